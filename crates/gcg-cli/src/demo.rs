//! `gcg demo`: the whole pipeline on a synthetic grounded VideoQA world (no downloads).

use crate::args::{progress_bar, QuietArg};
use anyhow::Result;
use clap::Args;
use gcg::demo::{run_demo, DemoConfig, DemoEvent};
use gcg::model::Mode;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Seed of the world, the encoders and the training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder (replaced when it holds a previous demo: the new one is built beside it and
    /// swapped in when complete, so a killed demo leaves the previous one intact).
    #[arg(long, default_value = "gcg-demo")]
    pub out: PathBuf,
    /// A small, fast run (for tests): fewer videos, steps and epochs.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub quiet: QuietArg,
    /// Videos in the world (default 300; quick 24).
    #[arg(long)]
    pub videos: Option<usize>,
    /// Training epochs per mode.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Questions per training batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Learning rate of the language model in the modes' training.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of the grounding module.
    #[arg(long)]
    pub grounding_lr: Option<f64>,
    /// Grounding mode: epochs in which the grounding module trains alone on its weak losses
    /// before the joint epochs (0: none, the official recipe).
    #[arg(long)]
    pub grounding_warmup: Option<u64>,
    /// Epochs of the shared language-model pre-training (0: none).
    #[arg(long)]
    pub pretrain_epochs: Option<u64>,
    /// The models' modes to train, comma-separated: uniform | oracle | grounding (default
    /// uniform,grounding,oracle).
    #[arg(long, value_delimiter = ',')]
    pub modes: Option<Vec<Mode>>,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let mut cfg = if a.quick {
        DemoConfig::quick(a.seed)
    } else {
        DemoConfig::standard(a.seed)
    };
    if let Some(v) = a.videos {
        cfg.world.videos = v;
    }
    if let Some(m) = a.modes.clone() {
        cfg.modes = m;
    }
    if let Some(b) = a.batch {
        cfg.run.train.batch_size = b;
    }
    if let Some(lr) = a.lr {
        cfg.run.train.lr = lr;
    }
    if let Some(lr) = a.grounding_lr {
        cfg.run.train.grounding_lr = lr;
    }
    if let Some(e) = a.pretrain_epochs {
        cfg.pretrain_epochs = e;
    }
    if let Some(e) = a.epochs {
        cfg.run.train.epochs = e;
    }
    if let Some(e) = a.grounding_warmup {
        cfg.run.train.grounding_warmup_epochs = e;
    }
    let quiet = a.quiet.quiet;
    let pb = progress_bar(0, quiet);
    let result = run_demo(&cfg, &a.out, &mut |e| match e {
        DemoEvent::Stage { name, total } => {
            pb.set_prefix(name.to_string());
            pb.set_length(total);
            pb.set_position(0);
            pb.set_message("");
            if quiet {
                eprintln!("stage: {name}");
            }
        }
        DemoEvent::Progress { done, message } => {
            if pb.length().is_some_and(|l| done > l) {
                pb.set_length(done);
            }
            pb.set_position(done);
            pb.set_message(message);
        }
        DemoEvent::Note(line) => {
            if quiet {
                eprintln!("{line}");
            } else {
                pb.println(line);
            }
        }
    })?;
    pb.finish_and_clear();
    println!(
        "{:<10} {:>9} {:>8} {:>8} {:>10}",
        "mode", "accuracy", "IoP@0.5", "mIoU", "event hit"
    );
    for m in &result.modes {
        println!(
            "{:<10} {:>8.1}% {:>7.1}% {:>7.1}% {:>9.1}%",
            m.mode, m.accuracy, m.iop5, m.miou, m.event_hit
        );
    }
    println!("report: {} ({:.0} s)", a.out.join("report.md").display(), result.seconds);
    Ok(())
}
