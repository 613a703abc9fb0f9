//! Casts between f32 and bf16 on all cores, and the cast weights of an inference scope.
//!
//! candle converts element by element on one thread (~2.5 ns per element here). In a bf16
//! inference the trainable f32 layers (the Q-Former's ~160 M weights) are lowered to bf16 for
//! every product and activations cross between the f32 residual stream and the bf16 products, so
//! those casts cost more than the Q-Former's own products. [`cast`] gives the same values as
//! candle's `to_dtype` (round to nearest even; a NaN stays a quiet NaN with its sign and top
//! payload bits) converted in parallel with the CPU's vector units; [`cast_weight`] converts a
//! weight once per [`super::no_grad`] scope (as PyTorch's autocast keeps its weight casts until
//! the autocast region ends).

use anyhow::Result;
use candle_core::{CpuStorage, DType, Storage, Tensor, TensorId};
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::mem::MaybeUninit;

/// Below this many elements candle's own cast is as fast (no threads to start).
const PAR_MIN: usize = 1 << 15;
/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// `t` in `dt`, with the values of `t.to_dtype(dt)`. A CPU tensor that carries no gradient is
/// converted f32 ⇄ bf16 on all of candle's threads; anything else is candle's cast (so the
/// autograd graph is kept).
pub fn cast(t: &Tensor, dt: DType) -> candle_core::Result<Tensor> {
    if t.dtype() == dt {
        return Ok(t.clone());
    }
    let fast = t.device().is_cpu()
        && !t.track_op()
        && t.elem_count() >= PAR_MIN
        && matches!((t.dtype(), dt), (DType::F32, DType::BF16) | (DType::BF16, DType::F32));
    if !fast {
        return Ok(t.to_dtype(dt)?);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        unreachable!("checked: a CPU tensor")
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cast: a contiguous tensor without contiguous offsets".into()))?;
    let out = match cpu {
        CpuStorage::F32(v) => Tensor::from_vec(convert(&v[start..end], to_bf16), t.shape(), t.device())?,
        CpuStorage::BF16(v) => Tensor::from_vec(convert(&v[start..end], to_f32), t.shape(), t.device())?,
        _ => unreachable!("checked: f32 or bf16"),
    };
    Ok(out)
}

/// `src` widened to f32 (exactly), on all threads when it is long.
pub(crate) fn widen(src: &[bf16]) -> Vec<f32> {
    if src.len() < PAR_MIN {
        return src.iter().map(|v| v.to_f32()).collect();
    }
    convert(src, to_f32)
}

/// `src` rounded to bf16 (as [`cast`]), on all threads when it is long.
pub(crate) fn narrow(src: &[f32]) -> Vec<bf16> {
    if src.len() < PAR_MIN {
        return src.iter().map(|&v| bf16::from_f32(v)).collect();
    }
    convert(src, to_bf16)
}

/// `f` over `src` on all threads, into a new vector.
fn convert<S: Copy + Sync, D: Send>(src: &[S], f: fn(&[S], &mut [MaybeUninit<D>])) -> Vec<D> {
    let mut out: Vec<D> = Vec::with_capacity(src.len());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| f(s, d));
    // SAFETY: the chunks above cover all `src.len()` slots and `f` writes every slot it is given.
    unsafe { out.set_len(src.len()) };
    out
}

/// f32 → bf16 as `half::bf16::from_f32`: round to nearest, ties to even; NaN → a quiet NaN.
#[inline(always)]
fn bf16_bits(x: u32) -> u16 {
    if (x & 0x7fff_ffff) > 0x7f80_0000 {
        ((x >> 16) | 0x40) as u16
    } else {
        (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
    }
}

/// One value rounded to bf16 as [`cast`] rounds it.
#[inline(always)]
pub(super) fn round_bf16(x: f32) -> bf16 {
    bf16::from_bits(bf16_bits(x.to_bits()))
}

#[inline(always)]
fn to_bf16_plain(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(round_bf16(*s));
    }
}

#[inline(always)]
fn to_f32_plain(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
    for (d, s) in dst.iter_mut().zip(src) {
        let x = s.to_bits();
        // A NaN comes out quiet, as `half::bf16::to_f32`.
        let x = if (x & 0x7fff) > 0x7f80 { x | 0x40 } else { x };
        d.write(f32::from_bits((x as u32) << 16));
    }
}

/// The same loops compiled for wider vector units, chosen at run time (the binary targets plain
/// x86-64).
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::*;
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn to_bf16_avx512(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        to_bf16_plain(src, dst)
    }
    #[target_feature(enable = "avx2")]
    pub unsafe fn to_bf16_avx2(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        to_bf16_plain(src, dst)
    }
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn to_f32_avx512(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
        to_f32_plain(src, dst)
    }
    #[target_feature(enable = "avx2")]
    pub unsafe fn to_f32_avx2(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
        to_f32_plain(src, dst)
    }
}

#[cfg(target_arch = "x86_64")]
type Kernel<S, D> = fn(&[S], &mut [MaybeUninit<D>]);
#[cfg(target_arch = "x86_64")]
type WideKernel<S, D> = unsafe fn(&[S], &mut [MaybeUninit<D>]);

/// `plain`, or its copy compiled for the widest vector unit this CPU has (within
/// `GCG_MAX_CPU_ISA`'s cap, [`super::isa`]).
#[cfg(target_arch = "x86_64")]
fn widest<S, D>(src: &[S], dst: &mut [MaybeUninit<D>], plain: Kernel<S, D>, avx512: WideKernel<S, D>, avx2: WideKernel<S, D>) {
    if super::isa::avx512() {
        // SAFETY: the CPU has the features `avx512` is compiled for.
        unsafe { avx512(src, dst) }
    } else if super::isa::avx2() {
        // SAFETY: as above, for `avx2`.
        unsafe { avx2(src, dst) }
    } else {
        plain(src, dst)
    }
}

fn to_bf16(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    #[cfg(target_arch = "x86_64")]
    return widest(src, dst, to_bf16_plain, wide::to_bf16_avx512, wide::to_bf16_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    to_bf16_plain(src, dst)
}

fn to_f32(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    return widest(src, dst, to_f32_plain, wide::to_f32_avx512, wide::to_f32_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    to_f32_plain(src, dst)
}

thread_local! {
    /// Weights cast in the current no-grad scope: (the weight's id, the target dtype) → the cast,
    /// made when [`crate::weights::write_generation`] had the value in the first field.
    static WEIGHTS: RefCell<(u64, HashMap<(TensorId, DType), Tensor>)> = RefCell::new((0, HashMap::new()));
}

/// A layer's weight in `dt`, detached inside a [`super::no_grad`] scope. There a trainable
/// variable's cast to a narrower dtype (an f32 weight to bf16) is made once and kept until the
/// outermost scope ends or a variable is written ([`crate::weights::mark_written`]). Frozen weights and
/// widening casts are made per call, as outside a scope (keeping an f32 copy of a bf16 backbone
/// would double its memory).
pub fn cast_weight(w: &Tensor, dt: DType) -> Result<Tensor> {
    if w.dtype() == dt {
        return Ok(super::detach_if_no_grad(w));
    }
    if !super::grad_disabled() {
        return Ok(cast(w, dt)?);
    }
    if !w.is_variable() || dt.size_in_bytes() >= w.dtype().size_in_bytes() {
        return Ok(cast(&w.detach(), dt)?);
    }
    let key = (w.id(), dt);
    let generation = crate::weights::write_generation();
    let hit = WEIGHTS.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != generation {
            *c = (generation, HashMap::new());
        }
        c.1.get(&key).cloned()
    });
    if let Some(hit) = hit {
        return Ok(hit);
    }
    let out = cast(&w.detach(), dt)?;
    WEIGHTS.with(|c| c.borrow_mut().1.insert(key, out.clone()));
    Ok(out)
}

/// Forget this thread's cast weights (the outermost no-grad scope ended).
pub(super) fn clear_weights() {
    WEIGHTS.with(|c| c.borrow_mut().1.clear());
}

/// How many weights this thread holds cast (for tests).
#[cfg(test)]
pub(crate) fn cached_weights() -> usize {
    WEIGHTS.with(|c| c.borrow().1.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every kind of f32 value (zeros, denormals, ties, the largest finite values rounding to
    /// ∞, ∞, NaNs with payloads, both signs) and many random bit patterns: the fast cast equals
    /// candle's, both ways.
    #[test]
    fn fast_casts_equal_candles() -> Result<()> {
        let mut bits: Vec<u32> = vec![
            0,
            0x8000_0000,
            1,
            0x8000_0001,
            0x007f_ffff,
            0x0080_0000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x3f80_7fff,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f7f_8000,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0xffc0_0000,
            0x7fff_ffff,
            0x7fa0_1234,
            0xffbf_ffff,
        ];
        // Every exponent and sign with the low half's boundary cases, then random patterns.
        for hi in 0..=0xffffu32 {
            for lo in [0u32, 0x7fff, 0x8000, 0x8001, 0xffff] {
                bits.push(hi << 16 | lo);
            }
        }
        let mut x = 0x9e37_79b9u32;
        for _ in 0..1 << 20 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bits.push(x);
        }
        assert!(bits.len() >= PAR_MIN);
        let n = bits.len();
        let t = Tensor::from_vec(bits.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>(), n, &Device::Cpu)?;
        let fast = cast(&t, DType::BF16)?.to_vec1::<bf16>()?;
        let want = t.to_dtype(DType::BF16)?.to_vec1::<bf16>()?;
        let diff = fast.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            diff.is_none(),
            "f32 {:#010x}: fast {:#06x}, candle {:#06x}",
            bits[diff.unwrap()],
            fast[diff.unwrap()].to_bits(),
            want[diff.unwrap()].to_bits()
        );

        // bf16 → f32 over every bf16 value, in a strided (non-contiguous) view.
        let all: Vec<bf16> = (0..=0xffffu16).map(bf16::from_bits).collect();
        let b = Tensor::from_vec(all, (256, 256), &Device::Cpu)?.t()?;
        let fast = cast(&b, DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let want = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let diff = fast.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            diff.is_none(),
            "bf16 #{}: fast {:#010x}, candle {:#010x}",
            diff.unwrap(),
            fast[diff.unwrap()].to_bits(),
            want[diff.unwrap()].to_bits()
        );
        Ok(())
    }

    /// A tensor carrying a gradient is cast by candle, so the gradient still flows.
    #[test]
    fn a_cast_keeps_the_gradient() -> Result<()> {
        let v = candle_core::Var::from_vec(vec![1.5f32; PAR_MIN], PAR_MIN, &Device::Cpu)?;
        let y = cast(v.as_tensor(), DType::BF16)?;
        let grads = cast(&y, DType::F32)?.sum_all()?.backward()?;
        let g = grads.get(v.as_tensor()).expect("a gradient for the variable").to_vec1::<f32>()?;
        assert!(g.iter().all(|&g| g == 1.0));
        Ok(())
    }

    /// A weight is cast once per no-grad scope, and forgotten when the outermost scope ends.
    #[test]
    fn weights_are_cast_once_per_scope() -> Result<()> {
        let w = candle_core::Var::from_vec(vec![0.1f32; PAR_MIN], PAR_MIN, &Device::Cpu)?;
        {
            let _outer = super::super::no_grad();
            let a = cast_weight(w.as_tensor(), DType::BF16)?;
            {
                let _inner = super::super::no_grad();
                let b = cast_weight(w.as_tensor(), DType::BF16)?;
                assert_eq!(a.id(), b.id(), "the second cast is the first");
            }
            assert_eq!(cached_weights(), 1, "an inner scope keeps the outer scope's casts");
            assert!(!a.track_op());
            // A weight written in place (an optimizer step) is cast again.
            w.set(&(w.as_tensor() * 2.0)?)?;
            crate::weights::mark_written();
            let c = cast_weight(w.as_tensor(), DType::BF16)?;
            assert_ne!(c.id(), a.id());
            assert_eq!(c.to_vec1::<bf16>()?[0], bf16::from_f32(0.2));
            assert_eq!(cached_weights(), 1, "the stale cast is gone");
        }
        assert_eq!(cached_weights(), 0, "forgotten after the scope");
        {
            // Frozen weights and widening casts are not kept.
            let _scope = super::super::no_grad();
            let frozen = w.as_tensor().detach();
            let a = cast_weight(&frozen, DType::BF16)?;
            let b = cast_weight(&frozen, DType::BF16)?;
            assert_ne!(a.id(), b.id());
            let wb = candle_core::Var::from_tensor(&a)?;
            let up = cast_weight(wb.as_tensor(), DType::F32)?;
            assert!(!up.track_op());
            assert_eq!(cached_weights(), 0);
        }
        // Outside a scope nothing is kept, and the gradient flows.
        let y = cast_weight(w.as_tensor(), DType::BF16)?;
        assert_eq!(cached_weights(), 0);
        assert!(y.track_op());
        Ok(())
    }
}
