//! The training loop: epochs over cached features with seeded shuffling, gradient accumulation,
//! clipping, AdamW groups and the schedule; validation each epoch with deterministic answering;
//! the best-on-validation checkpoint kept; test evaluated only at the end; metrics to a JSONL log;
//! resumable to the identical loss sequence.

use super::checkpoint::{self, TrainState};
use super::optim::{AdamW, AdamWConfig, Grads, GroupConfig};
use super::schedule::{LrSchedule, Schedule};
use crate::data::Batch;
use crate::model::{Answered, GcgModel, Losses, Mode};
use crate::rng::SeededRng;
use crate::weights::VarStore;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The optimisation settings of a run (the `[train]` table of run.toml).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub seed: u64,
    /// Epochs of the joint objective L_vqa + α1·L_reg + α2·L_con.
    pub epochs: u64,
    /// Grounding mode only: epochs before the joint ones in which the grounding module trains
    /// alone on its weak losses α1·L_reg + α2·L_con (pseudo-labels; no language model runs, so
    /// an epoch costs a small fraction of a joint one). The generator needs far more steps than
    /// the language model to learn where events are (see the demo report); 0 = the official
    /// recipe. These epochs run at the constant `grounding_lr` (a decaying rate leaves the
    /// generator on its L_reg plateau) and are validated only at their end; the joint epochs
    /// then run `schedule` from its start. Ignored in the other modes.
    pub grounding_warmup_epochs: u64,
    /// Questions per micro-batch (4: the official per-GPU batch, which keeps L_con's three
    /// in-batch answer negatives).
    pub batch_size: usize,
    /// Micro-batches per optimiser step (8: the official 8 GPUs; 4 × 8 = 32 questions per step).
    /// The last group of an epoch may be shorter; its gradient is the mean over its questions.
    /// With more than one, each micro-batch draws its randomness (dropout, top-k noise) from
    /// its own stream, seeded from the run's generator at the start of its group, so that the
    /// result does not depend on `data_parallel`.
    pub grad_accum: usize,
    /// Micro-batches of one optimiser step computed side by side, each on its own thread
    /// (data parallelism on the CPU, as DDP's one micro-batch per GPU): their gradients are
    /// summed in micro-batch order, so the run is identical for every value. Worth it for
    /// small models, whose operations are too small to split across cores: with `--threads 1`,
    /// `data_parallel = cores` keeps every core busy. Each thread holds its own activations
    /// (memory × `data_parallel`). 1 = one micro-batch at a time.
    pub data_parallel: usize,
    /// Learning rate of the Q-Former, query tokens, projection and frame positions.
    pub lr: f64,
    /// Learning rate of the grounding module.
    pub grounding_lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `constant` or `warmup-cosine`.
    pub schedule: LrSchedule,
    /// Warm-up as a fraction of all optimiser steps (warmup-cosine).
    pub warmup_fraction: f64,
    /// Warm-up start and final learning rate, as fractions of the base rates (`official`: of
    /// `lr`; the defaults give the official 1e-8 and 5e-6 for lr = 1e-5).
    pub warmup_start_factor: f64,
    pub min_lr_factor: f64,
    /// `official` schedule: epochs of its cosine half-period (the official `max_T`).
    pub cosine_epochs: u64,
    /// Clip gradients to this global norm (none when absent).
    pub max_grad_norm: Option<f64>,
    /// Skip a batch whose loss is not finite (counted) instead of stopping with an error.
    pub skip_nonfinite: bool,
    /// Also train the language model (tiny models trained from scratch, e.g. the demo); GCG
    /// keeps it frozen.
    pub train_t5: bool,
    /// Also validate (and keep `best`) after every this many optimiser steps of the joint
    /// epochs (counted from the first joint step), besides each epoch's end. (The official
    /// `--eval_step k` validates every 1/k epoch from the second epoch on, not in an epoch's last
    /// tenth: with S steps an epoch, `validate_every = S / k` is the nearest setting.)
    pub validate_every: Option<u64>,
    /// Write the `last` checkpoint every this many optimiser steps (and at each epoch end).
    pub checkpoint_every: u64,
    /// Stop after this many optimiser steps (for smoke runs and tests).
    pub max_steps: Option<u64>,
    /// Log a metrics row every this many optimiser steps.
    pub log_every: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 3407,
            epochs: 10,
            grounding_warmup_epochs: 0,
            batch_size: 4,
            grad_accum: 8,
            data_parallel: 1,
            lr: 1e-5,
            grounding_lr: 7e-5,
            weight_decay: 0.02,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: LrSchedule::Constant,
            warmup_fraction: 0.025,
            warmup_start_factor: 1e-3,
            min_lr_factor: 0.5,
            cosine_epochs: 30,
            max_grad_norm: None,
            skip_nonfinite: false,
            train_t5: false,
            validate_every: None,
            checkpoint_every: 500,
            max_steps: None,
            log_every: 1,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 || self.data_parallel == 0 {
            bail!(
                "batch_size, grad_accum and data_parallel must be at least 1 (got {}, {}, {})",
                self.batch_size,
                self.grad_accum,
                self.data_parallel
            );
        }
        if self.epochs == 0 && self.grounding_warmup_epochs == 0 {
            bail!("epochs = 0 (and no grounding_warmup_epochs) trains nothing; give at least 1 epoch");
        }
        if !(0.0..=1.0).contains(&self.warmup_fraction) {
            bail!(
                "warmup_fraction = {} is not a fraction of the steps (expected 0 to 1)",
                self.warmup_fraction
            );
        }
        for (name, v) in [
            ("warmup_start_factor", self.warmup_start_factor),
            ("min_lr_factor", self.min_lr_factor),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{name} = {v} is not a fraction of the base learning rate (expected 0 to 1)");
            }
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                bail!("max_grad_norm = {m}: clipping needs a finite norm > 0 (leave it out for no clipping)");
            }
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("{name} = {v}: AdamW's moment decay must be in [0, 1) (the official 0.9 and 0.999)");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!(
                "eps = {}: AdamW's epsilon must be a finite number > 0 (the official 1e-8)",
                self.eps
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "weight_decay = {}: must be a finite number >= 0 (the official 0.02)",
                self.weight_decay
            );
        }
        if self.validate_every == Some(0) {
            bail!("validate_every must be at least 1 step (leave it out to validate at epoch ends only)");
        }
        if self.cosine_epochs == 0 {
            bail!("cosine_epochs must be at least 1 (the official max_T is 30)");
        }
        if !(self.lr > 0.0 && self.grounding_lr > 0.0) {
            bail!(
                "learning rates must be positive (lr {}, grounding_lr {})",
                self.lr,
                self.grounding_lr
            );
        }
        for (name, v) in [("lr", self.lr), ("grounding_lr", self.grounding_lr)] {
            if v > 1.0 {
                bail!(
                    "{name} = {v:e}: AdamW moves every weight by up to the learning rate at each step, so a rate above 1 \
                     destroys the model (GCG uses lr = 1e-5 and grounding_lr = 7e-5)"
                );
            }
        }
        Ok(())
    }

    /// The schedule of `epochs` epochs of `steps_per_epoch` optimiser steps.
    pub fn schedule(&self, steps_per_epoch: u64, epochs: u64) -> Schedule {
        let total_steps = steps_per_epoch * epochs;
        match self.schedule {
            LrSchedule::WarmupCosine => Schedule::WarmupCosine {
                warmup_steps: (self.warmup_fraction * total_steps as f64).round() as u64,
                total_steps,
                warmup_start_factor: self.warmup_start_factor,
                min_factor: self.min_lr_factor,
            },
            LrSchedule::Official => Schedule::Official {
                steps_per_epoch,
                warmup_steps: steps_per_epoch / 4,
                init_lr: self.lr,
                warmup_start_lr: self.warmup_start_factor * self.lr,
                min_lr: self.min_lr_factor * self.lr,
                max_epochs: self.cosine_epochs,
            },
            LrSchedule::Constant => Schedule::Constant,
        }
    }

    /// The two parameter groups of the official code: everything, and the grounding module.
    pub fn optimizer(&self, vars: &VarStore) -> Result<AdamW> {
        let groups = vec![
            GroupConfig {
                name: "base".into(),
                lr: self.lr,
                weight_decay: self.weight_decay,
            },
            GroupConfig {
                name: "grounding".into(),
                lr: self.grounding_lr,
                weight_decay: self.weight_decay,
            },
        ];
        AdamW::new(
            vars,
            groups,
            AdamWConfig {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
            },
            |n| usize::from(crate::grounding::is_trainable(n)),
        )
    }
}

/// Batches of a split in a deterministic order for (seed, epoch).
pub trait BatchSource {
    /// Number of micro-batches per epoch.
    fn num_batches(&self) -> usize;
    /// The epoch's batches in order; `skip` leading batches are not produced (resume).
    fn batches(&self, epoch: u64, skip: usize) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>>;
}

/// One row of the metrics log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub vqa: f64,
    pub reg: Option<f64>,
    pub con: Option<f64>,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub samples_per_s: f64,
    /// A grounding warm-up step (the grounding module alone; `vqa` is 0).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warmup: bool,
}

/// What the loop tells its caller (progress bars, logs).
pub enum Event<'a> {
    Step(&'a StepMetrics),
    SkippedNonFinite {
        step: u64,
        epoch: u64,
        batch: u64,
    },
    /// `grounding`: NExT-GQA's metrics of the validation questions (a run with `val_grounding`).
    Validation {
        epoch: u64,
        accuracy: f64,
        best: bool,
        grounding: Option<&'a crate::eval::grounding::GroundingMetrics>,
    },
    Checkpoint(&'a Path),
}

/// Is the answer right (multiple choice, or exact match of a text)?
fn is_right(s: &crate::data::QaSample, a: &Answered) -> bool {
    match (&s.answer, &a.prediction) {
        (crate::data::Answer::Choice(x), crate::data::Answer::Choice(y)) => x == y,
        (crate::data::Answer::Text(x), crate::data::Answer::Text(y)) => x.trim().eq_ignore_ascii_case(y.trim()),
        _ => false,
    }
}

/// NExT-GQA's grounding metrics of answered questions: each one's span is its first to last
/// moment in seconds (as `gcg predict` writes it), scored against `gt` as `gcg eval` scores a
/// prediction file (questions of `gt` not answered here are left out, as the official script
/// leaves out questions without a prediction).
pub fn grounding_of(batches: &[(Batch, Vec<Answered>)], gt: &crate::data::nextgqa::Grounding) -> crate::eval::grounding::GroundingMetrics {
    let mut spans = std::collections::HashMap::new();
    for (b, answers) in batches {
        for (s, a) in b.samples.iter().zip(answers) {
            if let Some(span) = a.span() {
                spans.insert((s.video.clone(), s.qid.clone()), (span, is_right(s, a)));
            }
        }
    }
    crate::eval::grounding::grounding_metrics(gt, |video, qid| spans.get(&(video.to_string(), qid.to_string())).copied())
}

/// Accuracy of answers against their samples (multiple choice or exact match).
pub fn accuracy(batches: &[(Batch, Vec<Answered>)]) -> f64 {
    let mut n = 0usize;
    let mut right = 0usize;
    for (b, answers) in batches {
        for (s, a) in b.samples.iter().zip(answers) {
            n += 1;
            right += usize::from(is_right(s, a));
        }
    }
    if n == 0 {
        0.0
    } else {
        100.0 * right as f64 / n as f64
    }
}

/// Answer every batch of a source (deterministic).
pub fn answer_all(model: &GcgModel, source: &dyn BatchSource) -> Result<Vec<(Batch, Vec<Answered>)>> {
    let _casts_kept = crate::nn::no_grad(); // weights cast to bf16 once for all batches
    let mut out = Vec::new();
    for b in source.batches(0, 0)? {
        let b = b?;
        let a = model.answer(&b)?;
        out.push((b, a));
    }
    Ok(out)
}

/// A run directory: `config.json`, `metrics.jsonl`, `checkpoints/{last,best}`.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("checkpoints")).with_context(|| format!("creating run directory {}", root.display()))?;
        Ok(Self { root })
    }
    pub fn last(&self) -> PathBuf {
        self.root.join("checkpoints/last")
    }
    pub fn best(&self) -> PathBuf {
        self.root.join("checkpoints/best")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// Append one JSON row to the metrics log (one write per line; flushed).
    pub fn log(&self, row: &serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.metrics())?;
        writeln!(f, "{}", serde_json::to_string(row)?)?;
        f.flush()?;
        Ok(())
    }

    /// Cut the metrics log back to what `state` (a checkpoint being resumed) had done: training
    /// rows past its step and validation rows of epochs it had not finished are dropped (they
    /// are logged again when the resumed run reaches them), as is an incomplete last line. The
    /// log is rewritten atomically. Returns the number of rows dropped.
    pub fn truncate_log(&self, state: &TrainState) -> Result<usize> {
        let path = self.metrics();
        if !path.exists() {
            return Ok(0);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut kept = String::with_capacity(text.len());
        let mut dropped = 0;
        for (i, line) in text.split_inclusive('\n').enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row: Option<serde_json::Value> = serde_json::from_str(line).ok().filter(|_| line.ends_with('\n'));
            let keep = match &row {
                None => {
                    tracing::warn!("{}:{}: dropping an unreadable metrics row", path.display(), i + 1);
                    false
                }
                // A mid-epoch validation is redone when the resumed run's step has not passed it.
                Some(r) if r.get("mid_epoch").is_some() => r.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s <= state.step),
                Some(r) if r.get("split").is_some() => r.get("epoch").and_then(|e| e.as_u64()).is_some_and(|e| e < state.epoch),
                // A skipped batch is met again when the resumed run has not passed it.
                Some(r) if r.get("skipped_nonfinite").is_some() => {
                    let at = |k: &str| r.get(k).and_then(|v| v.as_u64());
                    matches!((at("epoch"), at("batch")), (Some(e), Some(b)) if (e, b) < (state.epoch, state.batch_in_epoch))
                }
                Some(r) => r.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s <= state.step),
            };
            if keep {
                kept.push_str(line);
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            crate::util::write_atomic(&path, kept.as_bytes())?;
        }
        Ok(dropped)
    }
}

/// A training job: the model with its trainable variables, the data, and where it writes.
pub struct TrainJob<'a> {
    pub model: &'a GcgModel,
    /// The model's trainable variables.
    pub vars: &'a VarStore,
    pub cfg: &'a TrainConfig,
    pub run: &'a RunDir,
    pub train_set: &'a dyn BatchSource,
    pub val_set: Option<&'a dyn BatchSource>,
    /// NExT-GQA's spans of the validation questions (`[data] val_grounding`): validation logs
    /// the grounding metrics beside the accuracy.
    pub val_grounding: Option<&'a crate::data::nextgqa::Grounding>,
    /// The run's resolved config, saved with every checkpoint.
    pub run_config: &'a serde_json::Value,
}

/// The shape of a run in optimiser steps.
struct Plan {
    /// Micro-batches per epoch.
    batches_per_epoch: u64,
    /// Grounding warm-up epochs (grounding mode) before the joint ones, and their steps.
    warmup_epochs: u64,
    warmup_steps: u64,
    all_epochs: u64,
    /// The joint epochs' learning-rate schedule.
    schedule: Schedule,
}

impl Plan {
    fn new(job: &TrainJob) -> Result<Self> {
        let cfg = job.cfg;
        let batches_per_epoch = job.train_set.num_batches() as u64;
        if batches_per_epoch == 0 {
            bail!("the training set yields no batches");
        }
        let steps_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accum as u64);
        // The grounding warm-up (grounding mode only) comes first, at constant learning rates.
        let mode = job.model.cfg.mode;
        let warmup_epochs = if mode == Mode::Grounding {
            cfg.grounding_warmup_epochs
        } else {
            if cfg.grounding_warmup_epochs > 0 {
                tracing::info!("grounding_warmup_epochs ignored in {} mode", mode.name());
            }
            0
        };
        if warmup_epochs + cfg.epochs == 0 {
            bail!(
                "epochs = 0 trains nothing in {} mode (grounding_warmup_epochs counts only in grounding mode)",
                mode.name()
            );
        }
        // The schedule spans the whole run; `max_steps` only stops early (a smoke run or a
        // simulated kill must not change the learning rates).
        Ok(Self {
            batches_per_epoch,
            warmup_epochs,
            warmup_steps: steps_per_epoch * warmup_epochs,
            all_epochs: warmup_epochs + cfg.epochs,
            schedule: cfg.schedule(steps_per_epoch, cfg.epochs),
        })
    }
}

/// Gradients and loss sums of the micro-batches of one optimiser step.
struct Accumulator {
    grads: Grads,
    micro: usize,
    loss: f64,
    vqa: f64,
    reg: Option<f64>,
    con: Option<f64>,
    samples: usize,
    started: Instant,
}

impl Accumulator {
    fn new() -> Self {
        Self {
            grads: Grads::new(),
            micro: 0,
            loss: 0.0,
            vqa: 0.0,
            reg: None,
            con: None,
            samples: 0,
            started: Instant::now(),
        }
    }

    fn add(&mut self, micro: &MicroStep, samples: usize, vars: &VarStore, scale: f64) -> Result<()> {
        let (losses, loss) = (&micro.losses, micro.loss);
        let store = micro.grads.as_ref().context("a finite micro-batch loss without its gradients")?;
        self.grads.accumulate(store, vars, scale)?;
        self.micro += 1;
        self.loss += loss;
        self.vqa += losses.vqa.to_scalar::<f32>()? as f64;
        let scalar = |t: &candle_core::Tensor| -> Result<f64> { Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64) };
        if let Some(r) = &losses.reg {
            *self.reg.get_or_insert(0.0) += scalar(r)?;
        }
        if let Some(c) = &losses.con {
            *self.con.get_or_insert(0.0) += scalar(c)?;
        }
        self.samples += samples;
        Ok(())
    }

    /// The metrics row of the step these micro-batches made.
    fn metrics(&self, step: u64, epoch: u64, lr: f64, grad_norm: Option<f64>, warmup: bool) -> StepMetrics {
        let n = self.micro as f64;
        StepMetrics {
            step,
            epoch,
            loss: self.loss / n,
            vqa: self.vqa / n,
            reg: self.reg.map(|r| r / n),
            con: self.con.map(|c| c / n),
            lr,
            grad_norm,
            samples_per_s: self.samples as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
            warmup,
        }
    }
}

/// Train `job.model`. Resumes from `run/checkpoints/last` when `resume` and it exists. Returns
/// the final state.
pub fn train(job: &TrainJob, resume: bool, on_event: &mut dyn FnMut(Event)) -> Result<TrainState> {
    let (cfg, run) = (job.cfg, job.run);
    cfg.validate()?;
    let mut opt = cfg.optimizer(job.vars)?;
    let mut state = TrainState::new(cfg.seed);
    if resume && checkpoint::exists(&run.last())? {
        let loaded = checkpoint::load(&run.last(), &job.model.lmm.query_tokens.device().clone())?;
        loaded.restore(job.vars, &mut opt)?;
        state = loaded.state;
        tracing::info!("resumed from {} at step {}", run.last().display(), state.step);
        // Rows logged after this checkpoint are logged again by the resumed run.
        let dropped = run.truncate_log(&state)?;
        if dropped > 0 {
            tracing::info!(
                "{}: dropped {dropped} rows logged after step {}",
                run.metrics().display(),
                state.step
            );
        }
    } else {
        if resume {
            // A run killed before its first checkpoint has nothing to resume; say so, louder
            // when a `best` shows it had trained (its `last` was removed).
            let best = run.root.join("checkpoints").join("best");
            tracing::warn!(
                "{}: no checkpoint to resume from ({} is missing{}); the run starts over at step 1",
                run.root.display(),
                run.last().display(),
                if best.exists() { ", though checkpoints/best exists" } else { "" }
            );
        }
        if run.metrics().exists() {
            // A fresh run starts a fresh log.
            std::fs::remove_file(run.metrics())?;
        }
    }
    let plan = Plan::new(job)?;
    let rng = RefCell::new(state.rng.clone());
    while state.epoch < plan.all_epochs {
        let finished = train_epoch(job, &plan, &mut opt, &mut state, &rng, on_event)?;
        if !finished {
            break;
        }
        end_epoch(job, &plan, &opt, &mut state, on_event)?;
    }
    // A stop at max_steps mid-epoch also leaves a resumable checkpoint.
    checkpoint::save(&run.last(), job.vars, &opt, &state, job.run_config)?;
    Ok(state)
}

/// The rest of the current epoch's optimiser steps. False when `max_steps` stopped it early.
fn train_epoch(
    job: &TrainJob,
    plan: &Plan,
    opt: &mut AdamW,
    state: &mut TrainState,
    rng: &RefCell<SeededRng>,
    on_event: &mut dyn FnMut(Event),
) -> Result<bool> {
    let (cfg, run) = (job.cfg, job.run);
    let epoch = state.epoch;
    let warmup = epoch < plan.warmup_epochs;
    let mut batches = job.train_set.batches(epoch, state.batch_in_epoch as usize)?;
    let mut acc = Accumulator::new();
    let accum = cfg.grad_accum as u64;
    let mut group_seed = 0u64;
    // A wave: the next micro-batches of the current group (up to `data_parallel` of them),
    // computed side by side; then each is accounted for in order, as if computed one by one.
    let mut wave: std::collections::VecDeque<(Batch, Result<MicroStep>)> = Default::default();
    loop {
        if wave.is_empty() {
            if cfg.max_steps.is_some_and(|m| state.step >= m) {
                return Ok(false);
            }
            let in_group = state.batch_in_epoch % accum;
            let left = (accum - in_group).min(plan.batches_per_epoch.saturating_sub(state.batch_in_epoch).max(1));
            let mut read = Vec::new();
            for i in 0..(cfg.data_parallel as u64).min(left) {
                let Some(batch) = batches.next() else { break };
                let at = state.batch_in_epoch + i;
                read.push(batch.with_context(|| format!("reading training batch {at} of epoch {epoch}"))?);
            }
            if read.is_empty() {
                return Ok(true);
            }
            // A group's seed is drawn once its first micro-batch is read: drawn before, at the end
            // of an epoch it was a draw that the checkpoint saved at that step does not hold, and a
            // run resumed there went on with every later seed shifted by one.
            if in_group == 0 && accum > 1 {
                group_seed = rng.borrow_mut().next_u64();
            }
            let steps = if accum == 1 {
                // One micro-batch per step draws from the run's generator itself (as always).
                vec![micro_step(job.model, &read[0], rng, warmup)]
            } else {
                // In a group, micro-batch j draws from its own stream.
                let streams = (0..read.len() as u64).map(|i| micro_batch_rng(group_seed, in_group + i));
                micro_steps(job.model, &read, streams.collect(), warmup)
            };
            wave.extend(read.into_iter().zip(steps));
        }
        let (batch, step) = wave.pop_front().expect("a wave holds a micro-batch");
        let micro = step.map_err(|e| diverged(job, state, e))?;
        let loss = micro.loss;
        state.batch_in_epoch += 1;
        let skipped = !loss.is_finite();
        if skipped {
            // Skipping cannot help once the weights themselves are gone.
            let weights = job.vars.non_finite()?;
            if !weights.is_empty() {
                return Err(diverged(job, state, anyhow::anyhow!("non-finite loss {loss}")));
            }
            if !cfg.skip_nonfinite {
                bail!(
                    "non-finite loss {loss} at step {} (epoch {epoch}, batch {}); the last good checkpoint is {} (use --skip-nonfinite to skip such batches)",
                    state.step + 1,
                    state.batch_in_epoch - 1,
                    run.last().display()
                );
            }
            state.skipped_nonfinite += 1;
            let (step, batch) = (state.step, state.batch_in_epoch - 1);
            run.log(&serde_json::json!({"skipped_nonfinite": state.skipped_nonfinite, "step": step, "epoch": epoch, "batch": batch, "loss": loss.to_string()}))?;
            on_event(Event::SkippedNonFinite { step, epoch, batch });
        }
        // The step's gradient is that of the mean loss over its questions: each micro-batch's
        // mean loss weighs by its share of a full group's questions (1/grad_accum when all are
        // full), and a short group (the end of an epoch, or one with a skipped batch) is rescaled
        // to its own question count. One micro-batch per step is its own mean already.
        let full_group = (cfg.grad_accum * cfg.batch_size) as f64;
        if !skipped {
            let weight = if cfg.grad_accum == 1 {
                1.0
            } else {
                batch.len() as f64 / full_group
            };
            acc.add(&micro, batch.len(), job.vars, weight)?;
        }
        // Groups are fixed runs of grad_accum micro-batches of the epoch (a skipped batch
        // shortens its group, it does not shift the next ones); a group of only skipped
        // batches makes no step.
        let end_of_epoch = state.batch_in_epoch >= plan.batches_per_epoch;
        let end_of_group = state.batch_in_epoch % cfg.grad_accum as u64 == 0 || end_of_epoch;
        if !end_of_group || acc.micro == 0 {
            continue;
        }
        if cfg.grad_accum > 1 && acc.samples as f64 != full_group {
            acc.grads.scale(full_group / acc.samples as f64)?;
        }
        // One optimiser step.
        let grad_norm = match cfg.max_grad_norm {
            Some(m) => Some(acc.grads.clip_global_norm(m)?),
            None => None,
        };
        let lr_of = |base: f64| {
            if warmup {
                base
            } else {
                plan.schedule.lr(state.step - plan.warmup_steps, base)
            }
        };
        opt.step_with(&acc.grads, &lr_of)?;
        let lr = lr_of(cfg.lr);
        state.step += 1;
        state.rng = rng.borrow().clone();
        let m = acc.metrics(state.step, epoch, lr, grad_norm, warmup);
        if state.step % cfg.log_every.max(1) == 0 {
            run.log(&serde_json::to_value(&m)?)?;
        }
        on_event(Event::Step(&m));
        acc = Accumulator::new();
        // Before the periodic checkpoint: a kill between them redoes this validation on resume.
        let joint_step = state.step.saturating_sub(plan.warmup_steps);
        if cfg.validate_every.is_some_and(|n| joint_step % n == 0) && !warmup && !end_of_epoch {
            validate(job, opt, state, epoch, true, on_event)?;
        }
        if state.step % cfg.checkpoint_every.max(1) == 0 && !end_of_epoch {
            checkpoint::save(&run.last(), job.vars, opt, state, job.run_config)?;
            on_event(Event::Checkpoint(&run.last()));
        }
    }
}

/// One micro-batch's forward and backward: its losses, the total as a number, and the
/// gradients (none when the loss is not finite: such a batch is skipped or stops the run).
struct MicroStep {
    losses: Losses,
    loss: f64,
    grads: Option<candle_core::backprop::GradStore>,
}

/// The random stream of micro-batch `j` of the group seeded `group_seed`.
fn micro_batch_rng(group_seed: u64, j: u64) -> SeededRng {
    SeededRng::new(group_seed ^ (j + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn micro_step(model: &GcgModel, batch: &Batch, rng: &RefCell<SeededRng>, warmup: bool) -> Result<MicroStep> {
    let losses = if warmup {
        model.forward_grounding(batch, rng)?
    } else {
        model.forward_train(batch, rng)?
    };
    let loss = losses.total.to_scalar::<f32>()? as f64;
    let grads = if loss.is_finite() { Some(losses.total.backward()?) } else { None };
    // The values only from here: the graph (this micro-batch's activations) is freed now.
    let losses = Losses {
        vqa: losses.vqa.detach(),
        reg: losses.reg.map(|t| t.detach()),
        con: losses.con.map(|t| t.detach()),
        total: losses.total.detach(),
    };
    Ok(MicroStep { losses, loss, grads })
}

/// Forward and backward of `batches`, side by side (batch i on its own thread, drawing from
/// `streams[i]`).
fn micro_steps(model: &GcgModel, batches: &[Batch], streams: Vec<SeededRng>, warmup: bool) -> Vec<Result<MicroStep>> {
    let work: Vec<(&Batch, SeededRng)> = batches.iter().zip(streams).collect();
    crate::util::side_by_side(work, |_, (batch, stream)| micro_step(model, batch, &RefCell::new(stream), warmup))
}

/// A failed training forward, told as a divergence when the trainable weights are no longer
/// finite (then skipping batches cannot help), else with its step.
fn diverged(job: &TrainJob, state: &TrainState, e: anyhow::Error) -> anyhow::Error {
    let at = format!(
        "training step {} (epoch {}, batch {})",
        state.step + 1,
        state.epoch,
        state.batch_in_epoch
    );
    let bad = match job.vars.non_finite() {
        Ok(b) if !b.is_empty() => b,
        Ok(_) => return e.context(at),
        Err(check) => return e.context(format!("{at} (checking the weights failed too: {check})")),
    };
    let (name, what) = &bad[0];
    let last = job.run.last();
    let kept = if last.exists() {
        format!(
            "{} holds the last finite weights (checkpoints are only written with finite weights)",
            last.display()
        )
    } else {
        "no checkpoint was written".to_string()
    };
    e.context(format!(
        "{at}: training diverged — after {} optimiser steps {} trainable tensors hold non-finite values (e.g. {name}: {what}) \
         at lr {:e} / grounding_lr {:e}; lower the learning rates; {kept}",
        state.step,
        bad.len(),
        job.cfg.lr,
        job.cfg.grounding_lr,
    ))
}

/// End of an epoch: validate, keep the best, write `last`, move on.
fn end_epoch(job: &TrainJob, plan: &Plan, opt: &AdamW, state: &mut TrainState, on_event: &mut dyn FnMut(Event)) -> Result<()> {
    let run = job.run;
    let epoch = state.epoch;
    let warmup = epoch < plan.warmup_epochs;
    state.epoch += 1;
    state.batch_in_epoch = 0;
    // Validation after every joint epoch and after the last warm-up epoch (the warmed-up
    // generator with the untouched language model is a candidate for `best` too).
    if !warmup || state.epoch == plan.warmup_epochs {
        validate(job, opt, state, epoch, false, on_event)?;
    }
    checkpoint::save(&run.last(), job.vars, opt, state, job.run_config)?;
    on_event(Event::Checkpoint(&run.last()));
    Ok(())
}

/// Validate (when the job has a validation set), keep `best` when it is the best so far, log it.
fn validate(
    job: &TrainJob,
    opt: &AdamW,
    state: &mut TrainState,
    epoch: u64,
    mid_epoch: bool,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    let Some(val) = job.val_set else { return Ok(()) };
    let answered = answer_all(job.model, val)?;
    let acc = accuracy(&answered);
    let grounding = job.val_grounding.map(|g| grounding_of(&answered, g));
    let best = state.best_metric.is_none_or(|b| acc > b);
    if best {
        state.best_metric = Some(acc);
        state.best_step = Some(state.step);
        checkpoint::save(&job.run.best(), job.vars, opt, state, job.run_config)?;
    }
    let mut row = serde_json::json!({"split": "val", "epoch": epoch, "step": state.step, "accuracy": acc, "best": best});
    if mid_epoch {
        row["mid_epoch"] = true.into();
    }
    if let Some(g) = &grounding {
        for (name, value) in g.named() {
            row[name] = serde_json::json!(value);
        }
        row["grounding_evaluated"] = g.evaluated.into();
    }
    job.run.log(&row)?;
    on_event(Event::Validation {
        epoch,
        accuracy: acc,
        best,
        grounding: grounding.as_ref(),
    });
    Ok(())
}
