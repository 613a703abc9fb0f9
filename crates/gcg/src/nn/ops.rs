//! Differentiable element-wise and reduction ops: softmax, log-softmax, GELU, cross-entropy; and
//! the hard top-k rule shared by the pseudo-labels and the grounding selection.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// Softmax over the last dimension.
///
/// With no gradient to carry it uses candle's fused kernel; otherwise it is composed from
/// primitives (the max is detached: softmax is shift-invariant, so its gradient through the max is
/// exactly zero).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Log-softmax over the last dimension (numerically stable, differentiable).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Activation functions used by the networks here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU, x·Φ(x) (PyTorch `nn.GELU()`, HF `"gelu"`).
    Gelu,
    /// The tanh approximation (HF `"gelu_new"`, `"gelu_pytorch_tanh"`), Flan-T5's default.
    GeluTanh,
    Relu,
    /// x·σ(1.702x), OpenAI CLIP's approximation.
    QuickGelu,
}

impl Activation {
    /// Parse an HF config's `hidden_act` / `dense_act_fn` string.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "quick_gelu" => Self::QuickGelu,
            other => bail!("unsupported activation {other:?} (expected gelu, gelu_new, relu or quick_gelu)"),
        })
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        if super::cpu_half_no_grad(&[x]) {
            return Ok(self.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?);
        }
        Ok(match self {
            Self::Gelu => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::Relu => x.relu()?,
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }
}

/// Exact GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Activation::Gelu.forward(x)
}

/// Token cross-entropy, mean over the targets that are not `ignore_index` (as
/// `torch.nn.CrossEntropyLoss(ignore_index=-100)`).
///
/// `logits`: [N, V] (any float dtype; computed in f32 or f64), `targets`: [N] integer ids.
/// Returns a scalar. With every target ignored the loss is NaN, as in PyTorch.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let t = targets.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if t.len() != n {
        bail!("cross_entropy: {n} logit rows but {} targets", t.len());
    }
    let compute = if logits.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let logits = logits.to_dtype(compute)?;
    let keep: Vec<u32> = t
        .iter()
        .enumerate()
        .filter(|(_, &id)| id != ignore_index)
        .map(|(i, _)| i as u32)
        .collect();
    for (row, &id) in t.iter().enumerate() {
        if id != ignore_index && (id < 0 || id as usize >= v) {
            bail!("cross_entropy: target {id} in row {row} is outside the vocabulary of {v}");
        }
    }
    if keep.is_empty() {
        return Ok(Tensor::new(f32::NAN, logits.device())?.to_dtype(compute)?);
    }
    let dev = logits.device();
    let rows = Tensor::new(keep.as_slice(), dev)?;
    let ids: Vec<u32> = keep.iter().map(|&i| t[i as usize] as u32).collect();
    let ids = Tensor::new(ids.as_slice(), dev)?.unsqueeze(1)?;
    let logp = log_softmax_last_dim(&logits.index_select(&rows, 0)?)?;
    let picked = logp.gather(&ids, 1)?.squeeze(1)?;
    Ok((picked.sum_all()?.neg()? / keep.len() as f64)?)
}

/// Indices of the `k` largest of `values`, sorted ascending (time order): descending by value,
/// ties to the lower index. A NaN is an error (naming its index); `k` beyond the length too.
pub fn top_k_sorted<T: PartialOrd + Copy>(values: &[T], k: usize) -> Result<Vec<usize>> {
    ensure!(k <= values.len(), "top-k: k = {k} exceeds the {} scores", values.len());
    if let Some(i) = values.iter().position(|v| v.partial_cmp(v).is_none()) {
        bail!("top-k: score {i} is NaN");
    }
    let mut order: Vec<usize> = (0..values.len()).collect();
    // Descending by value, ascending by index among equal values (no NaN is left, so every pair
    // compares).
    order.sort_by(|&a, &b| {
        values[b]
            .partial_cmp(&values[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    order.truncate(k);
    order.sort_unstable();
    Ok(order)
}
