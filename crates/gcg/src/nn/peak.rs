//! What this CPU's arithmetic units can do at most: the ceiling a benchmark's GFLOP/s is read
//! against (`gcg bench peak`, and `gcg bench forward`'s `vit.fraction_of_peak`).
//!
//! Each probe keeps one unit busy with independent multiply-adds on values held in registers
//! (more accumulators than the unit's latency × issue rate: 16 zmm, 12 ymm, 4 tiles), on every
//! asked thread at once, and counts 2 operations per multiply-add, as FLOP counters of products
//! do:
//!
//! * `f32_fma`: `vfmadd231ps` on 16 (AVX-512) or 8 (AVX2 + FMA) floats;
//! * `bf16_dot`: AVX512-BF16's `vdpbf16ps`, 16 lanes × a pair of bf16 products into f32;
//! * `amx_bf16`: AMX's `tdpbf16ps`, 16 × 16 × 32 products a tile instruction
//!   (`csrc/amx_linear.c`);
//! * `amx_bf16_l1`, `amx_bf16_l2`: the same unit fed from memory, as a matrix product's kernel
//!   feeds it: gcg's kernel's inner loop (four accumulator tiles, two tiles of each operand
//!   loaded a step) over operands of 16 + 16 KB (in L1) or 88 KB + 1 MB (in L2: x's 32-row
//!   block at the ViT-g's reduction of 1408 and a panel of weights). Not an arithmetic
//!   ceiling but the loads' one: what a kernel that reads its operands from there can reach at
//!   most (on the Xeon of 2026-12-05, all of `amx_bf16` from L1 and 75% of it from L2).
//!
//! A probe checks its own sums after every round (each must equal the exact count of products,
//! all operands being 1), so a wrong instruction sequence gives an error, not a number.

use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// An arithmetic unit a probe can keep busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    F32Fma,
    Bf16Dot,
    AmxBf16,
    AmxBf16L1,
    AmxBf16L2,
}

impl Unit {
    pub const ALL: [Unit; 5] = [Unit::F32Fma, Unit::Bf16Dot, Unit::AmxBf16, Unit::AmxBf16L1, Unit::AmxBf16L2];

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::F32Fma => "f32_fma",
            Unit::Bf16Dot => "bf16_dot",
            Unit::AmxBf16 => "amx_bf16",
            Unit::AmxBf16L1 => "amx_bf16_l1",
            Unit::AmxBf16L2 => "amx_bf16_l2",
        }
    }

    /// The instruction this CPU would run for the unit, or None when it has none.
    pub fn instruction(self) -> Option<&'static str> {
        #[cfg(target_arch = "x86_64")]
        {
            use super::isa;
            match self {
                Unit::F32Fma if isa::avx512() => Some("vfmadd231ps zmm (16 f32 lanes)"),
                Unit::F32Fma if isa::avx2() => Some("vfmadd231ps ymm (8 f32 lanes)"),
                Unit::Bf16Dot if isa::avx512_bf16() => Some("vdpbf16ps zmm (16 f32 lanes × 2 bf16 products)"),
                Unit::AmxBf16 if amx_present() => Some("tdpbf16ps (16 × 16 f32 × 32 bf16 products)"),
                Unit::AmxBf16L1 if amx_present() => Some("tdpbf16ps, 4 tiles loaded a step from 16 + 16 KB (L1)"),
                Unit::AmxBf16L2 if amx_present() => Some("tdpbf16ps, 4 tiles loaded a step from 88 KB + 1 MB (L2)"),
                _ => None,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }
}

/// Whether this CPU has AMX-BF16 (CPUID 7.0:EDX bit 22), whether or not this binary can use it:
/// oneDNN runs its bf16 products on it too.
pub fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that reports it; leaf 0 says so.
        // (`unsafe` for the Rust versions whose CPUID intrinsics are unsafe.)
        #[allow(unused_unsafe)]
        unsafe {
            let max = std::arch::x86_64::__cpuid(0).eax;
            max >= 7 && std::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 22) != 0
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The CPU has AMX-BF16, Linux grants its tile state, gcg's AMX code is built in and
/// `GCG_MAX_CPU_ISA` does not cap it (whatever `GCG_NO_AMX` says: that only sends products back
/// to oneDNN).
#[cfg(target_arch = "x86_64")]
fn amx_present() -> bool {
    if !super::isa::allows(super::isa::Isa::Amx) {
        return false;
    }
    #[cfg(gcg_amx)]
    {
        extern "C" {
            fn gcg_amx_available() -> std::os::raw::c_int;
        }
        // SAFETY: reads CPUID and asks Linux for the tile state; no memory is passed.
        unsafe { gcg_amx_available() == 1 }
    }
    #[cfg(not(gcg_amx))]
    {
        false
    }
}

/// One unit's measured rate: the best of its windows.
#[derive(Debug, Clone)]
pub struct Peak {
    pub unit: Unit,
    pub instruction: &'static str,
    /// Threads that ran the probe at once.
    pub threads: usize,
    /// GFLOP/s of all threads together.
    pub gflops: f64,
    /// GFLOP/s of each thread in that window.
    pub per_thread: Vec<f64>,
}

/// Windows a measurement is cut into: the threads start each one together, and the best
/// window's total is the peak (a virtual machine's cores are at times taken by its host for a
/// while: a ceiling is what the unit did when it had the core).
const WINDOWS: usize = 5;

/// Runs `unit`'s probe on `threads` threads at once for about `time` in all (each window runs
/// at least one round); None when this CPU has no such unit (or AMX is not built into this
/// binary).
pub fn measure(unit: Unit, threads: usize, time: Duration) -> Result<Option<Peak>> {
    let Some(instruction) = unit.instruction() else {
        return Ok(None);
    };
    let threads = threads.max(1);
    let window = time / WINDOWS as u32;
    let gate = Gate::new(threads);
    let results = std::thread::scope(|s| -> Result<Vec<Result<Vec<f64>>>> {
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("gcg-peak-{i}"))
                .spawn_scoped(s, || probe(unit, window, &gate));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The threads already started would wait for this one: let them go.
                    gate.abort();
                    return Err(anyhow::Error::new(e).context(format!("starting peak probe thread {i} of {threads}")));
                }
            }
        }
        Ok(handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked"))))
            .collect())
    })?;
    let mut rates = Vec::with_capacity(threads); // [thread][window] GFLOP/s
    for (i, r) in results.into_iter().enumerate() {
        rates.push(r.map_err(|e| e.context(format!("peak probe {} on thread {i}", unit.as_str())))?);
    }
    let total = |w: usize| rates.iter().map(|r: &Vec<f64>| r[w]).sum::<f64>();
    let best = (0..WINDOWS).max_by(|&a, &b| total(a).total_cmp(&total(b))).unwrap_or(0);
    let per_thread: Vec<f64> = rates.iter().map(|r| r[best]).collect();
    Ok(Some(Peak {
        unit,
        instruction,
        threads,
        gflops: per_thread.iter().sum(),
        per_thread,
    }))
}

/// A barrier that can be opened for good: the threads of a measurement meet at the start of
/// each window, and a thread that could not be started does not leave the others waiting.
struct Gate {
    state: std::sync::Mutex<(usize, u64, bool)>, // (arrived, generation, aborted)
    turn: std::sync::Condvar,
    parties: usize,
}

impl Gate {
    fn new(parties: usize) -> Self {
        Self {
            state: std::sync::Mutex::new((0, 0, false)),
            turn: std::sync::Condvar::new(),
            parties,
        }
    }

    /// Waits until every party arrived (or the gate was opened for good).
    fn wait(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.2 {
            return;
        }
        st.0 += 1;
        if st.0 == self.parties {
            st.0 = 0;
            st.1 += 1;
            self.turn.notify_all();
            return;
        }
        let generation = st.1;
        while st.1 == generation && !st.2 {
            st = self.turn.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn abort(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).2 = true;
        self.turn.notify_all();
    }
}

/// This thread's GFLOP/s on `unit` in each window: whole rounds until `window` has passed (at
/// least one), every window started with the other threads'. A failing or panicking round
/// stops this thread's work but it still meets the others at each window, so none waits
/// forever.
fn probe(unit: Unit, window: Duration, gate: &Gate) -> Result<Vec<f64>> {
    let round: fn() -> Result<f64> = match unit {
        Unit::F32Fma => f32_fma_round,
        Unit::Bf16Dot => bf16_dot_round,
        Unit::AmxBf16 => amx_round,
        Unit::AmxBf16L1 => amx_l1_round,
        Unit::AmxBf16L2 => amx_l2_round,
    };
    let guarded = || std::panic::catch_unwind(round).unwrap_or_else(|_| Err(anyhow::anyhow!("a round panicked")));
    let mut failed = guarded().err(); // wakes the unit (AVX-512 and AMX power up on first use)
    let mut rates = Vec::with_capacity(WINDOWS);
    for _ in 0..WINDOWS {
        gate.wait();
        let start = Instant::now();
        let mut flops = 0.0;
        while failed.is_none() {
            match guarded() {
                Ok(f) => flops += f,
                Err(e) => failed = Some(e),
            }
            if start.elapsed() >= window {
                break;
            }
        }
        rates.push(flops / start.elapsed().as_secs_f64().max(1e-9) / 1e9);
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(rates),
    }
}

/// Multiply-adds per accumulator a round: small enough that every sum stays exact in f32.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const STEPS: usize = 1 << 18;

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn check(what: &str, sums: &[f32], expected: f32) -> Result<()> {
    if let Some((i, v)) = sums.iter().enumerate().find(|(_, &v)| v != expected) {
        bail!("{what}: accumulator lane {i} holds {v}, expected {expected}: the probe's arithmetic is wrong");
    }
    Ok(())
}

/// Accumulators of the AVX-512 probes (of 32 registers), and of the AVX2 one (of 16, one of
/// which holds the operand): more than latency × issue rate on these units.
#[cfg(target_arch = "x86_64")]
const ZMM_ACCS: usize = 16;
#[cfg(target_arch = "x86_64")]
const YMM_ACCS: usize = 12;

#[cfg(target_arch = "x86_64")]
fn f32_fma_round() -> Result<f64> {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f")]
    unsafe fn zmm(one: f32) -> [f32; ZMM_ACCS * 16] {
        let a = _mm512_set1_ps(one);
        let mut acc = [_mm512_setzero_ps(); ZMM_ACCS];
        for _ in 0..STEPS {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(a, a, *r);
            }
        }
        std::mem::transmute(acc)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn ymm(one: f32) -> [f32; YMM_ACCS * 8] {
        let a = _mm256_set1_ps(one);
        let mut acc = [_mm256_setzero_ps(); YMM_ACCS];
        for _ in 0..STEPS {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(a, a, *r);
            }
        }
        std::mem::transmute(acc)
    }
    let one = std::hint::black_box(1.0f32);
    if super::isa::avx512() {
        // SAFETY: the CPU has AVX-512F (asked just above).
        let sums = unsafe { zmm(one) };
        check("f32_fma", &sums, STEPS as f32)?;
        Ok((2 * STEPS * sums.len()) as f64)
    } else if super::isa::avx2() {
        // SAFETY: the CPU has AVX2 and FMA (asked just above).
        let sums = unsafe { ymm(one) };
        check("f32_fma", &sums, STEPS as f32)?;
        Ok((2 * STEPS * sums.len()) as f64)
    } else {
        bail!(
            "f32_fma: this CPU has neither AVX-512F nor AVX2 + FMA (or {} caps them)",
            super::isa::ENV
        )
    }
}

#[cfg(target_arch = "x86_64")]
fn bf16_dot_round() -> Result<f64> {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn zmm(one: u16) -> [f32; ZMM_ACCS * 16] {
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi16(one as i16));
        let mut acc = [_mm512_setzero_ps(); ZMM_ACCS];
        for _ in 0..STEPS {
            for r in acc.iter_mut() {
                *r = _mm512_dpbf16_ps(*r, a, a);
            }
        }
        std::mem::transmute(acc)
    }
    if !super::isa::avx512_bf16() {
        bail!("bf16_dot: this CPU has no AVX512-BF16 (or {} caps it)", super::isa::ENV);
    }
    let one = std::hint::black_box(0x3f80u16); // 1.0 in bf16
                                               // SAFETY: the CPU has AVX-512F, BW and BF16 (asked just above).
    let sums = unsafe { zmm(one) };
    check("bf16_dot", &sums, (2 * STEPS) as f32)?; // two products a lane a step
    Ok((2 * 2 * STEPS * sums.len()) as f64)
}

/// Tile-product steps per accumulator a round of the AMX probes (sums of 32 · steps, exact in f32).
#[cfg(all(target_arch = "x86_64", gcg_amx))]
const TILE_STEPS: usize = 1 << 16;

#[cfg(all(target_arch = "x86_64", gcg_amx))]
fn amx_round() -> Result<f64> {
    extern "C" {
        fn gcg_amx_peak(steps: std::os::raw::c_long, sums: *mut f32) -> std::os::raw::c_int;
    }
    let mut sums = [0f32; 4 * 256];
    // SAFETY: `sums` holds the four 16 × 16 accumulator tiles the function writes.
    let rc = unsafe { gcg_amx_peak(TILE_STEPS as _, sums.as_mut_ptr()) };
    if rc != 0 {
        bail!("amx_bf16: the tile unit is not usable in this process");
    }
    check("amx_bf16", &sums, (32 * TILE_STEPS) as f32)?;
    Ok((4 * TILE_STEPS * 16 * 16 * 32 * 2) as f64)
}

/// One round of the tile unit fed from memory: `a_steps` and `b_steps` steps of 2 KB of bf16
/// ones (this thread's, made once), walked by `gcg_amx_stream_peak`.
#[cfg(all(target_arch = "x86_64", gcg_amx))]
fn amx_stream_round(what: &str, a_steps: usize, b_steps: usize) -> Result<f64> {
    extern "C" {
        fn gcg_amx_stream_peak(
            steps: std::os::raw::c_long,
            a: *const u16,
            a_steps: std::os::raw::c_long,
            b: *const u16,
            b_steps: std::os::raw::c_long,
            sums: *mut f32,
        ) -> std::os::raw::c_int;
    }
    thread_local! {
        static ONES: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut sums = [0f32; 4 * 256];
    let rc = ONES.with(|ones| {
        let mut ones = ones.borrow_mut();
        // 32 values more, to start at a cache line: tile rows that straddle two lines load at
        // well under half the rate (measured: 40% of the unit's peak from L1 against 95%).
        let len = (a_steps + b_steps) * 1024 + 32;
        if ones.len() < len {
            ones.resize(len, 0x3f80); // 1.0 in bf16
        }
        let skip = ones.as_ptr().align_offset(64);
        let (a, b) = ones[skip..].split_at(a_steps * 1024);
        // SAFETY: a holds a_steps and b at least b_steps steps of 1024 bf16 values; `sums` the
        // four 16 × 16 accumulator tiles the function writes.
        unsafe {
            gcg_amx_stream_peak(
                TILE_STEPS as _,
                a.as_ptr(),
                a_steps as _,
                b.as_ptr(),
                b_steps as _,
                sums.as_mut_ptr(),
            )
        }
    });
    if rc != 0 {
        bail!("{what}: the tile unit is not usable in this process");
    }
    check(what, &sums, (32 * TILE_STEPS) as f32)?;
    Ok((4 * TILE_STEPS * 16 * 16 * 32 * 2) as f64)
}

/// Operands in L1: 8 steps of each (16 + 16 KB).
#[cfg(all(target_arch = "x86_64", gcg_amx))]
fn amx_l1_round() -> Result<f64> {
    amx_stream_round("amx_bf16_l1", 8, 8)
}

/// Operands in L2: x's 32-row block at a reduction of 1408 (44 steps, 88 KB) against 1 MB of
/// weights (512 steps), as gcg's kernel walks the ViT-g's products.
#[cfg(all(target_arch = "x86_64", gcg_amx))]
fn amx_l2_round() -> Result<f64> {
    amx_stream_round("amx_bf16_l2", 44, 512)
}

#[cfg(not(all(target_arch = "x86_64", gcg_amx)))]
fn amx_round() -> Result<f64> {
    bail!("amx_bf16: gcg's AMX code is not built into this binary")
}

#[cfg(not(all(target_arch = "x86_64", gcg_amx)))]
fn amx_l1_round() -> Result<f64> {
    bail!("amx_bf16_l1: gcg's AMX code is not built into this binary")
}

#[cfg(not(all(target_arch = "x86_64", gcg_amx)))]
fn amx_l2_round() -> Result<f64> {
    bail!("amx_bf16_l2: gcg's AMX code is not built into this binary")
}

#[cfg(not(target_arch = "x86_64"))]
fn f32_fma_round() -> Result<f64> {
    bail!("f32_fma: no probe for this architecture")
}

#[cfg(not(target_arch = "x86_64"))]
fn bf16_dot_round() -> Result<f64> {
    bail!("bf16_dot: no probe for this architecture")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit this CPU has gives a finite rate that passed its own sum checks, with one
    /// entry per thread and their sum as the total; the FMA unit is there on any x86-64 CPU with
    /// AVX2 + FMA.
    #[test]
    fn probes_run_and_check_their_sums() -> Result<()> {
        let mut measured = Vec::new();
        for unit in Unit::ALL {
            if let Some(p) = measure(unit, 2, Duration::from_millis(30))? {
                assert_eq!(p.per_thread.len(), 2, "{unit:?}");
                assert!(p.per_thread.iter().all(|g| g.is_finite() && *g > 0.0), "{unit:?}: {p:?}");
                assert!((p.gflops - p.per_thread.iter().sum::<f64>()).abs() < 1e-9);
                measured.push(unit);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if crate::nn::isa::avx2() {
            assert!(measured.contains(&Unit::F32Fma), "{measured:?}");
        }
        Ok(())
    }

    /// A window shorter than a round still runs one round, so the rate is a number.
    #[test]
    fn a_tiny_window_still_measures() -> Result<()> {
        if let Some(p) = measure(Unit::F32Fma, 1, Duration::from_nanos(1))? {
            assert!(p.gflops.is_finite() && p.gflops > 0.0, "{p:?}");
        }
        Ok(())
    }

    /// The gate opened for good lets a waiting thread go (a thread that could not be started
    /// does not leave the others waiting).
    #[test]
    fn an_aborted_gate_lets_waiters_go() {
        let gate = Gate::new(3);
        std::thread::scope(|s| {
            let h = s.spawn(|| gate.wait());
            std::thread::sleep(Duration::from_millis(20));
            gate.abort();
            h.join().expect("the waiter returns");
        });
        gate.wait(); // returns at once
    }

    /// The check refuses a sum that is off by one product.
    #[test]
    fn check_refuses_a_wrong_sum() {
        assert!(check("x", &[4.0, 4.0], 4.0).is_ok());
        let e = check("x", &[4.0, 5.0], 4.0).unwrap_err().to_string();
        assert!(e.contains("lane 1 holds 5, expected 4"), "{e}");
    }
}
