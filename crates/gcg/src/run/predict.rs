//! Predicting with a run: prediction files (resumable) and their scores with the official metrics.

use super::build::{build_model, open_store, BuiltModel, Split};
use super::config::RunConfig;
use crate::data::{self, Dataset, QaSample, ReadOptions, SplitFiles};
use crate::data::{BatchLoader, BatchOptions};
use crate::eval::predictions::{Moments, OnMismatch, PredictionRow, PredictionWriter, Provenance};
use crate::model::{Answered, GcgModel};
use crate::store::Store;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// An evaluation split of a run's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    Val,
    Test,
}

impl EvalSplit {
    /// The split's annotations, video list and NExT-GQA grounding file in a run config.
    pub fn files(self, cfg: &RunConfig) -> Result<SplitFiles> {
        let d = &cfg.data;
        let (ann, videos, grounding) = match self {
            EvalSplit::Val => (&d.val, &d.val_videos, &d.val_grounding),
            EvalSplit::Test => (&d.test, &d.test_videos, &d.test_grounding),
        };
        Ok(SplitFiles {
            annotations: ann.clone().ok_or_else(|| anyhow!("the config has no [data] {self}"))?,
            videos: videos.clone(),
            grounding: grounding.clone(),
        })
    }
}

crate::choice_names!(EvalSplit, "split", { Val => "val", Test => "test" });

/// Which checkpoint of a run: the best on validation or the last written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpoint {
    Best,
    Last,
}

impl Checkpoint {
    /// `best` when the run has one (a run without validation has only `last`), else `last`.
    pub fn best_or_last(run_dir: &Path) -> Self {
        if crate::train::checkpoint::exists(&run_dir.join("checkpoints").join("best")).unwrap_or(false) {
            Checkpoint::Best
        } else {
            Checkpoint::Last
        }
    }
}

crate::choice_names!(Checkpoint, "checkpoint", { Best => "best", Last => "last" });

/// Which weights of a run to predict with.
pub fn checkpoint_weights(run_dir: &Path, which: Checkpoint) -> Result<PathBuf> {
    let dir = run_dir.join("checkpoints").join(which.name());
    crate::train::checkpoint::exists(&dir)?;
    let p = dir.join(crate::train::checkpoint::WEIGHTS);
    if !p.exists() {
        bail!("{} has no {which} checkpoint ({} does not exist)", run_dir.display(), p.display());
    }
    Ok(p)
}

/// The prediction row of an answered question.
pub fn prediction_row(s: &QaSample, a: &Answered) -> PredictionRow {
    let mut row = PredictionRow::for_sample(s, a.prediction.clone());
    if let Some(span) = a.span() {
        row.span = Some(span);
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

/// A fast 64-bit hash (FNV-1a) of a file's bytes, as `fnv1a64:<16 hex digits>`.
fn hash_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {} to hash it", path.display()))?;
    let mut h = crate::util::Fnv64::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.tagged())
}

/// What a prediction file made by the model of `cfg` on `annotations` records about its maker:
/// the run, the trained weights (`[weights] init`) and their hash, the annotations, the store and
/// a hash of the config's model-relevant part (paths made absolute first, so the same run gives
/// the same provenance from any working directory).
pub fn provenance(cfg: &RunConfig, files: &SplitFiles) -> Result<Provenance> {
    let annotations = files.annotations.as_path();
    let inputs_hash = Some(inputs_hash(cfg, files)?);
    let cfg = cfg.absolute()?;
    // Absolute, and without a trailing `/` or `.` components (`--store s/` is the store `s`).
    let abs = |p: &Path| -> Result<String> { Ok(std::path::absolute(p)?.components().collect::<PathBuf>().display().to_string()) };
    let weights_hash = cfg.weights.init.as_deref().map(hash_file).transpose()?;
    Ok(Provenance {
        // The run only when its checkpoint predicts (not a config's pretrained model).
        run_dir: cfg
            .run_dir
            .as_deref()
            .filter(|r| cfg.weights.init.as_deref().is_some_and(|w| w.starts_with(r)))
            .map(|p| p.display().to_string()),
        weights: cfg.weights.init.as_deref().map(|p| p.display().to_string()),
        weights_hash,
        annotations: abs(annotations)?,
        store: abs(&cfg.data.store)?,
        config_hash: config_hash(&cfg)?,
        inputs_hash,
    })
}

/// The `inputs_hash` of a prediction file's [`Provenance`]: the split's questions as read (key,
/// video, question, options, answer, type: what the predictions and their scores are made of,
/// whatever the file's bytes around them) and the store's records (index entries: shards, byte
/// ranges, extractors, labels, text encoders) of those questions and, once each, their videos.
/// Records of other questions and videos do not count, so a store that grows keeps the hash.
pub fn inputs_hash(cfg: &RunConfig, files: &SplitFiles) -> Result<String> {
    let ann = files.read(
        cfg.data.dataset,
        &crate::data::ReadOptions {
            skip_bad_rows: cfg.data.skip_bad_rows,
        },
    )?;
    let mut h = crate::util::Fnv64::default();
    let mut part = |bytes: &[u8]| {
        h.update(bytes);
        h.update(&[0]);
    };
    part(&serde_json::to_vec(&ann.samples)?);
    let store = crate::store::Store::open(&cfg.data.store).with_context(|| format!("[data] store = {}", cfg.data.store.display()))?;
    let snap = store.snapshot();
    let idx = snap.index();
    let mut keys: Vec<&str> = ann.samples.iter().map(|s| s.key.as_str()).collect();
    keys.sort_unstable();
    for key in keys {
        part(&serde_json::to_vec(&idx.questions.get(key))?);
    }
    let videos: std::collections::BTreeSet<&str> = ann.samples.iter().map(|s| s.video.as_str()).collect();
    for video in videos {
        // Where a video's frames came from is for information (it moves with a moved store).
        let v = idx
            .videos
            .get(video)
            .map(|v| crate::store::VideoEntry { source: None, ..v.clone() });
        part(&serde_json::to_vec(&v)?);
    }
    Ok(h.tagged())
}

/// The `config_hash` of a prediction file's [`Provenance`]: a hash of the config's model-relevant
/// part (`[weights]` but `init`, `[model]`, the dataset and dtype), paths as they are in `cfg`
/// ([`provenance`] makes them absolute first).
pub fn config_hash(cfg: &RunConfig) -> Result<String> {
    let mut weights = cfg.weights.clone();
    weights.init = None;
    let model_part = serde_json::json!({
        "weights": weights,
        "model": cfg.model,
        "dataset": cfg.data.dataset,
        "dtype": cfg.dtype,
    });
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serde_json::to_vec(&model_part)? {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(format!("fnv1a64:{h:016x}"))
}

/// Answer every question of a split into a prediction file made by `prov`, resuming a partial
/// one of the same provenance (another model's file is refused or started over: `on_mismatch`).
pub fn predict_split(
    model: &GcgModel,
    split: &Split,
    out: &Path,
    prov: &Provenance,
    on_mismatch: OnMismatch,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<usize> {
    let mut writer = PredictionWriter::open(out, prov, on_mismatch)?;
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
    let _casts_kept = crate::nn::no_grad(); // weights cast to bf16 once for all batches
    for b in loader.epoch(0) {
        let batch = b?;
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
pub fn open_eval_split(cfg: &RunConfig, store: &Store, files: &SplitFiles, built: &BuiltModel) -> Result<Split> {
    Split::open(
        store,
        cfg.data.dataset,
        files,
        super::build::batch_options(cfg, built, false)?,
        &cfg.data,
        cfg.data.max_eval,
    )
}

/// Score a prediction file with the benchmark's official metrics (NExT-GQA grounding too, when
/// its gsub file is given) and write `metrics` as JSON next to it.
pub fn evaluate_predictions(
    dataset: Dataset,
    files: &SplitFiles,
    predictions: &Path,
    metrics_out: Option<&Path>,
    skip_bad_rows: bool,
) -> Result<crate::eval::Evaluation> {
    let opts = ReadOptions { skip_bad_rows };
    let ann = files.read(dataset, &opts)?;
    let g = match &files.grounding {
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
    let ev = crate::eval::evaluate(dataset, &ann.samples, &preds, g.as_ref()).with_context(|| {
        let gsub = files
            .grounding
            .as_ref()
            .map(|g| format!(" and {}", g.display()))
            .unwrap_or_default();
        format!("scoring {} against {}{gsub}", predictions.display(), files.annotations.display())
    })?;
    if let Some(out) = metrics_out {
        crate::eval::write_metrics_json(out, &ev.metrics.to_json())?;
    }
    Ok(ev)
}

/// Predict the questions of an annotation file with the model of `cfg` into `out` (resuming a
/// partial file of the same model; another model's file is refused or started over:
/// `on_mismatch`) and score them (NExT-GQA grounding too, with its gsub file), writing the
/// metrics to `metrics` when given.
pub fn predict_annotations(
    cfg: &RunConfig,
    files: &SplitFiles,
    out: &Path,
    metrics: Option<&Path>,
    on_mismatch: OnMismatch,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<crate::eval::Evaluation> {
    let prov = provenance(cfg, files)?;
    // Checked before the model is built: a refused file costs no loading.
    if on_mismatch == OnMismatch::Refuse {
        PredictionWriter::check(out, &prov)?;
    }
    let (store, embed_dim) = open_store(cfg)?;
    let built = build_model(cfg, embed_dim)?;
    let split = open_eval_split(cfg, &store, files, &built)?;
    predict_split(&built.model, &split, out, &prov, on_mismatch, on_batch)?;
    evaluate_predictions(cfg.data.dataset, files, out, metrics, cfg.data.skip_bad_rows)
}

/// Predict a split (`val` or `test`) of a run with its `best` or `last` checkpoint into
/// `predictions-{split}.jsonl` in the run directory and score it into `metrics-{split}.json`. A
/// partial file of the same checkpoint is resumed; one of another checkpoint (an earlier best,
/// a previous run) is started over, never reused.
pub fn predict_run(
    cfg: &RunConfig,
    split: EvalSplit,
    which: Checkpoint,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<crate::eval::Evaluation> {
    let files = split.files(cfg)?;
    let mut cfg = cfg.clone();
    let run_dir = cfg.run_dir()?.to_path_buf();
    cfg.weights.init = Some(checkpoint_weights(&run_dir, which)?);
    let out = run_dir.join(format!("predictions-{split}.jsonl"));
    let metrics = run_dir.join(format!("metrics-{split}.json"));
    predict_annotations(&cfg, &files, &out, Some(&metrics), OnMismatch::Replace, on_batch)
}
