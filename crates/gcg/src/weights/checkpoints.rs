//! The two published ways to get InstructBLIP-FlanT5 weights, seen under one canonical naming
//! (`vision_model.*`, `qformer.*`, `query_tokens`, `language_projection.*`, `language_model.*`):
//!
//! * an HF snapshot directory of `Salesforce/instructblip-flan-t5-xl` (config.json, sharded
//!   `model-*.safetensors` + `model.safetensors.index.json`);
//! * the GCG release files (`eva_vit_g.pth`, `eva_vit_post_layernorm.pth`, `qformer_t5.pth`,
//!   `query_tokens_t5.pth`, `llm_proj_t5.pth`) plus a Flan-T5 safetensors snapshot.

use super::layouts::{eva_vit_source, gcg_qformer_name};
use super::pth::PthSource;
use super::source::{MergedSource, RenamedSource, SafetensorsSource, TensorSource};
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub type Source = Arc<dyn TensorSource + Send + Sync>;

/// Saved buffers that carry no weights (older checkpoints store them); never an error when unused.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
}

/// A JSON file (an HF `config.json`), parsed: the one reader of config files (their sections then
/// go through [`hf_section`]). Errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// One section of an HF config (a JSON object) as its serde struct `T`: a `#[derive(Deserialize)]`
/// struct with HF's field names and, through `#[serde(default)]`, HF's defaults for the fields
/// that transformers leaves out. A `null` value counts as absent (it takes the default); keys `T`
/// does not name are ignored. Errors start with `what` and name the offending field
/// (`qformer_config.hidden_size: invalid type: string "768", expected usize`).
pub fn hf_section<T: DeserializeOwned>(v: &serde_json::Value, what: &str) -> Result<T> {
    let serde_json::Value::Object(map) = v else {
        bail!("{what}: expected a JSON object, got {v}");
    };
    let set: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .filter(|(_, x)| !x.is_null())
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    match T::deserialize(&serde_json::Value::Object(set.clone())) {
        Ok(t) => Ok(t),
        Err(e) => {
            // serde's message names the type, not the key: find the key that fails on its own (a
            // "missing field" error names its field already and is not a key's fault).
            for (k, x) in &set {
                let one = serde_json::Value::Object(std::iter::once((k.clone(), x.clone())).collect());
                if let Err(e1) = T::deserialize(&one) {
                    let msg = e1.to_string();
                    if !msg.starts_with("missing field") {
                        bail!("{what}.{k}: {msg}");
                    }
                }
            }
            bail!("{what}: {e}")
        }
    }
}

/// Is `dir` an HF snapshot (config.json + model*.safetensors)?
pub fn is_hf_snapshot(dir: &Path) -> bool {
    dir.join("config.json").exists() && (dir.join("model.safetensors.index.json").exists() || dir.join("model.safetensors").exists())
}

/// Is `dir` a GCG release directory (`qformer_t5.pth` & co.)?
pub fn is_gcg_release(dir: &Path) -> bool {
    dir.join("qformer_t5.pth").exists()
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

    /// All files as one source under the canonical names. The ViT trunk (`eva_vit_g.pth`) is
    /// optional: without it the model works from cached features.
    pub fn open(&self) -> Result<Source> {
        let mut parts: Vec<Source> = Vec::new();
        if self.dir.join("eva_vit_g.pth").exists() {
            parts.push(eva_vit_source(&self.dir)?);
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
