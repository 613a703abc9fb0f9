//! `gcg train` and `gcg predict`.

use anyhow::{bail, Result};
use clap::Args;
use gcg::run::{self, Checkpoint, EvalSplit, RunConfig};
use gcg::train::trainer::Event;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TrainArgs {
    /// The run config (TOML: run_dir, [weights], [model], [data], [train]; see README).
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint (its config.json is used).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Override a config field, e.g. `--set train.lr=2e-5 --set model.mode=\"uniform\"`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Skip batches whose loss is not finite (counted in the log) instead of stopping.
    #[arg(long)]
    skip_nonfinite: bool,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
}

fn bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
            .unwrap()
            .progress_chars("=> "),
    );
    pb
}

/// Predict a split of a run with its best (or last) checkpoint and score it.
fn predict_and_score(cfg: &RunConfig, split: EvalSplit, which: Checkpoint, quiet: bool) -> Result<()> {
    let pb = bar(0, quiet);
    pb.set_prefix("predict");
    let ev = run::predict_run(cfg, split, which, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    show_scores(&ev, &cfg.run_dir.join(format!("predictions-{split}.jsonl")));
    Ok(())
}

fn predict_to(cfg: &RunConfig, ann: &Path, grounding: Option<&Path>, out: &Path, metrics: Option<&Path>, quiet: bool) -> Result<()> {
    let pb = bar(0, quiet);
    pb.set_prefix("predict");
    let ev = run::predict_annotations(cfg, ann, grounding, out, metrics, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    show_scores(&ev, out);
    Ok(())
}

/// Where the predictions are, the problems found in them, and the metrics table.
fn show_scores(ev: &gcg::eval::Evaluation, out: &Path) {
    eprintln!("predictions: {}", out.display());
    if !ev.problems.is_empty() {
        eprintln!("{} problem(s) in the predictions (first: {})", ev.problems.len(), ev.problems[0]);
    }
    println!("{}", crate::eval::table(&ev.metrics, out));
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    let (mut cfg, resume) = match (&a.config, &a.resume) {
        (_, Some(dir)) => {
            let mut c = RunConfig::from_run_dir(dir)?.with_overrides(&a.overrides)?;
            c.run_dir = dir.clone();
            (c, true)
        }
        (Some(p), None) => (RunConfig::load(Some(p), &a.overrides)?, false),
        (None, None) => bail!("give --config run.toml (a new run) or --resume RUN_DIR"),
    };
    if a.skip_nonfinite {
        cfg.train.skip_nonfinite = true;
    }
    let pb = bar(0, a.quiet);
    pb.set_prefix("train");
    let mut on_event = |e: Event| match e {
        Event::Step(m) => {
            if pb.length() == Some(0) {
                pb.set_length(m.step.max(1));
            }
            pb.set_position(m.step);
            let extra = match (m.reg, m.con) {
                (Some(r), Some(c)) => format!(" reg {r:.3} con {c:.3}"),
                _ => String::new(),
            };
            pb.set_message(format!(
                "ep {} loss {:.4} vqa {:.4}{extra} lr {:.2e} {:.1} samples/s",
                m.epoch, m.loss, m.vqa, m.lr, m.samples_per_s
            ));
            if a.quiet {
                eprintln!(
                    "step {} epoch {} loss {:.4} vqa {:.4}{extra} lr {:.2e}",
                    m.step, m.epoch, m.loss, m.vqa, m.lr
                );
            }
        }
        Event::Validation { epoch, accuracy, best } => {
            pb.println(format!(
                "epoch {epoch}: validation accuracy {accuracy:.2}%{}",
                if best { " (best)" } else { "" }
            ));
        }
        Event::SkippedNonFinite { step, epoch, batch } => {
            pb.println(format!("skipped batch {batch} of epoch {epoch} (non-finite loss) at step {step}"))
        }
        Event::Checkpoint(_) => {}
    };
    run::train_run(&cfg, resume, &mut on_event)?;
    pb.finish_and_clear();
    eprintln!("run directory: {}", cfg.run_dir.display());
    if cfg.data.test.is_some() {
        let which = Checkpoint::best_or_last(&cfg.run_dir);
        eprintln!("test split with the {which} checkpoint:");
        predict_and_score(&cfg, EvalSplit::Test, which, a.quiet)?;
    }
    Ok(())
}

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
    /// val | test: the split's annotations from the config.
    #[arg(long)]
    split: Option<EvalSplit>,
    /// Or an annotation file directly.
    #[arg(long)]
    annotations: Option<PathBuf>,
    /// NExT-GQA grounding annotations (gsub json) for the grounding metrics.
    #[arg(long)]
    grounding: Option<PathBuf>,
    /// The feature store (default: the config's).
    #[arg(long)]
    store: Option<PathBuf>,
    /// The prediction file (JSONL; resumed when it exists).
    #[arg(long)]
    out: PathBuf,
    /// Also write the metrics here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[arg(long)]
    quiet: bool,
}

pub fn run_predict(a: PredictArgs) -> Result<()> {
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
    cfg = cfg.with_overrides(&a.overrides)?;
    if let Some(s) = &a.store {
        cfg.data.store = s.clone();
    }
    let (ann, grounding) = match (&a.annotations, a.split) {
        (Some(p), _) => (p.clone(), a.grounding.clone()),
        (None, Some(split)) => {
            let (ann, grounding) = split.files(&cfg)?;
            (ann, a.grounding.clone().or(grounding))
        }
        (None, None) => bail!("give --split val|test or --annotations PATH"),
    };
    predict_to(&cfg, &ann, grounding.as_deref(), &a.out, a.json.as_deref(), a.quiet)
}
