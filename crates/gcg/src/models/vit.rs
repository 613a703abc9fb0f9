//! The frozen image encoder: BLIP-2's EVA ViT-g/14, as HF `InstructBlipVisionModel` and GCG's
//! `models/eva_vit.py`.
//!
//! ```text
//! pixels [B, 3, 224, 224] ─ conv 14×14 / 14 ─▶ 16×16 patches ─▶ [CLS; patches] + positions  [B, 257, 1408]
//!   ─▶ 39 × pre-LN block: x + attn(LN(x)); x + mlp(LN(x))   (fused qkv, bias [q; 0; v], exact GELU)
//!   ─▶ hidden_wo_norm (what the feature store keeps) ─ post_layernorm ─▶ hidden
//! ```
//!
//! Tensor names are those of the published HF checkpoint under `vision_model.`:
//! `embeddings.{class_embedding, patch_embedding.{weight,bias}, position_embedding}`,
//! `encoder.layers.{i}.{layer_norm1, self_attn.{qkv, projection}, layer_norm2, mlp.{fc1, fc2}}`,
//! `post_layernorm`. The qkv bias is read as one tensor `self_attn.qkv.bias` [3D] (HF's and GCG's
//! `eva_vit_g.pth` layout, whose k third is zero) or as `self_attn.q_bias` + `self_attn.v_bias`
//! [D] each (the original EVA/LAVIS layout). [`crate::weights::layouts::eva_vit_source`] exposes GCG's release files
//! (`eva_vit_g.pth`, `eva_vit_post_layernorm.pth`) under these names.
//!
//! [`PackedSelfAttention`] (self-attention with one packed q/k/v projection) is shared with the
//! EVA-CLIP towers (`clip_text`, `clip_branch`).

use crate::nn::linear::PackSlot;
use crate::nn::{init::Init, merge_heads, scaled_dot_product_attention, Activation, Epilogue, LayerNorm, Linear};
use crate::weights::checkpoints::hf_section;
use crate::weights::Loader;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

/// Sizes of the vision transformer (HF `InstructBlipVisionConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    pub hidden_act: Activation,
}

/// HF's `InstructBlipVisionConfig` as `config.json` writes it (the fields read here).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HfVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: HfSide,
    pub patch_size: HfSide,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    pub hidden_act: String,
}

/// An image or patch side: one integer or a square `[n, n]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum HfSide {
    One(usize),
    Pair(Vec<usize>),
}

impl Default for HfVisionConfig {
    /// HF's defaults: EVA ViT-g/14.
    fn default() -> Self {
        let c = VitConfig::eva_vit_g();
        Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_channels: c.num_channels,
            image_size: HfSide::One(c.image_size),
            patch_size: HfSide::One(c.patch_size),
            layer_norm_eps: c.layer_norm_eps,
            qkv_bias: c.qkv_bias,
            hidden_act: "gelu".into(),
        }
    }
}

impl HfSide {
    fn side(&self, name: &str) -> Result<usize> {
        match self {
            Self::One(n) => Ok(*n),
            Self::Pair(a) => match a.as_slice() {
                [h, w] if h == w => Ok(*h),
                _ => bail!("vision_config.{name} must be one integer or a square [n, n], got {a:?}"),
            },
        }
    }
}

impl TryFrom<HfVisionConfig> for VitConfig {
    type Error = anyhow::Error;
    fn try_from(h: HfVisionConfig) -> Result<Self> {
        let c = Self {
            hidden_size: h.hidden_size,
            intermediate_size: h.intermediate_size,
            num_hidden_layers: h.num_hidden_layers,
            num_attention_heads: h.num_attention_heads,
            image_size: h.image_size.side("image_size")?,
            patch_size: h.patch_size.side("patch_size")?,
            num_channels: h.num_channels,
            layer_norm_eps: h.layer_norm_eps,
            qkv_bias: h.qkv_bias,
            hidden_act: Activation::from_hf(&h.hidden_act).context("vision_config.hidden_act")?,
        };
        c.validate()?;
        Ok(c)
    }
}

impl VitConfig {
    /// EVA ViT-g/14 of BLIP-2 / InstructBLIP (also HF's defaults for a missing field).
    pub fn eva_vit_g() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            qkv_bias: true,
            hidden_act: Activation::Gelu,
        }
    }

    /// The test preset (equal to the fixture driver's `tiny` vision config).
    pub fn tiny() -> Self {
        Self {
            hidden_size: 48,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 42,
            patch_size: 14,
            ..Self::eva_vit_g()
        }
    }

    /// Read an HF `vision_config` object (or a whole InstructBLIP config holding one). Fields the
    /// file omits take HF's defaults, which are the EVA ViT-g values.
    pub fn from_hf_config(v: &Value) -> Result<Self> {
        let v = v.get("vision_config").unwrap_or(v);
        Self::try_from(hf_section::<HfVisionConfig>(v, "vision_config")?)
    }

    pub fn validate(&self) -> Result<()> {
        if self.hidden_size.checked_rem(self.num_attention_heads) != Some(0) {
            bail!(
                "vision config: hidden_size {} is not divisible by {} heads",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.image_size.checked_rem(self.patch_size) != Some(0) {
            bail!(
                "vision config: image_size {} is not a multiple of patch_size {}",
                self.image_size,
                self.patch_size
            );
        }
        Ok(())
    }

    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: patches + CLS (257 for ViT-g/14 at 224).
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Floating-point operations of one image's forward pass, counted as PyTorch's
    /// `FlopCounterMode` counts them: 2·m·n·k for every product (the patch convolution, each
    /// block's q/k/v, output, fc1 and fc2 projections, its attention scores and weighted sum);
    /// biases, norms and activations are not counted. 520.7 GFLOP for EVA ViT-g/14 at 224.
    /// Benchmarks divide it by time for GFLOP/s.
    pub fn flops_per_frame(&self) -> u64 {
        let (d, i, n) = (self.hidden_size as u64, self.intermediate_size as u64, self.num_positions() as u64);
        let patches = n - 1;
        let patch_in = (self.num_channels * self.patch_size * self.patch_size) as u64;
        let conv = 2 * patches * patch_in * d;
        let projections = 2 * n * d * (3 * d + d + i + i);
        let attention = 2 * (2 * n * n * d); // q·kᵀ over all heads, then the weights times v
        conv + self.num_hidden_layers as u64 * (projections + attention)
    }
}

/// Self-attention whose q, k, v come from one packed projection `[q; k; v]` (weight [3D, D]) and
/// whose heads are contiguous slices of width D/H — the layout of BLIP-2's ViT, EVA's blocks and
/// `nn.MultiheadAttention`.
///
/// The weights are kept exactly as loaded and everything derived from them (the packed bias of
/// the q/v-bias layout, the 1/sqrt(head_dim) scale) is computed in the forward pass, so the same
/// module trains correctly when its tensors are variables (an update of a variable is seen by
/// views of it, not by tensors computed from it at load time).
#[derive(Debug, Clone)]
pub struct PackedSelfAttention {
    weight: Tensor, // [3D, D]
    bias: Option<PackedBias>,
    pub out: Linear, // [D, D]
    pub heads: usize,
    /// The packed copy of the whole q/k/v weight ([`PackSlot`]): its projection is a layer made
    /// on every call, so the copy is kept here (shared by clones, which hold the same weight).
    qkv_pack: Arc<PackSlot>,
}

#[derive(Debug, Clone)]
enum PackedBias {
    /// One [3D] bias (HF / GCG files, `nn.MultiheadAttention`).
    Full(Tensor),
    /// EVA's separate q and v biases (no k bias).
    QV { q: Tensor, v: Tensor },
}

impl PackedSelfAttention {
    /// `qkv_weight` [3D, D], `qkv_bias` [3D] (None: no bias), `out` the output projection.
    pub fn new(qkv_weight: Tensor, qkv_bias: Option<Tensor>, out: Linear, heads: usize) -> Result<Self> {
        Self::check(&qkv_weight, heads)?;
        Ok(Self {
            weight: qkv_weight,
            bias: qkv_bias.map(PackedBias::Full),
            out,
            heads,
            qkv_pack: Arc::default(),
        })
    }

    /// The EVA layout: separate q and v biases [D], the k bias zero.
    pub fn new_qv(qkv_weight: Tensor, q_bias: Tensor, v_bias: Tensor, out: Linear, heads: usize) -> Result<Self> {
        Self::check(&qkv_weight, heads)?;
        Ok(Self {
            weight: qkv_weight,
            bias: Some(PackedBias::QV { q: q_bias, v: v_bias }),
            out,
            heads,
            qkv_pack: Arc::default(),
        })
    }

    fn check(w: &Tensor, heads: usize) -> Result<()> {
        let (three_d, d) = w.dims2()?;
        if three_d != 3 * d || d.checked_rem(heads) != Some(0) {
            bail!(
                "packed attention: qkv weight {:?} does not fit {heads} heads of a width-{d} model",
                w.dims()
            );
        }
        Ok(())
    }

    fn width(&self) -> usize {
        self.out.out_dim()
    }

    fn scale(&self) -> f64 {
        1.0 / ((self.width() / self.heads) as f64).sqrt()
    }

    /// Rows `start..start+len` of the packed bias.
    fn bias_rows(&self, start: usize, len: usize) -> Result<Option<Tensor>> {
        let d = self.width();
        Ok(match &self.bias {
            None => None,
            Some(PackedBias::Full(b)) => Some(b.narrow(0, start, len)?),
            Some(PackedBias::QV { q, v }) => {
                let mut parts = Vec::new();
                for (i, part) in [Some(q), None, Some(v)].into_iter().enumerate() {
                    let (lo, hi) = (i * d, (i + 1) * d);
                    let (a, b) = (start.max(lo), (start + len).min(hi));
                    if a < b {
                        parts.push(match part {
                            Some(t) => t.narrow(0, a - lo, b - a)?,
                            None => Tensor::zeros(b - a, q.dtype(), q.device())?,
                        });
                    }
                }
                Some(Tensor::cat(&parts, 0)?)
            }
        })
    }

    fn projection(&self, start: usize, len: usize) -> Result<Linear> {
        let lin = Linear::new(self.weight.narrow(0, start, len)?, self.bias_rows(start, len)?);
        // The whole weight (`narrow` gives the same tensor) keeps its packed copy across calls;
        // a part of it is a new tensor on every call, read as it is.
        Ok(if start == 0 && len == self.weight.dim(0)? {
            lin.with_pack_slot(&self.qkv_pack)
        } else {
            lin
        })
    }

    /// Bytes of the packed copy of the q/k/v weight (0 when none is held).
    pub fn qkv_packed_bytes(&self) -> usize {
        self.qkv_pack.bytes()
    }

    /// Scaled dot-product attention over heads, q [B, H, Lq, hd], k/v [B, H, Lk, hd]
    /// → merged and projected [B, Lq, D].
    /// With `residual`, it is added to the projection's output (in the same fused call).
    /// The result is in `out` (the residual's dtype when there is one).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, out: DType) -> Result<Tensor> {
        let heads = scaled_dot_product_attention(q, k, v, Some(self.scale()), bias, None)?; // [B, H, Lq, hd]
        let epilogue = Epilogue {
            residual,
            out: Some(residual.map_or(out, |r| r.dtype())),
            ..Default::default()
        };
        self.out.forward_fused(&merge_heads(&heads)?, epilogue) // [B, Lq, D]
    }

    /// x: [B, L, D]; `bias` broadcastable to [B, H, L, L] (e.g. a causal mask) → [B, L, D].
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.forward_residual(x, bias, None)
    }

    /// `residual + attention(x)` (the residual added inside the output projection's call).
    pub fn forward_residual(&self, x: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        // q, k, v in the weights' dtype (bf16 in the CPU's mixed precision, as autocast), as
        // strided views of one projection: the attention reads its heads in place.
        let qkv = self
            .projection(0, 3 * d)?
            .forward_fused(
                x,
                Epilogue {
                    out: Some(self.weight.dtype()),
                    ..Default::default()
                },
            )? // [B, L, 3D]
            .reshape((b, l, 3, self.heads, d / self.heads))?
            .permute((2, 0, 3, 1, 4))?; // [3, B, H, L, hd]

        // Views, not copies (`get` would copy a non-contiguous tensor: 3% of the ViT).
        let part = |i: usize| qkv.narrow(0, i, 1)?.squeeze(0);
        self.attend(&part(0)?, &part(1)?, &part(2)?, bias, residual, x.dtype())
    }

    /// Attention output for the first token only (the CLS query over all keys): [B, L, D] → [B, 1, D].
    pub fn forward_first_query(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.heads;
        let q = self
            .projection(0, d)?
            .forward(&x.narrow(1, 0, 1)?)?
            .reshape((b, 1, self.heads, hd))?
            .transpose(1, 2)?
            .contiguous()?; // [B, H, 1, hd]
        let kv = self
            .projection(d, 2 * d)?
            .forward(x)? // [B, L, 2D]
            .reshape((b, l, 2, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?; // [2, B, H, L, hd]
        self.attend(&q, &kv.get(0)?, &kv.get(1)?, None, None, x.dtype())
    }
}

/// Patch, class and position embeddings.
#[derive(Debug, Clone)]
pub struct VitEmbeddings {
    patch_weight: Tensor,           // [D, C·p·p] (the conv kernel flattened)
    patch_bias: Tensor,             // [D]
    pub class_embedding: Tensor,    // [1, 1, D]
    pub position_embedding: Tensor, // [1, N, D]
    patch_size: usize,
    image_size: usize,
    channels: usize,
}

impl VitEmbeddings {
    pub fn load(lb: &Loader, cfg: &VitConfig) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let std = Init::TruncNormal { std: 0.02 };
        let w = lb.get((d, c, p, p), "patch_embedding.weight", Init::Normal { std: 0.02 })?;
        Ok(Self {
            patch_weight: w.reshape((d, c * p * p))?,
            patch_bias: lb.get(d, "patch_embedding.bias", Init::Zeros)?,
            class_embedding: lb.get((1, 1, d), "class_embedding", std)?,
            position_embedding: lb.get((1, cfg.num_positions(), d), "position_embedding", std)?,
            patch_size: p,
            image_size: cfg.image_size,
            channels: c,
        })
    }

    /// pixel_values [B, C, S, S] → [B, 1 + (S/p)², D].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        if c != self.channels || h != self.image_size || w != self.image_size {
            bail!(
                "vision model: pixel_values have shape {:?}, expected [B, {}, {}, {}] (images must be pre-processed to the model's size)",
                pixel_values.dims(),
                self.channels,
                self.image_size,
                self.image_size
            );
        }
        let (p, g) = (self.patch_size, self.image_size / self.patch_size);
        let d = self.patch_weight.dim(0)?;
        // A stride-p, p×p convolution is a matmul over non-overlapping patches, each flattened in
        // the kernel's (channel, row, column) order.
        let patches = pixel_values
            .to_dtype(self.patch_weight.dtype())?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))? // [B, gy, gx, C, p, p]
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let patch_embeds = patches
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?
            .reshape((b, g * g, d))?; // [B, g², D]
        let cls = self.class_embedding.broadcast_as((b, 1, d))?;
        Ok(Tensor::cat(&[&cls, &patch_embeds], 1)?.broadcast_add(&self.position_embedding)?)
    }
}

/// One pre-LN encoder layer.
#[derive(Debug, Clone)]
pub struct VitLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: PackedSelfAttention,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Activation,
}

impl VitLayer {
    pub fn load(lb: &Loader, cfg: &VitConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = lb.pp("self_attn");
        let qkv_weight = attn.get((3 * d, d), "qkv.weight", Init::Normal { std: 0.02 })?;
        let projection = Linear::load(&attn.pp("projection"), d, d, true)?;
        let heads = cfg.num_attention_heads;
        let self_attn = if attn.contains("qkv.bias") || (cfg.qkv_bias && !attn.contains("q_bias") && !attn.contains("v_bias")) {
            // HF / GCG layout (and the layout a random model is built with).
            if !cfg.qkv_bias {
                bail!(
                    "{} holds a qkv bias, but the config says qkv_bias = false",
                    attn.full_name("qkv.bias")
                );
            }
            PackedSelfAttention::new(qkv_weight, Some(attn.get(3 * d, "qkv.bias", Init::Zeros)?), projection, heads)?
        } else if cfg.qkv_bias {
            // EVA / LAVIS layout: separate q and v biases, no k bias.
            let q = attn.get(d, "q_bias", Init::Zeros)?;
            let v = attn.get(d, "v_bias", Init::Zeros)?;
            PackedSelfAttention::new_qv(qkv_weight, q, v, projection, heads)?
        } else {
            PackedSelfAttention::new(qkv_weight, None, projection, heads)?
        };
        Ok(Self {
            layer_norm1: LayerNorm::load(&lb.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            self_attn,
            layer_norm2: LayerNorm::load(&lb.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
            fc1: Linear::load(&lb.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::load(&lb.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
            act: cfg.hidden_act,
        })
    }

    /// x: [B, N, D] → [B, N, D]. The bias, activation and residual of each product are fused
    /// into it where oneDNN applies ([`Linear::forward_fused`]); the hidden activation is kept
    /// in the dtype `fc2` multiplies in.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The norms write the dtype the products after them multiply in (bf16 in mixed
        // precision), so the products need no cast of their input.
        let normed = self.layer_norm1.forward_as(x, self.self_attn.weight.dtype())?;
        let x = self.self_attn.forward_residual(&normed, None, Some(x))?;
        let h = self.fc1.forward_fused(
            &self.layer_norm2.forward_as(&x, self.fc1.weight.dtype())?,
            Epilogue {
                act: Some(self.act),
                out: Some(self.fc2.weight.dtype()),
                ..Default::default()
            },
        )?;
        let out = Epilogue {
            residual: Some(&x),
            out: Some(x.dtype()),
            ..Default::default()
        };
        self.fc2.forward_fused(&h, out)
    }
}

/// The vision model's outputs.
#[derive(Debug, Clone)]
pub struct VitOutput {
    /// Last hidden state before the post-LayerNorm — GCG's cached "features without norm". [B, N, D]
    pub hidden_wo_norm: Tensor,
    /// After the post-LayerNorm (HF's `last_hidden_state`). [B, N, D]
    pub hidden: Tensor,
}

/// EVA ViT-g/14 with its post-LayerNorm.
#[derive(Debug, Clone)]
pub struct VisionModel {
    pub embeddings: VitEmbeddings,
    pub layers: Vec<VitLayer>,
    pub post_layernorm: LayerNorm,
    pub config: VitConfig,
}

impl VisionModel {
    /// Load from a loader positioned at the vision model's names (e.g. `lb.pp("vision_model")`
    /// for an HF InstructBLIP snapshot).
    pub fn load(lb: &Loader, cfg: &VitConfig) -> Result<Self> {
        cfg.validate()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VitLayer::load(&lb.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: VitEmbeddings::load(&lb.pp("embeddings"), cfg)?,
            layers,
            post_layernorm: LayerNorm::load(&lb.pp("post_layernorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            config: cfg.clone(),
        })
    }

    /// The un-normalised last hidden state: pixel_values [B, C, S, S] → [B, N, D].
    ///
    /// A bf16 model on the CPU with nothing needing a gradient runs in mixed precision when gcg
    /// has oneDNN: the residual stream, norms, activations, attention scores and softmax in
    /// f32, the products (attention's included: q, k, v and the probabilities in bf16) in bf16
    /// with f32 accumulation, the output rounded to bf16 — as PyTorch's CPU autocast runs a
    /// model, and closer to the f32 model than all-bf16 arithmetic.
    pub fn forward_wo_norm(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut x = self.embeddings.forward(pixel_values)?;
        let dt = x.dtype();
        let mixed = crate::nn::linear::ONEDNN && dt == DType::BF16 && crate::nn::cpu_half_no_grad(&[&x]);
        if mixed {
            x = crate::nn::cast::cast(&x, DType::F32)?;
        }
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        if mixed {
            x = crate::nn::cast::cast(&x, dt)?;
        }
        Ok(x)
    }

    /// pixel_values [B, C, S, S] → both last hidden states.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<VitOutput> {
        let hidden_wo_norm = self.forward_wo_norm(pixel_values)?;
        let hidden = self.post_layernorm(&hidden_wo_norm)?;
        Ok(VitOutput { hidden_wo_norm, hidden })
    }

    /// The post-LayerNorm alone, for cached un-normalised features [..., D].
    pub fn post_layernorm(&self, x: &Tensor) -> Result<Tensor> {
        self.post_layernorm.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::MapSource;
    use candle_core::{DType, Device};

    /// A ViT wide enough for the fused oneDNN path (both sides of every product ≥ 256).
    fn wide_config() -> VitConfig {
        VitConfig {
            hidden_size: 256,
            intermediate_size: 512,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 28,
            patch_size: 14,
            ..VitConfig::eva_vit_g()
        }
    }

    /// The fused layer (bias, GELU and residuals inside the products) against the plain ops
    /// written out here, in f32: equal to float rounding.
    #[test]
    fn fused_layer_equals_the_plain_ops() -> Result<()> {
        let cfg = wide_config();
        let dev = Device::Cpu;
        let lb = Loader::random(&dev, DType::F32, 3);
        let vit = VisionModel::load(&lb.pp("vision_model"), &cfg)?;
        let mut rng = crate::rng::SeededRng::new(4);
        let x = Tensor::from_vec(rng.normal_vec(2 * 5 * 256, 0.0, 1.0), (2, 5, 256), &dev)?;
        let layer = &vit.layers[0];
        let before = crate::nn::linear::onednn_calls();
        let got = layer.forward(&x)?;
        assert_eq!(
            crate::nn::linear::onednn_calls() - before,
            if crate::nn::linear::ONEDNN { 4 } else { 0 },
            "qkv, projection, fc1, fc2"
        );
        let h = layer.layer_norm1.forward(&x)?;
        let x1 = (&x + plain_attention(&layer.self_attn, &h)?)?;
        let h = layer.layer_norm2.forward(&x1)?;
        let lin = |l: &Linear, t: &Tensor| -> Result<Tensor> {
            let (o, i) = l.weight.dims2()?;
            Ok(t.matmul(&l.weight.t()?.unsqueeze(0)?.broadcast_as((2, i, o))?)?
                .broadcast_add(l.bias.as_ref().unwrap())?)
        };
        let want = (&x1 + lin(&layer.fc2, &lin(&layer.fc1, &h)?.gelu_erf()?)?)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        assert!(err < 1e-5, "fused layer vs plain ops: {err}");
        Ok(())
    }

    /// The wide config's attention (D = 256, 4 heads) written out in plain ops: h [B, L, 256].
    fn plain_attention(a: &PackedSelfAttention, h: &Tensor) -> Result<Tensor> {
        let (b, l, _) = h.dims3()?;
        let qkv = h.matmul(&a.weight.t()?.unsqueeze(0)?.broadcast_as((b, 256, 768))?)?;
        let bias = a.bias_rows(0, 768)?.expect("a qkv bias");
        let qkv = qkv
            .broadcast_add(&bias)?
            .reshape((b, l, 3, 4, 64))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let att = scaled_dot_product_attention(&qkv.get(0)?, &qkv.get(1)?, &qkv.get(2)?, Some(0.125), None, None)?;
        let proj = &a.out;
        Ok(merge_heads(&att)?
            .matmul(&proj.weight.t()?.unsqueeze(0)?.broadcast_as((b, 256, 256))?)?
            .broadcast_add(proj.bias.as_ref().unwrap())?)
    }

    /// The q/k/v projection is a layer made on every call, yet its frozen weight keeps one packed
    /// copy across calls (made on the second, as any layer's): on an AVX-512 CPU with oneDNN a
    /// copy must exist after four calls, clones share it, and every call's output equals the
    /// plain ops.
    #[test]
    fn the_qkv_weight_keeps_its_packed_copy_across_calls() -> Result<()> {
        let dev = Device::Cpu;
        let lb = Loader::random(&dev, DType::F32, 5);
        let vit = VisionModel::load(&lb.pp("vision_model"), &wide_config())?;
        let a = &vit.layers[0].self_attn;
        let mut rng = crate::rng::SeededRng::new(6);
        let x = Tensor::from_vec(rng.normal_vec(2 * 60 * 256, 0.0, 1.0), (2, 60, 256), &dev)?;
        let want = plain_attention(a, &x)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        for call in 0..4 {
            let got = a.forward(&x, None)?;
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            assert!(err < 1e-5, "call {call}: attention vs plain ops: {err}");
            if call == 0 {
                assert_eq!(a.qkv_packed_bytes(), 0, "packed on the first call");
            }
        }
        if crate::nn::linear::ONEDNN && crate::nn::isa::avx512() && crate::nn::linear::pack_weights_enabled() {
            assert!(a.qkv_packed_bytes() >= 768 * 256 * 4, "no packed q/k/v copy after four calls");
        }
        assert_eq!(a.clone().qkv_packed_bytes(), a.qkv_packed_bytes(), "a clone holds the same copy");
        Ok(())
    }

    /// A bf16 ViT on the CPU (mixed precision with oneDNN, all-bf16 without) stays within bf16
    /// rounding of the same weights in f32.
    #[test]
    fn bf16_vit_tracks_the_f32_model() -> Result<()> {
        let cfg = wide_config();
        let dev = Device::Cpu;
        let run = |dt: DType| -> Result<Tensor> {
            let vit = VisionModel::load(&Loader::random(&dev, dt, 3).pp("vision_model"), &cfg)?;
            let mut rng = crate::rng::SeededRng::new(6);
            let px = Tensor::from_vec(rng.normal_vec(2 * 3 * 28 * 28, 0.0, 1.0), (2, 3, 28, 28), &dev)?;
            Ok(vit.forward_wo_norm(&px.to_dtype(dt)?)?.to_dtype(DType::F32)?)
        };
        let (f, b) = (run(DType::F32)?, run(DType::BF16)?);
        let scale = f.abs()?.max_all()?.to_scalar::<f32>()?;
        let err = (b - &f)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        assert!(err < 2e-2, "bf16 vs f32 ViT: {err}");
        Ok(())
    }

    /// A tiny checkpoint under the canonical names, built from a seeded random model.
    fn tiny_checkpoint() -> MapSource {
        let cfg = VitConfig::tiny();
        let d = cfg.hidden_size;
        let dev = Device::Cpu;
        let mut m = MapSource::new(Vec::new(), "test checkpoint");
        let mut rng = crate::rng::SeededRng::new(0);
        let mut put = |name: &str, shape: &[usize]| {
            let t = Init::Normal { std: 0.1 }.make(&shape.into(), DType::F32, &dev, &mut rng).unwrap();
            m.insert(format!("vision_model.{name}"), t);
        };
        put("embeddings.class_embedding", &[1, 1, d]);
        put("embeddings.patch_embedding.weight", &[d, 3, 14, 14]);
        put("embeddings.patch_embedding.bias", &[d]);
        put("embeddings.position_embedding", &[1, 10, d]);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layers.{i}");
            put(&format!("{p}.self_attn.qkv.weight"), &[3 * d, d]);
            put(&format!("{p}.self_attn.qkv.bias"), &[3 * d]);
            put(&format!("{p}.self_attn.projection.weight"), &[d, d]);
            put(&format!("{p}.self_attn.projection.bias"), &[d]);
            for ln in ["layer_norm1", "layer_norm2"] {
                put(&format!("{p}.{ln}.weight"), &[d]);
                put(&format!("{p}.{ln}.bias"), &[d]);
            }
            put(&format!("{p}.mlp.fc1.weight"), &[cfg.intermediate_size, d]);
            put(&format!("{p}.mlp.fc1.bias"), &[cfg.intermediate_size]);
            put(&format!("{p}.mlp.fc2.weight"), &[d, cfg.intermediate_size]);
            put(&format!("{p}.mlp.fc2.bias"), &[d]);
        }
        put("post_layernorm.weight", &[d]);
        put("post_layernorm.bias", &[d]);
        m
    }

    fn load(src: MapSource) -> Result<VisionModel> {
        let lb = Loader::from_source(std::sync::Arc::new(src), &Device::Cpu, DType::F32);
        let vm = VisionModel::load(&lb.pp("vision_model"), &VitConfig::tiny())?;
        lb.finish()?;
        Ok(vm)
    }

    #[test]
    fn complete_checkpoint_loads_and_runs() -> Result<()> {
        let vm = load(tiny_checkpoint())?;
        let px = Init::Normal { std: 1.0 }.make(&(2, 3, 42, 42).into(), DType::F32, &Device::Cpu, &mut crate::rng::SeededRng::new(1))?;
        let out = vm.forward(&px)?;
        assert_eq!(out.hidden_wo_norm.dims(), &[2, 10, 48]);
        assert_eq!(out.hidden.dims(), &[2, 10, 48]);
        Ok(())
    }

    #[test]
    fn misshaped_tensor_is_named_with_both_shapes() {
        let mut src = tiny_checkpoint();
        let bad = "vision_model.encoder.layers.1.mlp.fc1.weight";
        src.insert(bad, Tensor::zeros((130, 48), DType::F32, &Device::Cpu).unwrap());
        let err = format!("{:#}", load(src).unwrap_err());
        assert!(err.contains(bad), "error does not name the tensor: {err}");
        assert!(err.contains("[130, 48]"), "error does not give the stored shape: {err}");
        assert!(err.contains("[128, 48]"), "error does not give the expected shape: {err}");

        let mut src = tiny_checkpoint();
        let bad = "vision_model.encoder.layers.0.self_attn.qkv.bias";
        src.insert(bad, Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap());
        let err = format!("{:#}", load(src).unwrap_err());
        assert!(err.contains(bad) && err.contains("[48]") && err.contains("[144]"), "{err}");
    }

    #[test]
    fn wrong_image_size_is_an_error() -> Result<()> {
        let vm = load(tiny_checkpoint())?;
        let px = Tensor::zeros((1, 3, 56, 56), DType::F32, &Device::Cpu)?;
        let err = format!("{:#}", vm.forward(&px).unwrap_err());
        assert!(err.contains("[1, 3, 56, 56]") && err.contains("42"), "{err}");
        Ok(())
    }

    #[test]
    fn hf_config_fields_and_defaults() -> Result<()> {
        // A saved config keeps only the fields that differ from the defaults (EVA ViT-g's).
        let c = VitConfig::from_hf_config(&serde_json::json!({"vision_config": {"model_type": "instructblip_vision_model"}}))?;
        assert_eq!(c, VitConfig::eva_vit_g());
        let c = VitConfig::from_hf_config(&serde_json::json!({
            "hidden_size": 48, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": [42, 42], "patch_size": 14, "layer_norm_eps": 1e-6, "qkv_bias": true, "hidden_act": "gelu"
        }))?;
        assert_eq!(c, VitConfig::tiny());
        assert!(VitConfig::from_hf_config(&serde_json::json!({"hidden_size": 50})).is_err());
        assert!(VitConfig::from_hf_config(&serde_json::json!({"hidden_act": "swish"})).is_err());
        Ok(())
    }
}
