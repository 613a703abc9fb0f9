//! `gcg train`: a run from its config (resumable); the test split scored at the end.

use crate::args::{progress_bar, QuietArg};
use anyhow::{bail, Result};
use clap::Args;
use gcg::run::{self, Checkpoint, EvalSplit, RunConfig, RunStart};
use gcg::train::trainer::Event;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// The run config (TOML: run_dir, [weights], [model], [data], [train]; see README). Its
    /// run_dir (default runs/<file stem> beside the file) must not hold another run.
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint (its config.json is used).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// With --config: start over in a run_dir that holds a previous run, clearing its
    /// checkpoints, metrics and predictions first.
    #[arg(long, requires = "config")]
    overwrite: bool,
    /// Override a config field (repeatable), e.g. `--set train.lr=2e-5 --set model.mode=\"uniform\"`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Skip batches whose loss is not finite (counted in the log) instead of stopping.
    #[arg(long)]
    skip_nonfinite: bool,
    /// Print the resolved config (every default filled in, paths made absolute, overrides
    /// applied) as TOML on stdout and exit without training.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    quiet: QuietArg,
}

/// Predict a split of a run with its best (or last) checkpoint and score it.
fn predict_and_score(cfg: &RunConfig, split: EvalSplit, which: Checkpoint, quiet: bool) -> Result<()> {
    let pb = progress_bar(0, quiet);
    pb.set_prefix("predict");
    let ev = run::predict_run(cfg, split, which, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    crate::report::show_scores(&ev, &cfg.run_dir()?.join(format!("predictions-{split}.jsonl")));
    Ok(())
}

/// The checkpoints of a run were trained as its `[model]` and `[weights]` say (the frozen T5 and
/// ViT are rebuilt from `[weights]`, they are not in the checkpoint): resuming or predicting with
/// it may change the schedule or the data, not what the weights mean (nor `init`, the checkpoint
/// loaded). Only where the frozen weights are read from may change (`pretrained`, `t5`,
/// `tokenizers`, `vit` moved to another path), never whether they are read.
pub fn check_same_model(dir: &std::path::Path, stored: &RunConfig, new: &RunConfig, what: &str) -> Result<()> {
    let mut moved = new.weights.clone();
    for (m, s) in [
        (&mut moved.pretrained, &stored.weights.pretrained),
        (&mut moved.t5, &stored.weights.t5),
        (&mut moved.tokenizers, &stored.weights.tokenizers),
        (&mut moved.vit, &stored.weights.vit),
    ] {
        if m.is_some() && s.is_some() {
            m.clone_from(s);
        }
    }
    for (table, changed) in [("[model]", new.model != stored.model), ("[weights]", moved != stored.weights)] {
        if changed {
            bail!(
                "{what} {} cannot change its {table} settings (its checkpoints were trained with them; the \
                 predictions and metrics would describe another model); start a new run with --config instead",
                dir.display()
            );
        }
    }
    Ok(())
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    let (mut cfg, start) = match (&a.config, &a.resume) {
        (_, Some(dir)) => {
            let stored = RunConfig::from_run_dir(dir)?;
            let mut c = stored.with_overrides(&a.overrides)?;
            check_same_model(dir, &stored, &c, "--resume")?;
            c.run_dir = Some(dir.clone());
            (c, RunStart::Resume)
        }
        (Some(p), None) => {
            let c = RunConfig::load(Some(p), &a.overrides)?;
            let sets_run_dir = std::fs::read_to_string(p)
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .is_some_and(|t| t.contains_key("run_dir"))
                || a.overrides.iter().any(|o| o.trim_start().starts_with("run_dir"));
            let derived = !sets_run_dir;
            eprintln!(
                "run directory: {}{}",
                c.run_dir()?.display(),
                if derived { " (the config sets no run_dir)" } else { "" }
            );
            (c, if a.overwrite { RunStart::Overwrite } else { RunStart::New })
        }
        (None, None) => bail!("give --config run.toml (a new run) or --resume RUN_DIR"),
    };
    if a.skip_nonfinite {
        cfg.train.skip_nonfinite = true;
    }
    if a.print_config {
        cfg.validate()?;
        let mut resolved = cfg.absolute()?;
        resolved.run_dir = Some(cfg.run_dir()?.to_path_buf());
        print!("{}", resolved.to_toml_with_unset()?);
        return Ok(());
    }
    let pb = progress_bar(0, a.quiet.quiet);
    pb.set_prefix("train");
    let mut skipped = 0u64;
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
            if a.quiet.quiet {
                eprintln!(
                    "step {} epoch {} loss {:.4} vqa {:.4}{extra} lr {:.2e}",
                    m.step, m.epoch, m.loss, m.vqa, m.lr
                );
            }
        }
        Event::Validation {
            epoch,
            accuracy,
            best,
            grounding,
        } => {
            let g = grounding
                .map(|g| format!(", mIoP {:.2}, IoP@0.5 {:.2}, Acc@GQA {:.2}", g.m_iop, g.iop_05, g.acc_gqa))
                .unwrap_or_default();
            let line = format!(
                "epoch {epoch}: validation accuracy {accuracy:.2}%{g}{}",
                if best { " (best)" } else { "" }
            );
            // A hidden bar (stderr not a terminal: a log file) prints nothing of its own.
            if pb.is_hidden() {
                eprintln!("{line}");
            } else {
                pb.println(line);
            }
        }
        Event::SkippedNonFinite { step, epoch, batch } => {
            skipped += 1;
            let line = format!("skipped batch {batch} of epoch {epoch} (non-finite loss) after step {step}");
            if pb.is_hidden() {
                eprintln!("{line}");
            } else {
                pb.println(line);
            }
        }
        Event::Checkpoint(_) => {}
    };
    let trained = run::train_run(&cfg, start, &mut on_event);
    pb.finish_and_clear();
    if skipped > 0 {
        eprintln!("skipped {skipped} batches with a non-finite loss (--skip-nonfinite; listed in metrics.jsonl)");
    }
    trained?;
    let run_dir = cfg.run_dir()?;
    eprintln!("trained: checkpoints and metrics.jsonl in {}", run_dir.display());
    if cfg.data.test.is_some() {
        let which = Checkpoint::best_or_last(run_dir);
        eprintln!("test split with the {which} checkpoint:");
        predict_and_score(&cfg, EvalSplit::Test, which, a.quiet.quiet)?;
    }
    Ok(())
}
