//! `gcg predict`: answer a split with a trained run (or a pretrained model): predictions JSONL
//! and their metrics.

use crate::args::{progress_bar, QuietArg};
use anyhow::{bail, Result};
use clap::Args;
use gcg::data::SplitFiles;
use gcg::eval::OnMismatch;
use gcg::run::{self, Checkpoint, EvalSplit, RunConfig};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct PredictArgs {
    /// A run directory (its config and checkpoint).
    #[arg(long, conflicts_with = "config")]
    run: Option<PathBuf>,
    /// Or a run config (e.g. a pretrained checkpoint with `[weights] pretrained`, no training).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Which checkpoint of the run: best | last (best falls back to last in a run without
    /// validation).
    #[arg(long, default_value = "best")]
    checkpoint: Checkpoint,
    /// The split: val | test (its annotations from the config).
    #[arg(long)]
    split: Option<EvalSplit>,
    /// Or an annotation file directly.
    #[arg(long)]
    annotations: Option<PathBuf>,
    /// NExT-GQA: `gsub_{val,test}.json`, for the grounding metrics (default with --split: the
    /// config's).
    #[arg(long)]
    grounding: Option<PathBuf>,
    /// The feature store (default: the config's).
    #[arg(long)]
    store: Option<PathBuf>,
    /// The prediction file (JSONL, with its provenance in FILE.meta.json; an existing file is
    /// resumed when the same model wrote it, and refused otherwise).
    #[arg(long)]
    out: PathBuf,
    /// Also write the metrics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Override a config field (repeatable), e.g. `--set data.workers=4`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[command(flatten)]
    quiet: QuietArg,
}

pub fn run(a: PredictArgs) -> Result<()> {
    let mut cfg = match (&a.run, &a.config) {
        (Some(dir), _) => {
            let mut c = RunConfig::from_run_dir(dir)?;
            let which = match a.checkpoint {
                Checkpoint::Best => Checkpoint::best_or_last(dir),
                Checkpoint::Last => Checkpoint::Last,
            };
            c.weights.init = Some(run::checkpoint_weights(dir, which)?);
            c
        }
        (None, Some(p)) => RunConfig::load(Some(p), &[])?,
        (None, None) => bail!("give --run RUN_DIR or --config run.toml"),
    };
    let stored = cfg.clone();
    cfg = cfg.with_overrides(&a.overrides)?;
    if let Some(dir) = &a.run {
        crate::train::check_same_model(dir, &stored, &cfg, "predict --run")?;
    }
    if let Some(s) = &a.store {
        cfg.data.store = s.clone();
    }
    let files = match (&a.annotations, a.split) {
        (Some(p), _) => SplitFiles {
            grounding: a.grounding.clone(),
            ..SplitFiles::annotations(p)
        },
        (None, Some(split)) => {
            let files = split.files(&cfg)?;
            SplitFiles {
                grounding: a.grounding.clone().or(files.grounding.clone()),
                ..files
            }
        }
        (None, None) => bail!("give --split val|test or --annotations PATH"),
    };
    // The files this command reads on its own count as inputs too: a typo must not put the
    // predictions or the metrics over a checkpoint, the run's config or the store.
    let run_files = a.run.as_ref().map(|r| (r.join("config.json"), r.join("checkpoints")));
    let sidecar = gcg::eval::Provenance::path_of(&a.out);
    let inputs = [
        ("--annotations", Some(files.annotations.as_path())),
        ("--grounding", files.grounding.as_deref()),
        ("split videos", files.videos.as_deref()),
        ("feature store", Some(cfg.data.store.as_path())),
        ("trained weights", cfg.weights.init.as_deref()),
        ("run's config", run_files.as_ref().map(|(c, _)| c.as_path())),
        ("run's checkpoints", run_files.as_ref().map(|(_, k)| k.as_path())),
    ];
    crate::args::check_not_an_input("--out", &a.out, &inputs)?;
    if let Some(j) = &a.json {
        crate::args::check_not_an_input("--json", j, &inputs)?;
        crate::args::check_not_an_input(
            "--json",
            j,
            &[("--out", Some(a.out.as_path())), ("--out's provenance", Some(sidecar.as_path()))],
        )?;
        gcg::eval::check_metrics_target(j)?;
    }
    predict_to(&cfg, &files, &a.out, a.json.as_deref(), a.quiet.quiet)
}

fn predict_to(cfg: &RunConfig, files: &SplitFiles, out: &Path, metrics: Option<&Path>, quiet: bool) -> Result<()> {
    let pb = progress_bar(0, quiet);
    pb.set_prefix("predict");
    let ev = run::predict_annotations(cfg, files, out, metrics, OnMismatch::Refuse, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    crate::report::show_scores(&ev, out);
    Ok(())
}
