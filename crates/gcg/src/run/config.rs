//! The run config: one TOML file, each table deserialized straight into the config of its concept
//! (defaults on the structs, unknown keys rejected with their name):
//!
//! ```toml
//! run_dir = "runs/gcg"
//! device = "cpu"                 # cpu | cuda
//! # dtype = "bf16"               # frozen networks: f32 | bf16 | f16 (default f32 on cpu, bf16 on cuda)
//! [weights]                      # WeightsConfig: where the parameters come from
//! pretrained = "instructblip-flan-t5-xl"
//! [model]                        # GcgConfig: the method
//! mode = "grounding"
//! [model.lmm]                    # LmmOptions
//! [model.grounding]              # GroundingConfig (T frames, K moments, the generator)
//! [model.grounding.topk]         # PerturbedTopK
//! [data]                         # DataConfig
//! [train]                        # TrainConfig
//! ```

use crate::data::Dataset;
use crate::model::GcgConfig;
use crate::models::Preset;
use crate::train::trainer::TrainConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a run's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// Open the device (CUDA device 0).
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda => Device::new_cuda(0).map_err(|e| {
                anyhow!("cannot open CUDA device 0 ({e}); build gcg with `--features cuda` on a machine with the CUDA toolkit")
            }),
        }
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            other => bail!("unknown device {other:?} (expected cpu or cuda)"),
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// The floating-point type of the frozen networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// The asked precision, or the device's default: f32 on a CPU, bf16 on a GPU.
    pub fn resolve(asked: Option<Precision>, dev: &Device) -> DType {
        match asked {
            Some(p) => p.dtype(),
            None if dev.is_cuda() => DType::BF16,
            None => DType::F32,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            other => bail!("unknown dtype {other:?} (expected f32, bf16 or f16)"),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

/// Where the model's parameters come from: the `[weights]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightsConfig {
    /// Network sizes when no checkpoint says them (random initialisation, GCG release files).
    pub preset: Preset,
    /// An HF InstructBLIP snapshot or a GCG release directory; none = random initialisation.
    pub pretrained: Option<PathBuf>,
    /// The Flan-T5 snapshot of a GCG release directory (default `<pretrained>/flan-t5`).
    pub t5: Option<PathBuf>,
    /// A directory with `tokenizer.json` (T5) and `qformer_tokenizer/tokenizer.json`
    /// (default: the pretrained directory).
    pub tokenizers: Option<PathBuf>,
    /// Trained weights to start from (a `weights.safetensors` of a checkpoint).
    pub init: Option<PathBuf>,
    /// Warm start: `init` may lack some trainable tensors (they keep their initialisation, e.g.
    /// a new grounding module) and hold others (ignored).
    pub init_partial: bool,
    /// Without `pretrained`: re-initialise the trainable matrices from N(0, 1/fan_in) instead of
    /// the checkpoints' initialisers (std 0.02), which are too small for tiny networks trained
    /// from scratch.
    pub fan_in_init: bool,
    /// Seed of the random initialisation.
    pub seed: u64,
}

impl Default for WeightsConfig {
    fn default() -> Self {
        Self {
            preset: Preset::InstructblipFlanT5Xl,
            pretrained: None,
            t5: None,
            tokenizers: None,
            init: None,
            init_partial: false,
            fan_in_init: false,
            seed: 0,
        }
    }
}

/// The questions and the feature store: the `[data]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub dataset: Dataset,
    /// The feature store (`gcg features` + `gcg labels`).
    pub store: PathBuf,
    pub train: Option<PathBuf>,
    pub val: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// NExT-GQA grounding annotations (`gsub_{val,test}.json`) for the grounding metrics.
    pub val_grounding: Option<PathBuf>,
    pub test_grounding: Option<PathBuf>,
    /// Batch-collating worker threads.
    pub workers: usize,
    /// Skip malformed annotation rows (reported) instead of stopping.
    pub skip_bad_rows: bool,
    /// Evaluate at most this many questions per split (quick runs).
    pub max_eval: Option<usize>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: Dataset::NextQa,
            store: PathBuf::from("store"),
            train: None,
            val: None,
            test: None,
            val_grounding: None,
            test_grounding: None,
            workers: 2,
            skip_bad_rows: false,
            max_eval: None,
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub run_dir: PathBuf,
    /// cpu | cuda.
    pub device: DeviceKind,
    /// Frozen networks' dtype: f32 | bf16 | f16 (default f32 on cpu, bf16 on cuda).
    pub dtype: Option<Precision>,
    pub weights: WeightsConfig,
    pub model: GcgConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            run_dir: PathBuf::from("runs/gcg"),
            device: DeviceKind::Cpu,
            dtype: None,
            weights: WeightsConfig::default(),
            model: GcgConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
        }
    }
}

/// Apply `key.path=value` overrides to a TOML document (the value is parsed as a TOML value,
/// falling back to a string).
pub fn apply_overrides(doc: &mut toml::Value, overrides: &[String]) -> Result<()> {
    for o in overrides {
        let (key, raw) = o.split_once('=').ok_or_else(|| anyhow!("override {o:?} is not key=value"))?;
        let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.to_string())),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        let mut cur = doc.as_table_mut().ok_or_else(|| anyhow!("the config is not a TOML table"))?;
        let parts: Vec<&str> = key.trim().split('.').collect();
        for p in &parts[..parts.len() - 1] {
            cur = cur
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| anyhow!("override {o:?}: '{p}' is not a table"))?;
        }
        cur.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(())
}

impl RunConfig {
    /// Read a TOML config (or start from the defaults) and apply overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let doc = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
                toml::from_str::<toml::Value>(&text).with_context(|| format!("{} is not valid TOML", p.display()))?
            }
            None => toml::Value::Table(Default::default()),
        };
        Self::from_doc(
            doc,
            overrides,
            &match path {
                Some(p) => format!("in config {}", p.display()),
                None => "in the command-line settings".to_string(),
            },
        )
    }

    /// This config with `key=value` overrides applied (e.g. a run directory's config).
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self> {
        if overrides.is_empty() {
            return Ok(self.clone());
        }
        Self::from_doc(toml::Value::try_from(self)?, overrides, "in the command-line settings")
    }

    fn from_doc(mut doc: toml::Value, overrides: &[String], origin: &str) -> Result<Self> {
        apply_overrides(&mut doc, overrides)?;
        let cfg: RunConfig = doc.try_into().with_context(|| origin.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.model.validate()
    }

    /// The config a run directory was trained with.
    pub fn from_run_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }
}
