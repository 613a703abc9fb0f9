//! Checkpoints: a directory holding the trainable weights (`weights.safetensors`, under the
//! canonical names, loadable by PyTorch's `safetensors.torch.load_file`), the optimiser moments
//! (`optimizer.safetensors`), the loop position and generator state (`state.json`) and the run
//! config (`config.json`). A checkpoint is written into a temporary directory and renamed into
//! place, so a crash never leaves a half-written checkpoint under the final name.

use super::optim::AdamW;
use crate::rng::SeededRng;
use crate::util::{save_safetensors_atomic, write_atomic, write_dir_atomic};
use crate::weights::{SafetensorsSource, TensorSource, VarStore};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the training loop is, and everything random it will draw next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser updates done.
    pub step: u64,
    /// The epoch in progress (0-based) and the micro-batches of it already consumed.
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// The generator for dropout and the perturbation noise, as it is after the last update.
    pub rng: SeededRng,
    /// The best validation score so far and the step it was reached at.
    pub best_metric: Option<f64>,
    pub best_step: Option<u64>,
    /// Batches skipped because their loss was not finite (`--skip-nonfinite`).
    pub skipped_nonfinite: u64,
}

impl TrainState {
    pub fn new(seed: u64) -> Self {
        Self {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            rng: SeededRng::new(seed),
            best_metric: None,
            best_step: None,
            skipped_nonfinite: 0,
        }
    }
}

pub const WEIGHTS: &str = "weights.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "state.json";
pub const CONFIG: &str = "config.json";

/// Write a checkpoint directory atomically (replacing an existing one of the same name).
pub fn save(dir: &Path, vars: &VarStore, opt: &AdamW, state: &TrainState, config: &serde_json::Value) -> Result<()> {
    // A diverged model never replaces a good checkpoint.
    let bad = vars.non_finite()?;
    if let Some((name, what)) = bad.first() {
        bail!(
            "not saving the checkpoint {} at step {}: {} trainable tensors hold non-finite values (e.g. {name}: {what}); \
             training diverged (lower the learning rate; the checkpoint there is kept)",
            dir.display(),
            state.step,
            bad.len()
        );
    }
    // The old checkpoint moves aside only once the new one is complete, so one complete
    // checkpoint always exists.
    write_dir_atomic(dir, |tmp| {
        vars.save_safetensors(&tmp.join(WEIGHTS))?;
        save_safetensors_atomic(&opt.state_tensors()?, &tmp.join(OPTIMIZER))?;
        write_atomic(&tmp.join(STATE), serde_json::to_string_pretty(state)?.as_bytes())?;
        write_atomic(&tmp.join(CONFIG), serde_json::to_string_pretty(config)?.as_bytes())?;
        Ok(())
    })
    .with_context(|| format!("saving the checkpoint {}", dir.display()))
}

/// A checkpoint read back.
pub struct Loaded {
    pub dir: PathBuf,
    pub weights: SafetensorsSource,
    pub optimizer: BTreeMap<String, Tensor>,
    pub state: TrainState,
    pub config: serde_json::Value,
}

/// Whether a checkpoint is at `dir`, after putting back one that a writer killed mid-swap left
/// beside it (see [`crate::util::restore_interrupted_dir`]; nothing is deleted).
pub fn exists(dir: &Path) -> Result<bool> {
    for p in crate::util::restore_interrupted_dir(dir)? {
        tracing::info!("cleared {}, left by a killed writer", p.display());
    }
    Ok(dir.join(STATE).exists())
}

pub fn load(dir: &Path, dev: &Device) -> Result<Loaded> {
    exists(dir)?;
    if !dir.join(STATE).exists() {
        bail!("{} is not a checkpoint directory (no {STATE})", dir.display());
    }
    let weights = SafetensorsSource::open(dir.join(WEIGHTS))?;
    let opt_src = SafetensorsSource::open(dir.join(OPTIMIZER))?;
    let mut optimizer = BTreeMap::new();
    for n in opt_src.names() {
        optimizer.insert(n.clone(), opt_src.load(&n, dev)?);
    }
    let read =
        |f: &str| -> Result<String> { std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display())) };
    let state: TrainState = serde_json::from_str(&read(STATE)?).with_context(|| format!("parsing {}", dir.join(STATE).display()))?;
    let config: serde_json::Value =
        serde_json::from_str(&read(CONFIG)?).with_context(|| format!("parsing {}", dir.join(CONFIG).display()))?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        weights,
        optimizer,
        state,
        config,
    })
}

impl Loaded {
    /// Put the weights into the variables and the moments into the optimiser.
    pub fn restore(&self, vars: &VarStore, opt: &mut AdamW) -> Result<()> {
        vars.load_from(&self.weights)
            .with_context(|| format!("restoring weights from {}", self.dir.display()))?;
        opt.load_state(&self.optimizer, self.state.step)
            .with_context(|| format!("restoring the optimizer from {}", self.dir.display()))
    }
}
