//! One file per network.
pub mod qformer;
pub mod t5;
