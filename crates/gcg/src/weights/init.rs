//! Parameter initialisers: what the [`Loader`](super::Loader) draws a tensor from when it has no
//! checkpoint (benchmarks, newly added trainable modules, tiny test models).

use crate::rng::SeededRng;
use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Const(f64),
    Normal {
        std: f64,
    },
    TruncNormal {
        std: f64,
    },
    Uniform {
        lo: f64,
        hi: f64,
    },
    /// Sinusoidal position table [n_pos, dim] as GCG's `create_sinusoidal_embeddings`.
    Sinusoidal,
}

impl Init {
    pub fn make(&self, shape: &Shape, dtype: DType, dev: &Device, rng: &mut SeededRng) -> Result<Tensor> {
        let n = shape.elem_count();
        let v: Vec<f32> = match *self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Const(c) => vec![c as f32; n],
            Init::Normal { std } => rng.normal_vec(n, 0.0, std),
            Init::TruncNormal { std } => rng.trunc_normal_vec(n, 0.0, std),
            Init::Uniform { lo, hi } => rng.uniform_vec(n, lo, hi),
            Init::Sinusoidal => {
                let dims = shape.dims();
                anyhow::ensure!(dims.len() == 2, "sinusoidal init needs a 2-d shape, got {dims:?}");
                sinusoidal_table(dims[0], dims[1])
            }
        };
        Ok(Tensor::from_vec(v, shape.clone(), dev)?.to_dtype(dtype)?)
    }
}

/// position_enc[pos, j] = pos / 10000^(2·(j div 2)/dim); even columns take sin, odd take cos.
pub fn sinusoidal_table(n_pos: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; n_pos * dim];
    for pos in 0..n_pos {
        for j in 0..dim {
            let angle = pos as f64 / 10000f64.powf(2.0 * (j / 2) as f64 / dim as f64);
            out[pos * dim + j] = if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
    out
}
