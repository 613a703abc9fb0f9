//! A run, from one config: build the model (pretrained checkpoint or random tiny weights), open
//! the splits from the feature store, train, predict and evaluate. Shared by `gcg train`,
//! `gcg predict` and `gcg demo`.
//!
//! * [`config`] — the run TOML, one struct per table;
//! * [`build`] — the model, the store and the splits it serves;
//! * [`predict`] — prediction files and their scores.
//!
//! A run directory holds `config.json` (the resolved [`RunConfig`], paths absolute),
//! `metrics.jsonl`, `checkpoints/{last,best}/` and, after prediction, `predictions-{split}.jsonl`
//! (+ its provenance `.meta.json`) and `metrics-{split}.json`. A new run never writes into a
//! directory that holds another run's outputs ([`RunStart`]).

pub mod build;
pub mod config;
pub mod predict;

use crate::data::SplitFiles;
pub use build::{build_model, open_store, trainable, BuiltModel, Split};
pub use config::{apply_overrides, DataConfig, DeviceKind, Precision, RunConfig, WeightsConfig};
pub use predict::{
    checkpoint_weights, config_hash, evaluate_predictions, open_eval_split, predict_annotations, predict_run, predict_split,
    prediction_row, provenance, Checkpoint, EvalSplit,
};

use crate::train::trainer::{self, BatchSource, Event, RunDir};
use anyhow::{anyhow, bail, Context, Result};
use build::batch_options;
use std::path::{Path, PathBuf};

/// How a training run treats its run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStart {
    /// A new run: refused when the directory already holds a run's outputs.
    New,
    /// Continue from the `last` checkpoint (a fresh start when there is none).
    Resume,
    /// Start over: the directory's run outputs are cleared first.
    Overwrite,
}

/// The outputs of a run found in `dir` (names relative to it): `config.json`, `metrics.jsonl`,
/// a non-empty `checkpoints/`, `predictions-*.jsonl` (+ `.meta.json`), `metrics-*.json`, and
/// what an interrupted `--overwrite` left (`.overwritten-*`). Other files are not the run's.
pub fn run_outputs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading run directory {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("reading run directory {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        let ours = match name.as_str() {
            "config.json" | "metrics.jsonl" => true,
            "checkpoints" => std::fs::read_dir(e.path()).map(|mut d| d.next().is_some()).unwrap_or(true),
            n => {
                (n.starts_with("predictions-") && (n.ends_with(".jsonl") || n.ends_with(".jsonl.meta.json")))
                    || (n.starts_with(".predictions-") && n.ends_with(".jsonl.lock"))
                    || is_output_temp(n)
                    || (n.starts_with("metrics-") && n.ends_with(".json"))
                    || n.starts_with(".overwritten-")
            }
        };
        if ours {
            out.push(PathBuf::from(name));
        }
    }
    out.sort();
    Ok(out)
}

/// Before any training: the test split is readable and in the store, and each grounding file
/// has spans for the questions of its split (a file of another split is refused, not scored on
/// nothing at the end of the run).
fn check_eval_files(cfg: &RunConfig, store: &crate::store::Store, built: &BuiltModel, val: Option<&Split>) -> Result<()> {
    let test = match &cfg.data.test {
        Some(_) => Some(
            Split::open(
                store,
                cfg.data.dataset,
                &EvalSplit::Test.files(cfg)?,
                batch_options(cfg, built, false)?,
                &cfg.data,
                cfg.data.max_eval,
            )
            .context("checking [data] test before training")?,
        ),
        None => None,
    };
    let opts = crate::data::ReadOptions {
        skip_bad_rows: cfg.data.skip_bad_rows,
    };
    for (key, file, split, name) in [
        ("data.val_grounding", &cfg.data.val_grounding, val, "val"),
        ("data.test_grounding", &cfg.data.test_grounding, test.as_ref(), "test"),
    ] {
        let Some(path) = file else { continue };
        let g = crate::data::nextgqa::Grounding::read_with(path, &opts).with_context(|| key.to_string())?;
        let Some(split) = split else {
            bail!("{key} is set but [data] {name} is not");
        };
        let covered = split.samples.iter().filter(|s| g.segments(&s.video, &s.qid).is_some()).count();
        if covered == 0 {
            bail!(
                "{key} = {} has spans for none of the {} questions of [data] {name} (another split's file?)",
                path.display(),
                split.samples.len()
            );
        }
        if covered < split.samples.len() {
            tracing::warn!(
                "{key}: {} of the {} questions of [data] {name} have no spans and will not be scored for grounding",
                split.samples.len() - covered,
                split.samples.len()
            );
        }
    }
    Ok(())
}

/// A temporary file an atomic write of a run output leaves when killed: `.{output}.tmp-{pid}`.
fn is_output_temp(name: &str) -> bool {
    let Some((base, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else {
        return false;
    };
    pid.chars().all(|c| c.is_ascii_digit())
        && !pid.is_empty()
        && (matches!(base, "config.json" | "metrics.jsonl")
            || (base.starts_with("metrics-") && base.ends_with(".json"))
            || (base.starts_with("predictions-") && base.ends_with(".jsonl.meta.json")))
}

/// The lock a training process holds in its run directory.
pub const RUN_LOCK: &str = ".gcg-run.lock";

/// Entries of `dir` that are not run outputs (`outputs`, from [`run_outputs`]) nor an empty
/// `checkpoints/`, by name.
fn foreign_entries(dir: &Path, outputs: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(out) };
    for e in entries {
        let name = e.with_context(|| format!("reading run directory {}", dir.display()))?.file_name();
        let name = name.to_string_lossy().to_string();
        if name != "checkpoints" && name != RUN_LOCK && !outputs.iter().any(|o| o.as_os_str() == name.as_str()) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Clear a run's outputs for `--overwrite`. Each is moved into `.overwritten-<pid>/` (checkpoints
/// first, so a kill midway leaves no checkpoint beside old derived files: a resume then starts
/// fresh, and derived files are never reused for another checkpoint), then that is deleted.
fn clear_run_outputs(dir: &Path) -> Result<usize> {
    let mut outputs = run_outputs(dir)?;
    outputs.sort_by_key(|n| n != Path::new("checkpoints"));
    let trash = dir.join(format!(".overwritten-{}", std::process::id()));
    let mut stale = Vec::new();
    for n in &outputs {
        let p = dir.join(n);
        if n.to_string_lossy().starts_with(".overwritten-") {
            if p != trash {
                stale.push(p);
            }
            continue;
        }
        std::fs::create_dir_all(&trash).with_context(|| format!("creating {}", trash.display()))?;
        std::fs::rename(&p, trash.join(n)).with_context(|| format!("moving aside {}", p.display()))?;
    }
    stale.push(trash);
    for p in stale.iter().filter(|p| p.exists()) {
        std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(outputs.len())
}

/// Train a run: a new one ([`RunStart::New`], refused if its directory already holds a run),
/// a resumed one or one started over. The run directory is created (or cleared) only once the
/// config, the store, the model and the splits are known to be good. Relative paths are taken
/// from the working directory and stored absolute in `config.json`.
pub fn train_run(cfg: &RunConfig, start: RunStart, on_event: &mut dyn FnMut(Event)) -> Result<()> {
    cfg.validate()?;
    let cfg = &cfg.absolute()?;
    let root = cfg.run_dir()?.to_path_buf();
    // One process per run directory (taken again once a new directory exists).
    let lock = |root: &Path| crate::util::lock_exclusive(&root.join(RUN_LOCK), &format!("the run directory {}", root.display()));
    let existing = run_outputs(&root)?;
    if start != RunStart::Resume {
        // A run starts in a new or empty directory, or one holding only a run: never among
        // someone's other files (the working directory, a home folder, `/`).
        let foreign = foreign_entries(&root, &existing)?;
        if !foreign.is_empty() {
            bail!(
                "run directory {} holds files that are not a run's ({}{}); give a new or empty run_dir",
                root.display(),
                foreign.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                if foreign.len() > 5 {
                    format!(" and {} more", foreign.len() - 5)
                } else {
                    String::new()
                }
            );
        }
    }
    let mut _held = if root.is_dir() { Some(lock(&root)?) } else { None };
    if start == RunStart::New && !existing.is_empty() {
        let names: Vec<String> = existing.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "run directory {} already holds a run ({}); continue it with `gcg train --resume {}`, start it over with `--overwrite`, or set another run_dir",
            root.display(),
            names.join(", "),
            root.display()
        );
    }
    let (store, embed_dim) = open_store(cfg)?;
    let built = build_model(cfg, embed_dim)?;
    let train_path = cfg.data.train.as_ref().ok_or_else(|| anyhow!("[data] train is not set"))?;
    let train_files = SplitFiles {
        annotations: train_path.clone(),
        videos: cfg.data.train_videos.clone(),
        grounding: None,
    };
    let train = Split::open(
        &store,
        cfg.data.train_format(),
        &train_files,
        batch_options(cfg, &built, true)?,
        &cfg.data,
        None,
    )?;
    // With NExT-GQA's spans for it, validation answers the questions that have spans (those
    // `gcg predict --split val` scores) and logs the grounding metrics too.
    let val_grounding = match (&cfg.data.val_grounding, &cfg.data.val) {
        (Some(p), Some(_)) => Some(
            crate::data::nextgqa::Grounding::read_with(
                p,
                &crate::data::ReadOptions {
                    skip_bad_rows: cfg.data.skip_bad_rows,
                },
            )
            .context("data.val_grounding")?,
        ),
        _ => None,
    };
    let open_val = |keep: &dyn Fn(&crate::data::QaSample) -> bool| -> Result<Split> {
        Split::open_only(
            &store,
            cfg.data.dataset,
            &EvalSplit::Val.files(cfg)?,
            batch_options(cfg, &built, false)?,
            &cfg.data,
            cfg.data.max_eval,
            keep,
        )
    };
    let mut val = cfg.data.val.as_ref().map(|_| open_val(&|_| true)).transpose()?;
    check_eval_files(cfg, &store, &built, val.as_ref())?;
    if let (Some(g), Some(_)) = (&val_grounding, &val) {
        val = Some(open_val(&|s| g.segments(&s.video, &s.qid).is_some())?);
    }
    if cfg.data.val.is_some() && cfg.data.val == cfg.data.train && cfg.data.val_videos == cfg.data.train_videos {
        tracing::warn!("[data] val is the training split: validation accuracy (and `best`) will measure fitting, not generalisation");
    }
    if start == RunStart::Overwrite && !existing.is_empty() {
        let n = clear_run_outputs(&root)?;
        tracing::info!("{}: cleared {n} outputs of the previous run", root.display());
    }
    let run = RunDir::new(&root)?;
    if _held.is_none() {
        _held = Some(lock(&root)?);
    }
    let cfg_json = serde_json::to_value(cfg)?;
    crate::util::write_atomic(&run.root.join("config.json"), serde_json::to_string_pretty(&cfg_json)?.as_bytes())?;
    let job = trainer::TrainJob {
        model: &built.model,
        vars: &built.vars,
        cfg: &cfg.train,
        run: &run,
        train_set: &train,
        val_set: val.as_ref().map(|v| v as &dyn BatchSource),
        val_grounding: val_grounding.as_ref(),
        run_config: &cfg_json,
    };
    trainer::train(&job, start == RunStart::Resume, on_event)?;
    Ok(())
}
