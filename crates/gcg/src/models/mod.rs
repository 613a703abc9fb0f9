//! One file per network.

pub mod clip_branch;
pub mod clip_text;
pub mod vit;
