//! A pretrained checkpoint as a model: its tensors under the canonical names
//! ([`crate::weights::checkpoints`]) and the sizes of the video LMM they imply.

use crate::models::lmm::LmmConfig;
use crate::models::t5::T5Config;
use crate::models::Preset;
use crate::weights::checkpoints::{is_gcg_release, is_hf_snapshot, read_json, GcgRelease, Source};
use crate::weights::hub;
use crate::weights::SafetensorsSource;
use anyhow::{anyhow, Context, Result};
use std::path::Path;
use std::sync::Arc;

/// An HF InstructBLIP snapshot: its tensors and its config.
pub fn open_hf_snapshot(dir: &Path) -> Result<(Source, LmmConfig)> {
    let cfg_path = dir.join("config.json");
    let cfg =
        LmmConfig::from_hf_config(&read_json(&cfg_path)?).with_context(|| format!("reading the model config {}", cfg_path.display()))?;
    let src: Source = Arc::new(SafetensorsSource::open_dir(dir)?);
    Ok((src, cfg))
}

/// The T5 config of a GCG release's Flan-T5 snapshot.
pub fn release_t5_config(rel: &GcgRelease) -> Result<T5Config> {
    let p = rel.t5_dir.join("config.json");
    T5Config::from_hf_config(&read_json(&p)?).with_context(|| format!("reading the T5 config {}", p.display()))
}

/// A checkpoint location given on the command line: an HF snapshot directory, or a GCG release
/// directory (with the Flan-T5 snapshot in `flan-t5/` inside it unless given separately).
/// A GCG release directory carries no config: `preset` names the sizes of its ViT and Q-Former
/// (the T5 config comes from the Flan-T5 snapshot, with the official code's exact GELU).
pub fn open_any(dir: &Path, t5_dir: Option<&Path>, preset: Preset) -> Result<(Source, LmmConfig)> {
    if is_hf_snapshot(dir) {
        return open_hf_snapshot(dir);
    }
    if is_gcg_release(dir) {
        let t5 = t5_dir.map(Path::to_path_buf).unwrap_or_else(|| dir.join("flan-t5"));
        let rel = GcgRelease::new(dir, t5);
        let mut cfg = LmmConfig::preset(preset);
        cfg.t5 = release_t5_config(&rel)?.with_activation(crate::nn::Activation::Gelu);
        return Ok((rel.open()?, cfg));
    }
    if !dir.exists() {
        return Err(anyhow!("weights directory {} does not exist", dir.display()));
    }
    Err(anyhow!(
        "{} is neither an HF snapshot (config.json + model*.safetensors) nor a GCG release directory (qformer_t5.pth, ...)",
        dir.display()
    ))
}

/// [`open_any`] for a checkpoint given by path or by Hugging Face model id
/// (`Salesforce/instructblip-flan-t5-xl`, `WHB139426/GCG`; `t5` likewise, e.g. `google/flan-t5-xl`):
/// a name is resolved through the HF cache, downloading what is missing ([`hub::locate_checkpoint`];
/// `with_vit`: a GCG release's ViT trunk is needed too).
pub fn open_checkpoint(spec: &Path, t5: Option<&Path>, preset: Preset, with_vit: bool) -> Result<(Source, LmmConfig)> {
    let dirs = hub::locate_checkpoint(spec, t5, with_vit)?;
    open_any(&dirs.dir, dirs.t5.as_deref(), preset)
}
