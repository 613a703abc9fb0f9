//! A run, from one config: build the model (pretrained checkpoint or random tiny weights), open
//! the splits from the feature store, train, predict and evaluate. Shared by `gcg train`,
//! `gcg predict` and `gcg demo`.
//!
//! A run directory holds `config.json` (the resolved [`RunConfig`]), `metrics.jsonl`,
//! `checkpoints/{last,best}/` and, after prediction, `predictions-{split}.jsonl` and
//! `metrics-{split}.json`.

use crate::data::{self, Dataset, QaSample, ReadOptions};
use crate::eval::predictions::{Moments, PredictionRow, PredictionWriter};
use crate::gcg::{AnswerFormat, AnswerMethod, Answered, GcgBatch, GcgConfig, GcgModel, Mode, TextTokenizers, UniformRule};
use crate::grounding::{GroundingConfig, TopkGradient};
use crate::models::lmm::{is_vit_trunk, LmmConfig};
use crate::store::batch::{Batch, BatchLoader, BatchOptions};
use crate::store::Store;
use crate::train::trainer::{self, BatchSource, Event, RunDir, TrainConfig};
use crate::weights::checkpoints::{is_buffer, open_any};
use crate::weights::tokenizers::{QFormerTokenizer, T5Tokenizer};
use crate::weights::{Loader, SafetensorsSource, VarStore};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `[model]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Sizes when no checkpoint says them: `tiny` or `instructblip-flan-t5-xl`.
    pub preset: String,
    /// An HF InstructBLIP snapshot or a GCG release directory; none = random initialisation.
    pub weights: Option<PathBuf>,
    /// The Flan-T5 snapshot of a GCG release directory (default `<weights>/flan-t5`).
    pub t5: Option<PathBuf>,
    /// A directory with `tokenizer.json` (T5) and `qformer_tokenizer/tokenizer.json`
    /// (default: the weights directory).
    pub tokenizers: Option<PathBuf>,
    /// Trained weights to start from (a `weights.safetensors` of a checkpoint).
    pub init: Option<PathBuf>,
    /// Warm start: `init` may lack some trainable tensors (they keep their initialisation, e.g.
    /// a new grounding module) and hold others (ignored).
    pub init_partial: bool,
    /// uniform | oracle | grounding.
    pub mode: Mode,
    /// T sampled frames and K selected moments.
    pub frames: usize,
    pub moments: usize,
    pub width: f64,
    pub temperature: f64,
    pub alpha_reg: f64,
    pub alpha_con: f64,
    pub spatial: bool,
    /// Frame-position embeddings (default: off in uniform mode, on otherwise, as the official code).
    pub frame_positions: Option<bool>,
    pub uniform_rule: UniformRule,
    pub topk_samples: usize,
    pub topk_sigma: f64,
    pub topk_gradient: TopkGradient,
    pub grounding_dropout: f64,
    /// Grounding width preset for the CLIP space: `gcg` (d 1024) or `tiny`; the store's
    /// embedding width always wins.
    pub grounding_preset: String,
    pub answer: AnswerMethod,
    /// `letter` (official) or `text`: what the language model learns to write for a
    /// multiple-choice question and what option scoring scores.
    pub answer_format: AnswerFormat,
    /// Dropout of the Q-Former and T5 (default: the checkpoint's or preset's, 0.1).
    pub lmm_dropout: Option<f64>,
    /// Also train the language model (tiny models trained from scratch, e.g. the demo).
    pub train_t5: bool,
    /// Without `weights`: re-initialise the trainable matrices from N(0, 1/fan_in) instead of
    /// the checkpoints' initialisers (std 0.02), which are too small for tiny networks trained
    /// from scratch.
    pub fan_in_init: bool,
    pub device: String,
    /// Frozen networks' dtype: f32 | bf16 | f16 (default f32 on cpu, bf16 on cuda).
    pub dtype: Option<String>,
    pub seed: u64,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: "instructblip-flan-t5-xl".into(),
            weights: None,
            t5: None,
            tokenizers: None,
            init: None,
            init_partial: false,
            mode: Mode::Grounding,
            frames: 32,
            moments: 4,
            width: 0.2,
            temperature: 0.1,
            alpha_reg: 1.0,
            alpha_con: 1.0,
            spatial: true,
            frame_positions: None,
            uniform_rule: UniformRule::OfficialTruncate,
            topk_samples: 500,
            topk_sigma: 0.05,
            topk_gradient: TopkGradient::Full,
            grounding_dropout: 0.3,
            grounding_preset: "gcg".into(),
            answer: AnswerMethod::OptionScoring,
            answer_format: AnswerFormat::Letter,
            lmm_dropout: None,
            train_t5: false,
            fan_in_init: false,
            device: "cpu".into(),
            dtype: None,
            seed: 0,
        }
    }
}

/// The `[data]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
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
    pub skip_bad_rows: bool,
    /// Evaluate at most this many questions per split (quick runs).
    pub max_eval: Option<usize>,
}

impl Default for DataSection {
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
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            run_dir: PathBuf::from("runs/gcg"),
            model: ModelSection::default(),
            data: DataSection::default(),
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
        let mut doc = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
                toml::from_str::<toml::Value>(&text).with_context(|| format!("{} is not valid TOML", p.display()))?
            }
            None => toml::Value::Table(Default::default()),
        };
        apply_overrides(&mut doc, overrides)?;
        let cfg: RunConfig = doc.try_into().with_context(|| match path {
            Some(p) => format!("in config {}", p.display()),
            None => "in the command-line settings".to_string(),
        })?;
        cfg.train.validate()?;
        Ok(cfg)
    }

    /// The config a run directory was trained with.
    pub fn from_run_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }
}

pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0)
            .map_err(|e| anyhow!("cannot open CUDA device 0 ({e}); build gcg with `--features cuda` on a machine with the CUDA toolkit")),
        other => bail!("unknown device {other:?} (expected cpu or cuda)"),
    }
}

pub fn dtype(name: Option<&str>, dev: &Device) -> Result<DType> {
    Ok(match name {
        None if dev.is_cuda() => DType::BF16,
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => bail!("unknown dtype {other:?} (expected f32, bf16 or f16)"),
    })
}

/// The model of a run, its trainable variables, and the device it lives on.
pub struct BuiltModel {
    pub model: GcgModel,
    pub vars: VarStore,
    pub device: Device,
}

/// Is `name` trained in this run?
pub fn trainable(m: &ModelSection) -> impl Fn(&str) -> bool + 'static {
    let t5 = m.train_t5;
    move |n: &str| crate::gcg::is_trainable(n) || (t5 && n.starts_with("language_model."))
}

/// Build the model of `m` for a CLIP space of `embed_dim` (the store's).
pub fn build_model(m: &ModelSection, embed_dim: usize) -> Result<BuiltModel> {
    let dev = device(&m.device)?;
    let dt = dtype(m.dtype.as_deref(), &dev)?;
    let (lb, mut lmm) = match &m.weights {
        Some(w) => {
            let (src, cfg) = open_any(w, m.t5.as_deref(), &m.preset)?;
            (Loader::from_source(src, &dev, dt).with_seed(m.seed), cfg)
        }
        None => (Loader::random(&dev, dt, m.seed), LmmConfig::preset(&m.preset)?),
    };
    let lb = lb.with_trainable(trainable(m)).with_ignored(|n| is_buffer(n) || is_vit_trunk(n));
    lmm.spatial = m.spatial;
    if let Some(p) = m.lmm_dropout {
        lmm.qformer.hidden_dropout_prob = p;
        lmm.qformer.attention_probs_dropout_prob = p;
        lmm.t5.dropout_rate = p;
    }
    lmm.max_frames = lmm.max_frames.max(m.frames);
    lmm.frame_positions = m.frame_positions.unwrap_or(m.mode != Mode::Uniform);
    let mut grounding = GroundingConfig::preset(&m.grounding_preset)?;
    grounding.dim = embed_dim;
    grounding.frames = m.frames;
    grounding.moments = m.moments;
    grounding.width = m.width;
    grounding.temperature = m.temperature;
    grounding.dropout = m.grounding_dropout;
    grounding.topk.num_samples = m.topk_samples;
    grounding.topk.sigma = m.topk_sigma;
    grounding.topk.gradient = m.topk_gradient;
    let cfg = GcgConfig {
        lmm,
        grounding,
        mode: m.mode,
        alpha_reg: m.alpha_reg,
        alpha_con: m.alpha_con,
        uniform_rule: m.uniform_rule,
        answer: m.answer.clone(),
        answer_format: m.answer_format,
    };
    let tok_dir = m.tokenizers.clone().or_else(|| m.weights.clone()).ok_or_else(|| {
        anyhow!("[model] needs `tokenizers` (a directory with tokenizer.json and qformer_tokenizer/) when it has no `weights`")
    })?;
    let tokenizers = TextTokenizers {
        qformer: QFormerTokenizer::from_snapshot(&tok_dir)?,
        t5: T5Tokenizer::from_snapshot(&tok_dir)?,
    };
    let mut model = GcgModel::load(&lb, &cfg, tokenizers, false)?;
    if m.weights.is_some() {
        lb.finish()?;
    }
    let vars = lb.vars();
    if m.fan_in_init && m.weights.is_none() {
        crate::nn::init::fan_in_reinit(&vars, m.seed.wrapping_add(17), |n| n.contains("embed") || n.contains("shared"))?;
    }
    if let Some(init) = &m.init {
        let src = SafetensorsSource::open(init)?;
        if m.init_partial {
            let missing = vars
                .load_matching(&src)
                .with_context(|| format!("loading trained weights from {}", init.display()))?;
            if !missing.is_empty() {
                tracing::info!(
                    "{} trainable tensors not in {} keep their initialisation",
                    missing.len(),
                    init.display()
                );
            }
        } else {
            vars.load_from(&src)
                .with_context(|| format!("loading trained weights from {}", init.display()))?;
        }
    }
    // The frame positions of a uniform model stay off even when the config forced them on.
    model.cfg.lmm.frame_positions = model.lmm.frame_embeds.is_some();
    Ok(BuiltModel { model, vars, device: dev })
}

/// A split read from its annotations and served from the store.
pub struct Split {
    pub samples: Vec<QaSample>,
    loader: BatchLoader,
}

impl Split {
    pub fn open(
        store: &Store,
        dataset: Dataset,
        annotations: &Path,
        opts: BatchOptions,
        data: &DataSection,
        limit: Option<usize>,
    ) -> Result<Self> {
        let ann = data::read_annotations(
            dataset,
            annotations,
            &ReadOptions {
                skip_bad_rows: data.skip_bad_rows,
            },
        )?;
        if !ann.bad_rows.is_empty() {
            tracing::warn!("{}: skipped {} malformed rows", annotations.display(), ann.bad_rows.len());
        }
        let mut samples = ann.samples;
        if let Some(n) = limit {
            samples.truncate(n);
        }
        if samples.is_empty() {
            bail!("{} holds no questions", annotations.display());
        }
        let loader = BatchLoader::new(store.snapshot(), samples.clone(), opts)
            .with_context(|| format!("serving {} from the store {}", annotations.display(), store.dir().display()))?;
        Ok(Self { samples, loader })
    }
}

/// A store batch as the model's input.
pub fn to_gcg_batch(b: Batch, dev: &Device) -> Result<GcgBatch> {
    let features = b.features.ok_or_else(|| anyhow!("the batch has no frame features"))?;
    let (_, rows, _) = b.text_embeds.dims3()?;
    let clip_question = b.text_embeds.narrow(1, 0, 1)?.squeeze(1)?;
    let clip_options = if rows > 1 {
        Some(b.text_embeds.narrow(1, 1, rows - 1)?.contiguous()?)
    } else {
        None
    };
    Ok(GcgBatch {
        samples: b.samples,
        features: features.to_device(dev)?,
        clip_frames: b.frame_embeds.to_device(dev)?,
        clip_question: clip_question.contiguous()?.to_device(dev)?,
        clip_options: clip_options.map(|t| t.to_device(dev)).transpose()?,
        clip_event: b.event_embeds.to_device(dev)?,
        pseudo_label_scores: b.curves.to_device(dev)?,
        timestamps: b.timestamps,
    })
}

impl BatchSource for Split {
    fn num_batches(&self) -> usize {
        self.loader.num_batches()
    }
    fn batches(&self, epoch: u64, skip: usize) -> Result<Box<dyn Iterator<Item = Result<GcgBatch>> + '_>> {
        let dev = self.loader.options().device.clone();
        Ok(Box::new(self.loader.epoch(epoch).skip(skip).map(move |b| to_gcg_batch(b?, &dev))))
    }
}

fn batch_options(cfg: &RunConfig, dev: &Device, dt: DType, shuffle: bool) -> BatchOptions {
    BatchOptions {
        batch_size: cfg.train.batch_size,
        shuffle,
        seed: cfg.train.seed,
        drop_last: false,
        workers: cfg.data.workers,
        prefetch: 2,
        features: Some(dt),
        device: dev.clone(),
    }
}

/// The store of a run and its CLIP width.
pub fn open_store(cfg: &RunConfig) -> Result<(Store, usize)> {
    let store = Store::open(&cfg.data.store)?;
    let meta = store
        .snapshot()
        .meta()
        .ok_or_else(|| anyhow!("the store {} holds no features yet (run gcg features)", cfg.data.store.display()))?;
    Ok((store, meta.embed_dim))
}

/// Train a run (resuming from its `last` checkpoint when asked), then evaluate the best
/// checkpoint on the test split when one is configured.
pub fn train_run(cfg: &RunConfig, resume: bool, on_event: &mut dyn FnMut(Event)) -> Result<()> {
    let run = RunDir::new(&cfg.run_dir)?;
    let (store, embed_dim) = open_store(cfg)?;
    let built = build_model(&cfg.model, embed_dim)?;
    let dt = built.model.lmm.post_layernorm.weight.dtype();
    let train_path = cfg.data.train.as_ref().ok_or_else(|| anyhow!("[data] train is not set"))?;
    let train = Split::open(
        &store,
        cfg.data.dataset,
        train_path,
        batch_options(cfg, &built.device, dt, true),
        &cfg.data,
        None,
    )?;
    let val = match &cfg.data.val {
        Some(p) => Some(Split::open(
            &store,
            cfg.data.dataset,
            p,
            batch_options(cfg, &built.device, dt, false),
            &cfg.data,
            cfg.data.max_eval,
        )?),
        None => None,
    };
    let cfg_json = serde_json::to_value(cfg)?;
    crate::util::write_atomic(&run.root.join("config.json"), serde_json::to_string_pretty(&cfg_json)?.as_bytes())?;
    trainer::train(
        &built.model,
        &built.vars,
        &cfg.train,
        &run,
        &train,
        val.as_ref().map(|v| v as &dyn BatchSource),
        &cfg_json,
        resume,
        on_event,
    )?;
    Ok(())
}

/// Which weights of a run to predict with.
pub fn checkpoint_weights(run_dir: &Path, which: &str) -> Result<PathBuf> {
    let p = run_dir.join("checkpoints").join(which).join(crate::train::checkpoint::WEIGHTS);
    if !p.exists() {
        bail!("{} has no {which} checkpoint ({} does not exist)", run_dir.display(), p.display());
    }
    Ok(p)
}

/// The prediction row of an answered question.
pub fn prediction_row(s: &QaSample, a: &Answered) -> PredictionRow {
    let mut row = PredictionRow::for_sample(s, a.prediction.clone());
    if !a.seconds.is_empty() && a.seconds.iter().all(|x| x.is_finite()) {
        let first = a.seconds.iter().cloned().fold(f64::INFINITY, f64::min);
        let last = a.seconds.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        row.span = Some([first, last]);
        row.moments = Some(Moments {
            frames: a.frames.clone(),
            seconds: a.seconds.clone(),
        });
    } else {
        row.moments = Some(Moments {
            frames: a.frames.clone(),
            seconds: vec![],
        });
    }
    row.curve = a.curve.as_ref().map(|c| c.iter().map(|&x| x as f64).collect());
    row
}

/// Answer every question of a split into a prediction file, resuming a partial one.
pub fn predict_split(model: &GcgModel, split: &Split, out: &Path, on_batch: &mut dyn FnMut(usize, usize)) -> Result<usize> {
    let mut writer = if out.exists() {
        PredictionWriter::resume(out)?
    } else {
        PredictionWriter::create(out)?
    };
    let total = split.samples.len();
    let mut done = writer.len();
    // Only the questions not yet written are answered.
    let todo: Vec<QaSample> = split
        .samples
        .iter()
        .filter(|s| !writer.contains(&s.video, &s.qid))
        .cloned()
        .collect();
    if todo.is_empty() {
        return Ok(total);
    }
    let opts = split.loader.options().clone();
    let loader = BatchLoader::new(
        split.loader.snapshot(),
        todo,
        BatchOptions {
            shuffle: false,
            ..opts.clone()
        },
    )?;
    for b in loader.epoch(0) {
        let batch = to_gcg_batch(b?, &opts.device)?;
        let answers = model.answer(&batch)?;
        for (s, a) in batch.samples.iter().zip(&answers) {
            writer.write(&prediction_row(s, a))?;
        }
        done += answers.len();
        on_batch(done, total);
    }
    writer.sync()?;
    Ok(done)
}

/// Open a split of a run for prediction (no shuffling).
pub fn open_eval_split(cfg: &RunConfig, store: &Store, annotations: &Path, dev: &Device, dt: DType) -> Result<Split> {
    Split::open(
        store,
        cfg.data.dataset,
        annotations,
        batch_options(cfg, dev, dt, false),
        &cfg.data,
        cfg.data.max_eval,
    )
}

/// Score a prediction file with the benchmark's official metrics (NExT-GQA grounding too, when
/// its gsub file is given) and write `metrics` as JSON next to it.
pub fn evaluate_predictions(
    dataset: Dataset,
    annotations: &Path,
    grounding: Option<&Path>,
    predictions: &Path,
    metrics_out: Option<&Path>,
    skip_bad_rows: bool,
) -> Result<crate::eval::Evaluation> {
    let opts = ReadOptions { skip_bad_rows };
    let ann = data::read_annotations(dataset, annotations, &opts)?;
    let g = match grounding {
        Some(p) => Some(data::nextgqa::Grounding::read_with(p, &opts)?),
        None => None,
    };
    // The grounding metrics are NExT-GQA's; a NExT-QA-format split with a gsub file (e.g. the
    // synthetic world) is scored as NExT-GQA.
    let dataset = if g.is_some() && dataset == Dataset::NextQa {
        Dataset::NextGqa
    } else {
        dataset
    };
    let preds = crate::eval::read_predictions(predictions)?;
    let ev = crate::eval::evaluate(dataset, &ann.samples, &preds, g.as_ref())?;
    if let Some(out) = metrics_out {
        let text = serde_json::to_string_pretty(&ev.metrics.to_json())? + "\n";
        crate::util::write_atomic(out, text.as_bytes())?;
    }
    Ok(ev)
}

/// Predict a split (`val` or `test`) of a run with its `best` or `last` checkpoint into
/// `predictions-{split}.jsonl` in the run directory (resuming a partial file) and score it into
/// `metrics-{split}.json`.
pub fn predict_run(cfg: &RunConfig, split: &str, which: &str, on_batch: &mut dyn FnMut(usize, usize)) -> Result<crate::eval::Evaluation> {
    let (ann, grounding) = match split {
        "val" => (cfg.data.val.clone(), cfg.data.val_grounding.clone()),
        "test" => (cfg.data.test.clone(), cfg.data.test_grounding.clone()),
        other => bail!("unknown split {other:?} (val or test)"),
    };
    let ann = ann.ok_or_else(|| anyhow!("[data] {split} is not set"))?;
    let mut cfg = cfg.clone();
    cfg.model.init = Some(checkpoint_weights(&cfg.run_dir, which)?);
    let out = cfg.run_dir.join(format!("predictions-{split}.jsonl"));
    let metrics = cfg.run_dir.join(format!("metrics-{split}.json"));
    let (store, embed_dim) = open_store(&cfg)?;
    let built = build_model(&cfg.model, embed_dim)?;
    let dt = built.model.lmm.post_layernorm.weight.dtype();
    let s = open_eval_split(&cfg, &store, &ann, &built.device, dt)?;
    predict_split(&built.model, &s, &out, on_batch)?;
    evaluate_predictions(
        cfg.data.dataset,
        &ann,
        grounding.as_deref(),
        &out,
        Some(&metrics),
        cfg.data.skip_bad_rows,
    )
}
