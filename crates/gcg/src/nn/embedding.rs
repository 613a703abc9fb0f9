//! Token / position embedding tables.

use super::init::Init;
use crate::weights::Loader;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Tensor, // [num, dim]
}

impl Embedding {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    pub fn load(lb: &Loader, num: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: lb.get((num, dim), "weight", Init::Normal { std: 0.02 })?,
        })
    }

    pub fn num(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }
    pub fn dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    /// ids: any shape of integer ids → [..., dim]. Out-of-range ids are an error, not a crash.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut out_dims = ids.dims().to_vec();
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let n = self.num();
        if flat.elem_count() > 0 {
            let max = flat.max(0)?.to_scalar::<u32>()? as usize;
            if max >= n {
                bail!("embedding: id {max} is outside the table of {n} rows");
            }
        }
        let e = self.weight.index_select(&flat, 0)?;
        out_dims.push(self.dim());
        Ok(e.reshape(out_dims)?)
    }
}
