//! Which of this CPU's vector instruction sets gcg's own kernels and oneDNN may use: what the CPU
//! reports, under an optional cap, `GCG_MAX_CPU_ISA` (as oneDNN's `ONEDNN_MAX_CPU_ISA` and
//! PyTorch's `ATEN_CPU_CAPABILITY`).
//!
//! The cap makes a machine with AVX-512 or AMX run the code paths of a smaller CPU (a laptop with
//! AVX2 only, say): to test those paths where CI runs, and to measure what such a CPU's user
//! gets. Its levels, each including the ones before it:
//!
//! * `baseline`: plain x86-64 code (gcg's scalar loops; oneDNN at its SSE4.1 floor);
//! * `avx2`: AVX2 + FMA (most laptops and desktops without AVX-512); oneDNN has no bf16 products
//!   here, so bf16 weights are widened to f32 for the products ([`crate::nn::linear`]);
//! * `avx512`: AVX-512 F, BW, VL and DQ (oneDNN's `avx512_core`);
//! * `avx512_bf16`: AVX512-BF16's dot products (gcg's AVX-512 attention, oneDNN's bf16 kernels);
//! * `amx`: AMX-BF16 tiles (gcg's AMX products and attention): no cap, the default.
//!
//! oneDNN's own names (`avx512_core`, `avx512_core_bf16`, `avx512_core_amx`) are taken too. The
//! cap only lowers: a level the CPU lacks stays off. candle's own kernels (small products,
//! element-wise ops) keep their own dispatch, which in this build goes no further than AVX2.

use anyhow::{bail, Result};
use std::sync::OnceLock;

/// The environment variable holding the cap.
pub const ENV: &str = "GCG_MAX_CPU_ISA";

/// A level of x86-64 vector instructions, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Baseline,
    Avx2,
    Avx512,
    Avx512Bf16,
    Amx,
}

impl Isa {
    pub const ALL: [Isa; 5] = [Isa::Baseline, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx];

    /// A level from its name or oneDNN's (any case, surrounding blanks ignored).
    pub fn parse(s: &str) -> Option<Isa> {
        s.trim().to_ascii_lowercase().parse().ok()
    }
}

// The names `GCG_MAX_CPU_ISA` takes (and the bench JSON prints), with oneDNN's as aliases.
crate::choice_names!(Isa, "vector instruction level", {
    Baseline => "baseline" | "sse41",
    Avx2 => "avx2",
    Avx512 => "avx512" | "avx512_core",
    Avx512Bf16 => "avx512_bf16" | "avx512_core_bf16",
    Amx => "amx" | "avx512_core_amx" | "all",
});

/// The cap `value` (the variable's text) asks for: `None` when unset or empty; an error naming
/// the variable, the value and the accepted names when it is not one of them.
pub fn parse_cap(value: Option<&str>) -> Result<Option<Isa>> {
    match value {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => match Isa::parse(v) {
            Some(isa) => Ok(Some(isa)),
            None => {
                let names: Vec<&str> = Isa::ALL.iter().map(|i| i.name()).collect();
                bail!("{ENV}={v:?} is not a level of vector instructions: expected one of {} (or oneDNN's avx512_core, avx512_core_bf16, avx512_core_amx)", names.join(", "))
            }
        },
    }
}

/// The cap set in the environment (read once per process), or an error for a value that is not a
/// level. `gcg` checks it when it starts, so a wrong value stops the command with that message.
pub fn check_env() -> Result<Option<Isa>> {
    parse_cap(std::env::var(ENV).ok().as_deref())
}

/// The process's cap: [`Isa::Amx`] (none) unless `GCG_MAX_CPU_ISA` sets one. Read once.
///
/// # Panics
/// When the variable holds something that is not a level (see [`check_env`], which the CLI
/// calls first to report it as an error).
pub fn cap() -> Isa {
    static CAP: OnceLock<Isa> = OnceLock::new();
    *CAP.get_or_init(|| match check_env() {
        Ok(cap) => cap.unwrap_or(Isa::Amx),
        Err(e) => panic!("{e:#}"),
    })
}

/// Whether the cap is set below [`Isa::Amx`].
pub fn capped() -> bool {
    cap() < Isa::Amx
}

#[cfg(target_arch = "x86_64")]
fn detected(level: Isa) -> bool {
    use std::arch::is_x86_feature_detected as has;
    match level {
        Isa::Baseline => true,
        Isa::Avx2 => has!("avx2") && has!("fma"),
        Isa::Avx512 => detected(Isa::Avx2) && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq"),
        Isa::Avx512Bf16 => detected(Isa::Avx512) && has!("avx512bf16"),
        // The tile unit's own check (and Linux's grant of its state) is made where it is used.
        Isa::Amx => detected(Isa::Avx512Bf16),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected(level: Isa) -> bool {
    level == Isa::Baseline
}

/// Whether code for `level` may run: the CPU has it and the cap allows it. For [`Isa::Amx`] this
/// says only that the cap allows it and the CPU has AVX512-BF16; the tile unit is checked apart.
pub fn allows(level: Isa) -> bool {
    level <= cap() && detected(level)
}

/// AVX2 + FMA, under the cap.
pub fn avx2() -> bool {
    allows(Isa::Avx2)
}

/// AVX-512 F/BW/VL/DQ, under the cap.
pub fn avx512() -> bool {
    allows(Isa::Avx512)
}

/// AVX-512 with AVX512-BF16, under the cap.
pub fn avx512_bf16() -> bool {
    allows(Isa::Avx512Bf16)
}

/// The highest level this CPU has within the cap (AMX counted when the CPU reports AMX-BF16).
pub fn best() -> Isa {
    let amx = crate::nn::peak::cpu_has_amx_bf16();
    Isa::ALL
        .into_iter()
        .rev()
        .find(|&l| allows(l) && (l != Isa::Amx || amx))
        .unwrap_or(Isa::Baseline)
}

/// The level `gcg_onednn_cap_isa` (csrc/onednn_matmul.c) takes for the cap: 0 baseline, 1 AVX2,
/// 2 AVX-512, 3 AVX512-BF16; `None` with no cap (oneDNN then uses what the CPU has, or its own
/// `ONEDNN_MAX_CPU_ISA`).
pub fn onednn_level() -> Option<i32> {
    match cap() {
        Isa::Amx => None,
        l => Some(l as i32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
            assert_eq!(Isa::parse(&format!(" {} ", isa.name().to_uppercase())), Some(isa));
        }
        assert_eq!(Isa::parse("AVX512_CORE"), Some(Isa::Avx512));
        assert_eq!(Isa::parse("avx512_core_bf16"), Some(Isa::Avx512Bf16));
        assert_eq!(Isa::parse("avx512_core_amx"), Some(Isa::Amx));
        assert!(Isa::Baseline < Isa::Avx2 && Isa::Avx2 < Isa::Avx512 && Isa::Avx512Bf16 < Isa::Amx);
    }

    #[test]
    fn a_wrong_value_is_an_error_naming_it() {
        assert_eq!(parse_cap(None).unwrap(), None);
        assert_eq!(parse_cap(Some("")).unwrap(), None);
        assert_eq!(parse_cap(Some("avx2")).unwrap(), Some(Isa::Avx2));
        let e = parse_cap(Some("avx3")).unwrap_err().to_string();
        assert!(
            e.contains("GCG_MAX_CPU_ISA") && e.contains("\"avx3\"") && e.contains("avx512_bf16"),
            "{e}"
        );
    }

    /// Under a cap no level above it is allowed; without one, what the CPU reports is.
    #[test]
    fn the_cap_bounds_what_is_allowed() {
        for l in Isa::ALL {
            if l > cap() {
                assert!(!allows(l), "{l:?} above the cap {:?}", cap());
            }
        }
        assert!(best() <= cap());
        #[cfg(target_arch = "x86_64")]
        if !capped() {
            assert_eq!(
                avx2(),
                std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
            );
            assert_eq!(avx512_bf16(), std::arch::is_x86_feature_detected!("avx512bf16") && avx512());
        }
    }
}
