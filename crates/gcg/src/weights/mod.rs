//! Loading weights: tensor sources (safetensors files and HF snapshot directories, PyTorch `.pth`
//! checkpoints, in-memory maps), the name layouts of the published checkpoints, the [`Loader`]
//! that builds networks from them with shape checks, and weights by Hugging Face model id
//! through the HF cache ([`hub`]).

pub mod checkpoints;
pub mod hub;
pub mod init;
pub mod layouts;
pub mod loader;
pub mod pth;
pub mod source;

pub use loader::{Loader, VarStore};

use std::sync::atomic::{AtomicU64, Ordering};

/// Bumped whenever variables' values are written in place (optimizer steps, loading into
/// variables, re-initialisation): copies derived from them before (the bf16 casts that
/// `nn::cast::cast_weight` keeps) are then stale.
static WRITE_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Call after writing new values into variables (`Var::set`).
pub fn mark_written() {
    WRITE_GENERATION.fetch_add(1, Ordering::SeqCst);
}

/// How many times variables have been written ([`mark_written`]) in this process.
pub fn write_generation() -> u64 {
    WRITE_GENERATION.load(Ordering::SeqCst)
}
pub use source::{MapSource, MergedSource, RenamedSource, SafetensorsSource, TensorMeta, TensorSource};
