//! The two published ways to get InstructBLIP-FlanT5 weights, seen under one canonical naming
//! (`vision_model.*`, `qformer.*`, `query_tokens`, `language_projection.*`, `language_model.*`):
//!
//! * an HF snapshot directory of `Salesforce/instructblip-flan-t5-xl` (config.json, sharded
//!   `model-*.safetensors` + `model.safetensors.index.json`);
//! * the GCG release files (`eva_vit_g.pth`, `eva_vit_post_layernorm.pth`, `qformer_t5.pth`,
//!   `query_tokens_t5.pth`, `llm_proj_t5.pth`) plus a Flan-T5 safetensors snapshot.

use super::pth::PthSource;
use super::source::{MergedSource, RenamedSource, SafetensorsSource, TensorSource};
use crate::models::lmm::LmmConfig;
use crate::models::qformer::gcg_qformer_name;
use crate::models::t5::T5Config;
use crate::models::vit::VisionModel;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub type Source = Arc<dyn TensorSource + Send + Sync>;

/// Saved buffers that carry no weights (older checkpoints store them); never an error when unused.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// An HF InstructBLIP snapshot: its tensors and its config.
pub fn open_hf_snapshot(dir: &Path) -> Result<(Source, LmmConfig)> {
    let cfg_path = dir.join("config.json");
    let cfg =
        LmmConfig::from_hf_config(&read_json(&cfg_path)?).with_context(|| format!("reading the model config {}", cfg_path.display()))?;
    let src: Source = Arc::new(SafetensorsSource::open_dir(dir)?);
    Ok((src, cfg))
}

/// Where the GCG release files are.
#[derive(Debug, Clone)]
pub struct GcgRelease {
    /// The folder holding `qformer_t5.pth` & co. (the official code's `experiments/`).
    pub dir: PathBuf,
    /// A Flan-T5 snapshot (`google/flan-t5-xl`: config.json + safetensors).
    pub t5_dir: PathBuf,
}

impl GcgRelease {
    pub fn new(dir: impl Into<PathBuf>, t5_dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            t5_dir: t5_dir.into(),
        }
    }

    fn file(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(name);
        if !p.exists() {
            bail!("the GCG release file {} is missing", p.display());
        }
        Ok(p)
    }

    /// The T5 config of the Flan-T5 snapshot.
    pub fn t5_config(&self) -> Result<T5Config> {
        let p = self.t5_dir.join("config.json");
        T5Config::from_hf_config(&read_json(&p)?).with_context(|| format!("reading the T5 config {}", p.display()))
    }

    /// All files as one source under the canonical names. The ViT trunk (`eva_vit_g.pth`) is
    /// optional: without it the model works from cached features.
    pub fn open(&self) -> Result<Source> {
        let mut parts: Vec<Source> = Vec::new();
        if self.dir.join("eva_vit_g.pth").exists() {
            parts.push(VisionModel::gcg_source(&self.dir)?);
        } else {
            let ln = PthSource::open(self.file("eva_vit_post_layernorm.pth")?, None, "eva_vit_post_layernorm")?;
            parts.push(Arc::new(RenamedSource::prefixed(Arc::new(ln), "vision_model.post_layernorm.")?));
        }
        let q = PthSource::open(self.file("qformer_t5.pth")?, None, "qformer")?;
        parts.push(Arc::new(RenamedSource::new(Arc::new(q), gcg_qformer_name)?));
        let qt: Source = Arc::new(PthSource::open(self.file("query_tokens_t5.pth")?, None, "query_tokens")?);
        let qt_names = qt.names();
        if qt_names.len() != 1 {
            bail!(
                "{} should hold the single query-token tensor, found {} tensors ({})",
                self.dir.join("query_tokens_t5.pth").display(),
                qt_names.len(),
                qt_names.join(", ")
            );
        }
        parts.push(Arc::new(RenamedSource::new(qt, |_| Some("query_tokens".to_string()))?));
        let proj = PthSource::open(self.file("llm_proj_t5.pth")?, None, "llm_proj")?;
        parts.push(Arc::new(RenamedSource::prefixed(Arc::new(proj), "language_projection.")?));
        let t5 =
            SafetensorsSource::open_dir(&self.t5_dir).with_context(|| format!("opening the Flan-T5 snapshot {}", self.t5_dir.display()))?;
        parts.push(Arc::new(RenamedSource::prefixed(Arc::new(t5), "language_model.")?));
        Ok(Arc::new(MergedSource::new(parts)?))
    }
}

/// A checkpoint location given on the command line: an HF snapshot directory, or a GCG release
/// directory (with the Flan-T5 snapshot in `flan-t5/` inside it unless given separately).
/// A GCG release directory carries no config: `preset` names the sizes of its ViT and Q-Former
/// (the T5 config comes from the Flan-T5 snapshot, with the official code's exact GELU).
pub fn open_any(dir: &Path, t5_dir: Option<&Path>, preset: &str) -> Result<(Source, LmmConfig)> {
    if dir.join("config.json").exists() && (dir.join("model.safetensors.index.json").exists() || dir.join("model.safetensors").exists()) {
        return open_hf_snapshot(dir);
    }
    if dir.join("qformer_t5.pth").exists() {
        let t5 = t5_dir.map(Path::to_path_buf).unwrap_or_else(|| dir.join("flan-t5"));
        let rel = GcgRelease::new(dir, t5);
        let mut cfg = LmmConfig::preset(preset)?;
        cfg.t5 = rel.t5_config()?.with_activation(crate::nn::Activation::Gelu);
        return Ok((rel.open()?, cfg));
    }
    Err(anyhow!(
        "{} is neither an HF snapshot (config.json + model*.safetensors) nor a GCG release directory (qformer_t5.pth, ...)",
        dir.display()
    ))
}
