//! One file per network.
pub mod t5;
