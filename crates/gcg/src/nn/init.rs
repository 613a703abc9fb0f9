//! Parameter initialisation of built networks. The initialisers themselves ([`Init`]) belong to
//! the weight loader, which draws every tensor it has no checkpoint for from one.

use crate::rng::SeededRng;
pub use crate::weights::init::{sinusoidal_table, Init};
use anyhow::Result;
use candle_core::Tensor;

/// Re-initialise every matrix-shaped `*weight` variable of `vars` (rank ≥ 2; the input dims are
/// the trailing ones, as in `nn.Linear` and `nn.Conv2d`) from N(0, 1/fan_in), except the names
/// `skip` accepts. The published checkpoints' initialisers (std 0.02) suit wide networks; the
/// tiny networks the demo trains from scratch barely move with them. Returns how many tensors
/// were re-initialised.
pub fn fan_in_reinit(vars: &crate::weights::VarStore, seed: u64, skip: impl Fn(&str) -> bool) -> Result<usize> {
    let mut rng = SeededRng::new(seed);
    let mut n = 0;
    for (name, var) in vars.iter() {
        let dims = var.dims().to_vec();
        if dims.len() < 2 || !name.ends_with("weight") || skip(name) {
            continue;
        }
        let fan_in: usize = dims[1..].iter().product();
        let std = 1.0 / (fan_in.max(1) as f64).sqrt();
        let t = Tensor::from_vec(rng.normal_vec(var.elem_count(), 0.0, std), dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
        crate::weights::mark_written();
        n += 1;
    }
    Ok(n)
}
