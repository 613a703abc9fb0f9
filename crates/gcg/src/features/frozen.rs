//! The frozen networks that fill the store — the ViT, the CLIP branch's image head and its text
//! tower — from checkpoints or, for tests and benchmarks, from seeded random weights.

use crate::models::clip_branch::{load_gcg_clip_files, ClipConfig, ClipImageHead};
use crate::models::clip_text::ClipTextModel;
use crate::models::vit::{VisionModel, VitConfig};
use crate::models::Preset;
use crate::weights::{Loader, SafetensorsSource, TensorSource};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use std::path::Path;
use std::sync::Arc;

/// Sizes of the frozen networks: `tiny` (tests) or the real EVA ViT-g / EVA-CLIP-g.
pub fn preset(preset: Preset) -> (VitConfig, ClipConfig) {
    preset.frozen()
}

/// A ViT with seeded random weights.
pub fn random_vit(cfg: &VitConfig, dev: &Device, dtype: DType, seed: u64) -> Result<VisionModel> {
    VisionModel::load(&Loader::random(dev, dtype, seed).pp("vision_model"), cfg)
}

/// A CLIP image head with seeded random weights (seed + 1, so that it differs from the ViT's).
pub fn random_clip_image(cfg: &ClipConfig, dev: &Device, dtype: DType, seed: u64) -> Result<ClipImageHead> {
    ClipImageHead::load(&Loader::random(dev, dtype, seed.wrapping_add(1)), &cfg.image)
}

/// A CLIP text tower with seeded random weights (seed + 2).
pub fn random_clip_text(cfg: &ClipConfig, dev: &Device, dtype: DType, seed: u64) -> Result<ClipTextModel> {
    ClipTextModel::load(&Loader::random(dev, dtype, seed.wrapping_add(2)).pp("text"), &cfg.text)
}

/// The ViT of a checkpoint directory: an HF InstructBLIP/BLIP-2 snapshot (its config.json gives
/// the sizes) or a GCG release directory (`eva_vit_g.pth` + `eva_vit_post_layernorm.pth`; sizes
/// from `cfg`).
pub fn load_vit(dir: &Path, cfg: &VitConfig, dev: &Device, dtype: DType) -> Result<VisionModel> {
    let (src, cfg): (Arc<dyn TensorSource + Send + Sync>, VitConfig) = if dir.join("config.json").exists() {
        let path = dir.join("config.json");
        let v = crate::weights::checkpoints::read_json(&path)?;
        let vc = v
            .get("vision_config")
            .ok_or_else(|| anyhow!("{} has no vision_config", path.display()))?;
        let cfg = VitConfig::from_hf_config(vc).with_context(|| format!("reading the vision config of {}", path.display()))?;
        (Arc::new(SafetensorsSource::open_dir(dir)?), cfg)
    } else if dir.join("eva_vit_g.pth").exists() {
        (crate::weights::layouts::eva_vit_source(dir)?, cfg.clone())
    } else {
        bail!(
            "{} holds neither an HF snapshot (config.json + safetensors) nor the GCG release's eva_vit_g.pth",
            dir.display()
        );
    };
    let lb = Loader::from_source(src, dev, dtype);
    VisionModel::load(&lb.pp("vision_model"), &cfg).with_context(|| format!("loading the ViT from {}", dir.display()))
}

/// The CLIP image head from the GCG release's four `eva_clip_*.pth` files in `dir`.
pub fn load_clip_image(dir: &Path, cfg: &ClipConfig, dev: &Device, dtype: DType) -> Result<ClipImageHead> {
    let lb = Loader::from_source(load_gcg_clip_files(dir)?, dev, dtype);
    ClipImageHead::load(&lb, &cfg.image).with_context(|| format!("loading the CLIP image head from {}", dir.display()))
}

/// The CLIP text tower from the GCG release's `eva_clip_*.pth` files in `dir`.
pub fn load_clip_text(dir: &Path, cfg: &ClipConfig, dev: &Device, dtype: DType) -> Result<ClipTextModel> {
    let lb = Loader::from_source(load_gcg_clip_files(dir)?, dev, dtype);
    ClipTextModel::load(&lb.pp("text"), &cfg.text).with_context(|| format!("loading the CLIP text tower from {}", dir.display()))
}
