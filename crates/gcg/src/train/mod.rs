//! Training: the optimiser with parameter groups, the learning-rate schedule, gradient clipping
//! and accumulation, checkpoints that resume exactly.

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use optim::{AdamW, AdamWConfig, Grads, GroupConfig};
pub use schedule::{LrSchedule, Schedule};
