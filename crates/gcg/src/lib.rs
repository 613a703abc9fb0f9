//! gcg — Weakly supervised Gaussian contrastive grounding with large multimodal models for
//! video question answering, in Rust on candle.
//!
//! The library is organised along the data flow of `DESIGN.md`: `nn` (trainable building blocks),
//! `models` (ViT, Q-Former, T5, CLIP branch, the video LMM), `weights` (checkpoints and
//! tokenizers).

pub mod ask;
pub mod data;
pub mod demo;
pub mod eval;
pub mod features;
pub mod grounding;
pub mod model;
pub mod models;
pub mod nn;
pub mod rng;
pub mod run;
pub mod store;
pub mod synth;
pub mod text;
pub mod train;
pub mod util;
pub mod video;
pub mod weights;

pub use rng::SeededRng;
