//! Small shared helpers: atomic file and folder writes.

use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write bytes to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
        }
    }
    let tmp = temp_name(path);
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    }
    fault_point("atomic-file");
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Save tensors as a safetensors file, atomically.
pub fn save_safetensors_atomic(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = temp_name(path);
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
        }
    }
    let map: std::collections::HashMap<String, Tensor> = tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    candle_core::safetensors::save(&map, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    // On disk before the rename publishes it (a power cut must not leave an empty file there).
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    fault_point("atomic-safetensors");
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Write the folder `dir` atomically: `fill` writes its contents into a fresh temporary sibling
/// (`.{name}.tmp-{pid}`, a stale one is removed first), which is then renamed to `dir`. An existing
/// `dir` is moved aside (`.{name}.old-{pid}`) before the swap and removed after it, so one complete
/// folder exists at every moment. When `fill` fails, the temporary folder is removed and its error
/// returned. Once the new folder is in place, failing to remove the old one is not an error (a
/// hidden leftover folder, not a lost write). Returns what `fill` returned.
pub fn write_dir_atomic<T>(dir: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let name = dir
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a folder name", dir.display()))?
        .to_string_lossy()
        .to_string();
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let out = match fill(&tmp) {
        Ok(out) => out,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let moved_aside = dir.exists();
    if moved_aside {
        std::fs::rename(dir, &old).with_context(|| format!("moving the old {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    if moved_aside {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(out)
}

/// The names of a choice enum, written once: `name()`, `FromStr` (an unknown name is an error that
/// lists the choices) and `Display`. Aliases are accepted when parsing; `name()` gives the first.
///
/// ```ignore
/// choice_names!(DeviceKind, "device", { Cpu => "cpu", Cuda => "cuda" });
/// ```
#[macro_export]
macro_rules! choice_names {
    ($ty:ident, $what:literal, { $($var:ident => $name:literal $(| $alias:literal)*),+ $(,)? }) => {
        impl $ty {
            /// The choice's name, as configs and flags spell it.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$var => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> anyhow::Result<Self> {
                match s {
                    $($name $(| $alias)* => Ok($ty::$var),)+
                    other => Err(anyhow::anyhow!(
                        "unknown {} {other:?} (expected {})",
                        $what,
                        $crate::util::either_of(&[$($name),+])
                    )),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

/// `a`, `a or b`, `a, b or c`.
pub fn either_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// Where a slice or tensor holds NaN or ±∞: how many such values, and the flat index of the first
/// (`None` when the tensor lives on an accelerator, where only the count is computed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite {
    pub count: usize,
    pub first: Option<usize>,
}

impl NonFinite {
    /// "3 non-finite values (the first at [2, 17, 5])" for a row-major `shape`.
    pub fn describe(&self, shape: &[usize]) -> String {
        let values = if self.count == 1 { "value" } else { "values" };
        match self.first {
            Some(i) => format!("{} non-finite {values} (the first at {:?})", self.count, unravel(i, shape)),
            None => format!("{} non-finite {values}", self.count),
        }
    }
}

/// The multi-index of flat position `i` in a row-major `shape`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for (o, &d) in out.iter_mut().zip(shape).rev() {
        if d > 0 {
            *o = i % d;
            i /= d;
        }
    }
    out
}

fn count_flagged<T: Copy>(xs: &[T], bad: impl Fn(T) -> bool) -> Option<NonFinite> {
    // A branch-free count first (vectorised), the position only when something is wrong.
    let count = xs.iter().fold(0usize, |c, &x| c + bad(x) as usize);
    (count > 0).then(|| NonFinite {
        count,
        first: xs.iter().position(|&x| bad(x)),
    })
}

/// NaN or ±∞ among f32 values.
pub fn non_finite_f32(xs: &[f32]) -> Option<NonFinite> {
    count_flagged(xs, |x| x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
}

/// NaN or ±∞ among f64 values.
pub fn non_finite_f64(xs: &[f64]) -> Option<NonFinite> {
    count_flagged(xs, |x| !x.is_finite())
}

/// NaN or ±∞ among f16 values (exponent bits all set).
pub fn non_finite_f16(xs: &[half::f16]) -> Option<NonFinite> {
    count_flagged(xs, |x| x.to_bits() & 0x7c00 == 0x7c00)
}

/// NaN or ±∞ among bf16 values (exponent bits all set).
pub fn non_finite_bf16(xs: &[half::bf16]) -> Option<NonFinite> {
    count_flagged(xs, |x| x.to_bits() & 0x7f80 == 0x7f80)
}

/// NaN or ±∞ in a floating-point tensor (integer tensors have none). Reads a contiguous CPU
/// tensor in place; elsewhere counts on the tensor's device.
pub fn non_finite(t: &Tensor) -> Result<Option<NonFinite>> {
    use candle_core::{CpuStorage, DType, Storage};
    if !t.dtype().is_float() {
        return Ok(None);
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(match cpu {
                CpuStorage::F32(v) => non_finite_f32(&v[a..b]),
                CpuStorage::F64(v) => non_finite_f64(&v[a..b]),
                CpuStorage::F16(v) => non_finite_f16(&v[a..b]),
                CpuStorage::BF16(v) => non_finite_bf16(&v[a..b]),
                _ => {
                    drop(storage);
                    return non_finite(&t.to_dtype(DType::F32)?);
                }
            });
        }
    }
    // |x| ≤ f32::MAX is false exactly for NaN and ±∞ (also for f64 beyond the f32 range,
    // which an f32 model cannot use either).
    let finite = t
        .to_dtype(DType::F32)?
        .abs()?
        .le(f32::MAX as f64)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    let count = t.elem_count() - finite;
    Ok((count > 0).then_some(NonFinite { count, first: None }))
}

/// Test hook for crash safety: with `GCG_FAULT=SITE:N` in the environment the process aborts (no
/// destructor, no flush — as a kill would) the N-th time it reaches `site`. Sites: `atomic-file`
/// and `atomic-safetensors` (a temporary file complete, not yet renamed), `atomic-dir` (a
/// temporary folder complete, not yet swapped in), `atomic-dir-swap` (the old folder moved aside,
/// the new one not yet in place), `prediction-row` (half a prediction line written).
pub fn fault_point(site: &str) {
    fault_point_then(site, || {});
}

/// [`fault_point`], running `partial` (e.g. half a write) before the abort.
pub fn fault_point_then(site: &str, partial: impl FnOnce()) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;
    static SPEC: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("GCG_FAULT").ok()?;
        let (s, n) = v.rsplit_once(':')?;
        Some((s.to_string(), n.parse().ok()?))
    });
    let Some((want, nth)) = spec else { return };
    if want == site && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        partial();
        eprintln!("injected fault: aborting at {site} #{nth}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::either_of;
    use crate::models::Preset;
    use crate::run::{Checkpoint, DeviceKind};

    #[test]
    fn choice_names_parse_print_and_list_the_choices() {
        assert_eq!(either_of(&["a"]), "a");
        assert_eq!(either_of(&["a", "b", "c"]), "a, b or c");
        assert_eq!("eva-vit-g".parse::<Preset>().unwrap(), Preset::InstructblipFlanT5Xl);
        assert_eq!(Preset::InstructblipFlanT5Xl.to_string(), "instructblip-flan-t5-xl");
        assert_eq!("last".parse::<Checkpoint>().unwrap(), Checkpoint::Last);
        let e = "tpu".parse::<DeviceKind>().unwrap_err().to_string();
        assert_eq!(e, "unknown device \"tpu\" (expected cpu or cuda)");
    }

    #[test]
    fn non_finite_values_are_counted_and_located_in_every_float_type() -> anyhow::Result<()> {
        use super::{non_finite, non_finite_f16, non_finite_f32, unravel, NonFinite};
        use candle_core::{DType, Device, Tensor};
        let mut xs = vec![0.5f32, -1e38, 3e38, f32::MIN_POSITIVE / 4.0, -0.0];
        assert_eq!(non_finite_f32(&xs), None);
        xs.extend([1.0, f32::NAN, 2.0, f32::NEG_INFINITY, f32::INFINITY]);
        let want = Some(NonFinite { count: 3, first: Some(6) });
        assert_eq!(non_finite_f32(&xs), want);
        let halves: Vec<half::f16> = xs.iter().map(|&x| half::f16::from_f32(x)).collect();
        // -1e38 and 3e38 overflow to ±∞ in f16.
        assert_eq!(non_finite_f16(&halves), Some(NonFinite { count: 5, first: Some(1) }));
        assert_eq!(non_finite_f16(&[half::f16::MAX, half::f16::MIN, half::f16::from_bits(1)]), None);
        let t = Tensor::from_vec(xs.clone(), (2, 5), &Device::Cpu)?;
        assert_eq!(non_finite(&t)?, want);
        assert_eq!(non_finite(&t.to_dtype(DType::BF16)?)?, want);
        assert_eq!(non_finite(&t.to_dtype(DType::F64)?)?, want);
        // Not contiguous: counted by the device-side path (no position).
        assert_eq!(non_finite(&t.t()?)?, Some(NonFinite { count: 3, first: None }));
        assert_eq!(non_finite(&t.to_dtype(DType::U32)?)?, None);
        assert_eq!(unravel(6, &[2, 5]), [1, 1]);
        assert_eq!(unravel(23, &[2, 3, 4]), [1, 2, 3]);
        assert_eq!(want.unwrap().describe(&[2, 5]), "3 non-finite values (the first at [1, 1])");
        Ok(())
    }
}
