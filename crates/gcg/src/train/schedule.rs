//! Learning-rate schedules, as a factor applied to every group's base learning rate.

use serde::{Deserialize, Serialize};

/// The schedule a run asks for (`[train] schedule`); [`Schedule`] is its resolved form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// Constant learning rates (the official default).
    #[default]
    Constant,
    /// Linear warm-up, then cosine decay ([`Schedule::WarmupCosine`]).
    WarmupCosine,
    /// The official code's optional scheduler (`--use_schedule True`): warm-up over the first
    /// quarter epoch, then one cosine value per epoch ([`Schedule::Official`]).
    Official,
}

impl std::fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LrSchedule::Constant => "constant",
            LrSchedule::WarmupCosine => "warmup-cosine",
            LrSchedule::Official => "official",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    /// The official code's default (`--use_schedule False`): constant learning rates.
    Constant,
    /// Linear warm-up from `warmup_start_factor` to 1 over `warmup_steps`, then cosine decay to
    /// `min_factor` at `total_steps`.
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
        warmup_start_factor: f64,
        min_factor: f64,
    },
    /// The official `LinearWarmupCosineLRScheduler` as `finetune_ans.py` steps it (after each
    /// optimiser step, so each update uses the rate set after the previous one):
    /// * update 0 uses each group's own rate (the optimiser's, before any scheduler call);
    /// * in epoch 0, `min(init_lr, warmup_start_lr + (init_lr − warmup_start_lr)·i / warmup_steps)`
    ///   with i the previous update's index in the epoch and `warmup_steps` = ⌊steps/4⌋;
    /// * from epoch 1, `min_lr + (init_lr − min_lr)·½(1 + cos(π·e / max_epochs))` for the epoch e
    ///   of the previous update (the official `max_T` = 30 with 10 epochs decays only to ~0.9·lr).
    ///
    /// As the official scheduler, it sets *every* group to this rate (the grounding module's
    /// `grounding_lr` holds for the first update only).
    Official {
        steps_per_epoch: u64,
        warmup_steps: u64,
        init_lr: f64,
        warmup_start_lr: f64,
        min_lr: f64,
        max_epochs: u64,
    },
}

impl Schedule {
    /// The learning rate at optimiser step `step` (0-based) of a parameter group whose base
    /// rate is `base`.
    pub fn lr(&self, step: u64, base: f64) -> f64 {
        match *self {
            Schedule::Official {
                steps_per_epoch,
                warmup_steps,
                init_lr,
                warmup_start_lr,
                min_lr,
                max_epochs,
            } => {
                if step == 0 {
                    return base;
                }
                let prev = step - 1;
                let (epoch, i) = (prev / steps_per_epoch.max(1), prev % steps_per_epoch.max(1));
                if epoch == 0 {
                    (warmup_start_lr + (init_lr - warmup_start_lr) * i as f64 / warmup_steps.max(1) as f64).min(init_lr)
                } else {
                    let c = (std::f64::consts::PI * epoch as f64 / max_epochs.max(1) as f64).cos();
                    (init_lr - min_lr) * 0.5 * (1.0 + c) + min_lr
                }
            }
            _ => base * self.factor(step),
        }
    }

    /// The factor for optimiser step `step` (0-based: the first update uses `factor(0)`).
    /// (For [`Schedule::Official`], the base group's rate over its base rate.)
    pub fn factor(&self, step: u64) -> f64 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::Official { init_lr, .. } => self.lr(step, init_lr) / init_lr,
            Schedule::WarmupCosine {
                warmup_steps,
                total_steps,
                warmup_start_factor,
                min_factor,
            } => {
                if step < warmup_steps {
                    warmup_start_factor + (1.0 - warmup_start_factor) * step as f64 / warmup_steps as f64
                } else {
                    let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                    let progress = ((step - warmup_steps) as f64 / span).min(1.0);
                    min_factor + (1.0 - min_factor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::WarmupCosine {
            warmup_steps: 10,
            total_steps: 110,
            warmup_start_factor: 0.0,
            min_factor: 0.1,
        };
        assert_eq!(s.factor(0), 0.0);
        assert!((s.factor(5) - 0.5).abs() < 1e-12);
        assert!((s.factor(10) - 1.0).abs() < 1e-12);
        assert!((s.factor(60) - 0.55).abs() < 1e-12);
        assert!((s.factor(110) - 0.1).abs() < 1e-12);
        assert!((s.factor(500) - 0.1).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(123), 1.0);
    }
}
