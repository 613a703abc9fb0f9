//! The run config: one TOML file, each table deserialized straight into the config of its concept
//! (defaults on the structs, unknown keys rejected with their name):
//!
//! ```toml
//! run_dir = "runs/gcg"          # default runs/<config file stem>
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
//!
//! Relative paths in a config file (`run_dir`, `[weights]` and `[data]` paths) are relative to the
//! file's directory (a `[weights]` value that is a Hugging Face model id such as `google/flan-t5-xl`
//! stays a name unless that path exists there): [`RunConfig::load`] resolves them to absolute paths, and a run directory's
//! `config.json` stores them absolute, so a run is used the same from any working directory (and
//! still works when the run directory itself is moved). Paths given with `--set` are relative to
//! the working directory.

use crate::data::Dataset;
use crate::model::GcgConfig;
use crate::models::Preset;
use crate::train::trainer::TrainConfig;
use crate::weights::hub;
use anyhow::{anyhow, bail, ensure, Context, Result};
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

crate::choice_names!(DeviceKind, "device", { Cpu => "cpu", Cuda => "cuda" });

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

    /// The asked precision, or the device's default: f32 on a CPU, bf16 on a GPU. bf16 asked
    /// on a CPU whose oneDNN has no bf16 products (below AVX-512, or under `GCG_MAX_CPU_ISA`)
    /// logs, once, that it runs widened to f32 there and is slower than f32.
    pub fn resolve(asked: Option<Precision>, dev: &Device) -> DType {
        let dt = match asked {
            Some(p) => p.dtype(),
            None if dev.is_cuda() => DType::BF16,
            None => DType::F32,
        };
        if dt == DType::BF16 && dev.is_cpu() && crate::nn::linear::ONEDNN && !crate::nn::linear::onednn_bf16() {
            static NOTE: std::sync::Once = std::sync::Once::new();
            NOTE.call_once(|| {
                let why = if crate::nn::isa::capped() {
                    format!("{}={} caps it below AVX-512", crate::nn::isa::ENV, crate::nn::isa::cap().name())
                } else {
                    "they need AVX-512".to_string()
                };
                tracing::warn!(
                    "bf16 on this CPU: no bf16 matrix products here ({why}), so each product widens its bf16 operands to f32: \
                     the same values as bf16 products elsewhere and half the weights' memory, but slower than --dtype f32"
                );
            });
        }
        dt
    }
}

crate::choice_names!(Precision, "dtype", { F32 => "f32", Bf16 => "bf16", F16 => "f16" });

/// Where the model's parameters come from: the `[weights]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightsConfig {
    /// Network sizes when no checkpoint says them (random initialisation, GCG release files).
    pub preset: Preset,
    /// An HF InstructBLIP snapshot or a GCG release directory, or its Hugging Face model id
    /// (`Salesforce/instructblip-flan-t5-xl`, `WHB139426/GCG`: resolved through the HF cache,
    /// the missing files downloaded unless HF_HUB_OFFLINE; an existing path wins over an id);
    /// none = random initialisation.
    pub pretrained: Option<PathBuf>,
    /// The Flan-T5 snapshot of a GCG release, a directory or a model id (default
    /// `<pretrained>/flan-t5` when it exists, else `google/flan-t5-xl`).
    pub t5: Option<PathBuf>,
    /// A directory with `tokenizer.json` (T5) and `qformer_tokenizer/tokenizer.json`, or a model
    /// id that has them (`Salesforce/instructblip-flan-t5-xl`; default: `pretrained`).
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
    /// With `[data] online_vit`: the ViT that made the store's embeddings, as `gcg features
    /// --weights` read it (a directory or a model id; default: `pretrained`).
    pub vit: Option<PathBuf>,
    /// With `[data] online_vit`: a seeded random ViT of the preset instead (as `gcg features
    /// --random-weights --seed S`; tests).
    pub vit_random_seed: Option<u64>,
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
            vit: None,
            vit_random_seed: None,
        }
    }
}

/// The questions and the feature store: the `[data]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// The benchmark: `next-qa`, `next-gqa`, `intent-qa`, `causal-vid-qa`, `star`, `traffic-qa`,
    /// `vlep`, `open-ended` (or the `--dataset` names: `nextqa`, `trafficqa`, ...).
    pub dataset: Dataset,
    /// The format of `train` when it is not `dataset`'s (see [`DataConfig::train_format`]).
    pub train_dataset: Option<Dataset>,
    /// The feature store (`gcg features` + `gcg labels`).
    pub store: PathBuf,
    pub train: Option<PathBuf>,
    pub val: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// A split's videos (Causal-VidQA: `split/{train,val,test}.pkl` with `train`/`val`/`test` all
    /// the `QA` folder; or a JSON list / one id a line for any dataset): only their questions.
    pub train_videos: Option<PathBuf>,
    pub val_videos: Option<PathBuf>,
    pub test_videos: Option<PathBuf>,
    /// NExT-GQA grounding annotations (`gsub_{val,test}.json`) for the grounding metrics.
    pub val_grounding: Option<PathBuf>,
    pub test_grounding: Option<PathBuf>,
    /// Batch-collating worker threads.
    pub workers: usize,
    /// Skip malformed annotation rows (reported) instead of stopping.
    pub skip_bad_rows: bool,
    /// Evaluate at most this many questions per split (quick runs).
    pub max_eval: Option<usize>,
    /// The online ViT (the official `use_vit`): decode each batch's frames again and run the
    /// frozen ViT in the loop instead of reading stored features — for a store made with `gcg
    /// features --embeddings-only` (23 MB less a video at T = 32 for EVA ViT-g). The frames are
    /// sampled as the store's were; the ViT is `[weights] vit`.
    pub online_vit: bool,
    /// Where the videos are now, when not at the paths the store recorded (their file names
    /// are looked up here).
    pub video_dir: Option<PathBuf>,
    /// Frames per ViT pass in the loop (as `gcg features --frame-batch`; the same value gives
    /// the stored features bit for bit).
    pub vit_frame_batch: usize,
}

impl DataConfig {
    /// The format `train` is read in: `train_dataset` when set, else `dataset`'s, except for
    /// NExT-GQA, which has no training split: the official recipe trains on NExT-QA's training
    /// questions (NExT-QA's format, its first column `video` and the answer an option index)
    /// and validates and tests on NExT-GQA's. So with `dataset = "nextgqa"` a train file whose
    /// header starts with `video,` is read as NExT-QA's, any other (`video_id,`) as NExT-GQA's.
    pub fn train_format(&self) -> Dataset {
        if let Some(d) = self.train_dataset {
            return d;
        }
        if self.dataset != Dataset::NextGqa {
            return self.dataset;
        }
        let header = self.train.as_deref().and_then(|p| {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(std::fs::File::open(p).ok()?).read_line(&mut line).ok()?;
            Some(line)
        });
        match header {
            Some(h) if h.trim_start_matches('\u{feff}').starts_with("video,") => Dataset::NextQa,
            _ => Dataset::NextGqa,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: Dataset::NextQa,
            train_dataset: None,
            store: PathBuf::from("store"),
            train: None,
            val: None,
            test: None,
            train_videos: None,
            val_videos: None,
            test_videos: None,
            val_grounding: None,
            test_grounding: None,
            workers: 2,
            skip_bad_rows: false,
            max_eval: None,
            online_vit: false,
            video_dir: None,
            vit_frame_batch: 32,
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Where the run writes (checkpoints, metrics, predictions). A config file without it uses
    /// `runs/<file stem>` beside the file ([`RunConfig::default_run_dir`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<PathBuf>,
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
            run_dir: None,
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
    /// Read a TOML config (or start from the defaults) and apply overrides. The file's relative
    /// paths are resolved against its directory, and a file without `run_dir` gets
    /// [`RunConfig::default_run_dir`]; the overrides' paths are left as given (relative to the
    /// working directory).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let Some(p) = path else {
            return Self::from_doc(toml::Value::Table(Default::default()), overrides, "in the command-line settings");
        };
        let text = std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
        let doc = toml::from_str::<toml::Value>(&text).with_context(|| format!("{} is not valid TOML", p.display()))?;
        let origin = format!("in config {}", p.display());
        let mut cfg: RunConfig = doc.try_into().with_context(|| origin.clone())?;
        // Empty paths are mistakes, not "this directory" (checked before they are resolved).
        cfg.validate_paths().with_context(|| origin.clone())?;
        let base = config_dir(p)?;
        if cfg.run_dir.is_none() {
            cfg.run_dir = Some(Self::default_run_dir(p)?);
        }
        cfg.resolve_paths(&base);
        if overrides.is_empty() {
            cfg.validate().with_context(|| origin.clone())?;
            Ok(cfg)
        } else {
            Self::from_doc(toml::Value::try_from(&cfg)?, overrides, &overrides_origin(overrides))
        }
    }

    /// The run directory of a config file that sets none: `runs/<file stem>` in the file's
    /// directory (absolute).
    pub fn default_run_dir(config: &Path) -> Result<PathBuf> {
        let stem = config
            .file_stem()
            .ok_or_else(|| anyhow!("config path {} has no file name", config.display()))?;
        Ok(config_dir(config)?.join("runs").join(stem))
    }

    /// The run directory; an error naming the setting when there is none.
    pub fn run_dir(&self) -> Result<&Path> {
        self.run_dir
            .as_deref()
            .ok_or_else(|| anyhow!("the config sets no run_dir (add `run_dir = \"runs/NAME\"` to it or give --set run_dir=DIR)"))
    }

    /// Resolve every relative path of the config (`run_dir`, `[weights]`, `[data]`) against
    /// `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        let w = &mut self.weights;
        let d = &mut self.data;
        for p in [&mut self.run_dir, &mut w.init].into_iter().flatten() {
            fix(p);
        }
        // A Hugging Face model id (`org/name`) stays a name unless that path exists here.
        for p in [&mut w.pretrained, &mut w.t5, &mut w.tokenizers, &mut w.vit].into_iter().flatten() {
            let local = base.join(&*p);
            if p.is_relative() && !local.exists() && p.to_str().is_some_and(hub::is_model_id) {
                continue;
            }
            fix(p);
        }
        fix(&mut d.store);
        let splits = [
            &mut d.train,
            &mut d.val,
            &mut d.test,
            &mut d.train_videos,
            &mut d.val_videos,
            &mut d.test_videos,
        ];
        for p in splits
            .into_iter()
            .chain([&mut d.val_grounding, &mut d.test_grounding, &mut d.video_dir])
            .flatten()
        {
            fix(p);
        }
    }

    /// The config as TOML, every setting included: the optional ones that are not set (which
    /// TOML cannot write) as comments in their tables, `# max_steps = ...  (not set)`, so that
    /// `gcg train --print-config` shows every key there is.
    pub fn to_toml_with_unset(&self) -> Result<String> {
        let text = toml::to_string(self)?;
        let mut unset: Vec<(String, String)> = Vec::new();
        fn walk(v: &serde_json::Value, table: &str, out: &mut Vec<(String, String)>) {
            if let serde_json::Value::Object(m) = v {
                for (k, x) in m {
                    match x {
                        serde_json::Value::Null => out.push((table.to_string(), k.clone())),
                        serde_json::Value::Object(_) => walk(x, &if table.is_empty() { k.clone() } else { format!("{table}.{k}") }, out),
                        _ => {}
                    }
                }
            }
        }
        walk(&serde_json::to_value(self)?, "", &mut unset);
        let comment = |table: &str| -> String {
            unset
                .iter()
                .filter(|(t, _)| t == table)
                .map(|(_, k)| format!("# {k} = ...  (not set)\n"))
                .collect()
        };
        let mut out = comment("");
        let mut placed = std::collections::BTreeSet::from([String::new()]);
        for line in text.lines() {
            out.push_str(line);
            out.push('\n');
            if let Some(table) = line.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                out.push_str(&comment(table));
                placed.insert(table.to_string());
            }
        }
        // Tables TOML left out (every key unset).
        for table in unset.iter().map(|(t, _)| t.clone()).collect::<std::collections::BTreeSet<_>>() {
            if !placed.contains(&table) {
                out.push_str(&format!("\n[{table}]\n{}", comment(&table)));
            }
        }
        Ok(out)
    }

    /// This config with its relative paths resolved against the working directory.
    pub fn absolute(&self) -> Result<Self> {
        let cwd = std::env::current_dir().context("reading the working directory")?;
        let mut c = self.clone();
        c.resolve_paths(&cwd);
        Ok(c)
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
        cfg.validate().with_context(|| origin.to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.validate_paths()?;
        self.validate_settings()
    }

    fn validate_paths(&self) -> Result<()> {
        if let Some(r) = &self.run_dir {
            ensure!(
                !r.as_os_str().is_empty(),
                "run_dir is empty (give the directory the run writes into)"
            );
            ensure!(
                r.parent().is_some(),
                "run_dir = {}: a run does not write into the file-system root; give a directory of its own",
                r.display()
            );
        }
        let w = &self.weights;
        let d = &self.data;
        let paths = [
            ("weights.pretrained", &w.pretrained),
            ("weights.t5", &w.t5),
            ("weights.tokenizers", &w.tokenizers),
            ("weights.init", &w.init),
            ("data.train", &d.train),
            ("data.val", &d.val),
            ("data.test", &d.test),
            ("data.train_videos", &d.train_videos),
            ("data.val_videos", &d.val_videos),
            ("data.test_videos", &d.test_videos),
            ("data.val_grounding", &d.val_grounding),
            ("data.test_grounding", &d.test_grounding),
        ];
        for (key, p) in paths {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                bail!("{key} is an empty path (leave the key out instead)");
            }
        }
        ensure!(!d.store.as_os_str().is_empty(), "data.store is an empty path");
        Ok(())
    }

    fn validate_settings(&self) -> Result<()> {
        let d = &self.data;
        ensure!(
            d.max_eval != Some(0),
            "data.max_eval = 0 leaves nothing to evaluate (leave it out to evaluate every question)"
        );
        ensure!(
            self.train.max_steps != Some(0),
            "train.max_steps = 0 trains nothing (the run's results would be the untrained model's; leave it out to train every epoch)"
        );
        ensure!(d.workers >= 1, "data.workers must be at least 1");
        ensure!(d.vit_frame_batch >= 1, "data.vit_frame_batch must be at least 1");
        if d.online_vit {
            ensure!(
                self.weights.vit.is_some() || self.weights.vit_random_seed.is_some() || self.weights.pretrained.is_some(),
                "data.online_vit needs the ViT that made the store: [weights] vit (or pretrained), or vit_random_seed"
            );
        }
        self.train.validate()?;
        if self.train.train_t5 && self.model.lmm.lora.is_some() {
            bail!("[train] train_t5 = true fine-tunes every T5 weight, [model.lmm] lora trains adapters on a frozen T5: choose one");
        }
        if self.train.epochs == 0 && self.model.mode != crate::model::Mode::Grounding {
            bail!(
                "epochs = 0 trains nothing in {} mode (grounding_warmup_epochs counts only in grounding mode)",
                self.model.mode.name()
            );
        }
        self.model.validate()
    }

    /// The config a run directory was trained with; its `run_dir` is `dir` (where the run is
    /// now, wherever it was trained).
    pub fn from_run_dir(dir: &Path) -> Result<Self> {
        ensure!(
            dir.is_dir(),
            "the run directory {} does not exist (or is not a directory)",
            dir.display()
        );
        let p = dir.join("config.json");
        ensure!(
            p.is_file(),
            "{} is not a run directory: it holds no config.json (`gcg train` writes one into each run)",
            dir.display()
        );
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let mut cfg: RunConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        cfg.run_dir = Some(dir.to_path_buf());
        Ok(cfg)
    }
}

/// The absolute directory of a config file.
fn config_dir(config: &Path) -> Result<PathBuf> {
    let dir = config.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::path::absolute(dir).with_context(|| format!("resolving the directory of {}", config.display()))
}

/// Where a config error comes from when `--set` overrides were applied: the overrides, named.
fn overrides_origin(overrides: &[String]) -> String {
    let list: Vec<String> = overrides.iter().map(|o| format!("--set {o}")).collect();
    format!("with {}", list.join(" "))
}
