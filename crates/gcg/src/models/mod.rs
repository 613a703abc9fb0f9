//! One file per network.
pub mod qformer;
