//! `gcg check-weights`: load a checkpoint, check every tensor against the model's shapes and
//! report what it holds, as JSON.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::Args;
use gcg::models::checkpoint::open_any;
use gcg::models::lmm::{is_trainable, is_vit_trunk, VideoLmm};
use gcg::models::Preset;
use gcg::weights::checkpoints::is_buffer;
use gcg::weights::hub;
use gcg::weights::Loader;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct CheckWeightsArgs {
    /// An HF InstructBLIP snapshot directory, or a GCG release directory, or a Hugging Face model
    /// id (`Salesforce/instructblip-flan-t5-xl`, `WHB139426/GCG`) resolved through the HF cache
    /// ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub; missing files are downloaded
    /// unless HF_HUB_OFFLINE=1).
    #[arg(long)]
    weights: PathBuf,
    /// The Flan-T5 snapshot for a GCG release, a directory or a model id (default:
    /// `<weights>/flan-t5` when it exists, else google/flan-t5-xl).
    #[arg(long)]
    t5: Option<PathBuf>,
    /// Skip the ViT trunk (when working from cached features).
    #[arg(long)]
    no_vit: bool,
    /// Network sizes: tiny | instructblip-flan-t5-xl, for a GCG release directory, which carries
    /// no config of its own (an HF snapshot's config.json always wins).
    #[arg(long, default_value = "instructblip-flan-t5-xl")]
    preset: Preset,
}

pub fn run(a: CheckWeightsArgs) -> Result<()> {
    let dirs = hub::locate_checkpoint(&a.weights, a.t5.as_deref(), !a.no_vit)?;
    let (src, cfg) = open_any(&dirs.dir, dirs.t5.as_deref(), a.preset)?;
    let no_vit = a.no_vit;
    let lb = Loader::from_source(src.clone(), &Device::Cpu, DType::F32)
        .with_trainable(is_trainable)
        .with_ignored(move |n| is_buffer(n) || (no_vit && is_vit_trunk(n)))
        .collecting_value_problems();
    let _model = VideoLmm::load(&lb, &cfg, !a.no_vit)?;
    lb.finish()?;
    let problems = lb.value_problems();
    let out = json!({
        "weights": a.weights,
        "weights_dir": dirs.dir,
        "t5_dir": dirs.t5,
        "source": src.describe(),
        "tensors": src.names().len(),
        "trainable_params": lb.vars().num_params(),
        "ok": problems.is_empty(),
        "problems": problems,
        "config": cfg,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    if !problems.is_empty() {
        for p in problems.iter().take(20) {
            eprintln!("  {p}");
        }
        bail!(
            "{} of the checkpoint's tensors are unusable (listed above{})",
            problems.len(),
            if problems.len() > 20 {
                ", the first 20; all in the JSON"
            } else {
                ""
            }
        );
    }
    Ok(())
}
