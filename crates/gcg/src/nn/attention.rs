//! Multi-head attention: head splitting, scaled dot-product attention with additive biases
//! (padding masks, causal masks, T5's relative position bias), and a q/k/v/o module.

use super::{cast::cast, dropout::Dropout, linear::Linear, ops::softmax_last_dim, Ctx};
use crate::weights::Loader;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// The additive value that removes a key from attention (HF uses the dtype's minimum).
pub fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895e38,
        DType::F64 => f32::MIN as f64,
        _ => f32::MIN as f64,
    }
}

/// [B, L, H·D] → [B, H, L, D] (contiguous).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    if hd % heads != 0 {
        bail!("split_heads: width {hd} is not divisible by {heads} heads");
    }
    Ok(x.reshape((b, l, heads, hd / heads))?.transpose(1, 2)?.contiguous()?)
}

/// [B, H, L, D] → [B, L, H·D].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))?)
}

/// A padding mask [B, Lk] (1 = attend, 0 = padding; any numeric dtype) as an additive bias
/// [B, 1, 1, Lk] in `dtype`.
pub fn padding_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, lk) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    let bias = ((m.affine(-1.0, 1.0))? * mask_value(dtype))?; // 0 where kept, min where padded
    Ok(bias.to_dtype(dtype)?.reshape((b, 1, 1, lk))?)
}

/// A causal bias [1, 1, Lq, Lk] for queries at positions `offset..offset+Lq` over keys `0..Lk`:
/// key j is visible to query i when j ≤ offset + i.
pub fn causal_bias(lq: usize, lk: usize, offset: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let neg = mask_value(dtype) as f32;
    let v: Vec<f32> = (0..lq)
        .flat_map(|i| (0..lk).map(move |j| if j <= offset + i { 0.0 } else { neg }))
        .collect();
    Ok(Tensor::from_vec(v, (1, 1, lq, lk), dev)?.to_dtype(dtype)?)
}

/// The one attention kernel of the crate: softmax(q·kᵀ·scale + bias) · v for q [B, H, Lq, D],
/// k/v [B, H, Lk, D] (→ [B, H, Lq, D]).
///
/// * `scale`: `None` means no scaling (T5 folds 1/sqrt(d) into its initialisation); the ViT,
///   Q-Former and CLIP pass `Some(1/sqrt(head_dim))`.
/// * `bias` broadcasts to [B, H, Lq, Lk]: padding and causal masks ([`padding_bias`],
///   [`causal_bias`]), T5's relative position bias, or their sum; it is cast to the scores' dtype.
/// * `dropout` acts on the attention weights (only with a training [`Ctx`]).
///
/// kᵀ is a strided view of `k` (no copy). The softmax is candle's fused kernel when nothing
/// needs a gradient and the differentiable composition otherwise (see [`softmax_last_dim`]).
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
    bias: Option<&Tensor>,
    dropout: Option<(Dropout, Ctx)>,
) -> Result<Tensor> {
    let train = dropout.as_ref().is_some_and(|(_, ctx)| ctx.is_train());
    if !train {
        // oneDNN's batched products and softmax when they apply (bf16 products accumulate in
        // f32; scores and softmax in f32), the result as a view of merged heads.
        if let Some(out) = super::linear::onednn_attention(q, k, v, scale.unwrap_or(1.0) as f32, bias)? {
            return Ok(out);
        }
    }
    if !train && super::cpu_half_no_grad(&[q, k, v]) {
        // Scores, softmax and the weighted sum in f32, rounded back once (see cpu_half_no_grad).
        let f = |t: &Tensor| super::cast::cast(t, DType::F32);
        let bias = bias.map(f).transpose()?;
        let out = scaled_dot_product_attention(&f(q)?, &f(k)?, &f(v)?, scale, bias.as_ref(), None)?;
        return Ok(super::cast::cast(&out, q.dtype())?);
    }
    let q = match scale {
        Some(s) => (q * s)?,
        None => q.clone(),
    };
    let mut scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?; // [B, H, Lq, Lk]
    if let Some(b) = bias {
        scores = scores.broadcast_add(&b.to_dtype(scores.dtype())?)?;
    }
    let mut probs = softmax_last_dim(&scores)?;
    if let Some((d, ctx)) = dropout {
        probs = d.forward(&probs, ctx)?;
    }
    Ok(probs.matmul(&v.contiguous()?)?) // [B, H, Lq, D]
}

/// Attention with separate query/key/value/output projections (BERT, T5, the grounding encoder).
///
/// The projections go through [`Linear::project`]: a bias-free frozen weight (T5's) gets no
/// gradient of its own; every other layer is plain [`Linear::forward`]; a projection with a LoRA
/// branch adds it (its dropout active in a training context).
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub heads: usize,
    /// `None`: no 1/sqrt(d) scaling (T5 folds it into its initialisation).
    pub scale: Option<f64>,
    pub dropout: Dropout,
}

/// Tensor names of the four projections inside a checkpoint.
pub struct ProjNames<'a> {
    pub q: &'a str,
    pub k: &'a str,
    pub v: &'a str,
    pub o: &'a str,
}

impl MultiHeadAttention {
    /// `dim`: query width; `kv_dim`: key/value source width (≠ dim for cross-attention);
    /// `inner`: heads × head_dim.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        lb: &Loader,
        names: ProjNames,
        dim: usize,
        kv_dim: usize,
        inner: usize,
        heads: usize,
        bias: bool,
        scaled: bool,
        dropout: f64,
    ) -> Result<Self> {
        Ok(Self {
            q: Linear::load(&lb.pp(names.q), dim, inner, bias)?,
            k: Linear::load(&lb.pp(names.k), kv_dim, inner, bias)?,
            v: Linear::load(&lb.pp(names.v), kv_dim, inner, bias)?,
            o: Linear::load(&lb.pp(names.o), inner, dim, bias)?,
            heads,
            scale: if scaled {
                Some(1.0 / ((inner / heads) as f64).sqrt())
            } else {
                None
            },
            dropout: Dropout::new(dropout),
        })
    }

    /// Project keys and values once (e.g. to cache them): [B, Lk, kv_dim] → two [B, H, Lk, D].
    pub fn project_kv(&self, kv: &Tensor, ctx: Ctx) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.k.project(kv, ctx)?, self.heads)?,
            split_heads(&self.v.project(kv, ctx)?, self.heads)?,
        ))
    }

    /// x: [B, Lq, dim]; kv: [B, Lk, kv_dim] (= x for self-attention); bias broadcastable to
    /// [B, H, Lq, Lk]. Returns [B, Lq, dim] after the output projection.
    pub fn forward(&self, x: &Tensor, kv: &Tensor, bias: Option<&Tensor>, ctx: Ctx) -> Result<Tensor> {
        let (k, v) = self.project_kv(kv, ctx)?;
        self.forward_with_kv(x, &k, &v, bias, ctx)
    }

    pub fn forward_with_kv(&self, x: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, ctx: Ctx) -> Result<Tensor> {
        let q = split_heads(&self.q.project(x, ctx)?, self.heads)?;
        let out = scaled_dot_product_attention(&q, k, v, self.scale, bias, Some((self.dropout, ctx)))?;
        self.o.project(&merge_heads(&out)?, ctx)
    }

    /// Cross-attention of a few queries `x` [B, Lq, dim] to many keys `kv` [B, Lk, kv_dim]:
    /// [`MultiHeadAttention::forward`]'s result, computed with the key and value projections
    /// folded into the queries' side when that takes fewer operations ([`Self::folds`]).
    ///
    /// With q_h the scaled query of head h, W_{k,h} and W_{v,h} the rows of head h in the key
    /// and value weights ([dh, kv_dim]) and X = `kv`:
    ///
    /// * scores: q_h (X W_{k,h}ᵀ + b_{k,h})ᵀ = (q_h W_{k,h}) Xᵀ + q_h·b_{k,h}, whose last term is
    ///   the same for every key of a query, so the softmax drops it;
    /// * output: P_h (X W_{v,h}ᵀ + b_{v,h}) = (P_h X) W_{v,h}ᵀ + b_{v,h}, as each row of P_h sums
    ///   to 1 (no dropout on P).
    ///
    /// The Q-Former's queries (32 per frame, 12 heads of 64) attend to ViT-g tokens 1408 wide:
    /// the keys and values of a video's 32 × 257 tokens cost 2 · 8224 · 1408 · 768 multiply-adds
    /// a layer, the folded products (q_h W_{k,h}) Xᵀ and P_h X over all heads half of that. The
    /// two large products are one attention with a single head 1408 wide (oneDNN's batched
    /// products and softmax on the CPU).
    pub fn forward_cross(&self, x: &Tensor, kv: &Tensor, bias: Option<&Tensor>, ctx: Ctx) -> Result<Tensor> {
        if self.folds(x, kv, ctx) {
            return self.forward_folded(x, kv, bias, ctx);
        }
        self.forward(x, kv, bias, ctx)
    }

    /// Whether [`Self::forward_cross`] folds the projections for these inputs: no LoRA branch
    /// on the keys or values, no dropout on the attention weights, and fewer multiply-adds than
    /// projecting keys and values with keys and projections at least
    /// [`ONEDNN_MIN_DIM`](super::linear::ONEDNN_MIN_DIM) wide, or the thread's override
    /// ([`set_folded_attention_here`]). Narrower networks (the demo's, the parity fixtures') keep the
    /// projected form, and so their results: folding saves them nothing measurable, and its other
    /// rounding sent the demo's grounding mode down another path (seed 0: IoP@0.5 28.3 against
    /// 57.2). `GCG_NO_FOLDED_ATTENTION=1` turns folding off (for comparisons).
    pub fn folds(&self, x: &Tensor, kv: &Tensor, ctx: Ctx) -> bool {
        let choice = FOLD_HERE.with(|c| c.get());
        if choice == Some(false) || (choice.is_none() && folding_off()) {
            return false;
        }
        let (Ok((b, lq, _)), Ok((bk, lk, dv))) = (x.dims3(), kv.dims3()) else {
            return false;
        };
        let (heads, inner) = (self.heads, self.k.out_dim());
        let valid = self.k.lora.is_none()
            && self.v.lora.is_none()
            && !(ctx.is_train() && self.dropout.p > 0.0)
            && b == bk
            && inner % heads == 0
            && self.v.out_dim() == inner
            && self.k.in_dim() == dv
            && self.v.in_dim() == dv;
        // Multiply-adds (per sample): keys and values projected, then the scores and the
        // weighted sum; against q_h W_{k,h} and (P_h X) W_{v,h}ᵀ, then the scores over X and P X.
        let projected = 2 * lk * dv * inner + 2 * lq * lk * inner;
        let folded = 2 * lq * inner * dv + 2 * heads * lq * lk * dv;
        let wide = dv >= super::linear::ONEDNN_MIN_DIM && inner >= super::linear::ONEDNN_MIN_DIM;
        valid && (choice == Some(true) || (wide && folded < projected))
    }

    /// [`Self::forward_cross`] with the projections folded (see there).
    fn forward_folded(&self, x: &Tensor, kv: &Tensor, bias: Option<&Tensor>, ctx: Ctx) -> Result<Tensor> {
        // Inside no_grad the tokens and the bias are cut from any graph, as the projections'
        // inputs are (Linear's inference path), so the products below take the fast kernels.
        let kv = &super::detach_if_no_grad(kv);
        let bias = bias.map(super::detach_if_no_grad);
        let bias = bias.as_ref();
        let (b, lq, _) = x.dims3()?;
        let (_, lk, dv) = kv.dims3()?;
        let (heads, inner) = (self.heads, self.k.out_dim());
        let dh = inner / heads;
        let mut q = split_heads(&self.q.project(x, ctx)?, heads)?; // [B, H, Lq, dh]
        if let Some(s) = self.scale {
            q = (q * s)?;
        }
        let dt = q.dtype();
        // The products over X in the dtype the key projection would take (bf16 for f32 layers
        // in a bf16 inference, as nn::inference lowers them), the small ones in q's.
        let wide = self.k.lowered_to(kv).unwrap_or(dt);
        let heads_of = |l: &Linear| -> Result<Tensor> { Ok(cast(&super::detach_if_no_grad(&l.weight), dt)?.reshape((heads, dh, dv))?) };
        // q_h W_{k,h} for every head: [H, B·Lq, dh] · [H, dh, Dv] → [B, 1, H·Lq, Dv].
        let qk = heads_major(&q)?
            .matmul(&heads_of(&self.k)?)?
            .reshape((heads, b, lq, dv))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((b, 1, heads * lq, dv))?;
        // The bias as the folded scores' [B, 1, H·Lq, Lk]; where the key bias carries a gradient
        // (training) its term q_h·b_{k,h}, which the softmax cancels, is added so that the bias
        // still gets its (zero) gradient as in the projected form.
        let mut bias = match bias {
            Some(m) if m.rank() == 4 && m.dim(1)? == 1 && m.dim(2)? == 1 => Some(m.clone()),
            Some(m) => Some(m.broadcast_as((b, heads, lq, lk))?.contiguous()?.reshape((b, 1, heads * lq, lk))?),
            None => None,
        };
        if let Some(bk) = self.k.bias.as_ref().filter(|t| t.track_op() && !super::grad_disabled()) {
            let bk = cast(bk, dt)?.reshape((1, heads, 1, dh))?;
            let shift = q.broadcast_mul(&bk)?.sum_keepdim(3)?.reshape((b, 1, heads * lq, 1))?;
            bias = Some(match bias {
                Some(m) => m.to_dtype(dt)?.broadcast_add(&shift)?,
                None => shift,
            });
        }
        // softmax((q_h W_{k,h}) Xᵀ) X for every head: [B, 1, H·Lq, Dv].
        let xs = cast(kv, wide)?.unsqueeze(1)?; // [B, 1, Lk, Dv]
        let px = scaled_dot_product_attention(&cast(&qk, wide)?, &xs, &xs, None, bias.as_ref(), None)?;
        // (P_h X) W_{v,h}ᵀ + b_{v,h}: [H, B·Lq, Dv] · [H, Dv, dh] → [B, Lq, H·dh].
        let px = heads_major(&cast(&px, dt)?.reshape((b, heads, lq, dv))?)?;
        let out = px.matmul(&heads_of(&self.v)?.transpose(1, 2)?)?;
        let mut out = out
            .reshape((heads, b, lq, dh))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((b, lq, inner))?;
        if let Some(bv) = &self.v.bias {
            out = out.broadcast_add(&cast(&super::detach_if_no_grad(bv), dt)?)?;
        }
        self.o.project(&out, ctx)
    }
}

/// [B, H, L, D] → [H, B·L, D] (contiguous): one batch of rows per head.
fn heads_major(t: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = t.dims4()?;
    Ok(t.transpose(0, 1)?.contiguous()?.reshape((h, b * l, d))?)
}

/// Override [`MultiHeadAttention::folds`]'s choice on this thread: `Some(true)` folds wherever
/// it is valid (also where it costs more), `Some(false)` never folds, `None` (the default)
/// folds where it costs less. For tests and comparisons.
pub fn set_folded_attention_here(choice: Option<bool>) {
    FOLD_HERE.with(|c| c.set(choice));
}

thread_local! {
    static FOLD_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// `GCG_NO_FOLDED_ATTENTION` set (to anything but empty or 0), asked once.
fn folding_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("GCG_NO_FOLDED_ATTENTION").is_some_and(|v| !v.is_empty() && v != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::linear::{amx_active, amx_calls, avx512_attention_active, avx512_attention_calls, onednn_calls, ONEDNN};

    /// softmax(scale·q·kᵀ + bias)·v written out with candle's f32 ops: the reference of the
    /// fast path.
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
        let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        let mut s = (f(q)?.matmul(&f(k)?.t()?.contiguous()?)? * scale)?;
        if let Some(b) = bias {
            s = s.broadcast_add(&b.to_dtype(DType::F32)?)?;
        }
        let m = s.max_keepdim(candle_core::D::Minus1)?;
        let e = s.broadcast_sub(&m)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?;
        Ok(p.matmul(&f(v)?)?)
    }

    fn max_rel(got: &Tensor, want: &Tensor) -> Result<f32> {
        let (g, w) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
        let scale = w.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12);
        Ok((g - w)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    }

    /// The attention without a bias (gcg's AMX attention in bf16 where it runs, on the unit or
    /// on software tiles under `GCG_SOFT_AMX`; its AVX-512 attention otherwise) on random
    /// shapes against the plain ops: 1-3 batches, 1-4 heads as strided views of a projection,
    /// head widths up to the kernels' 256 (at least 256 over all heads, where the kernels
    /// apply), 16-299 queries and keys, values of another width. f32 to 1e-5 and bf16 to 1e-2
    /// of the largest value, as above; the kernel named must have run.
    mod random_shapes {
        use super::*;
        use proptest::prelude::*;

        fn check(b: usize, heads: usize, lq: usize, lk: usize, d: usize, dv: usize, bf16: bool, seed: u64) -> Result<()> {
            crate::nn::linear::require_soft_tiles_where_asked();
            let dev = Device::Cpu;
            let mut rng = crate::rng::SeededRng::new(seed);
            let mut t = |n: usize, w: usize| Tensor::from_vec(rng.normal_vec(b * heads * n * w, 0.0, 1.0), (b, n, heads, w), &dev);
            let (q, k, v) = (t(lq, d)?.transpose(1, 2)?, t(lk, d)?.transpose(1, 2)?, t(lk, dv)?.transpose(1, 2)?);
            let dt = if bf16 { DType::BF16 } else { DType::F32 };
            let (q, k, v) = ((q * 2.0)?.to_dtype(dt)?, k.to_dtype(dt)?, v.to_dtype(dt)?);
            let scale = 1.0 / (d as f64).sqrt();
            let (amx_before, avx_before) = (amx_calls(), avx512_attention_calls());
            let got = scaled_dot_product_attention(&q, &k, &v, Some(scale), None, None)?;
            let case = format!("{dt:?} b {b}, {heads} heads, [{lq}, {lk}, {d}, {dv}]");
            let fast = ONEDNN && heads * d >= crate::nn::linear::ONEDNN_MIN_DIM;
            let amx = fast && bf16 && amx_active();
            let avx = fast && !amx && avx512_attention_active(dt);
            assert_eq!(amx_calls() - amx_before, usize::from(amx), "{case}: AMX iff it applies");
            assert_eq!(
                avx512_attention_calls() - avx_before,
                usize::from(avx),
                "{case}: AVX-512 iff it applies"
            );
            assert_eq!(got.dims(), &[b, heads, lq, dv], "{case}");
            let err = max_rel(&got, &plain(&q, &k, &v, scale, None)?)?;
            let tol = if bf16 { 1e-2 } else { 1e-5 };
            assert!(err <= tol, "{case}: error {err} of the largest value > {tol}");
            Ok(())
        }

        proptest! {
            #![proptest_config(crate::nn::linear::kernel_proptest_config())]
            #[test]
            fn own_attention_kernels_equal_the_plain_ops_on_random_shapes(
                b in 1usize..4,
                (heads, d) in (1usize..5).prop_flat_map(|h| (Just(h), 256usize.div_ceil(h)..257)),
                lq in 16usize..300,
                lk in 16usize..300,
                dv in 1usize..257,
                bf16 in any::<bool>(),
                seed in any::<u64>(),
            ) {
                check(b, heads, lq, lk, d, dv, bf16, seed).unwrap();
            }
        }
    }

    /// The attention of inference (oneDNN's batched products and softmax, when gcg has oneDNN)
    /// against the plain ops: heads read in place from one packed projection, a padding bias,
    /// f32 to 1e-5 and bf16 to 1e-2 of the largest value; the result is laid out as merged
    /// heads; tiny and single-query attention and anything carrying a gradient stay with candle.
    #[test]
    fn fast_attention_equals_the_plain_ops() -> Result<()> {
        let dev = Device::Cpu;
        crate::nn::linear::require_soft_tiles_where_asked();
        #[cfg(target_arch = "x86_64")]
        if std::env::var("GCG_REQUIRE_ONEDNN").is_ok_and(|v| v == "1")
            && std::env::var_os("GCG_NO_AVX512_ATTENTION").is_none()
            && crate::nn::isa::avx512_bf16()
        {
            // Not a silent fallback where the kernel should run (built with the AMX kernels).
            assert!(
                avx512_attention_active(DType::F32),
                "GCG_REQUIRE_ONEDNN=1 on an AVX-512 CPU but gcg's AVX-512 attention is not active"
            );
        }
        let mut rng = crate::rng::SeededRng::new(11);
        let (b, h, l, d) = (2, 4, 37, 72); // width 288 ≥ ONEDNN_MIN_DIM
        let packed = Tensor::from_vec(rng.normal_vec(b * l * 3 * h * d, 0.0, 1.0), (b, l, 3, h, d), &dev)?;
        // Strided views of the packed projection [B, L, 3, H, D], in each dtype (`get` would copy).
        let views = |dt: DType| -> Result<(Tensor, Tensor, Tensor)> {
            let qkv = packed.to_dtype(dt)?.permute((2, 0, 3, 1, 4))?;
            let part = |i: usize| qkv.narrow(0, i, 1)?.squeeze(0);
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            assert!(!q.is_contiguous() && !k.is_contiguous() && !v.is_contiguous());
            Ok((q, k, v))
        };
        let (q, k, v) = views(DType::F32)?;
        let mut mask = vec![1f32; b * l];
        mask[b * l - 5..].iter_mut().for_each(|m| *m = 0.0); // the second sequence's last 5 keys padded
        let mask = Tensor::from_vec(mask, (b, l), &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        for dt in [DType::F32, DType::BF16] {
            let (q, k, v) = views(dt)?;
            let bias = padding_bias(&mask, dt)?;
            for bias in [None, Some(&bias)] {
                let (before, amx_before, avx_before) = (onednn_calls(), amx_calls(), avx512_attention_calls());
                let got = scaled_dot_product_attention(&q, &k, &v, Some(scale), bias, None)?;
                // Without a bias: gcg's AMX attention (bf16 on an AMX CPU) or its AVX-512
                // attention (the rest, on a CPU with AVX-512), one call.
                let amx = dt == DType::BF16 && bias.is_none() && amx_active();
                let avx = !amx && bias.is_none() && avx512_attention_active(dt);
                assert_eq!(
                    amx_calls() - amx_before,
                    usize::from(amx),
                    "{dt:?}: the AMX attention iff it applies"
                );
                assert_eq!(
                    avx512_attention_calls() - avx_before,
                    usize::from(avx),
                    "{dt:?}: the AVX-512 attention iff it applies"
                );
                assert_eq!(
                    onednn_calls() - before,
                    if amx || avx { 0 } else { 3 * usize::from(ONEDNN) },
                    "{dt:?}: two products and a softmax"
                );
                assert_eq!(got.dims(), &[b, h, l, d]);
                assert_eq!(got.dtype(), dt);
                let want = plain(&q, &k, &v, scale, bias)?;
                let err = max_rel(&got, &want)?;
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(err <= tol, "{dt:?}, bias {}: error {err} of the largest value", bias.is_some());
                // Merged heads are the same values whichever layout the result has.
                let merged = merge_heads(&got)?;
                assert_eq!(merge_heads(&want.to_dtype(dt)?)?.dims(), merged.dims());
                assert!(max_rel(&merged, &merge_heads(&want)?)? <= tol);
            }
        }
        // Cross-attention shapes: 20 queries over the 37 keys, values of another width (24), a
        // per-head [1, H, Lq, Lk] bias (T5's position bias) plus the padding bias.
        let v2 = Tensor::from_vec(rng.normal_vec(b * h * l * 24, 0.0, 1.0), (b, h, l, 24), &dev)?;
        let pos = Tensor::from_vec(rng.normal_vec(h * 20 * l, 0.0, 2.0), (1, h, 20, l), &dev)?;
        let bias = pos.broadcast_add(&padding_bias(&mask, DType::F32)?)?; // [B, H, 20, L]
        for dt in [DType::F32, DType::BF16] {
            let (q, k, v) = (q.narrow(2, 0, 20)?.to_dtype(dt)?, k.to_dtype(dt)?, v2.to_dtype(dt)?);
            let before = onednn_calls();
            let got = scaled_dot_product_attention(&q, &k, &v, Some(scale), Some(&bias), None)?;
            assert_eq!(
                onednn_calls() - before,
                3 * usize::from(ONEDNN),
                "{dt:?}: cross-attention through oneDNN"
            );
            assert_eq!(got.dims(), &[b, h, 20, 24]);
            let err = max_rel(&got, &plain(&q, &k, &v, scale, Some(&bias))?)?;
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(err <= tol, "{dt:?} cross-attention: error {err} of the largest value");
        }
        // Without a bias (the ViT's attention; gcg's AMX kernel in bf16 where it runs, its
        // AVX-512 kernel otherwise): queries, keys, head and value widths that end in partial
        // tiles and steps (ViT-g's heads are 88 wide over 257 tokens), more queries than keys
        // and fewer, values of another width; an odd head width and an odd number of keys (the
        // AVX-512 kernel's bf16 pairs), values wider than one block of output columns (96).
        for (lq, lk, d, dv) in [
            (257, 257, 88, 88),
            (70, 33, 40, 72),
            (16, 100, 64, 24),
            (41, 33, 89, 15),
            (16, 17, 96, 200),
        ] {
            let heads = 3;
            let mut t = |n: usize, w: usize| Tensor::from_vec(rng.normal_vec(b * heads * n * w, 0.0, 1.0), (b, n, heads, w), &dev);
            // [B, L, H, D] storage seen as [B, H, L, D]: strided, as heads of a projection.
            let (q, k, v) = (t(lq, d)?.transpose(1, 2)?, t(lk, d)?.transpose(1, 2)?, t(lk, dv)?.transpose(1, 2)?);
            let q = (q * 2.0)?; // sharper softmax rows
            let scale = 1.0 / (d as f64).sqrt();
            for dt in [DType::F32, DType::BF16] {
                let (q, k, v) = (q.to_dtype(dt)?, k.to_dtype(dt)?, v.to_dtype(dt)?);
                let (amx_before, avx_before) = (amx_calls(), avx512_attention_calls());
                let got = scaled_dot_product_attention(&q, &k, &v, Some(scale), None, None)?;
                let fast = heads * d >= crate::nn::linear::ONEDNN_MIN_DIM;
                let amx = dt == DType::BF16 && amx_active() && fast;
                let avx = !amx && avx512_attention_active(dt) && fast;
                assert_eq!(
                    amx_calls() - amx_before,
                    usize::from(amx),
                    "{dt:?} [{lq}, {lk}, {d}, {dv}]: AMX iff it applies"
                );
                assert_eq!(
                    avx512_attention_calls() - avx_before,
                    usize::from(avx),
                    "{dt:?} [{lq}, {lk}, {d}, {dv}]: AVX-512 iff it applies"
                );
                assert_eq!(got.dims(), &[b, heads, lq, dv]);
                let want = plain(&q, &k, &v, scale, None)?;
                let err = max_rel(&got, &want)?;
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(err <= tol, "{dt:?} [{lq}, {lk}, {d}, {dv}]: error {err} of the largest value");
            }
        }
        // A bias wider than the scores (a batch of 2 over one query batch): candle, which refuses it.
        let wide = Tensor::zeros((2, h, l, l), DType::F32, &dev)?;
        let (q1, k1, v1) = (q.narrow(0, 0, 1)?, k.narrow(0, 0, 1)?, v.narrow(0, 0, 1)?);
        assert!(scaled_dot_product_attention(&q1, &k1, &v1, Some(scale), Some(&wide), None).is_err());
        // Single-query (a decoding step) and narrow attention: candle.
        let before = onednn_calls();
        scaled_dot_product_attention(&q.narrow(2, 0, 1)?, &k, &v, Some(scale), None, None)?;
        scaled_dot_product_attention(
            &q.narrow(1, 0, 1)?,
            &k.narrow(1, 0, 1)?,
            &v.narrow(1, 0, 1)?,
            Some(scale),
            None,
            None,
        )?;
        assert_eq!(onednn_calls(), before);
        // A gradient to carry: candle, and the gradient flows.
        let qv = candle_core::Var::from_tensor(&q.contiguous()?)?;
        let before = onednn_calls();
        let y = scaled_dot_product_attention(qv.as_tensor(), &k, &v, Some(scale), None, None)?;
        assert_eq!(onednn_calls(), before);
        assert!(y.sum_all()?.backward()?.get(qv.as_tensor()).is_some());
        Ok(())
    }

    /// A [`MultiHeadAttention`] with random weights and biases: queries `dim` wide, keys and
    /// values from `kv_dim`, `heads` heads over `inner`, no dropout unless `p`.
    fn random_mha(
        rng: &mut crate::rng::SeededRng,
        dim: usize,
        kv_dim: usize,
        inner: usize,
        heads: usize,
        p: f64,
    ) -> Result<MultiHeadAttention> {
        let dev = Device::Cpu;
        let mut lin = |i: usize, o: usize| -> Result<Linear> {
            let w = Tensor::from_vec(rng.normal_vec(o * i, 0.0, 1.0 / (i as f64).sqrt()), (o, i), &dev)?;
            let b = Tensor::from_vec(rng.normal_vec(o, 0.0, 0.5), o, &dev)?;
            Ok(Linear::new(w, Some(b)))
        };
        Ok(MultiHeadAttention {
            q: lin(dim, inner)?,
            k: lin(kv_dim, inner)?,
            v: lin(kv_dim, inner)?,
            o: lin(inner, dim)?,
            heads,
            scale: Some(1.0 / ((inner / heads) as f64).sqrt()),
            dropout: Dropout::new(p),
        })
    }

    /// The folded cross-attention against the projected one (`forward`): f32 within 1e-5 of
    /// the largest value, with and without a padding bias and a per-head bias; a bf16 inference
    /// (f32 layers lowered to bf16, bf16 keys) within 1e-2 of the projected form in the same
    /// scope; the gradients of every weight, bias and input within 1e-4 (the key bias's, zero
    /// in exact arithmetic, below 1e-5 of the largest gradient on both sides); `folds` says no
    /// where folding costs more, for a narrow network, with dropout (also when forced) or
    /// turned off. The comparisons force the fold on, so they hold under
    /// `GCG_NO_FOLDED_ATTENTION=1` too, where the automatic choice is no.
    #[test]
    fn folded_cross_attention_equals_the_projected_form() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(5);
        // 8 heads of 32 over 5 queries (40 < 256 wide), 40 keys 288 wide: folding costs less.
        let (b, lq, lk, dim, kv_dim, inner, heads) = (2, 5, 40, 256, 288, 256, 8);
        let mha = random_mha(&mut rng, dim, kv_dim, inner, heads, 0.0)?;
        let x = Tensor::from_vec(rng.normal_vec(b * lq * dim, 0.0, 1.0), (b, lq, dim), &dev)?;
        let kv = Tensor::from_vec(rng.normal_vec(b * lk * kv_dim, 0.0, 1.0), (b, lk, kv_dim), &dev)?;
        let mut mask = vec![1f32; b * lk];
        mask[b * lk - 7..].iter_mut().for_each(|m| *m = 0.0);
        let padding = padding_bias(&Tensor::from_vec(mask, (b, lk), &dev)?, DType::F32)?; // [B, 1, 1, Lk]
        let per_head = Tensor::from_vec(rng.normal_vec(heads * lq * lk, 0.0, 2.0), (1, heads, lq, lk), &dev)?;
        let mixed = per_head.broadcast_add(&padding)?; // [B, H, Lq, Lk]
        let auto = !folding_off();
        assert_eq!(mha.folds(&x, &kv, Ctx::eval()), auto);
        set_folded_attention_here(Some(true));
        for bias in [None, Some(&padding), Some(&mixed)] {
            let want = mha.forward(&x, &kv, bias, Ctx::eval())?;
            let got = mha.forward_cross(&x, &kv, bias, Ctx::eval())?;
            assert_eq!(got.dims(), want.dims());
            let err = max_rel(&got, &want)?;
            assert!(
                err <= 1e-5,
                "f32, bias {:?}: error {err} of the largest value",
                bias.map(|t| t.dims().to_vec())
            );
            // Inference (the oneDNN path where gcg has it) gives the same values.
            let _scope = crate::nn::no_grad();
            let err = max_rel(&mha.forward_cross(&x, &kv, bias, Ctx::eval())?, &want)?;
            assert!(err <= 1e-5, "f32 inference: error {err}");
        }
        {
            let _scope = crate::nn::inference(DType::BF16);
            let kv16 = kv.to_dtype(DType::BF16)?;
            let want = mha.forward(&x, &kv, Some(&padding), Ctx::eval())?;
            let got = mha.forward_cross(&x, &kv16, Some(&padding), Ctx::eval())?;
            let err = max_rel(&got, &want)?;
            assert!(err <= 1e-2, "bf16 inference: error {err} of the largest value");
        }
        set_folded_attention_here(None);
        // Gradients (training without dropout), both forms on the same variables.
        let vars: Vec<candle_core::Var> = [&mha.q, &mha.k, &mha.v, &mha.o]
            .iter()
            .flat_map(|l| [l.weight.clone(), l.bias.clone().unwrap()])
            .chain([x.clone(), kv.clone()])
            .map(|t| candle_core::Var::from_tensor(&t))
            .collect::<candle_core::Result<_>>()?;
        let t = |i: usize| vars[i].as_tensor().clone();
        let lin = |i: usize| Linear::new(t(2 * i), Some(t(2 * i + 1)));
        let trained = MultiHeadAttention {
            q: lin(0),
            k: lin(1),
            v: lin(2),
            o: lin(3),
            ..mha.clone()
        };
        let r = Tensor::from_vec(rng.normal_vec(b * lq * dim, 0.0, 1.0), (b, lq, dim), &dev)?;
        let rng_cell = std::cell::RefCell::new(crate::rng::SeededRng::new(1));
        let ctx = Ctx::train(&rng_cell);
        assert_eq!(trained.folds(&t(8), &t(9), ctx), auto);
        let grads = |folded: bool| -> Result<Vec<Tensor>> {
            set_folded_attention_here(Some(folded));
            let y = trained.forward_cross(&t(8), &t(9), Some(&mixed), ctx);
            set_folded_attention_here(None);
            let g = (y? * &r)?.sum_all()?.backward()?;
            vars.iter()
                .map(|v| g.get(v.as_tensor()).cloned().ok_or_else(|| anyhow::anyhow!("no gradient")))
                .collect()
        };
        let (want, got) = (grads(false)?, grads(true)?);
        let names = ["q.w", "q.b", "k.w", "k.b", "v.w", "v.b", "o.w", "o.b", "x", "kv"];
        for (i, name) in names.iter().enumerate() {
            if *name == "k.b" {
                let top = want[2].abs()?.max_all()?.to_scalar::<f32>()?;
                for g in [&want[i], &got[i]] {
                    let m = g.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(m <= 1e-5 * top, "the key bias's gradient {m} (largest key weight gradient {top})");
                }
                continue;
            }
            let err = max_rel(&got[i], &want[i])?;
            assert!(err <= 1e-4, "gradient of {name}: error {err} of the largest value");
        }
        // Dropout on the attention weights in training: projected.
        let dropped = random_mha(&mut rng, dim, kv_dim, inner, heads, 0.1)?;
        assert!(!dropped.folds(&x, &kv, ctx));
        assert_eq!(dropped.folds(&x, &kv, Ctx::eval()), auto);
        set_folded_attention_here(Some(true));
        let forced_with_dropout = dropped.folds(&x, &kv, ctx);
        set_folded_attention_here(None);
        assert!(!forced_with_dropout, "forced on, dropout still keeps the projected form");
        // A narrow network (the demo's widths) keeps the projected form, unless forced.
        let narrow = random_mha(&mut rng, 32, 48, 32, 4, 0.0)?;
        let (xn, kvn) = (x.narrow(2, 0, 32)?, kv.narrow(2, 0, 48)?.contiguous()?);
        assert!(!narrow.folds(&xn.narrow(1, 0, 2)?, &kvn, Ctx::eval()));
        // As many query heads as the width (no saving): projected, unless forced.
        let many = Tensor::from_vec(rng.normal_vec(b * 40 * dim, 0.0, 1.0), (b, 40, dim), &dev)?;
        assert!(!mha.folds(&many, &kv, Ctx::eval()));
        set_folded_attention_here(Some(true));
        let forced = mha.folds(&many, &kv, Ctx::eval());
        set_folded_attention_here(Some(false));
        let off = mha.folds(&x, &kv, Ctx::eval());
        set_folded_attention_here(None);
        assert!(forced && !off);
        Ok(())
    }
}
