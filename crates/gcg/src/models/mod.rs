//! One file per network.

pub mod clip_branch;
pub mod clip_text;
pub mod lmm;
pub mod qformer;
pub mod t5;
pub mod vit;
