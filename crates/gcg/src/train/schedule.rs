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
}

impl std::fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LrSchedule::Constant => "constant",
            LrSchedule::WarmupCosine => "warmup-cosine",
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
}

impl Schedule {
    /// The factor for optimiser step `step` (0-based: the first update uses `factor(0)`).
    pub fn factor(&self, step: u64) -> f64 {
        match *self {
            Schedule::Constant => 1.0,
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
