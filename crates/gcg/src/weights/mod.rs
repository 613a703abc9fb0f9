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
pub use source::{MapSource, MergedSource, RenamedSource, SafetensorsSource, TensorMeta, TensorSource};
