//! GCG's frozen CLIP branch (`models/eva_clip_branch_encoder.py`, `Clip_Branch_Encoder`): frame
//! embeddings from EVA-CLIP-g's last vision block applied to the cached, un-normalised ViT
//! features, and text embeddings from EVA-CLIP's text tower ([`ClipTextModel`]).
//!
//! ```text
//! features [T, 257, 1408] ─▶ x + attn(norm1(x)); x + mlp(norm2(x))   (qkv without bias, q_bias,
//!   v_bias, exact GELU)  ─▶ CLS ─▶ norm ─▶ head 1408→1024 ─▶ [T, 1024]
//! ```
//!
//! Only the CLS token leaves the block, so only its row is computed past the keys and values
//! (one query instead of 257, no MLP for the patch tokens) — the same numbers as the full block.
//!
//! Names: the image side under `last_vision_block.` (`norm1`, `attn.{qkv.weight, q_bias, v_bias,
//! proj}`, `norm2`, `mlp.{fc1, fc2}`), `norm.`, `head.`; the text tower under `text.`. GCG ships
//! these as four `.pth` files; [`load_gcg_clip_files`] exposes them under those prefixes.

use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::vit::PackedSelfAttention;
use crate::nn::{init::Init, Activation, LayerNorm, Linear};
use crate::weights::{pth::PthSource, Loader, MergedSource, RenamedSource, TensorSource};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Sizes of the image head (EVA-CLIP's last vision block + norm + head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipImageConfig {
    /// ViT width (the cached features' last dimension).
    pub width: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    /// Output (CLIP embedding) width.
    pub embed_dim: usize,
    pub layer_norm_eps: f64,
}

/// The whole branch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub image: ClipImageConfig,
}

impl ClipConfig {
    /// EVA-CLIP-g as GCG uses it (`mlp_ratio` 4.3637 → int(1408·4.3637) = 6144; LayerNorm eps is
    /// PyTorch's default 1e-5 everywhere in the branch).
    pub fn eva_clip_g() -> Self {
        Self {
            text: ClipTextConfig::eva_clip_g(),
            image: ClipImageConfig {
                width: 1408,
                heads: 16,
                mlp_hidden: 6144,
                embed_dim: 1024,
                layer_norm_eps: 1e-5,
            },
        }
    }

    /// The test preset (the fixture driver's tiny `clip_config`).
    pub fn tiny() -> Self {
        Self {
            text: ClipTextConfig::tiny(),
            image: ClipImageConfig {
                width: 48,
                heads: 4,
                mlp_hidden: 128,
                embed_dim: 24,
                layer_norm_eps: 1e-5,
            },
        }
    }
}

/// EVA-CLIP's last vision block, then the CLS token's LayerNorm and projection head.
#[derive(Debug, Clone)]
pub struct ClipImageHead {
    pub norm1: LayerNorm,
    pub attn: PackedSelfAttention,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub norm: LayerNorm,
    pub head: Linear,
    pub config: ClipImageConfig,
}

impl ClipImageHead {
    /// `lb` at the branch root: reads `last_vision_block.*`, `norm.*`, `head.*`.
    pub fn load(lb: &Loader, cfg: &ClipImageConfig) -> Result<Self> {
        let (d, eps) = (cfg.width, cfg.layer_norm_eps);
        if d.checked_rem(cfg.heads) != Some(0) {
            bail!("CLIP image config: width {d} is not divisible by {} heads", cfg.heads);
        }
        let blk = lb.pp("last_vision_block");
        let a = blk.pp("attn");
        let qkv_weight = a.get((3 * d, d), "qkv.weight", Init::Normal { std: 0.02 })?;
        let q_bias = a.get(d, "q_bias", Init::Zeros)?;
        let v_bias = a.get(d, "v_bias", Init::Zeros)?;
        let proj = Linear::load(&a.pp("proj"), d, d, true)?;
        Ok(Self {
            norm1: LayerNorm::load(&blk.pp("norm1"), d, eps)?,
            attn: PackedSelfAttention::new_qv(qkv_weight, q_bias, v_bias, proj, cfg.heads)?,
            norm2: LayerNorm::load(&blk.pp("norm2"), d, eps)?,
            fc1: Linear::load(&blk.pp("mlp.fc1"), d, cfg.mlp_hidden, true)?,
            fc2: Linear::load(&blk.pp("mlp.fc2"), cfg.mlp_hidden, d, true)?,
            norm: LayerNorm::load(&lb.pp("norm"), d, eps)?,
            head: Linear::load(&lb.pp("head"), d, cfg.embed_dim, true)?,
            config: cfg.clone(),
        })
    }

    /// Un-normalised ViT features [T, N, D] (CLS first) → CLIP frame embeddings [T, E].
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (_, n, d) = features.dims3()?;
        if d != self.config.width || n == 0 {
            bail!(
                "CLIP image head: features of shape {:?}, expected [T, N, {}]",
                features.dims(),
                self.config.width
            );
        }
        let x = features.to_dtype(self.norm1.weight.dtype())?;
        let cls = (x.narrow(1, 0, 1)? + self.attn.forward_first_query(&self.norm1.forward(&x)?)?)?; // [T, 1, D]
        let h = self
            .fc2
            .forward(&Activation::Gelu.forward(&self.fc1.forward(&self.norm2.forward(&cls)?)?)?)?;
        let cls = (cls + h)?.squeeze(1)?; // [T, D]
        self.head.forward(&self.norm.forward(&cls)?)
    }
}

/// Text and image towers of the CLIP branch.
#[derive(Debug, Clone)]
pub struct ClipBranch {
    pub text: ClipTextModel,
    pub image: ClipImageHead,
}

impl ClipBranch {
    /// `lb` at the branch root: the image head's names and `text.*`.
    pub fn load(lb: &Loader, cfg: &ClipConfig) -> Result<Self> {
        Ok(Self {
            text: ClipTextModel::load(&lb.pp("text"), &cfg.text)?,
            image: ClipImageHead::load(lb, &cfg.image)?,
        })
    }

    /// Load GCG's four release files from `dir` (see [`load_gcg_clip_files`]), checking that every
    /// tensor in them is used.
    pub fn load_gcg_dir(dir: &Path, cfg: &ClipConfig, dev: &Device, dtype: DType) -> Result<Self> {
        let lb = Loader::from_source(load_gcg_clip_files(dir)?, dev, dtype);
        let branch = Self::load(&lb, cfg).with_context(|| format!("loading the CLIP branch from {}", dir.display()))?;
        lb.finish()?;
        Ok(branch)
    }

    /// Un-normalised ViT features [T, N, D] → [T, E].
    pub fn encode_image(&self, features: &Tensor) -> Result<Tensor> {
        self.image.forward(features)
    }

    /// CLIP token ids [B, L] → [B, E].
    pub fn encode_text(&self, ids: &Tensor) -> Result<Tensor> {
        self.text.forward(ids)
    }
}

/// GCG's CLIP branch files in `dir`, seen under the names [`ClipBranch::load`] reads:
/// `eva_clip_last_vision_block.pth` → `last_vision_block.*`, `eva_clip_last_vision_norm.pth` →
/// `norm.*`, `eva_clip_last_vision_head.pth` → `head.*`, `eva_clip_text_model.pth` → `text.*`.
pub fn load_gcg_clip_files(dir: &Path) -> Result<Arc<dyn TensorSource + Send + Sync>> {
    let files = [
        ("eva_clip_last_vision_block.pth", "last_vision_block."),
        ("eva_clip_last_vision_norm.pth", "norm."),
        ("eva_clip_last_vision_head.pth", "head."),
        ("eva_clip_text_model.pth", "text."),
    ];
    let mut parts: Vec<Arc<dyn TensorSource + Send + Sync>> = Vec::new();
    for (file, prefix) in files {
        let path = dir.join(file);
        if !path.exists() {
            bail!(
                "GCG CLIP branch file {} does not exist (expected the four eva_clip_*.pth files of the GCG release in {})",
                path.display(),
                dir.display()
            );
        }
        let src = Arc::new(PthSource::open(&path, None, file.trim_end_matches(".pth"))?);
        parts.push(Arc::new(RenamedSource::prefixed(src, prefix)?));
    }
    Ok(Arc::new(MergedSource::new(parts)?))
}
