//! Fully connected layer, weights stored as PyTorch does: `weight` [out, in], `bias` [out], and
//! the linear helpers: the frozen-weight projection ([`Linear::forward_frozen`]), `nn.Linear`'s
//! default initialisation ([`torch_linear`]) and the trainable-tensor listing ([`push_linear`]).
//! A layer may carry a LoRA branch ([`LoraAdapter`]) that every forward adds.
//!
//! On the CPU, the products of layers with a frozen weight (`x · Wᵀ`, f32 or bf16, both sides at
//! least [`ONEDNN_MIN_DIM`] wide) go to oneDNN when gcg was built with it (build.rs finds
//! Debian's `libdnnl-dev`): about twice candle's f32 speed and four times its bf16 speed on an
//! AVX-512 machine. Smaller products, trainable weights and other devices stay with candle.

use super::cast::{cast, cast_weight};
use super::init::Init;
use super::lora::LoraAdapter;
use super::ops::Activation;
use super::Ctx;
use crate::weights::Loader;
use anyhow::{anyhow, Result};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,       // [out, in]
    pub bias: Option<Tensor>, // [out]
    /// A low-rank trainable branch added to the output (the T5's adapted projections).
    pub lora: Option<Box<LoraAdapter>>,
    /// The kept copy of a frozen weight in oneDNN's blocked layout (shared by clones).
    pack: Arc<PackSlot>,
}

/// A layer's copy of its frozen weight in the blocked layout oneDNN's matrix kernel reads.
///
/// Read as it is (row-major), a weight is repacked into that layout by the kernel on every
/// product; on this project's AVX-512 machines that costs the ViT-g 5–9% (f32 and bf16, 4
/// frames a pass). So a layer whose weight is not trained keeps a packed copy, made on its second
/// product through oneDNN (a weight multiplied once gains nothing), in the layout of that
/// product's problem (rows, epilogue, dtypes); a later product whose kernel wants another layout
/// reads the weight as it is. The copy costs the weight's memory again: it is made only while
/// `MemAvailable` stays above a quarter of the machine's memory ([`pack_budget`]), not in
/// training commands ([`set_pack_weights`]), and `GCG_PACK_WEIGHTS=0|1` turns it off or on. The
/// gcg binary's bench JSON reports the bytes held ([`packed_weight_bytes`]).
#[derive(Default)]
pub struct PackSlot {
    #[cfg(gcg_onednn)]
    uses: std::sync::atomic::AtomicUsize,
    #[cfg(gcg_onednn)]
    packed: std::sync::OnceLock<(candle_core::TensorId, Option<onednn::Packed>)>,
}

impl PackSlot {
    /// Bytes of the packed copy this slot holds (0 when none was made).
    pub fn bytes(&self) -> usize {
        #[cfg(gcg_onednn)]
        if let Some((_, Some(p))) = self.packed.get() {
            return p.bytes();
        }
        0
    }
}

impl std::fmt::Debug for PackSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(gcg_onednn)]
        if let Some((_, Some(p))) = self.packed.get() {
            return write!(f, "PackSlot(packed, {} bytes)", p.bytes());
        }
        f.write_str("PackSlot(none)")
    }
}

/// Whether frozen weights are packed ([`PackSlot`]): as `GCG_PACK_WEIGHTS` says (`1`/`on` or
/// `0`/`off`), else as [`set_pack_weights`] set (on unless set), and not on a thread that
/// [`set_pack_weights_here`] turned it off on.
pub fn pack_weights_enabled() -> bool {
    static ENV: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let env = *ENV.get_or_init(|| {
        let v = std::env::var("GCG_PACK_WEIGHTS").ok()?;
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "on" | "true" | "yes" => Some(true),
            "0" | "off" | "false" | "no" => Some(false),
            _ => None,
        }
    });
    env.unwrap_or_else(|| PACK_DEFAULT.load(std::sync::atomic::Ordering::Relaxed)) && PACK_HERE.with(|c| c.get())
}

static PACK_DEFAULT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether frozen weights are packed from now on where `GCG_PACK_WEIGHTS` does not say (the gcg
/// binary turns it off for training, whose activations need the memory a copy would take).
pub fn set_pack_weights(on: bool) {
    PACK_DEFAULT.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Turn the packing of frozen weights off (or back on) for this thread's products (for tests and
/// comparisons; layers packed already keep their copies).
pub fn set_pack_weights_here(on: bool) {
    PACK_HERE.with(|c| c.set(on));
}

/// The bytes a new packed weight may take now: what `MemAvailable` (/proc/meminfo) holds above a
/// quarter of `MemTotal`; 0 when that cannot be read.
#[cfg_attr(not(gcg_onednn), allow(dead_code))]
fn pack_budget() -> usize {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    let field = |name: &str| -> Option<usize> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: usize = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    };
    match (field("MemAvailable:"), field("MemTotal:")) {
        (Some(avail), Some(total)) => avail.saturating_sub(total / 4),
        _ => 0,
    }
}

/// Bytes held by packed weights in this process ([`PackSlot`]).
pub fn packed_weight_bytes() -> usize {
    #[cfg(gcg_onednn)]
    {
        onednn::PACKED_BYTES.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(gcg_onednn))]
    {
        0
    }
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
            pack: Arc::default(),
        }
    }

    /// This layer keeping its packed weight in `slot`: for a layer made anew on every call
    /// around a weight that stays the same tensor (the packed q/k/v projection of
    /// `models::vit::PackedSelfAttention`), so that the copy outlives the call. A slot holds the
    /// copy of one weight (its tensor id): a product of another weight reads that weight as it is.
    pub fn with_pack_slot(mut self, slot: &Arc<PackSlot>) -> Self {
        self.pack = Arc::clone(slot);
        self
    }

    /// This layer's packing slot when its weight is frozen: not a variable and computed from
    /// none (a trained weight changes between products, so no copy of it is kept).
    #[cfg_attr(not(gcg_onednn), allow(dead_code))]
    fn frozen_pack(&self) -> Option<&PackSlot> {
        (!self.weight.is_variable() && !self.weight.track_op()).then_some(&*self.pack)
    }

    /// This layer with a LoRA branch.
    pub fn with_lora(mut self, lora: LoraAdapter) -> Self {
        self.lora = Some(Box::new(lora));
        self
    }

    /// Load `{prefix}.weight` (and `{prefix}.bias` when `bias`); random init follows
    /// `nn.Linear`'s conventions of the reference code (normal(0, 0.02), zero bias) unless a
    /// specific init is asked for with [`Linear::load_with`].
    pub fn load(lb: &Loader, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Self::load_with(lb, in_dim, out_dim, bias, Init::Normal { std: 0.02 })
    }

    pub fn load_with(lb: &Loader, in_dim: usize, out_dim: usize, bias: bool, init: Init) -> Result<Self> {
        let weight = lb.get((out_dim, in_dim), "weight", init)?;
        let bias = if bias { Some(lb.get(out_dim, "bias", Init::Zeros)?) } else { None };
        Ok(Self::new(weight, bias))
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }
    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// x: [..., in] → [..., out] (+ the LoRA branch, dropout off).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        self.add_lora(x, y, Ctx::eval())
    }

    /// `y` plus the LoRA branch of `x` (in `y`'s dtype), when the layer has one.
    fn add_lora(&self, x: &Tensor, y: Tensor, ctx: Ctx) -> Result<Tensor> {
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let d = l.forward(x, ctx)?;
                let d = if d.dtype() == y.dtype() { d } else { d.to_dtype(y.dtype())? };
                Ok((y + d)?)
            }
        }
    }

    /// W x (+ b), without the LoRA branch.
    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        if super::grad_disabled() {
            // Inference: the weights as frozen (see nn::no_grad), each cast once per scope.
            let x = super::detach_if_no_grad(x);
            let bias = self.bias.as_ref().map(super::detach_if_no_grad);
            #[cfg(gcg_onednn)]
            if let Some(half) = self.lowered_to(&x) {
                // An f32 layer in a bf16 model (nn::inference): its product in bf16, the
                // result in f32.
                let lowered = Linear::new(cast_weight(&self.weight, half)?, bias.clone());
                if let Some(y) = lowered.fused_onednn(&x, &Epilogue::default(), DType::F32, None)? {
                    return Ok(y);
                }
            }
            return Linear::new(cast_weight(&self.weight, x.dtype())?, bias).forward_base_tracked(&x);
        }
        self.forward_base_tracked(x)
    }

    /// The dtype this layer's product takes an input like `x` down to in the current scope:
    /// bf16 for an f32 layer in a bf16 inference ([`super::inference`]) on the CPU with
    /// oneDNN, for an input in f32 or already in bf16 (the result is f32 either way); `None`
    /// when the product runs in the input's dtype.
    pub fn lowered_to(&self, x: &Tensor) -> Option<DType> {
        let half = super::autocast_dtype()?;
        (ONEDNN
            && (x.dtype() == DType::F32 || x.dtype() == half)
            && self.weight.dtype() == DType::F32
            && x.device().is_cpu()
            && self.in_dim() >= ONEDNN_MIN_DIM
            && self.out_dim() >= ONEDNN_MIN_DIM)
            .then_some(half)
    }

    fn forward_base_tracked(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().ok_or_else(|| anyhow::anyhow!("Linear on a scalar"))?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let w = cast(&self.weight, x.dtype())?;
        let mut y = if ONEDNN && x.device().is_cpu() && !x.track_op() && !w.track_op() {
            // No gradient to carry: the frozen-weight product (oneDNN when it applies).
            let x2 = x2.contiguous()?;
            x2.apply_op1_arc(Arc::new(Box::new(FrozenMatmul { w: w.contiguous()? })))?
        } else {
            x2.matmul(&w.t()?)?
        };
        if let Some(b) = &self.bias {
            let b = if b.dtype() == y.dtype() {
                b.clone()
            } else {
                b.to_dtype(y.dtype())?
            };
            y = y.broadcast_add(&b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_dim();
        Ok(y.reshape(out_dims)?)
    }

    /// `residual + gate ⊙ act(x · Wᵀ + b)` in `e.out` (default: `x`'s dtype): a layer and what
    /// follows it, as one oneDNN call when it applies (the CPU, nothing needing a gradient, no
    /// LoRA branch, f32 or bf16, both sides ≥ [`ONEDNN_MIN_DIM`]), else the plain ops in that
    /// order ([`Linear::forward`], the activation, the gate, the cast, the residual), which is
    /// what the fused call is tested against.
    ///
    /// f32 input with a bf16 weight is the CPU's mixed precision: the input is rounded to bf16
    /// for the product, which accumulates, adds the bias and applies the epilogue in f32 (as
    /// PyTorch's CPU autocast does). Without oneDNN that case takes the plain ops, in f32.
    pub fn forward_fused(&self, x: &Tensor, e: Epilogue) -> Result<Tensor> {
        let out = e.out.unwrap_or(x.dtype());
        #[cfg(gcg_onednn)]
        if super::grad_disabled() && self.lora.is_none() {
            // Inference (see nn::no_grad): everything as frozen.
            let frozen = Linear::new(
                super::detach_if_no_grad(&self.weight),
                self.bias.as_ref().map(super::detach_if_no_grad),
            );
            let (x, gate, residual) = (
                super::detach_if_no_grad(x),
                e.gate.map(super::detach_if_no_grad),
                e.residual.map(super::detach_if_no_grad),
            );
            let e = Epilogue {
                gate: gate.as_ref(),
                residual: residual.as_ref(),
                ..e
            };
            if let Some(y) = frozen.fused_onednn(&x, &e, out, self.frozen_pack())? {
                return Ok(y);
            }
        } else if let Some(y) = self.fused_onednn(x, &e, out, self.frozen_pack())? {
            return Ok(y);
        }
        let mut y = self.forward(x)?;
        if let Some(a) = e.act {
            y = a.forward(&y)?;
        }
        if let Some(g) = e.gate {
            let g = if g.dtype() == y.dtype() {
                g.clone()
            } else {
                g.to_dtype(y.dtype())?
            };
            y = (y * g)?;
        }
        y = cast(&y, out)?;
        if let Some(r) = e.residual {
            y = (cast(r, out)? + y)?;
        }
        Ok(y)
    }

    /// [`Linear::forward_fused`] by oneDNN, or `None` when it does not apply; `pack`: the slot
    /// of the layer whose frozen weight this is ([`PackSlot`]).
    #[cfg(gcg_onednn)]
    fn fused_onednn(&self, x: &Tensor, e: &Epilogue, out: DType, pack: Option<&PackSlot>) -> Result<Option<Tensor>> {
        let w = &self.weight;
        let wdt = w.dtype();
        let grad = |t: Option<&Tensor>| t.is_some_and(|t| t.track_op());
        if !x.device().is_cpu()
            || self.lora.is_some()
            || x.track_op()
            || w.track_op()
            || grad(self.bias.as_ref())
            || grad(e.gate)
            || grad(e.residual)
            || !matches!(wdt, DType::F32 | DType::BF16)
            || !(x.dtype() == wdt || x.dtype() == DType::F32)
            || !matches!(out, DType::F32 | DType::BF16)
            || self.in_dim() < ONEDNN_MIN_DIM
            || self.out_dim() < ONEDNN_MIN_DIM
        {
            return Ok(None);
        }
        let act = match e.act {
            None => 0,
            Some(Activation::Gelu) => 1,
            Some(Activation::GeluTanh) => 2,
            Some(Activation::Relu) => 3,
            Some(Activation::QuickGelu) => return Ok(None),
        };
        let dims = x.dims().to_vec();
        let k = self.in_dim();
        if dims.last() != Some(&k) {
            return Ok(None);
        }
        let rows = x.elem_count() / k;
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_dim();
        let flat = |t: &Tensor| -> Result<Option<Tensor>> {
            if t.dims() != out_dims.as_slice() {
                return Ok(None);
            }
            Ok(Some(t.reshape((rows, self.out_dim()))?.contiguous()?))
        };
        let gate = match e.gate {
            None => None,
            Some(g) => match flat(g)? {
                Some(g) => Some(g),
                None => return Ok(None),
            },
        };
        let residual = match e.residual {
            None => None,
            Some(r) => match flat(&cast(r, out)?)? {
                Some(r) => Some(r),
                None => return Ok(None),
            },
        };
        let x2 = cast(x, wdt)?;
        let x2 = x2.reshape((rows, k))?.contiguous()?;
        let bias = match &self.bias {
            None => None,
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        };
        let y = onednn::linear_tensors(
            &x2,
            &w.contiguous()?,
            bias.as_deref(),
            act,
            gate.as_ref(),
            residual.as_ref(),
            out,
            pack,
        )?;
        Ok(match y {
            Some(y) => Some(y.reshape(out_dims)?),
            None => None,
        })
    }

    /// `forward` for a bias-free layer whose weight is frozen: when gradients flow through `x`
    /// and the weight is a plain tensor, the product is one autograd node ([`FrozenMatmul`]) whose
    /// only input is `x`, so no weight gradient is computed or stored. Otherwise (no gradient to
    /// carry, a trainable weight, or a bias) it is [`Linear::forward`]. The LoRA branch, when
    /// there is one, is added with dropout off ([`Linear::project`] with a training context).
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        self.project(x, Ctx::eval())
    }

    /// [`Linear::forward_frozen`] whose LoRA branch (if any) runs in `ctx` (its dropout acts in
    /// training): W x + (alpha / r) · B · A · dropout(x).
    pub fn project(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let y = self.frozen_base(x)?;
        self.add_lora(x, y, ctx)
    }

    /// W x through [`FrozenMatmul`] when it applies, else [`Linear::forward_base`].
    fn frozen_base(&self, x: &Tensor) -> Result<Tensor> {
        let w = &self.weight;
        if !x.track_op() || w.track_op() || self.bias.is_some() || super::grad_disabled() {
            return self.forward_base(x);
        }
        let dims = x.dims().to_vec();
        let k = *dims.last().ok_or_else(|| anyhow!("projection of a scalar"))?;
        let rows = x.elem_count() / k.max(1);
        let x2 = cast(x, w.dtype())?.reshape((rows, k))?.contiguous()?;
        let y = x2.apply_op1_arc(Arc::new(Box::new(FrozenMatmul { w: w.contiguous()? })))?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(w.dim(0)?);
        Ok(y.reshape(out_dims)?)
    }
}

/// What [`Linear::forward_fused`] applies after the product, in this order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub act: Option<Activation>,
    /// Multiplied in element-wise (a gated feed-forward's other branch), shaped as the output.
    pub gate: Option<&'a Tensor>,
    /// Added last (a residual connection), shaped as the output.
    pub residual: Option<&'a Tensor>,
    /// The output's dtype (default: the input's).
    pub out: Option<DType>,
}

/// `nn.Linear(in, out, bias)` with PyTorch's default initialisation when not loaded
/// (weight and bias uniform in ±1/sqrt(in)).
pub fn torch_linear(lb: &Loader, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = Init::Uniform { lo: -bound, hi: bound };
    let weight = lb.get((out_dim, in_dim), "weight", init)?;
    let bias = if bias { Some(lb.get(out_dim, "bias", init)?) } else { None };
    Ok(Linear::new(weight, bias))
}

/// List a layer's tensors as `{prefix}.weight` (and `{prefix}.bias`) for a trainable-tensor
/// listing.
pub fn push_linear<'a>(v: &mut Vec<(String, &'a mut Tensor)>, prefix: &str, lin: &'a mut Linear) {
    v.push((format!("{prefix}.weight"), &mut lin.weight));
    if let Some(b) = lin.bias.as_mut() {
        v.push((format!("{prefix}.bias"), b));
    }
}

/// `x · wᵀ` for a frozen weight `w` [out, in], as one autograd node whose only input is `x`.
///
/// candle's matmul backward computes the gradient of both operands, also of a plain (frozen)
/// weight, and keeps it in the gradient store: for Flan-T5-XL that is 3 B wasted values and
/// about a third of the backward time. This op's backward computes only `grad · w`.
pub struct FrozenMatmul {
    pub w: Tensor, // [out, in]
}

fn matmul_wt<S: candle_core::backend::BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> candle_core::Result<(S, Shape)> {
    let (rows, k) = xl.shape().dims2()?;
    let (n, kw) = wl.shape().dims2()?;
    if k != kw {
        candle_core::bail!("frozen linear: input width {k}, weight [{n}, {kw}]");
    }
    let out = x.matmul(w, (1, rows, n, k), xl, &wl.transpose(0, 1)?)?;
    Ok((out, Shape::from((rows, n))))
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(w) => {
                #[cfg(gcg_onednn)]
                if let Some(out) = onednn::try_matmul_wt(x, xl, w, wl)? {
                    return Ok(out);
                }
                matmul_wt(x, xl, w, wl)
            }
            _ => candle_core::bail!("frozen linear: input on the CPU, weight on {:?}", self.w.device()),
        }
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cuda(w) => matmul_wt(x, xl, w, wl),
            _ => candle_core::bail!("frozen linear: input on CUDA, weight on {:?}", self.w.device()),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?)) // [rows, out] · [out, in]
    }
}

/// Is gcg built with oneDNN's matrix products (see the module docs)?
pub const ONEDNN: bool = cfg!(gcg_onednn);

/// Products narrower than this (inputs or outputs) stay with candle: the tiny test networks keep
/// their exact results, and oneDNN's set-up would not pay off.
pub const ONEDNN_MIN_DIM: usize = 256;

/// Use `n` threads in oneDNN's products from now on, on every thread (its OpenMP runtime
/// otherwise takes `OMP_NUM_THREADS` or every core; OpenMP keeps the count per thread, so each
/// thread applies it before its next product). Returns whether it applies (gcg built with
/// oneDNN on an OpenMP runtime).
pub fn set_onednn_threads(n: usize) -> bool {
    ONEDNN_THREADS.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    apply_onednn_threads()
}

/// The thread count set by [`set_onednn_threads`] (none: OpenMP's default).
pub fn onednn_threads() -> Option<usize> {
    match ONEDNN_THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

static ONEDNN_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    /// The thread count this thread last gave OpenMP (0: none).
    static ONEDNN_THREADS_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Give this thread's OpenMP the count of [`set_onednn_threads`], once per change.
fn apply_onednn_threads() -> bool {
    let Some(n) = onednn_threads() else { return false };
    if ONEDNN_THREADS_HERE.with(|c| c.get()) == n {
        return true;
    }
    #[cfg(gcg_onednn)]
    {
        extern "C" {
            fn gcg_onednn_set_threads(n: std::os::raw::c_int) -> std::os::raw::c_int;
        }
        // SAFETY: sets OpenMP's thread count for this thread; no memory is passed.
        let ok = unsafe { gcg_onednn_set_threads(n.min(i32::MAX as usize) as std::os::raw::c_int) == 0 };
        if ok {
            ONEDNN_THREADS_HERE.with(|c| c.set(n));
        }
        ok
    }
    #[cfg(not(gcg_onednn))]
    {
        false
    }
}

/// Attention by oneDNN on the CPU when it applies (see `onednn::attention`): nothing needs a
/// gradient, q/k/v f32 or bf16 alike, at least 16 queries and keys and a model width of at least
/// [`ONEDNN_MIN_DIM`] (the tiny networks and single-token decoding steps stay with candle).
/// `None` otherwise.
pub(crate) fn onednn_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    #[cfg(gcg_onednn)]
    {
        let on_cpu =
            [q, k, v].iter().all(|t| t.device().is_cpu() && !t.track_op()) && bias.is_none_or(|b| b.device().is_cpu() && !b.track_op());
        let (Ok((_, h, lq, d)), Ok((_, _, lk, _))) = (q.dims4(), k.dims4()) else {
            return Ok(None);
        };
        if on_cpu && lq >= 16 && lk >= 16 && h * d >= ONEDNN_MIN_DIM {
            return Ok(onednn::attention(q, k, v, scale, bias)?);
        }
    }
    let _ = (q, k, v, scale, bias);
    Ok(None)
}

/// Products computed by oneDNN on this thread since it started, counting those gcg's AMX
/// kernel computed in its place (for tests and benchmarks).
pub fn onednn_calls() -> usize {
    ONEDNN_CALLS.with(|c| c.get())
}

/// Whether oneDNN multiplies bf16 here: built in, and its instruction set (the CPU's, under
/// `GCG_MAX_CPU_ISA`'s cap, or else under oneDNN's own `ONEDNN_MAX_CPU_ISA`) reaches AVX-512;
/// Debian's oneDNN 2.x has no bf16 kernels below it, and there bf16 products and attention run
/// on operands widened to f32.
pub fn onednn_bf16() -> bool {
    #[cfg(gcg_onednn)]
    {
        onednn::bf16_products()
    }
    #[cfg(not(gcg_onednn))]
    {
        false
    }
}

/// The variable that sets oneDNN's kernel for large f32 products: `gemm`, `brgemm` or `auto`
/// (or unset/empty: gemm on Intel CPUs, brgemm elsewhere; see [`onednn_f32_gemm`]).
pub const ONEDNN_F32_ENV: &str = "GCG_ONEDNN_F32";

/// What `GCG_ONEDNN_F32`'s text asks for: `Some(true)` gemm, `Some(false)` brgemm, `None` the
/// CPU's default (unset, empty or `auto`); an error naming the variable, the value and the
/// accepted ones otherwise (csrc reads the variable too, and would take any other text as auto).
pub fn parse_onednn_f32(value: Option<&str>) -> Result<Option<bool>> {
    match value {
        None | Some("") | Some("auto") => Ok(None),
        Some("gemm") => Ok(Some(true)),
        Some("brgemm") => Ok(Some(false)),
        Some(v) => anyhow::bail!("{ONEDNN_F32_ENV}={v:?} is not one of oneDNN's f32 kernels: expected gemm, brgemm or auto"),
    }
}

/// Checks `GCG_ONEDNN_F32` in the environment: `gcg` calls it when it starts, so a wrong value
/// stops the command with [`parse_onednn_f32`]'s message.
pub fn check_onednn_f32_env() -> Result<()> {
    parse_onednn_f32(std::env::var(ONEDNN_F32_ENV).ok().as_deref()).map(|_| ())
}

/// Which of oneDNN's kernels runs large f32 products (csrc/onednn_matmul.c, `f32_gemm_choice`):
/// `Some((true, rows, cols))` its gemm kernel for calls of at least `rows` rows and `cols`
/// outputs (the default on Intel CPUs, where it measured faster), `Some((false, ..))` its brgemm
/// kernel (elsewhere), as `GCG_ONEDNN_F32=gemm|brgemm` may set; `None` without oneDNN.
pub fn onednn_f32_gemm() -> Option<(bool, usize, usize)> {
    #[cfg(gcg_onednn)]
    {
        extern "C" {
            fn gcg_onednn_f32_gemm(min_rows: *mut std::os::raw::c_long, min_cols: *mut std::os::raw::c_long) -> std::os::raw::c_int;
        }
        let (mut rows, mut cols): (std::os::raw::c_long, std::os::raw::c_long) = (0, 0);
        // SAFETY: writes two longs through valid pointers and reads the environment once.
        let gemm = unsafe { gcg_onednn_f32_gemm(&mut rows, &mut cols) } != 0;
        Some((gemm, rows.max(0) as usize, cols.max(0) as usize))
    }
    #[cfg(not(gcg_onednn))]
    {
        None
    }
}

/// Products computed by gcg's AMX kernel (csrc/amx_linear.c) on this thread since it started.
pub fn amx_calls() -> usize {
    AMX_CALLS.with(|c| c.get())
}

/// Attentions computed by gcg's AVX-512 attention (csrc/amx_linear.c) on this thread since it
/// started.
pub fn avx512_attention_calls() -> usize {
    AVX512_ATTENTION_CALLS.with(|c| c.get())
}

thread_local! {
    static ONEDNN_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static AMX_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static AVX512_ATTENTION_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static AMX_OFF_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static MATMUL_PRECISION_HERE: std::cell::Cell<Option<MatmulPrecision>> = const { std::cell::Cell::new(None) };
    static PACK_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// gcg's own AMX product was built in (x86-64 with oneDNN, a C compiler with the AMX
/// intrinsics and glibc's vector math; see build.rs).
pub const AMX_BUILT: bool = cfg!(gcg_amx);

/// Products with fewer rows than this stay with oneDNN: single-token decoding reads each weight
/// once for one row, where the tile unit has nothing to gain.
pub const AMX_MIN_ROWS: usize = 32;

/// Whether bf16 products of at least [`AMX_MIN_ROWS`] rows (and a reduction that is a multiple
/// of 32) run on gcg's AMX kernel on this thread: built in, the CPU has AMX-BF16 and Linux grants
/// its tile state (or `GCG_SOFT_AMX` asks for the software tiles: [`amx_tiles`]), `GCG_NO_AMX`
/// is not set (to compare with oneDNN's kernels), `GCG_MAX_CPU_ISA` does not cap it
/// ([`super::isa`]), and [`set_amx_here`] did not turn it off.
pub fn amx_active() -> bool {
    amx_tiles().is_some() && !AMX_OFF_HERE.with(|c| c.get())
}

/// Where gcg's AMX kernels compute their tile products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmxTiles {
    /// The CPU's tile unit.
    Unit,
    /// `GCG_SOFT_AMX=1`: the same kernels built once more with the six tile instructions they
    /// use computed with AVX512-BF16's dot products (csrc/amx_soft.c), so that the kernels can
    /// be tested on CPUs without AMX (`.ci/run` does). Slower than the unit; on a CPU with AMX
    /// it replaces the unit too, to compare the two.
    Software,
}

impl AmxTiles {
    /// Whether `GCG_SOFT_AMX` asks for the software tiles.
    pub fn software_asked() -> bool {
        std::env::var_os("GCG_SOFT_AMX").is_some_and(|v| !v.is_empty() && v != "0")
    }
}

/// The process-wide part of [`amx_active`] (asked once): which tiles the AMX kernels use, `None`
/// when they do not run (not built, `GCG_NO_AMX`, the cap, no AMX-BF16 or no tile state; with
/// `GCG_SOFT_AMX`, no AVX-512 with AVX512-BF16, which a warning then names).
pub fn amx_tiles() -> Option<AmxTiles> {
    static TILES: std::sync::OnceLock<Option<AmxTiles>> = std::sync::OnceLock::new();
    *TILES.get_or_init(|| {
        if std::env::var_os("GCG_NO_AMX").is_some_and(|v| !v.is_empty() && v != "0") || !super::isa::allows(super::isa::Isa::Amx) {
            if AmxTiles::software_asked() {
                tracing::warn!(
                    "GCG_SOFT_AMX is set, but GCG_NO_AMX or GCG_MAX_CPU_ISA (or a CPU without AVX512-BF16) keeps gcg's AMX kernels off"
                );
            }
            return None;
        }
        #[cfg(gcg_amx)]
        {
            extern "C" {
                fn gcg_amx_available() -> std::os::raw::c_int;
                fn gcg_soft_amx_available() -> std::os::raw::c_int;
            }
            if AmxTiles::software_asked() {
                // SAFETY: reads CPUID and XCR0; no memory is passed.
                let ok = unsafe { gcg_soft_amx_available() == 1 };
                if !ok {
                    tracing::warn!("GCG_SOFT_AMX is set, but this CPU or OS has no AVX-512 with AVX512-BF16 for the software tiles");
                }
                return ok.then_some(AmxTiles::Software);
            }
            // SAFETY: reads CPUID and asks Linux for the tile state; no memory is passed.
            unsafe { gcg_amx_available() == 1 }.then_some(AmxTiles::Unit)
        }
        #[cfg(not(gcg_amx))]
        {
            if AmxTiles::software_asked() {
                tracing::warn!("GCG_SOFT_AMX is set, but gcg's AMX kernels are not built into this binary");
            }
            None
        }
    })
}

/// Whether inference attention without a bias in `dt` (f32, or bf16 where gcg's AMX attention
/// does not run) takes gcg's AVX-512 attention: built in (as the AMX kernels), the CPU has
/// AVX-512 F/DQ/BW/VL and AVX512-BF16 (both types) within `GCG_MAX_CPU_ISA`'s cap, and
/// `GCG_NO_AVX512_ATTENTION` is not set (to compare with oneDNN's batched products and softmax).
/// Asked once per type.
pub fn avx512_attention_active(dt: DType) -> bool {
    static USABLE: [std::sync::OnceLock<bool>; 2] = [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let bf16 = match dt {
        DType::F32 => false,
        DType::BF16 => true,
        _ => return false,
    };
    *USABLE[bf16 as usize].get_or_init(|| {
        if std::env::var_os("GCG_NO_AVX512_ATTENTION").is_some_and(|v| !v.is_empty() && v != "0") || !super::isa::avx512_bf16() {
            return false;
        }
        #[cfg(gcg_amx)]
        {
            extern "C" {
                fn gcg_avx512_attention_available(bf16: std::os::raw::c_int) -> std::os::raw::c_int;
            }
            // SAFETY: reads CPUID and XCR0; no memory is passed.
            unsafe { gcg_avx512_attention_available(bf16 as std::os::raw::c_int) == 1 }
        }
        #[cfg(not(gcg_amx))]
        {
            false
        }
    })
}

/// How f32 matrix products are computed, as torch's `set_float32_matmul_precision` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// f32 products in f32 (oneDNN's or candle's kernels): the default.
    #[default]
    Highest,
    /// Where gcg's AMX kernel runs (an AMX-BF16 CPU, products of at least [`AMX_MIN_ROWS`]
    /// rows and a reduction that is a multiple of 32), each f32 operand is taken as the sum of
    /// two bf16 numbers and three bf16 products are summed in f32 ("bf16x3"): ~16 bits of each
    /// operand's mantissa instead of 24, a result within ~1e-5 of the f32 product's size, on the
    /// matrix unit (3.4 TFLOP/s a core for bf16 on the Xeon gcg is measured on, against ~0.2
    /// for f32 FMA). Elsewhere f32 as with `Highest`: the products that stay with candle (narrow
    /// ones, trained weights carrying a gradient, every backward product) and CPUs without AMX.
    High,
}

impl MatmulPrecision {
    /// The name `--matmul-precision` takes (and torch's).
    pub fn as_str(self) -> &'static str {
        match self {
            MatmulPrecision::Highest => "highest",
            MatmulPrecision::High => "high",
        }
    }
}

static MATMUL_PRECISION: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Set how f32 matrix products are computed from now on, on every thread.
pub fn set_matmul_precision(p: MatmulPrecision) {
    MATMUL_PRECISION.store(p as u8, std::sync::atomic::Ordering::Relaxed);
}

/// Set (or with `None` drop) a precision for this thread's products only, over the one of
/// [`set_matmul_precision`] (for tests, which share a process).
pub fn set_matmul_precision_here(p: Option<MatmulPrecision>) {
    MATMUL_PRECISION_HERE.with(|c| c.set(p));
}

/// The precision of this thread's f32 products: [`set_matmul_precision_here`]'s, else
/// [`set_matmul_precision`]'s (`Highest` unless set).
pub fn matmul_precision() -> MatmulPrecision {
    MATMUL_PRECISION_HERE
        .with(|c| c.get())
        .unwrap_or(match MATMUL_PRECISION.load(std::sync::atomic::Ordering::Relaxed) {
            0 => MatmulPrecision::Highest,
            _ => MatmulPrecision::High,
        })
}

/// Turn gcg's AMX kernel off (or back on) for this thread's products: the same products then go
/// to oneDNN (for tests that compare the two).
pub fn set_amx_here(on: bool) {
    AMX_OFF_HERE.with(|c| c.set(!on));
}

/// With `GCG_SOFT_AMX=1` (`.ci/run`'s run for CPUs without AMX) the AMX kernels must run on
/// the software tiles wherever they can: built in, AVX-512 with AVX512-BF16, no cap below
/// AMX and no `GCG_NO_AMX`. Otherwise the AMX kernels' tests would compare oneDNN with itself.
#[cfg(test)]
pub(crate) fn require_soft_tiles_where_asked() {
    let off = std::env::var_os("GCG_NO_AMX").is_some_and(|v| !v.is_empty() && v != "0");
    if AmxTiles::software_asked() && AMX_BUILT && !off && crate::nn::isa::allows(crate::nn::isa::Isa::Amx) {
        assert_eq!(
            amx_tiles(),
            Some(AmxTiles::Software),
            "GCG_SOFT_AMX=1 here, but the software tiles do not run"
        );
    }
}

/// The random-shape tests of gcg's kernels: 24 cases unless `PROPTEST_CASES` says otherwise, no
/// failure files written into the source tree.
#[cfg(test)]
pub(crate) fn kernel_proptest_config() -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(24),
        failure_persistence: None,
        ..Default::default()
    }
}

#[cfg(gcg_onednn)]
mod onednn {
    use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor};
    use half::bf16;
    use std::os::raw::{c_int, c_long, c_void};

    /// Declares gcg's fully connected layers in C, all with one signature:
    /// `y [m, n] = residual + gate ⊙ act(x [m, k] · w [n, k]ᵀ + bias)`, row-major; x and w f32
    /// or bf16 (in_bf16), y f32 or bf16 (out_bf16), bias f32; the gate's dtype flagged; y holds
    /// the residual on entry when `residual` is set.
    macro_rules! linear_fns {
        ($($(#[$attr:meta])* fn $name:ident;)*) => {
            extern "C" {
                $($(#[$attr])* fn $name(
                    in_bf16: c_int, out_bf16: c_int, m: c_long, n: c_long, k: c_long,
                    x: *const c_void, w: *const c_void, bias: *const f32, act: c_int,
                    gate: *const c_void, gate_bf16: c_int, residual: c_int, y: *mut c_void,
                ) -> c_int;)*
            }
        };
    }

    linear_fns! {
        /// csrc/onednn_matmul.c: 0 done, else the dnnl_status_t.
        fn gcg_onednn_linear;
        /// csrc/amx_linear.c (bf16 x and w) on the AMX unit: 0 done, -1 not applicable, -2 out
        /// of memory.
        #[cfg(gcg_amx)]
        fn gcg_amx_linear;
        /// csrc/amx_linear.c (f32 x and w as pairs of bf16 numbers) on the AMX unit: as above.
        #[cfg(gcg_amx)]
        fn gcg_amx_linear_x3;
        /// The same two with the tile unit in software (csrc/amx_soft.c, `GCG_SOFT_AMX`).
        #[cfg(gcg_amx)]
        fn gcg_soft_amx_linear;
        #[cfg(gcg_amx)]
        fn gcg_soft_amx_linear_x3;
    }

    type LinearFn = unsafe extern "C" fn(
        c_int,
        c_int,
        c_long,
        c_long,
        c_long,
        *const c_void,
        *const c_void,
        *const f32,
        c_int,
        *const c_void,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int;

    /// A contiguous CPU buffer of f32 or bf16 values, borrowed for one call.
    enum Buf<'a> {
        F32(&'a [f32]),
        BF16(&'a [bf16]),
    }

    impl Buf<'_> {
        fn len(&self) -> usize {
            match self {
                Buf::F32(v) => v.len(),
                Buf::BF16(v) => v.len(),
            }
        }
        fn ptr(&self) -> *const c_void {
            match self {
                Buf::F32(v) => v.as_ptr() as *const c_void,
                Buf::BF16(v) => v.as_ptr() as *const c_void,
            }
        }
        fn is_bf16(&self) -> bool {
            matches!(self, Buf::BF16(_))
        }
    }

    fn buf<'a>(s: &'a CpuStorage, l: &Layout) -> Option<Buf<'a>> {
        if !l.is_contiguous() {
            return None;
        }
        let (o, n) = (l.start_offset(), l.shape().elem_count());
        match s {
            CpuStorage::F32(v) => v.get(o..o + n).map(Buf::F32),
            CpuStorage::BF16(v) => v.get(o..o + n).map(Buf::BF16),
            _ => None,
        }
    }

    /// `dnnl_unimplemented`: no kernel for the asked combination.
    const DNNL_UNIMPLEMENTED: c_int = 3;
    /// csrc's GCG_REFERENCE_ONLY: oneDNN had only its reference kernel (plain loops, ~100× slower
    /// than the plain ops here), so nothing was computed.
    const REFERENCE_ONLY: c_int = 100;

    /// Whether `status` says oneDNN did not compute: no kernel for the problem, or only its
    /// reference one. The plain ops take over.
    fn not_computed(status: c_int) -> bool {
        status == DNNL_UNIMPLEMENTED || status == REFERENCE_ONLY
    }
    /// `dnnl_out_of_memory`.
    const DNNL_OUT_OF_MEMORY: c_int = 1;

    /// What follows the product (see `gcg_onednn_linear`).
    pub struct Post<'a> {
        /// 0 none, 1 erf GELU, 2 tanh GELU, 3 ReLU.
        pub act: c_int,
        pub bias: Option<&'a [f32]>,
        pub gate: Option<(&'a CpuStorage, &'a Layout)>,
        /// The residual, copied into the output before the call.
        pub residual: Option<(&'a CpuStorage, &'a Layout)>,
        pub out: DType,
        /// The layer's slot for a packed copy of its (frozen) weight, see [`super::PackSlot`].
        pub pack: Option<&'a PackUse<'a>>,
    }

    /// A product's weight and the slot of the layer it belongs to.
    pub struct PackUse<'a> {
        pub slot: &'a super::PackSlot,
        /// The weight's id: a copy packed from another tensor (the layer's weight replaced) is
        /// not used.
        pub id: candle_core::TensorId,
    }

    /// A weight packed once into the blocked layout oneDNN's kernel reads for one problem
    /// (`gcg_onednn_pack`), so that its products need not repack it on every call.
    pub struct Packed(*mut c_void);

    /// Bytes held by packed weights in this process.
    pub static PACKED_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    // SAFETY: the packed buffer is written once, when made, and only read afterwards.
    unsafe impl Send for Packed {}
    unsafe impl Sync for Packed {}

    impl Drop for Packed {
        fn drop(&mut self) {
            PACKED_BYTES.fetch_sub(self.bytes(), std::sync::atomic::Ordering::Relaxed);
            // SAFETY: made by gcg_onednn_pack and freed only here.
            unsafe { gcg_onednn_packed_free(self.0) }
        }
    }

    impl Packed {
        /// Takes ownership of a packed weight made by gcg_onednn_pack (non-null).
        fn new(p: *mut c_void) -> Self {
            let p = Packed(p);
            PACKED_BYTES.fetch_add(p.bytes(), std::sync::atomic::Ordering::Relaxed);
            p
        }

        /// Its size in bytes.
        pub fn bytes(&self) -> usize {
            // SAFETY: a live packed weight.
            unsafe { gcg_onednn_packed_bytes(self.0) }
        }
    }

    extern "C" {
        fn gcg_onednn_packed_free(p: *mut c_void);
        fn gcg_onednn_packed_bytes(p: *const c_void) -> usize;
        fn gcg_onednn_pack(
            in_bf16: c_int,
            out_bf16: c_int,
            m: c_long,
            n: c_long,
            k: c_long,
            w: *const c_void,
            bias: *const f32,
            act: c_int,
            gate: c_int,
            gate_bf16: c_int,
            residual: c_int,
            max_bytes: usize,
            out: *mut *mut c_void,
        ) -> c_int;
        fn gcg_onednn_linear_packed(
            in_bf16: c_int,
            out_bf16: c_int,
            m: c_long,
            n: c_long,
            k: c_long,
            x: *const c_void,
            w: *const c_void,
            bias: *const f32,
            act: c_int,
            gate: *const c_void,
            gate_bf16: c_int,
            residual: c_int,
            y: *mut c_void,
            packed: *const c_void,
        ) -> c_int;
    }

    /// Hands `GCG_MAX_CPU_ISA`'s cap ([`crate::nn::isa`]) to oneDNN, once, before its first
    /// kernel (every call into oneDNN passes here first).
    fn cap_isa() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            extern "C" {
                fn gcg_onednn_cap_isa(level: c_int) -> c_int;
            }
            if let Some(level) = crate::nn::isa::onednn_level() {
                // SAFETY: takes a level number; oneDNN checks it.
                let status = unsafe { gcg_onednn_cap_isa(level) };
                if status != 0 {
                    tracing::warn!(
                        "oneDNN did not take {}={} (dnnl_status_t {status}): its kernels may use more than that",
                        crate::nn::isa::ENV,
                        crate::nn::isa::cap().name()
                    );
                }
            }
        });
    }

    /// Whether oneDNN multiplies bf16 here (see [`super::onednn_bf16`]). Asked once, after
    /// [`cap_isa`] (which it fixes: oneDNN reads its cap on the first question).
    pub fn bf16_products() -> bool {
        static BF16: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *BF16.get_or_init(|| {
            cap_isa();
            extern "C" {
                fn gcg_onednn_bf16() -> c_int;
            }
            // SAFETY: asks oneDNN for its instruction set; no memory is passed.
            unsafe { gcg_onednn_bf16() == 1 }
        })
    }

    /// [`linear`] of bf16 x and w where oneDNN has no bf16 products (a CPU without AVX-512, or
    /// one capped below it by `GCG_MAX_CPU_ISA`): x, w and a bf16 gate or residual widened to f32
    /// (exactly), oneDNN's f32 product (the same products of the same values, accumulated in f32
    /// as its bf16 kernels do), the output rounded to bf16 once where asked. The weight is
    /// widened on every call, as a frozen bf16 weight is kept in bf16 (an f32 copy would double
    /// the backbone's memory); a layer's packed copy, when made, is of the widened weight.
    fn widened(x: &[bf16], w: &[bf16], (m, n, k): (usize, usize, usize), post: &Post) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
        let wide = |v: &[bf16]| CpuStorage::F32(crate::nn::cast::widen(v));
        let (x, w) = (wide(x), wide(w));
        let (xl, wl) = (Layout::contiguous((m, k)), Layout::contiguous((n, k)));
        // A bf16 gate or residual widened (Err: not contiguous, left to the plain ops); an f32
        // one is read as it is.
        let widen_bf16 = |o: Option<(&CpuStorage, &Layout)>| -> Result<Option<CpuStorage>, ()> {
            match o {
                Some((s @ CpuStorage::BF16(_), l)) => match buf(s, l) {
                    Some(Buf::BF16(v)) if v.len() == m * n => Ok(Some(wide(v))),
                    _ => Err(()), // as `linear` refuses it
                },
                _ => Ok(None),
            }
        };
        if post
            .residual
            .is_some_and(|(r, _)| matches!(r, CpuStorage::BF16(_)) != (post.out == DType::BF16))
        {
            return Ok(None); // a residual not in the output's dtype, as `linear` refuses it
        }
        let (Ok(gate), Ok(residual)) = (widen_bf16(post.gate), widen_bf16(post.residual)) else {
            return Ok(None);
        };
        let rest = Layout::contiguous((m, n));
        let f32_post = Post {
            act: post.act,
            bias: post.bias,
            gate: gate.as_ref().map(|g| (g, &rest)).or(post.gate),
            residual: residual.as_ref().map(|r| (r, &rest)).or(post.residual),
            out: DType::F32,
            pack: post.pack,
        };
        let Some((y, shape)) = linear(&x, &xl, &w, &wl, &f32_post)? else {
            return Ok(None);
        };
        Ok(Some(match (post.out, y) {
            (DType::BF16, CpuStorage::F32(y)) => (CpuStorage::BF16(crate::nn::cast::narrow(&y)), shape),
            (_, y) => (y, shape),
        }))
    }

    /// `x [m, k] · w [n, k]ᵀ` plus `post` by oneDNN, or `None` when it does not apply (sizes,
    /// layouts, dtypes).
    pub fn linear(
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        post: &Post,
    ) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
        let (Ok((m, k)), Ok((n, kw))) = (xl.shape().dims2(), wl.shape().dims2()) else {
            return Ok(None);
        };
        let min = super::ONEDNN_MIN_DIM;
        if k != kw || k < min || n < min || m == 0 {
            return Ok(None);
        }
        let (Some(xb), Some(wb)) = (buf(x, xl), buf(w, wl)) else {
            return Ok(None);
        };
        if xb.is_bf16() != wb.is_bf16() || !matches!(post.out, DType::F32 | DType::BF16) {
            return Ok(None);
        }
        if let (Buf::BF16(xv), Buf::BF16(wv)) = (&xb, &wb) {
            if !bf16_products() {
                return widened(xv, wv, (m, n, k), post);
            }
        }
        cap_isa();
        let gate = match post.gate {
            None => None,
            Some((g, gl)) => match buf(g, gl) {
                Some(b) if b.len() == m * n => Some(b),
                _ => return Ok(None),
            },
        };
        let residual = match post.residual {
            None => None,
            Some((r, rl)) => match buf(r, rl) {
                Some(b) if b.len() == m * n && b.is_bf16() == (post.out == DType::BF16) => Some(b),
                _ => return Ok(None),
            },
        };
        if post.bias.is_some_and(|b| b.len() != n) {
            return Ok(None);
        }
        super::apply_onednn_threads();
        let call = |y: *mut c_void| -> candle_core::Result<bool> {
            // A call of one of the C functions with the product's arguments (and `extra` ones).
            macro_rules! with_args {
                ($f:expr $(, $extra:expr)*) => {
                    $f(
                        xb.is_bf16() as c_int,
                        (post.out == DType::BF16) as c_int,
                        m as c_long,
                        n as c_long,
                        k as c_long,
                        xb.ptr(),
                        wb.ptr(),
                        post.bias.map_or(std::ptr::null(), |b| b.as_ptr()),
                        post.act,
                        gate.as_ref().map_or(std::ptr::null(), |g| g.ptr()),
                        gate.as_ref().is_some_and(|g| g.is_bf16()) as c_int,
                        residual.is_some() as c_int,
                        y,
                        $($extra),*
                    )
                };
            }
            // SAFETY: x holds m·k and w n·k contiguous values of the type the flag names, the
            // bias n f32 values, the gate m·n values of its flagged type and y m·n values of the
            // output type (all checked above); the call reads x, w, bias and gate and writes y.
            let run = |f: LinearFn| unsafe { with_args!(f) };
            // The AMX kernels (bf16, and f32 as bf16 pairs), on the unit or on software tiles.
            #[cfg(gcg_amx)]
            let (bf16_fn, x3_fn): (LinearFn, LinearFn) = if super::amx_tiles() == Some(super::AmxTiles::Software) {
                (gcg_soft_amx_linear, gcg_soft_amx_linear_x3)
            } else {
                (gcg_amx_linear, gcg_amx_linear_x3)
            };
            #[cfg(gcg_amx)]
            let amx = if !(m >= super::AMX_MIN_ROWS && k % 32 == 0 && super::amx_active()) {
                None
            } else if xb.is_bf16() {
                Some(bf16_fn)
            } else if super::matmul_precision() == super::MatmulPrecision::High {
                Some(x3_fn)
            } else {
                None
            };
            #[cfg(gcg_amx)]
            if let Some(f) = amx {
                match run(f) {
                    0 => {
                        super::ONEDNN_CALLS.with(|c| c.set(c.get() + 1));
                        super::AMX_CALLS.with(|c| c.set(c.get() + 1));
                        return Ok(true);
                    }
                    -2 => candle_core::bail!("AMX matrix product [{m}, {k}] · [{n}, {k}]ᵀ: out of memory for its packed operands"),
                    _ => {} // Not applicable after all: oneDNN.
                }
            }
            let status = match post.pack {
                None => run(gcg_onednn_linear),
                Some(pu) => {
                    let slot = &pu.slot.packed;
                    // Packed on a layer's second product: a weight multiplied once (a one-off
                    // answer's encoder, one video's ViT pass) would gain nothing from a copy. So
                    // also for a product of many rows, which runs as several oneDNN calls of row
                    // blocks (csrc rows_per_call) that each repack the weight: the copy's fresh
                    // memory costs more than those repacks (the f32 ViT-g's one 32-frame pass,
                    // packed on its first product: 85-88 s against 81-83 s unpacked).
                    let uses = pu.slot.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if slot.get().is_none() && uses >= 2 && super::pack_weights_enabled() {
                        let mut p: *mut c_void = std::ptr::null_mut();
                        // SAFETY: as in `run` (gcg_onednn_pack reads w and the bias only); it
                        // stores a new packed weight or null in p.
                        let status = unsafe {
                            gcg_onednn_pack(
                                xb.is_bf16() as c_int,
                                (post.out == DType::BF16) as c_int,
                                m as c_long,
                                n as c_long,
                                k as c_long,
                                wb.ptr(),
                                post.bias.map_or(std::ptr::null(), |b| b.as_ptr()),
                                post.act,
                                gate.is_some() as c_int,
                                gate.as_ref().is_some_and(|g| g.is_bf16()) as c_int,
                                residual.is_some() as c_int,
                                super::pack_budget(),
                                &mut p,
                            )
                        };
                        // The copy only saves time: a failure to make it leaves the products
                        // reading the weight as it is.
                        if status == DNNL_OUT_OF_MEMORY {
                            tracing::warn!("weight [{n}, {k}]: out of memory for its packed copy; its products read it as it is");
                        } else if status == REFERENCE_ONLY {
                            tracing::debug!("weight [{n}, {k}]: oneDNN has only its reference kernel for this product: not packed");
                        } else if status != 0 {
                            tracing::debug!("weight [{n}, {k}]: packing failed (dnnl_status_t {status}); its products read it as it is");
                        }
                        // Decided once per layer: no copy when the kernel reads the weight as it
                        // is, the copy would not fit the memory budget or packing failed. Another
                        // thread may have decided meanwhile: its decision stands.
                        let _ = slot.set((pu.id, (status == 0 && !p.is_null()).then(|| Packed::new(p))));
                    }
                    match slot.get() {
                        Some((id, Some(p))) if *id == pu.id => {
                            let pp = p.0 as *const c_void;
                            // SAFETY: as in `run`; the packed weight is alive while `slot` is.
                            unsafe { with_args!(gcg_onednn_linear_packed, pp) }
                        }
                        _ => run(gcg_onednn_linear),
                    }
                }
            };
            if not_computed(status) {
                // A combination of types or epilogues this oneDNN has no (fast) kernel for: the
                // plain ops instead.
                return Ok(false);
            }
            if status != 0 {
                candle_core::bail!("oneDNN matrix product [{m}, {k}] · [{n}, {k}]ᵀ failed (dnnl_status_t {status})");
            }
            super::ONEDNN_CALLS.with(|c| c.set(c.get() + 1));
            Ok(true)
        };
        // The output holds the residual on entry, or is written in full by the call (so it is
        // not zeroed first: the length is set once the call has written it).
        let y = match (post.out, &residual) {
            (DType::F32, r) => {
                let mut y = match r {
                    Some(Buf::F32(r)) => r.to_vec(),
                    _ => Vec::with_capacity(m * n),
                };
                if !call(y.as_mut_ptr() as *mut c_void)? {
                    return Ok(None);
                }
                // SAFETY: the call wrote all m·n values (or y held them already).
                unsafe { y.set_len(m * n) };
                CpuStorage::F32(y)
            }
            (_, r) => {
                let mut y = match r {
                    Some(Buf::BF16(r)) => r.to_vec(),
                    _ => Vec::with_capacity(m * n),
                };
                if !call(y.as_mut_ptr() as *mut c_void)? {
                    return Ok(None);
                }
                // SAFETY: as above.
                unsafe { y.set_len(m * n) };
                CpuStorage::BF16(y)
            }
        };
        Ok(Some((y, Shape::from((m, n)))))
    }

    extern "C" {
        /// csrc/onednn_matmul.c: c = alpha · a · b over two batch dimensions, strided operands.
        fn gcg_onednn_bmm(
            ab_bf16: c_int,
            c_bf16: c_int,
            b0: c_long,
            b1: c_long,
            m: c_long,
            n: c_long,
            k: c_long,
            a: *const c_void,
            sa: *const c_long,
            b: *const c_void,
            sb: *const c_long,
            alpha: f32,
            c: *mut c_void,
            sc: *const c_long,
        ) -> c_int;
        /// csrc/onednn_matmul.c: y = softmax of each row of x (f32), y f32 or bf16.
        fn gcg_onednn_softmax(rows: c_long, n: c_long, x: *const f32, y: *mut c_void, y_bf16: c_int) -> c_int;
    }

    /// Declares gcg's attention kernels in C, all with one signature (see `gcg_attention`).
    macro_rules! attention_fns {
        ($($(#[$attr:meta])* fn $name:ident;)*) => {
            extern "C" {
                $($(#[$attr])* fn $name(
                    amx: c_int, bf16: c_int, b: c_long, h: c_long, lq: c_long, lk: c_long, d: c_long, dv: c_long,
                    q: *const c_void, sq: *const c_long, k: *const c_void, sk: *const c_long,
                    v: *const c_void, sv: *const c_long, scale: f32, out: *mut c_void,
                ) -> c_int;)*
            }
        };
    }

    attention_fns! {
        /// csrc/amx_linear.c: f32 (bf16 = 0) or bf16 attention without a bias, on the AMX unit
        /// (amx = 1, bf16 only) or on AVX-512, out [B, Lq, H, Dv]: 0 done, -1 not applicable,
        /// -2 out of memory.
        #[cfg(gcg_amx)]
        fn gcg_attention;
        /// The same with the tile unit in software (csrc/amx_soft.c, `GCG_SOFT_AMX`).
        #[cfg(gcg_amx)]
        fn gcg_soft_attention;
    }

    /// A 4-d tensor's CPU values from its first element on, and its strides (in elements).
    fn strided4(t: &Tensor) -> Option<(impl std::ops::Deref<Target = Storage> + '_, usize, [c_long; 4])> {
        let (s, l) = t.storage_and_layout();
        let st = l.stride();
        if st.len() != 4 {
            return None;
        }
        let strides = [st[0] as c_long, st[1] as c_long, st[2] as c_long, st[3] as c_long];
        let offset = l.start_offset();
        Some((s, offset, strides))
    }

    /// The address of element `offset` of CPU f32/bf16 storage of `dtype`, if that is what it holds
    /// and `span` elements from there are inside it.
    fn at(s: &Storage, offset: usize, span: usize, dtype: DType) -> Option<*const c_void> {
        match (s, dtype) {
            (Storage::Cpu(CpuStorage::F32(v)), DType::F32) => v.get(offset..offset + span).map(|v| v.as_ptr() as *const c_void),
            (Storage::Cpu(CpuStorage::BF16(v)), DType::BF16) => v.get(offset..offset + span).map(|v| v.as_ptr() as *const c_void),
            _ => None,
        }
    }

    /// The elements a strided 4-d view of `dims` reaches from its first one (one past the last).
    fn span(dims: &[usize], strides: &[c_long; 4]) -> usize {
        1 + dims
            .iter()
            .zip(strides)
            .map(|(&d, &s)| (d.max(1) - 1) * s.max(0) as usize)
            .sum::<usize>()
    }

    /// softmax(scale · q·kᵀ + bias) · v for q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]
    /// (any strides: the heads of a packed qkv projection are read in place), all f32 or all
    /// bf16, by two oneDNN batched products and oneDNN's softmax: scores and softmax in f32,
    /// the products in the inputs' type with f32 accumulation, the result in that type and laid
    /// out as [B, Lq, H, Dv] (returned as its [B, H, Lq, Dv] view, so merging the heads is free).
    /// `None` when it does not apply (types, shapes, storage).
    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, bias: Option<&Tensor>) -> candle_core::Result<Option<Tensor>> {
        let dt = q.dtype();
        if !matches!(dt, DType::F32 | DType::BF16) || k.dtype() != dt || v.dtype() != dt {
            return Ok(None);
        }
        let (Ok((b, h, lq, d)), Ok((kb, kh, lk, kd)), Ok((vb, vh, vl, dv))) = (q.dims4(), k.dims4(), v.dims4()) else {
            return Ok(None);
        };
        if (kb, kh, kd) != (b, h, d) || (vb, vh, vl) != (b, h, lk) || b * h * lq * lk * d * dv == 0 {
            return Ok(None);
        }
        if dt == DType::BF16 && !bf16_products() {
            // No bf16 products in oneDNN on this CPU or under the cap (gcg's bf16 kernels need
            // more): the f32 attention of the widened (exact) operands, its result rounded to bf16
            // once. The probabilities stay in f32 for the second product (oneDNN's bf16 path
            // rounds them to bf16 first).
            let f = |t: &Tensor| crate::nn::cast::cast(t, DType::F32);
            return match attention(&f(q)?, &f(k)?, &f(v)?, scale, bias)? {
                None => Ok(None),
                // [B, Lq, H, Dv] in memory, returned as its [B, H, Lq, Dv] view as below.
                Some(y) => Ok(Some(crate::nn::cast::cast(&y.transpose(1, 2)?, DType::BF16)?.transpose(1, 2)?)),
            };
        }
        cap_isa();
        // v's storage is read only for the second product (no lock held while the bias is added).
        let (Some((qs, qo, sq)), Some((ks, ko, sk))) = (strided4(q), strided4(k)) else {
            return Ok(None);
        };
        let (Some(qp), Some(kp)) = (
            at(&qs, qo, span(&[b, h, lq, d], &sq), dt),
            at(&ks, ko, span(&[b, h, lk, d], &sk), dt),
        ) else {
            return Ok(None);
        };
        let bf = (dt == DType::BF16) as c_int;
        super::apply_onednn_threads();
        // Without a bias: gcg's own kernels (every buffer of a (batch, head) pair in L2), AMX for
        // bf16 where it runs, else AVX-512 (f32, or bf16 with AVX512-BF16).
        #[cfg(gcg_amx)]
        if bias.is_none() {
            let amx = dt == DType::BF16 && super::amx_active();
            if amx || super::avx512_attention_active(dt) {
                let Some((vs, vo, sv)) = strided4(v) else {
                    return Ok(None);
                };
                let Some(vp) = at(&vs, vo, span(&[b, h, lk, dv], &sv), dt) else {
                    return Ok(None);
                };
                let n = b * lq * h * dv;
                let call = |out: *mut c_void| -> c_int {
                    let dims = [b, h, lq, lk, d, dv].map(|x| x as c_long);
                    let f = if amx && super::amx_tiles() == Some(super::AmxTiles::Software) {
                        gcg_soft_attention
                    } else {
                        gcg_attention
                    };
                    // SAFETY: q, k and v are read through strides that stay inside their buffers
                    // (checked by `at` with each view's span); out has room for b·lq·h·dv values
                    // of q's type, which the call writes in full when it returns 0.
                    unsafe {
                        f(
                            amx as c_int,
                            bf,
                            dims[0],
                            dims[1],
                            dims[2],
                            dims[3],
                            dims[4],
                            dims[5],
                            qp,
                            sq.as_ptr(),
                            kp,
                            sk.as_ptr(),
                            vp,
                            sv.as_ptr(),
                            scale,
                            out,
                        )
                    }
                };
                // A new [b, lq, h, dv] tensor of T that `call` writes in full when it returns 0.
                fn written<T: candle_core::WithDType>(
                    n: usize,
                    shape: (usize, usize, usize, usize),
                    call: impl Fn(*mut c_void) -> c_int,
                ) -> (c_int, Option<candle_core::Result<Tensor>>) {
                    let mut out: Vec<T> = Vec::with_capacity(n);
                    let st = call(out.as_mut_ptr() as *mut c_void);
                    // SAFETY: 0: the call wrote every output value.
                    let y = (st == 0)
                        .then(|| unsafe { out.set_len(n) })
                        .map(|_| Tensor::from_vec(out, shape, &Device::Cpu));
                    (st, y)
                }
                let (st, y) = if dt == DType::BF16 {
                    written::<bf16>(n, (b, lq, h, dv), call)
                } else {
                    written::<f32>(n, (b, lq, h, dv), call)
                };
                match (st, y) {
                    (0, Some(y)) => {
                        if amx {
                            super::AMX_CALLS.with(|c| c.set(c.get() + 1));
                        } else {
                            super::AVX512_ATTENTION_CALLS.with(|c| c.set(c.get() + 1));
                        }
                        return Ok(Some(y?.transpose(1, 2)?));
                    }
                    (-2, _) => candle_core::bail!(
                        "{} attention for q {:?}: out of memory for its buffers",
                        if amx { "AMX" } else { "AVX-512" },
                        q.dims()
                    ),
                    _ => {} // Not applicable after all: oneDNN.
                }
            }
        }
        let check = |status: c_int, what: &str| -> candle_core::Result<bool> {
            if not_computed(status) {
                return Ok(false);
            }
            if status != 0 {
                candle_core::bail!(
                    "oneDNN attention {what} for q {:?}, k {:?}, v {:?} failed (dnnl_status_t {status})",
                    q.dims(),
                    k.dims(),
                    v.dims()
                );
            }
            super::ONEDNN_CALLS.with(|c| c.set(c.get() + 1));
            Ok(true)
        };
        // Scores [B, H, Lq, Lk] in f32: q · kᵀ, kᵀ a strided view of k.
        // Buffers the calls write in full: their lengths are set once written (no zeroing).
        let mut scores: Vec<f32> = Vec::with_capacity(b * h * lq * lk);
        let s_str: [c_long; 4] = [(h * lq * lk) as c_long, (lq * lk) as c_long, lk as c_long, 1];
        let kt_str: [c_long; 4] = [sk[0], sk[1], sk[3], sk[2]];
        // SAFETY: q, kᵀ and the scores are read/written through strides that stay inside their
        // buffers (checked by `at` with each view's span); the call writes only the scores.
        let st = unsafe {
            gcg_onednn_bmm(
                bf,
                0,
                b as c_long,
                h as c_long,
                lq as c_long,
                lk as c_long,
                d as c_long,
                qp,
                sq.as_ptr(),
                kp,
                kt_str.as_ptr(),
                scale,
                scores.as_mut_ptr() as *mut c_void,
                s_str.as_ptr(),
            )
        };
        drop((qs, ks));
        if !check(st, "scores")? {
            return Ok(None);
        }
        // SAFETY: the call wrote every score.
        unsafe { scores.set_len(b * h * lq * lk) };
        if let Some(bias) = bias {
            let s = Tensor::from_vec(scores, (b, h, lq, lk), &Device::Cpu)?.broadcast_add(&crate::nn::cast::cast(bias, DType::F32)?)?;
            if s.dims() != [b, h, lq, lk] {
                // A bias that widens the scores (not this attention's shape): candle's ops say why.
                return Ok(None);
            }
            scores = s.flatten_all()?.to_vec1::<f32>()?;
        }
        let Some((vs, vo, sv)) = strided4(v) else {
            return Ok(None);
        };
        let Some(vp) = at(&vs, vo, span(&[b, h, lk, dv], &sv), dt) else {
            return Ok(None);
        };
        // Probabilities in the inputs' type, then the weighted sum written as [B, Lq, H, Dv].
        let rows = b * h * lq;
        let o_str: [c_long; 4] = [(lq * h * dv) as c_long, dv as c_long, (h * dv) as c_long, 1];
        macro_rules! finish {
            ($t:ty) => {{
                let mut probs: Vec<$t> = Vec::with_capacity(rows * lk);
                // SAFETY: scores hold rows·lk values; probs has room for as many, all written.
                let st = unsafe {
                    gcg_onednn_softmax(
                        rows as c_long,
                        lk as c_long,
                        scores.as_ptr(),
                        probs.as_mut_ptr() as *mut c_void,
                        bf,
                    )
                };
                if !check(st, "softmax")? {
                    return Ok(None);
                }
                // SAFETY: the softmax wrote every probability.
                unsafe { probs.set_len(rows * lk) };
                let mut out: Vec<$t> = Vec::with_capacity(b * lq * h * dv);
                // SAFETY: probs (contiguous), v (strided, inside its buffer) and out (b·lq·h·dv
                // values through o_str) as described; the call writes only out.
                let st = unsafe {
                    gcg_onednn_bmm(
                        bf,
                        bf,
                        b as c_long,
                        h as c_long,
                        lq as c_long,
                        dv as c_long,
                        lk as c_long,
                        probs.as_ptr() as *const c_void,
                        s_str.as_ptr(),
                        vp,
                        sv.as_ptr(),
                        1.0,
                        out.as_mut_ptr() as *mut c_void,
                        o_str.as_ptr(),
                    )
                };
                if !check(st, "weighted sum")? {
                    return Ok(None);
                }
                // SAFETY: the product wrote every output value ([B, Lq, H, Dv] covers the buffer).
                unsafe { out.set_len(b * lq * h * dv) };
                Tensor::from_vec(out, (b, lq, h, dv), &Device::Cpu)?.transpose(1, 2)?
            }};
        }
        let out = if dt == DType::BF16 { finish!(bf16) } else { finish!(f32) };
        drop(vs);
        Ok(Some(out))
    }

    /// [`linear`] on tensors (CPU storage; the caller has checked that nothing needs a gradient).
    pub fn linear_tensors(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&[f32]>,
        act: c_int,
        gate: Option<&Tensor>,
        residual: Option<&Tensor>,
        out: DType,
        pack: Option<&super::PackSlot>,
    ) -> candle_core::Result<Option<Tensor>> {
        let pack = pack.map(|slot| PackUse { slot, id: w.id() });
        let pack = pack.as_ref();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let gs = gate.map(|g| g.storage_and_layout());
        let rs = residual.map(|r| r.storage_and_layout());
        let (Storage::Cpu(xc), Storage::Cpu(wc)) = (&*xs, &*ws) else {
            return Ok(None);
        };
        // An optional operand's CPU storage: Err(()) when it lives elsewhere.
        fn on_cpu<'a, G: std::ops::Deref<Target = Storage>>(
            t: &'a Option<(G, &'a Layout)>,
        ) -> Result<Option<(&'a CpuStorage, &'a Layout)>, ()> {
            match t {
                None => Ok(None),
                Some((s, l)) => match &**s {
                    Storage::Cpu(c) => Ok(Some((c, *l))),
                    _ => Err(()),
                },
            }
        }
        let (Ok(gc), Ok(rc)) = (on_cpu(&gs), on_cpu(&rs)) else {
            return Ok(None);
        };
        let post = Post {
            act,
            bias,
            gate: gc,
            residual: rc,
            out,
            pack,
        };
        Ok(match linear(xc, xl, wc, wl, &post)? {
            None => None,
            Some((CpuStorage::F32(v), shape)) => Some(Tensor::from_vec(v, shape, &Device::Cpu)?),
            Some((CpuStorage::BF16(v), shape)) => Some(Tensor::from_vec(v, shape, &Device::Cpu)?),
            Some(_) => unreachable!("oneDNN writes f32 or bf16"),
        })
    }

    /// `x · wᵀ` by oneDNN, or `None` when it does not apply (sizes, layouts, dtypes).
    pub fn try_matmul_wt(x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
        let out = match x {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            _ => return Ok(None),
        };
        linear(
            x,
            xl,
            w,
            wl,
            &Post {
                act: 0,
                bias: None,
                gate: None,
                residual: None,
                out,
                pack: None,
            },
        )
    }
}

#[cfg(test)]
mod onednn_tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The oneDNN product against candle's plain matmul it replaces: f32 to float rounding,
    /// bf16 to bf16 rounding; narrow products and gradient-carrying ones stay with candle.
    #[test]
    fn frozen_products_equal_candles_matmul() -> Result<()> {
        if std::env::var("GCG_REQUIRE_ONEDNN").is_ok_and(|v| v == "1") {
            assert!(
                ONEDNN,
                "GCG_REQUIRE_ONEDNN=1 but gcg was built without oneDNN (apt install libdnnl-dev)"
            );
        }
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(7);
        let (m, k, n) = (300, 320, 288);
        let x = Tensor::from_vec(rng.normal_vec(2 * m * k, 0.0, 1.0), (2, m, k), &dev)?;
        let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.1), (n, k), &dev)?;
        let b = Tensor::from_vec(rng.normal_vec(n, 0.0, 1.0), n, &dev)?;
        let lin = Linear::new(w.clone(), Some(b.clone()));
        for dt in [DType::F32, DType::BF16] {
            let (xd, wd, bd) = (x.to_dtype(dt)?, w.to_dtype(dt)?, b.to_dtype(dt)?);
            let lin = Linear::new(wd.clone(), Some(bd.clone()));
            let before = onednn_calls();
            let y = lin.forward(&xd)?.to_dtype(DType::F32)?;
            assert_eq!(
                onednn_calls() - before,
                usize::from(ONEDNN),
                "{dt:?}: oneDNN used once when built in"
            );
            let want = xd
                .reshape((2 * m, k))?
                .matmul(&wd.t()?)?
                .broadcast_add(&bd)?
                .reshape((2, m, n))?
                .to_dtype(DType::F32)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = (y - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(err <= tol, "{dt:?}: max error {err} of the largest value (tolerance {tol})");
        }
        // Narrow: candle.
        let before = onednn_calls();
        let narrow = Linear::new(w.narrow(0, 0, 64)?, None);
        narrow.forward(&x)?;
        assert_eq!(onednn_calls(), before);
        // A trainable weight: candle's matmul (its gradient is needed).
        let var = candle_core::Var::from_tensor(&w)?;
        let trainable = Linear::new(var.as_tensor().clone(), None);
        let before = onednn_calls();
        let y = trainable.forward(&x)?;
        assert_eq!(onednn_calls(), before);
        let g = y.sum_all()?.backward()?;
        assert!(g.get(var.as_tensor()).is_some());
        // Gradients through a frozen weight (the frozen T5 in training): the oneDNN forward, and
        // the input's gradient equal to candle's.
        let frozen = Linear::new(w.clone(), None);
        let xv = candle_core::Var::from_tensor(&x)?;
        let before = onednn_calls();
        let y = frozen.forward_frozen(xv.as_tensor())?;
        assert_eq!(onednn_calls() - before, usize::from(ONEDNN));
        let want = x.reshape((2 * m, k))?.matmul(&w.t()?)?.reshape((2, m, n))?;
        let err = (&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= 1e-5 * want.abs()?.max_all()?.to_scalar::<f32>()?, "{err}");
        let g = (y.sqr()?.sum_all()? * 0.5)?.backward()?;
        let gx = g.get(xv.as_tensor()).expect("a gradient for x");
        let want_gx = want.reshape((2 * m, n))?.matmul(&w)?.reshape((2, m, k))?;
        let err = (gx - &want_gx)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= 1e-4 * want_gx.abs()?.max_all()?.to_scalar::<f32>()?, "gradient error {err}");
        let _ = lin;
        Ok(())
    }

    fn max_rel(got: &Tensor, want: &Tensor) -> f32 {
        let (g, w) = (got.to_dtype(DType::F32).unwrap(), want.to_dtype(DType::F32).unwrap());
        let scale = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
        (g - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale
    }

    /// What a fused call does after the product, as the plain ops in f32: the activation, the
    /// gate, the residual (reference for the fused paths).
    fn plain_epilogue(product: Tensor, act: Option<Activation>, gate: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let mut want = match act {
            None => product,
            Some(Activation::Gelu) => product.gelu_erf()?,
            Some(Activation::GeluTanh) => product.gelu()?,
            Some(Activation::Relu) => product.relu()?,
            Some(Activation::QuickGelu) => unreachable!("not fused"),
        };
        if let Some(g) = gate {
            want = (want * g.to_dtype(DType::F32)?)?;
        }
        if let Some(r) = residual {
            want = (want + r.to_dtype(DType::F32)?)?;
        }
        Ok(want)
    }

    /// Every epilogue a fused product takes: (activation, gate, residual, output dtype).
    fn epilogue_combos() -> Vec<(Option<Activation>, bool, bool, DType)> {
        let acts = [None, Some(Activation::Gelu), Some(Activation::GeluTanh), Some(Activation::Relu)];
        let mut v = Vec::new();
        for act in acts {
            for (use_gate, use_res) in [(false, false), (true, false), (false, true), (true, true)] {
                for out in [DType::F32, DType::BF16] {
                    v.push((act, use_gate, use_res, out));
                }
            }
        }
        v
    }

    /// `lin.forward_fused(x)` with one of [`epilogue_combos`], the gate and residual cast to
    /// its output dtype: (the result, that gate, that residual).
    fn fused_with(
        lin: &Linear,
        x: &Tensor,
        (act, use_gate, use_res, out): (Option<Activation>, bool, bool, DType),
        gate: &Tensor,
        res: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (g, r) = (gate.to_dtype(out)?, res.to_dtype(out)?);
        let e = Epilogue {
            act,
            gate: use_gate.then_some(&g),
            residual: use_res.then_some(&r),
            out: Some(out),
        };
        let got = lin.forward_fused(x, e)?;
        Ok((got, g, r))
    }

    /// `forward_fused` (one oneDNN call when built in) against the plain ops written out here
    /// in f32 from the rounded inputs, for every epilogue: activation, gate, residual, output
    /// dtype; f32, bf16 and mixed (f32 input, bf16 weight). f32 to 1e-5, bf16 to its rounding.
    #[test]
    fn fused_epilogues_equal_the_plain_ops() -> Result<()> {
        let dev = Device::Cpu;
        let split_before = split_residuals();
        let mut rng = crate::rng::SeededRng::new(17);
        let (m, k, n) = (37, 320, 288);
        let x = Tensor::from_vec(rng.normal_vec(2 * m * k, 0.0, 1.0), (2, m, k), &dev)?;
        let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?;
        let b = Tensor::from_vec(rng.normal_vec(n, 0.0, 0.5), n, &dev)?;
        let gate = Tensor::from_vec(rng.normal_vec(2 * m * n, 0.0, 1.0), (2, m, n), &dev)?;
        let res = Tensor::from_vec(rng.normal_vec(2 * m * n, 0.0, 1.0), (2, m, n), &dev)?;
        // (input dtype, weight dtype)
        for (xdt, wdt) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F32, DType::BF16)] {
            let lin = Linear::new(w.to_dtype(wdt)?, Some(b.to_dtype(wdt)?));
            let xin = x.to_dtype(xdt)?;
            for combo @ (act, use_gate, use_res, out) in epilogue_combos() {
                let before = onednn_calls();
                let (got, g, r) = fused_with(&lin, &xin, combo, &gate, &res)?;
                assert_eq!(got.dtype(), out);
                assert_eq!(got.dims(), &[2, m, n]);
                let combo = format!("{xdt:?} input, {wdt:?} weight, {act:?}, gate {use_gate}, residual {use_res}, {out:?} out");
                assert_eq!(onednn_calls() - before, usize::from(ONEDNN), "{combo}: one oneDNN call");
                // The reference: inputs rounded as the product sees them, then f32.
                let f = |t: &Tensor| t.to_dtype(DType::F32);
                let xr = f(&x.to_dtype(wdt)?)?;
                let mut want = xr
                    .reshape((2 * m, k))?
                    .matmul(&f(&w.to_dtype(wdt)?)?.t()?)?
                    .broadcast_add(&f(&b.to_dtype(wdt)?)?)?
                    .reshape((2, m, n))?;
                want = plain_epilogue(want, act, use_gate.then_some(&g), use_res.then_some(&r))?;
                let half = xdt == DType::BF16 || wdt == DType::BF16 || out == DType::BF16;
                let tol = if half { 1.6e-2 } else { 1e-5 };
                let err = max_rel(&got, &want);
                assert!(err <= tol, "{combo}: error {err} > {tol}");
            }
        }
        if ONEDNN && !crate::nn::isa::avx512() {
            // Below AVX-512 (here under GCG_MAX_CPU_ISA) Debian 12's oneDNN 2.6 has only its
            // reference kernel for an activation or gate followed by the residual's sum: those
            // products ran without the sum and csrc added the residual (checked above).
            assert!(split_residuals() > split_before, "no residual added apart below AVX-512");
        }
        Ok(())
    }

    /// Both of oneDNN's f32 kernels (gemm and brgemm, forced on this thread) against the plain
    /// ops, on a product of 1028 rows (the ViT-g's 4 frames) with every epilogue and output
    /// dtype: f32 to 1e-5, a bf16 output to its rounding. The gemm kernel must have run where
    /// asked for every epilogue but an activation or gate before the residual's sum (oneDNN 2.6
    /// has it for the bias with an activation, a gate or both, or with the sum alone: the ViT's
    /// four products among them), brgemm where asked on an AVX-512 CPU.
    #[cfg(gcg_onednn)]
    #[test]
    fn f32_products_on_either_onednn_kernel_equal_the_plain_ops() -> Result<()> {
        extern "C" {
            fn gcg_onednn_f32_gemm_here(on: std::os::raw::c_int);
            fn gcg_onednn_last_impl() -> *const std::os::raw::c_char;
        }
        // SAFETY: a thread-local string csrc keeps NUL-terminated.
        let last = || {
            unsafe { std::ffi::CStr::from_ptr(gcg_onednn_last_impl()) }
                .to_string_lossy()
                .into_owned()
        };
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(41);
        let (m, k, n) = (1028, 288, 320);
        let x = Tensor::from_vec(rng.normal_vec(m * k, 0.0, 1.0), (m, k), &dev)?;
        let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?;
        let b = Tensor::from_vec(rng.normal_vec(n, 0.0, 0.5), n, &dev)?;
        let gate = Tensor::from_vec(rng.normal_vec(m * n, 0.0, 1.0), (m, n), &dev)?;
        let res = Tensor::from_vec(rng.normal_vec(m * n, 0.0, 1.0), (m, n), &dev)?;
        let lin = Linear::new(w.clone(), Some(b.clone()));
        let plain = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        let mut kernels = std::collections::BTreeSet::new();
        for gemm in [1, 0] {
            // SAFETY: sets a thread-local flag.
            unsafe { gcg_onednn_f32_gemm_here(gemm) };
            for combo @ (act, use_gate, use_res, out) in epilogue_combos() {
                let before = onednn_calls();
                let (got, g, r) = fused_with(&lin, &x, combo, &gate, &res)?;
                assert_eq!(onednn_calls() - before, 1, "one oneDNN call");
                let impl_ = last();
                let combo = format!("gemm {gemm}, {act:?}, gate {use_gate}, residual {use_res}, {out:?} out, kernel {impl_}");
                if gemm == 1 && !(use_res && (act.is_some() || use_gate)) {
                    assert!(impl_.starts_with("gemm:"), "{combo}: the gemm kernel was asked for");
                }
                if gemm == 0 && crate::nn::isa::avx512() {
                    assert!(!impl_.starts_with("gemm:"), "{combo}: brgemm was asked for");
                }
                kernels.insert(impl_);
                let want = plain_epilogue(plain.clone(), act, use_gate.then_some(&g), use_res.then_some(&r))?;
                let tol = if out == DType::BF16 { 1.6e-2 } else { 1e-5 };
                let err = max_rel(&got, &want);
                assert!(err <= tol, "{combo}: error {err} > {tol}");
            }
        }
        // SAFETY: as above.
        unsafe { gcg_onednn_f32_gemm_here(-1) };
        assert!(kernels.len() >= 2 || !crate::nn::isa::avx512(), "kernels run: {kernels:?}");
        Ok(())
    }

    /// `GCG_ONEDNN_F32`'s values as csrc reads them (exact text); anything else is an error
    /// naming the variable and the value.
    #[test]
    fn the_f32_kernel_variable_takes_gemm_brgemm_or_auto() {
        assert_eq!(parse_onednn_f32(None).unwrap(), None);
        assert_eq!(parse_onednn_f32(Some("")).unwrap(), None);
        assert_eq!(parse_onednn_f32(Some("auto")).unwrap(), None);
        assert_eq!(parse_onednn_f32(Some("gemm")).unwrap(), Some(true));
        assert_eq!(parse_onednn_f32(Some("brgemm")).unwrap(), Some(false));
        for bad in ["sgemm", "GEMM", " gemm", "1"] {
            let e = parse_onednn_f32(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("GCG_ONEDNN_F32") && e.contains(&format!("{bad:?}")) && e.contains("brgemm"),
                "{e}"
            );
        }
    }

    /// Products whose residual csrc added apart (process-wide, only grows), 0 without oneDNN.
    fn split_residuals() -> i64 {
        #[cfg(gcg_onednn)]
        {
            extern "C" {
                fn gcg_onednn_split_residuals() -> std::os::raw::c_long;
            }
            // SAFETY: reads a counter.
            unsafe { gcg_onednn_split_residuals() as i64 }
        }
        #[cfg(not(gcg_onednn))]
        {
            0
        }
    }

    /// Products of more than 2048 rows run as oneDNN calls of row blocks (at most 1024 rows,
    /// nearly equal, a multiple of 16: 2100 rows as 704, 704 and 692); the result equals the
    /// plain ops across the blocks' edges, with every operand that follows the rows (x, the
    /// gate, the residual, the output) in f32 and bf16. Such a layer packs its weight on its
    /// second product, as any frozen layer (on an AVX-512 CPU oneDNN's kernel wants a blocked
    /// layout, so a copy must have been made then), and later products read the copy.
    #[cfg(gcg_onednn)]
    #[test]
    fn products_of_many_rows_run_in_row_blocks_and_equal_the_plain_ops() -> Result<()> {
        extern "C" {
            fn gcg_onednn_rows_per_call(m: std::os::raw::c_long) -> std::os::raw::c_long;
        }
        if std::env::var_os("GCG_ONEDNN_ROWS").is_none() {
            // SAFETY: arithmetic on its argument (and one read of the environment).
            let rows = |m: usize| unsafe { gcg_onednn_rows_per_call(m as std::os::raw::c_long) } as usize;
            assert_eq!((rows(1028), rows(2048), rows(2100), rows(8224)), (1028, 2048, 704, 928));
        }
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(37);
        let (m, k, n) = (2100, 256, 272);
        let x = Tensor::from_vec(rng.normal_vec(m * k, 0.0, 1.0), (m, k), &dev)?;
        let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?;
        let b = Tensor::from_vec(rng.normal_vec(n, 0.0, 0.5), n, &dev)?;
        let gate = Tensor::from_vec(rng.normal_vec(m * n, 0.0, 1.0), (m, n), &dev)?;
        let res = Tensor::from_vec(rng.normal_vec(m * n, 0.0, 1.0), (m, n), &dev)?;
        set_amx_here(false); // oneDNN's products also on an AMX CPU
        for (dt, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1.6e-2)] {
            let lin = Linear::new(w.to_dtype(dt)?, Some(b.to_dtype(dt)?));
            let xin = x.to_dtype(dt)?;
            // Six products: the first reads the weight as it is, the second packs it (in its
            // problem's layout: f32 out), the rest read the copy where their kernel wants it.
            let mut products = 0;
            for out in [DType::F32, DType::BF16] {
                for (i, act) in [Some(Activation::Gelu), None, Some(Activation::Gelu)].into_iter().enumerate() {
                    let (g, r) = (gate.to_dtype(out)?, res.to_dtype(out)?);
                    let (use_gate, use_res) = (i != 1, true);
                    let e = Epilogue {
                        act,
                        gate: use_gate.then_some(&g),
                        residual: use_res.then_some(&r),
                        out: Some(out),
                    };
                    let before = onednn_calls();
                    let got = lin.forward_fused(&xin, e)?;
                    products += 1;
                    assert_eq!(onednn_calls() - before, usize::from(ONEDNN), "one product");
                    let f = |t: &Tensor| t.to_dtype(DType::F32);
                    let want = f(&x.to_dtype(dt)?)?
                        .matmul(&f(&w.to_dtype(dt)?)?.t()?)?
                        .broadcast_add(&f(&b.to_dtype(dt)?)?)?;
                    let want = plain_epilogue(want, act, use_gate.then_some(&g), use_res.then_some(&r))?;
                    let tol = if out == DType::BF16 { 1.6e-2 } else { tol };
                    let err = max_rel(&got, &want);
                    assert!(err <= tol, "{dt:?} product {i}, {act:?}, {out:?} out: error {err} > {tol}");
                    if crate::nn::isa::avx512() {
                        let packed = matches!(lin.pack.packed.get(), Some((_, Some(_))));
                        assert_eq!(packed, products >= 2, "{dt:?}: packed copy after {products} products of {m} rows");
                    }
                    // Row by row: the last rows of each block and the first of the next.
                    for row in [0, 703, 704, 1407, 1408, m - 1] {
                        let e = max_rel(&got.narrow(0, row, 1)?, &want.narrow(0, row, 1)?);
                        assert!(e <= 2.0 * tol, "{dt:?} product {products} ({out:?} out), row {row}: error {e}");
                    }
                }
            }
        }
        set_amx_here(true);
        Ok(())
    }

    /// A frozen layer's packed weight ([`PackSlot`]) against the plain ops: the first product
    /// reads the weight as it is, the second packs it, later ones read the copy (on an AVX-512
    /// CPU oneDNN's kernel wants a blocked layout, so a copy must have been made); products of
    /// other row counts, a clone whose weight was replaced, a trained weight and a thread with
    /// packing turned off all give their own weight's products.
    #[test]
    fn packed_weights_give_the_products_of_the_weights_as_they_are() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(29);
        let (k, n) = (320, 288);
        let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?;
        let w2 = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?;
        let b = Tensor::from_vec(rng.normal_vec(n, 0.0, 0.5), n, &dev)?;
        // bf16 products on oneDNN also on an AMX CPU (its own kernel packs per call).
        set_amx_here(false);
        for (dt, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1.6e-2)] {
            let check = |lin: &Linear, w: &Tensor, m: usize, what: &str| -> Result<()> {
                let mut rng = crate::rng::SeededRng::new(m as u64);
                let x = Tensor::from_vec(rng.normal_vec(m * k, 0.0, 1.0), (m, k), &dev)?.to_dtype(dt)?;
                let e = Epilogue {
                    act: Some(Activation::Gelu),
                    out: Some(DType::F32),
                    ..Default::default()
                };
                let got = lin.forward_fused(&x, e)?;
                let f = |t: &Tensor| t.to_dtype(DType::F32);
                let want = f(&x)?.matmul(&f(&w.to_dtype(dt)?)?.t()?)?.broadcast_add(&f(&b.to_dtype(dt)?)?)?;
                let want = plain_epilogue(want, Some(Activation::Gelu), None, None)?;
                let err = max_rel(&got, &want);
                assert!(err <= tol, "{dt:?}, {what}, {m} rows: error {err} > {tol}");
                Ok(())
            };
            let packed = |lin: &Linear| -> bool {
                #[cfg(gcg_onednn)]
                {
                    matches!(lin.pack.packed.get(), Some((_, Some(_))))
                }
                #[cfg(not(gcg_onednn))]
                {
                    let _ = lin;
                    false
                }
            };
            let lin = Linear::new(w.to_dtype(dt)?, Some(b.to_dtype(dt)?));
            for i in 0..3 {
                check(&lin, &w, 100, &format!("product {i}"))?;
                assert!(i >= 1 || !packed(&lin), "{dt:?}: packed on the first product");
            }
            if ONEDNN && crate::nn::isa::avx512() {
                assert!(packed(&lin), "{dt:?}: no packed copy after three products on an AVX-512 CPU");
                assert!(packed_weight_bytes() >= n * k * dt.size_in_bytes());
            }
            for m in [1, 37, 514] {
                check(&lin, &w, m, "after packing")?;
            }
            // A clone shares the slot; its weight replaced, it multiplies by the new one.
            let mut other = lin.clone();
            other.weight = w2.to_dtype(dt)?;
            for _ in 0..3 {
                check(&other, &w2, 100, "replaced weight")?;
            }
            // A trained weight is never packed, in or out of an inference scope.
            let var = candle_core::Var::from_tensor(&w.to_dtype(dt)?)?;
            let trained = Linear::new(var.as_tensor().clone(), Some(b.to_dtype(dt)?));
            {
                let _scope = super::super::no_grad();
                for _ in 0..3 {
                    check(&trained, &w, 100, "trained weight")?;
                }
            }
            assert!(!packed(&trained), "{dt:?}: a trained weight was packed");
            // Packing turned off on this thread.
            set_pack_weights_here(false);
            let off = Linear::new(w.to_dtype(dt)?, Some(b.to_dtype(dt)?));
            for _ in 0..3 {
                check(&off, &w, 100, "packing off")?;
            }
            set_pack_weights_here(true);
            assert!(!packed(&off), "{dt:?}: packed with packing off");
        }
        set_amx_here(true);
        Ok(())
    }

    /// A packed copy in a layout other than the one a product's kernel wants (here: a bf16
    /// copy offered to an f32 product) is not read: the product reads the weight as it is.
    #[cfg(gcg_onednn)]
    #[test]
    fn a_packed_copy_in_another_layout_is_not_read() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(31);
        let (m, k, n) = (64, 256, 320);
        let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?;
        let x = Tensor::from_vec(rng.normal_vec(m * k, 0.0, 1.0), (m, k), &dev)?;
        let (wb, xb) = (w.to_dtype(DType::BF16)?, x.to_dtype(DType::BF16)?);
        set_amx_here(false);
        let slot = PackSlot::default();
        for _ in 0..2 {
            onednn::linear_tensors(&xb, &wb, None, 0, None, None, DType::F32, Some(&slot))?;
        }
        set_amx_here(true);
        if !onednn_bf16() {
            // No bf16 products in oneDNN here (below AVX-512, or capped): the bf16 product ran
            // widened to f32, so a copy is of the widened weight, in f32's layout, and is what the
            // next product of this slot reads: it gives the product of the bf16 values.
            let got = onednn::linear_tensors(&xb, &wb, None, 0, None, None, DType::F32, Some(&slot))?.expect("a widened product");
            let want = xb.to_dtype(DType::F32)?.matmul(&wb.to_dtype(DType::F32)?.t()?)?;
            let err = max_rel(&got, &want);
            assert!(err <= 1e-5, "widened bf16 product after packing: error {err}");
            return Ok(());
        }
        let Some((id, Some(_))) = slot.packed.get() else {
            // oneDNN reads the bf16 weight as it is on this CPU: nothing to offer.
            return Ok(());
        };
        assert_eq!(*id, wb.id());
        // The f32 weight's storage offered with the bf16 copy's slot and id.
        let (ws, wl) = w.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (Storage::Cpu(wc), Storage::Cpu(xc)) = (&*ws, &*xs) else {
            unreachable!()
        };
        let pu = onednn::PackUse { slot: &slot, id: *id };
        let post = onednn::Post {
            act: 0,
            bias: None,
            gate: None,
            residual: None,
            out: DType::F32,
            pack: Some(&pu),
        };
        let (CpuStorage::F32(got), _) = onednn::linear(xc, xl, wc, wl, &post)?.expect("an f32 product oneDNN runs") else {
            unreachable!()
        };
        let got = Tensor::from_vec(got, (m, n), &dev)?;
        let want = x.matmul(&w.t()?)?;
        let err = max_rel(&got, &want);
        assert!(err <= 1e-5, "error {err}: the bf16 copy was read");
        Ok(())
    }

    /// gcg's AMX kernel (bf16 products of at least 32 rows) against the plain ops in f32 from the
    /// same bf16 inputs and against oneDNN's kernel for the same call, for every epilogue, with
    /// rows, columns and a reduction that leave partial tiles, and a reduction long enough to be
    /// walked in several chunks. On a CPU without AMX-BF16 the same products run on oneDNN (and
    /// the test says so); on one with it, the AMX kernel must have run.
    #[test]
    fn amx_products_equal_the_plain_ops_and_onednn() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(23);
        let acts = [None, Some(Activation::Gelu), Some(Activation::GeluTanh), Some(Activation::Relu)];
        if std::env::var("GCG_REQUIRE_ONEDNN").is_ok_and(|v| v == "1") && cfg!(target_arch = "x86_64") {
            // Where oneDNN is (Debian 12 and later), gcc and glibc are new enough for the kernel.
            assert!(
                AMX_BUILT,
                "GCG_REQUIRE_ONEDNN=1 on x86-64 but gcg's AMX kernel was not built (see build.rs's warning)"
            );
        }
        super::require_soft_tiles_where_asked();
        if !amx_active() {
            eprintln!("AMX-BF16 not usable here (built in: {AMX_BUILT}): the bf16 products below run on oneDNN");
        }
        // (rows, reduction, columns): 74 rows = two blocks of 32 and 10; 270 columns end in a
        // partial tile; 1056 = 33 steps of 32, three chunks; 1100 columns of 1056 make several
        // panels per thread (496 columns each); 2112 = 66 steps, two spans of k (64 and 2
        // steps) with the row blocks' accumulators kept between them.
        for (m, k, n) in [(37, 288, 270), (20, 1056, 300), (20, 1056, 1100), (20, 2112, 300)] {
            let x = Tensor::from_vec(rng.normal_vec(2 * m * k, 0.0, 1.0), (2, m, k), &dev)?.to_dtype(DType::BF16)?;
            let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?.to_dtype(DType::BF16)?;
            let b = Tensor::from_vec(rng.normal_vec(n, 0.0, 0.5), n, &dev)?.to_dtype(DType::BF16)?;
            let gate = Tensor::from_vec(rng.normal_vec(2 * m * n, 0.0, 1.0), (2, m, n), &dev)?;
            let res = Tensor::from_vec(rng.normal_vec(2 * m * n, 0.0, 1.0), (2, m, n), &dev)?;
            let lin = Linear::new(w.clone(), Some(b.clone()));
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let product = f(&x)?
                .reshape((2 * m, k))?
                .matmul(&f(&w)?.t()?)?
                .broadcast_add(&f(&b)?)?
                .reshape((2, m, n))?;
            for act in acts {
                for (use_gate, use_res) in [(false, false), (true, false), (false, true), (true, true)] {
                    for out in [DType::F32, DType::BF16] {
                        let (g, r) = (gate.to_dtype(out)?, res.to_dtype(out)?);
                        let e = || Epilogue {
                            act,
                            gate: use_gate.then_some(&g),
                            residual: use_res.then_some(&r),
                            out: Some(out),
                        };
                        let combo = format!("[{m}x2, {k}] x [{n}, {k}]T, {act:?}, gate {use_gate}, residual {use_res}, {out:?} out");
                        let before = amx_calls();
                        let got = lin.forward_fused(&x, e())?;
                        assert_eq!(
                            amx_calls() - before,
                            usize::from(amx_active()),
                            "{combo}: the AMX kernel ran iff usable"
                        );
                        assert_eq!((got.dtype(), got.dims()), (out, &[2, m, n][..]), "{combo}");
                        set_amx_here(false);
                        let other = lin.forward_fused(&x, e());
                        set_amx_here(true);
                        let other = other?;
                        let want = plain_epilogue(product.clone(), act, use_gate.then_some(&g), use_res.then_some(&r))?;
                        // f32 results differ from the reference only by the order of the sums;
                        // bf16 results by one rounding of the output.
                        let tol = if out == DType::F32 { 2e-5 } else { 8e-3 };
                        let err = max_rel(&got, &want);
                        assert!(err <= tol, "{combo}: error {err} against the plain ops > {tol}");
                        let err = max_rel(&got, &other);
                        assert!(err <= tol, "{combo}: error {err} against oneDNN's kernel > {tol}");
                    }
                }
            }
        }
        Ok(())
    }

    /// The GELU fused into bf16 outputs (the AMX epilogue's own erf, csrc gelu_erf_bf16out)
    /// value by value against the plain ops in f64, over pre-activations spread across ±20 (the
    /// far tails included): each output within one bf16 rounding of the exact GELU (2⁻⁸ of its
    /// size, plus 1e-6 where GELU is nearly 0). Measured: within 4.2e-7 of it before rounding.
    #[test]
    fn amx_gelu_of_bf16_outputs_is_within_one_rounding() -> Result<()> {
        super::require_soft_tiles_where_asked();
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(29);
        let (m, k, n) = (64, 256, 512);
        // Rows of x scaled 0.1..2.1: pre-activations of standard deviations 0.5..10.
        let scale: Vec<f32> = (0..m)
            .flat_map(|i| std::iter::repeat_n(0.1 + 2.0 * i as f32 / m as f32, k))
            .collect();
        let x = (Tensor::from_vec(rng.normal_vec(m * k, 0.0, 1.0), (m, k), &dev)? * Tensor::from_vec(scale, (m, k), &dev)?)?
            .to_dtype(DType::BF16)?;
        let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.3), (n, k), &dev)?.to_dtype(DType::BF16)?;
        let b = Tensor::from_vec(rng.normal_vec(n, 0.0, 1.0), n, &dev)?.to_dtype(DType::BF16)?;
        let lin = Linear::new(w.clone(), Some(b.clone()));
        let before = amx_calls();
        let e = Epilogue {
            act: Some(Activation::Gelu),
            gate: None,
            residual: None,
            out: Some(DType::BF16),
        };
        let got = lin.forward_fused(&x, e)?;
        assert_eq!(amx_calls() - before, usize::from(amx_active()), "the AMX kernel ran iff usable");
        let f = |t: &Tensor| t.to_dtype(DType::F64);
        let pre = f(&x)?.matmul(&f(&w)?.t()?)?.broadcast_add(&f(&b)?)?;
        let want = pre.gelu_erf()?.flatten_all()?.to_vec1::<f64>()?;
        let pre = pre.flatten_all()?.to_vec1::<f64>()?;
        let got = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let (lo, hi) = pre.iter().fold((0f64, 0f64), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(lo < -15.0 && hi > 15.0, "pre-activations span [{lo}, {hi}], not the tails");
        for (i, ((g, w), p)) in got.iter().zip(&want).zip(&pre).enumerate() {
            let tol = w.abs() / 256.0 + 1e-6;
            assert!((g - w).abs() <= tol, "output {i}: GELU({p}) = {w}, got {g} (tolerance {tol})");
        }
        Ok(())
    }

    /// gcg's AMX products (on the unit, or on software tiles under `GCG_SOFT_AMX`; oneDNN's
    /// where neither runs) on random shapes against the plain ops: 32-299 rows, reductions of
    /// 8-81 steps of 32 (one chunk of k, several, and past 2048 several spans), 256-1299 output
    /// columns (partial tiles, one panel or several), a random epilogue (activation, gate,
    /// residual, f32 or bf16 out); bf16 operands (the reference: the same rounded operands in
    /// f64), or f32 operands at precision "high" (as bf16 pairs; the reference in f64). The
    /// tolerances of the two tests above; the AMX kernel must have run where it is usable.
    mod random_shapes {
        use super::*;
        use proptest::prelude::*;

        #[allow(clippy::too_many_arguments)]
        fn check(m: usize, k: usize, n: usize, act: usize, gate: bool, res: bool, out_bf16: bool, x3: bool, seed: u64) -> Result<()> {
            crate::nn::linear::require_soft_tiles_where_asked();
            let dev = Device::Cpu;
            let mut rng = crate::rng::SeededRng::new(seed);
            let (dt, out) = (
                if x3 { DType::F32 } else { DType::BF16 },
                if out_bf16 { DType::BF16 } else { DType::F32 },
            );
            let act = [None, Some(Activation::Gelu), Some(Activation::GeluTanh), Some(Activation::Relu)][act];
            let x = Tensor::from_vec(rng.normal_vec(m * k, 0.0, 1.0), (m, k), &dev)?.to_dtype(dt)?;
            let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?.to_dtype(dt)?;
            let bias = Tensor::from_vec(rng.normal_vec(n, 0.0, 0.5), n, &dev)?.to_dtype(dt)?;
            let g = Tensor::from_vec(rng.normal_vec(m * n, 0.0, 1.0), (m, n), &dev)?.to_dtype(out)?;
            let r = Tensor::from_vec(rng.normal_vec(m * n, 0.0, 1.0), (m, n), &dev)?.to_dtype(out)?;
            let lin = Linear::new(w.clone(), Some(bias.clone()));
            let f64_ = |t: &Tensor| t.to_dtype(DType::F64);
            let product = f64_(&x)?.matmul(&f64_(&w)?.t()?)?.broadcast_add(&f64_(&bias)?)?;
            let want = plain_epilogue(product.to_dtype(DType::F32)?, act, gate.then_some(&g), res.then_some(&r))?;
            let case = format!("[{m}, {k}] x [{n}, {k}]T {dt:?}, {act:?}, gate {gate}, residual {res}, {out:?} out");
            set_matmul_precision_here(x3.then_some(MatmulPrecision::High));
            let before = amx_calls();
            let got = lin.forward_fused(
                &x,
                Epilogue {
                    act,
                    gate: gate.then_some(&g),
                    residual: res.then_some(&r),
                    out: Some(out),
                },
            );
            let ran = amx_calls() - before;
            set_matmul_precision_here(None);
            let got = got?;
            assert_eq!(ran, usize::from(amx_active()), "{case}: the AMX kernel ran iff usable");
            assert_eq!((got.dtype(), got.dims()), (out, &[m, n][..]), "{case}");
            let tol = match (out_bf16, x3) {
                (true, _) => 8e-3,
                (false, false) => 2e-5,
                (false, true) => 1.5e-5,
            };
            let err = max_rel(&got, &want);
            assert!(err <= tol, "{case}: error {err} of the largest value > {tol}");
            Ok(())
        }

        proptest! {
            #![proptest_config(crate::nn::linear::kernel_proptest_config())]
            #[test]
            fn amx_products_equal_the_plain_ops_on_random_shapes(
                m in 32usize..300,
                steps in 8usize..82,
                n in 256usize..1300,
                act in 0usize..4,
                gate in any::<bool>(),
                res in any::<bool>(),
                out_bf16 in any::<bool>(),
                x3 in any::<bool>(),
                seed in any::<u64>(),
            ) {
                check(m, 32 * steps, n, act, gate, res, out_bf16, x3, seed).unwrap();
            }
        }
    }

    /// f32 products at matmul precision "high" (f32 operands as bf16 pairs on the AMX unit)
    /// against the same products in f64: within 1.5e-5 of the largest output, where products of
    /// the operands rounded to bf16 miss by ~2e-3 and so does leaving out lo (checked); also
    /// with a fused epilogue (GELU, residual, bf16 or f32 out), as the ViT runs. Infinities and NaN in either operand give what f32 gives. Shapes as in
    /// the bf16 test (partial tiles, several panels, the reduction in several spans). Measured
    /// here: 4-5e-6 at "high", 0.4-1.3e-6 for oneDNN's f32.
    #[test]
    fn amx_f32_products_as_bf16_pairs_equal_f64() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(29);
        super::require_soft_tiles_where_asked();
        if !amx_active() {
            eprintln!("AMX-BF16 not usable here (built in: {AMX_BUILT}): precision \"high\" computes in f32");
        }
        let high = |f: &dyn Fn() -> Result<Tensor>| -> Result<Tensor> {
            set_matmul_precision_here(Some(MatmulPrecision::High));
            let y = f();
            set_matmul_precision_here(None);
            y
        };
        for (m, k, n) in [(37, 288, 270), (34, 1056, 300), (40, 1056, 1100), (33, 2112, 300)] {
            let x = Tensor::from_vec(rng.normal_vec(m * k, 0.5, 1.0), (m, k), &dev)?;
            let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?;
            let b = Tensor::from_vec(rng.normal_vec(n, 0.0, 0.5), n, &dev)?;
            let lin = Linear::new(w.clone(), Some(b.clone()));
            let want = x
                .to_dtype(DType::F64)?
                .matmul(&w.to_dtype(DType::F64)?.t()?)?
                .broadcast_add(&b.to_dtype(DType::F64)?)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f64>()?;
            let err = |y: &Tensor| -> Result<f64> {
                // candle's max skips NaN: counted first.
                let y = y.to_dtype(DType::F64)?;
                let nan = y.flatten_all()?.to_vec1::<f64>()?.iter().filter(|v| !v.is_finite()).count();
                assert_eq!(nan, 0, "[{m}, {k}] x [{n}, {k}]T: {nan} outputs not finite");
                Ok((y - &want)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
            };
            let before = amx_calls();
            let got = high(&|| lin.forward_frozen(&x))?;
            assert_eq!(
                amx_calls() - before,
                usize::from(amx_active()),
                "[{m}, {k}] x [{n}, {k}]T: AMX ran iff usable"
            );
            let e = err(&got)?;
            assert!(
                e <= 1.5e-5,
                "[{m}, {k}] x [{n}, {k}]T at precision high: error {e} > 1.5e-5 of the largest output"
            );
            // The same product at "highest" is f32 (and the setting is per thread here).
            let e32 = err(&lin.forward_frozen(&x)?)?;
            assert!(e32 <= 5e-6, "[{m}, {k}] x [{n}, {k}]T at precision highest: error {e32}");
            // Fused: GELU and a residual, f32 and bf16 out (the plain ops in f64, then rounded).
            let res = Tensor::from_vec(rng.normal_vec(m * n, 0.0, 1.0), (m, n), &dev)?;
            let fused_want = (want.gelu_erf()? + res.to_dtype(DType::F64)?)?;
            let fs = fused_want.abs()?.max_all()?.to_scalar::<f64>()?;
            for out in [DType::F32, DType::BF16] {
                let r = res.to_dtype(out)?;
                let e = || Epilogue {
                    act: Some(Activation::Gelu),
                    gate: None,
                    residual: Some(&r),
                    out: Some(out),
                };
                let before = amx_calls();
                let got = high(&|| lin.forward_fused(&x, e()))?;
                assert_eq!(
                    amx_calls() - before,
                    usize::from(amx_active()),
                    "fused, {out:?} out: AMX ran iff usable"
                );
                let fe = (got.to_dtype(DType::F64)? - &fused_want)?.abs()?.max_all()?.to_scalar::<f64>()? / fs;
                let tol = if out == DType::F32 { 1.5e-5 } else { 8e-3 };
                assert!(
                    fe <= tol,
                    "[{m}, {k}] x [{n}, {k}]T fused, {out:?} out, at precision high: error {fe} > {tol}"
                );
            }
            if amx_active() {
                // What the test tells apart: the operands in bf16 alone.
                let bf = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
                let lossy = (bf(&x)?.matmul(&bf(&w)?.t()?)?.broadcast_add(&b))?;
                assert!(
                    err(&lossy)? > 1e-3,
                    "the bf16 operands' error {} is not what the bound excludes",
                    err(&lossy)?
                );
            }
        }
        // Infinities and NaN: rows with one inf, -inf or NaN in x; a column of w with an inf;
        // some w values exactly bf16 (lo = 0).
        let (m, k, n) = (40, 288, 300);
        let mut xs = rng.normal_vec(m * k, 0.0, 1.0);
        let mut ws = rng.normal_vec(n * k, 0.0, 0.06);
        xs[3 * k + 5] = f32::INFINITY;
        xs[7 * k + 100] = f32::NEG_INFINITY;
        xs[11 * k + 200] = f32::NAN;
        for v in ws.iter_mut().step_by(7) {
            *v = half::bf16::from_f32(*v).to_f32();
        }
        ws[13 * k + 17] = f32::INFINITY;
        let x = Tensor::from_vec(xs, (m, k), &dev)?;
        let lin = Linear::new(Tensor::from_vec(ws, (n, k), &dev)?, None);
        let got = high(&|| lin.forward_frozen(&x))?.flatten_all()?.to_vec1::<f32>()?;
        let want = lin.forward_frozen(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let class = |v: f32| {
            if v.is_nan() {
                0
            } else if v.is_infinite() {
                1 + (v > 0.0) as u8
            } else {
                3
            }
        };
        let non_finite = want.iter().filter(|v| !v.is_finite()).count();
        assert!(non_finite > 3 * n, "the case has few non-finite outputs: {non_finite}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                class(*g),
                class(*w),
                "output ({}, {}): {g} at precision high, {w} in f32",
                i / n,
                i % n
            );
        }
        Ok(())
    }

    /// Inside `no_grad`, a layer with trainable (variable) weights takes the frozen fast path and
    /// builds no graph; outside it the gradient flows again; `inference(bf16)` runs an f32
    /// layer's product in bf16 with an f32 result.
    #[test]
    fn no_grad_and_inference_scopes() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(5);
        let (m, k, n) = (40, 288, 320);
        let x = Tensor::from_vec(rng.normal_vec(m * k, 0.0, 1.0), (m, k), &dev)?;
        let w = candle_core::Var::from_tensor(&Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.06), (n, k), &dev)?)?;
        let b = candle_core::Var::from_tensor(&Tensor::from_vec(rng.normal_vec(n, 0.0, 0.5), n, &dev)?)?;
        let lin = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let plain = lin.forward(&x)?;
        assert!(plain.track_op(), "outside no_grad the output carries the weights' gradient");
        {
            let _g = super::super::no_grad();
            let before = onednn_calls();
            let y = lin.forward(&x)?;
            assert!(!y.track_op(), "no graph inside no_grad");
            assert_eq!(onednn_calls() - before, usize::from(ONEDNN));
            assert!(max_rel(&y, &plain) <= 1e-5);
            {
                let _inner = super::super::no_grad();
            }
            assert!(super::super::grad_disabled(), "a nested guard restores the outer state");
        }
        assert!(!super::super::grad_disabled());
        let y = lin.forward(&x)?;
        let g = y.sum_all()?.backward()?;
        assert!(g.get(w.as_tensor()).is_some(), "gradients flow again after the scope");
        {
            let _g = super::super::inference(DType::BF16);
            let before = onednn_calls();
            let y = lin.forward(&x)?;
            assert_eq!(y.dtype(), DType::F32);
            assert_eq!(onednn_calls() - before, usize::from(ONEDNN));
            let want = x
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?
                .matmul(&w.as_tensor().to_dtype(DType::BF16)?.to_dtype(DType::F32)?.t()?)?
                .broadcast_add(b.as_tensor())?;
            assert!(max_rel(&y, &want) <= 1e-5, "bf16 product, f32 accumulation: {}", max_rel(&y, &want));
            // An input already in bf16 takes the same product (what the Q-Former's bf16 image
            // does), and the weight was cast once for the scope.
            let xb = x.to_dtype(DType::BF16)?;
            let yb = lin.forward(&xb)?;
            assert_eq!(yb.dtype(), DType::F32);
            let same = lin.forward(&xb.to_dtype(DType::F32)?)?;
            let (a, b) = (yb.flatten_all()?.to_vec1::<f32>()?, same.flatten_all()?.to_vec1::<f32>()?);
            assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(lin.lowered_to(&xb), ONEDNN.then_some(DType::BF16));
            if ONEDNN {
                assert_eq!(super::super::cast::cached_weights(), 1, "one weight, cast once");
            }
        }
        {
            let _g = super::super::inference(DType::F32);
            assert!(max_rel(&lin.forward(&x)?, &plain) <= 1e-5, "an f32 model keeps f32 products");
        }
        Ok(())
    }
}
