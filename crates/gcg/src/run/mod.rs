//! A run, from one config: build the model (pretrained checkpoint or random tiny weights), open
//! the splits from the feature store, train, predict and evaluate. Shared by `gcg train`,
//! `gcg predict` and `gcg demo`.
//!
//! * [`config`] — the run TOML, one struct per table;
//! * [`build`] — the model, the store and the splits it serves;
//! * [`predict`] — prediction files and their scores.
//!
//! A run directory holds `config.json` (the resolved [`RunConfig`]), `metrics.jsonl`,
//! `checkpoints/{last,best}/` and, after prediction, `predictions-{split}.jsonl` and
//! `metrics-{split}.json`.

pub mod build;
pub mod config;
pub mod predict;

pub use build::{build_model, open_store, trainable, BuiltModel, Split};
pub use config::{apply_overrides, DataConfig, DeviceKind, Precision, RunConfig, WeightsConfig};
pub use predict::{
    checkpoint_weights, evaluate_predictions, open_eval_split, predict_annotations, predict_run, predict_split, prediction_row, Checkpoint,
    EvalSplit,
};

use crate::train::trainer::{self, BatchSource, Event, RunDir};
use anyhow::{anyhow, Result};
use build::batch_options;

/// Train a run (resuming from its `last` checkpoint when asked), then evaluate the best
/// checkpoint on the test split when one is configured.
pub fn train_run(cfg: &RunConfig, resume: bool, on_event: &mut dyn FnMut(Event)) -> Result<()> {
    let run = RunDir::new(&cfg.run_dir)?;
    let (store, embed_dim) = open_store(cfg)?;
    let built = build_model(cfg, embed_dim)?;
    let train_path = cfg.data.train.as_ref().ok_or_else(|| anyhow!("[data] train is not set"))?;
    let train = Split::open(
        &store,
        cfg.data.dataset,
        train_path,
        batch_options(cfg, &built, true),
        &cfg.data,
        None,
    )?;
    let val = match &cfg.data.val {
        Some(p) => Some(Split::open(
            &store,
            cfg.data.dataset,
            p,
            batch_options(cfg, &built, false),
            &cfg.data,
            cfg.data.max_eval,
        )?),
        None => None,
    };
    let cfg_json = serde_json::to_value(cfg)?;
    crate::util::write_atomic(&run.root.join("config.json"), serde_json::to_string_pretty(&cfg_json)?.as_bytes())?;
    let job = trainer::TrainJob {
        model: &built.model,
        vars: &built.vars,
        cfg: &cfg.train,
        run: &run,
        train_set: &train,
        val_set: val.as_ref().map(|v| v as &dyn BatchSource),
        run_config: &cfg_json,
    };
    trainer::train(&job, resume, on_event)?;
    Ok(())
}
