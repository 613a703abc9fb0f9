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

/// The root of `gcg ask`'s caches: `$GCG_CACHE`, else `$XDG_CACHE_HOME/gcg/ask`, else
/// `~/.cache/gcg/ask` (its parent holds gcg's other cached files).
pub fn ask_cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("GCG_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("gcg").join("ask")
}

/// Whether a writer may replace the folder `out` as a whole (`--force`, `--overwrite`): it is
/// absent, a file (the one the user named), an empty folder, or a folder holding `marker`, the
/// file that this kind of writer leaves there (a frames folder's `frames.json`, a world's
/// `world.json`, a demo's `demo.json`). Any other folder is someone's, and replacing it would
/// delete what it holds, unseen: an error names it and the marker it lacks.
pub fn check_replaceable_dir(out: &Path, marker: &str, what: &str) -> Result<()> {
    let out = &through_links(out)?;
    let Ok(meta) = out.symlink_metadata() else { return Ok(()) };
    if !meta.is_dir() {
        return Ok(());
    }
    let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !empty && !out.join(marker).is_file() {
        anyhow::bail!(
            "{} exists and is not {what} (no {marker}): replacing it would delete what it holds — give a new or empty folder",
            out.display()
        );
    }
    Ok(())
}

/// `path` with its symbolic links followed (the last component's, repeatedly; a dangling link
/// gives the path it points to, to be created); `path` itself when it is no link.
pub fn through_links(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match p.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p).with_context(|| format!("reading the link {}", p.display()))?;
                p = match p.parent() {
                    Some(parent) if target.is_relative() => parent.join(target),
                    _ => target,
                };
            }
            _ => return Ok(p),
        }
    }
    anyhow::bail!("{}: too many levels of symbolic links", path.display())
}

/// Seconds a frame time may lie past the video's duration (decoders' rounding): the larger of
/// half a second and two frame periods. (Here, below both `video` and `store`, which check
/// times with it.)
pub fn time_tolerance(fps: Option<f64>) -> f64 {
    fps.filter(|f| f.is_finite() && *f > 0.0).map_or(0.5, |f| (2.0 / f).max(0.5))
}

/// FNV-1a, 64 bits: the fingerprints of weight files, prediction inputs and the ask caches.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(pub u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// `fnv1a64:<16 hex digits>`.
    pub fn tagged(&self) -> String {
        format!("fnv1a64:{:016x}", self.0)
    }
}

/// Write bytes to `path` atomically: a temporary file in the same directory, fsync, rename. The
/// temporaries of `path` that killed writers left (`.{name}.tmp-{pid}`, the process gone) are
/// removed first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
        }
    }
    clear_own_stale_temps(path);
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

/// Save tensors as a safetensors file, atomically (killed writers' temporaries of `path` removed
/// first, as [`write_atomic`]).
pub fn save_safetensors_atomic(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = temp_name(path);
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
        }
    }
    clear_own_stale_temps(path);
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
/// folder is exchanged with the new one in one rename where the system can (Linux); otherwise an
/// existing `dir` (a folder or a file) is moved aside (`.{name}.old-{pid}`) before the swap and removed
/// after it, so one complete output exists at every moment; when the new folder cannot be renamed
/// in, the old one is moved back. When `fill` fails, the temporary folder is removed and its error
/// returned. Returns what `fill` returned.
pub fn write_dir_atomic<T>(dir: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    // Through a symbolic link: the folder it points to is what gets replaced (renaming over the
    // link would replace the link and leave the old folder as it was).
    let resolved = through_links(dir)?;
    if resolved != dir {
        tracing::info!("{} is a link to {}: writing that folder", dir.display(), resolved.display());
    }
    let dir = resolved.as_path();
    let name = dir
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a folder name", dir.display()))?
        .to_string_lossy()
        .to_string();
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    // A killed writer's leftovers first (its old folder back in place when it died mid-swap).
    clear_stale_dir_temps(dir)?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.symlink_metadata().is_ok() {
        remove_path(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let out = match fill(&tmp) {
        Ok(out) => out,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    fault_point("atomic-dir");
    let replacing_a_folder = dir.symlink_metadata().is_ok_and(|m| m.is_dir());
    let exchanged = if replacing_a_folder {
        exchange(&tmp, dir).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            anyhow::Error::new(e).context(format!(
                "swapping {} into {} (the old one is unchanged)",
                tmp.display(),
                dir.display()
            ))
        })?
    } else {
        false
    };
    if exchanged {
        // One rename put the new folder in place; `tmp` now holds the old one.
        fault_point("atomic-dir-swap");
        if let Err(e) = remove_path(&tmp) {
            tracing::warn!(
                "{} is replaced, but removing its old copy {} failed: {e}",
                dir.display(),
                tmp.display()
            );
        }
        return Ok(out);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    swap_in(&tmp, dir, &old, &|from, to| std::fs::rename(from, to))?;
    Ok(out)
}

/// Swaps two existing paths in one atomic rename (Linux `renameat2(RENAME_EXCHANGE)`), so no
/// reader ever finds neither. `Ok(false)` where the system or file system cannot (then the
/// caller renames twice).
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
        let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: two valid NUL-terminated paths relative to the working directory.
        let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(false),
            _ => Err(e),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// Clear what killed writers of `dir` ([`write_dir_atomic`] in another process) left beside it:
/// a `.{name}.tmp-{pid}` folder of a process that is gone is removed; an `.{name}.old-{pid}` of
/// one is the previous `dir` caught between the two renames, so it is moved back when `dir` is
/// missing and removed otherwise. Whether a process is gone is read from `/proc` (where there is
/// none, nothing is touched). Returns the paths removed or moved back.
pub fn clear_stale_dir_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    stale_dir_temps(dir, true)
}

/// For readers: only put back the previous `dir` a killed writer left moved aside when `dir` is
/// missing; nothing is deleted (a writer whose process is not visible from here, e.g. in another
/// container sharing the folder, may still be filling its temporary folder).
pub fn restore_interrupted_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.symlink_metadata().is_ok() {
        return Ok(Vec::new());
    }
    stale_dir_temps(dir, false)
}

/// Removes the temporaries of the file `path` that killed writers left; a failure to remove one
/// is a warning, never a failed write.
fn clear_own_stale_temps(path: &Path) {
    match stale_dir_temps(path, true) {
        Ok(cleared) => {
            for p in cleared {
                tracing::info!("removed {}, left by a killed writer", p.display());
            }
        }
        Err(e) => tracing::warn!("{e:#}"),
    }
}

/// The pid of a temporary `.{name}.tmp-{pid}` (any name) whose process is gone, read from `/proc`;
/// None for other names, this process's own and live processes', and where there is no `/proc`.
pub fn dead_writer_of(file_name: &str) -> Option<u32> {
    let (name, pid) = file_name.rsplit_once(".tmp-")?;
    if !name.starts_with('.') || name.len() < 2 {
        return None;
    }
    let pid = pid.parse::<u32>().ok()?;
    let proc = Path::new("/proc");
    (pid != std::process::id() && proc.join("self").exists() && !proc.join(pid.to_string()).exists()).then_some(pid)
}

/// Remove every `.{name}.tmp-{pid}` file or folder in `dir` whose writer is gone
/// ([`dead_writer_of`]): what processes killed mid-write left. Returns the paths removed.
pub fn clear_stale_temps_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut cleared = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        if dead_writer_of(&e.file_name().to_string_lossy()).is_none() {
            continue;
        }
        let path = e.path();
        match remove_path(&path) {
            Ok(()) => {}
            // Another cleaner got there first.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("removing {}, left by a killed process", path.display())),
        }
        cleared.push(path);
    }
    Ok(cleared)
}

fn stale_dir_temps(dir: &Path, delete: bool) -> Result<Vec<PathBuf>> {
    let proc = Path::new("/proc");
    let (Some(name), true) = (dir.file_name(), proc.join("self").exists()) else {
        return Ok(Vec::new());
    };
    let name = name.to_string_lossy().to_string();
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(Vec::new());
    };
    let mut cleared = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("listing {}", parent.display()))?;
        let file = e.file_name().to_string_lossy().to_string();
        let Some(rest) = file.strip_prefix(&format!(".{name}.")) else {
            continue;
        };
        let (old, pid) = match (rest.strip_prefix("tmp-"), rest.strip_prefix("old-")) {
            (Some(pid), _) => (false, pid),
            (_, Some(pid)) => (true, pid),
            _ => continue,
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || proc.join(pid.to_string()).exists() {
            continue;
        }
        let path = e.path();
        if old && dir.symlink_metadata().is_err() {
            std::fs::rename(&path, dir).with_context(|| format!("moving {} back to {}", path.display(), dir.display()))?;
        } else if delete {
            remove_path(&path).with_context(|| format!("removing {}, left by a killed process", path.display()))?;
        } else {
            continue;
        }
        cleared.push(path);
    }
    Ok(cleared)
}

/// Remove a file, a symlink or a folder with its contents.
pub fn remove_path(path: &Path) -> std::io::Result<()> {
    if path.symlink_metadata()?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Put the finished folder `tmp` at `dir`: an existing `dir` is renamed to `old` first and
/// removed once `tmp` is in place; when `tmp` cannot be renamed in, `old` goes back to `dir` and
/// `tmp` is removed. `rename` is `std::fs::rename` (a parameter so tests can make it fail).
fn swap_in(tmp: &Path, dir: &Path, old: &Path, rename: &dyn Fn(&Path, &Path) -> std::io::Result<()>) -> Result<()> {
    if old.symlink_metadata().is_ok() {
        remove_path(old).with_context(|| format!("removing stale {}", old.display()))?;
    }
    let moved_aside = dir.symlink_metadata().is_ok();
    if moved_aside {
        if let Err(e) = rename(dir, old) {
            let _ = std::fs::remove_dir_all(tmp);
            return Err(anyhow::Error::new(e).context(format!("moving the old {} aside (it is unchanged)", dir.display())));
        }
        // Killed here, `dir` is missing: [`clear_stale_dir_temps`] moves the old one back.
        fault_point("atomic-dir-swap");
    }
    if let Err(e) = rename(tmp, dir) {
        let _ = std::fs::remove_dir_all(tmp);
        let state = if !moved_aside {
            String::new()
        } else {
            match rename(old, dir) {
                Ok(()) => " (the old one is back in place)".to_string(),
                Err(back) => format!(" (the old one stays at {}: moving it back failed: {back})", old.display()),
            }
        };
        return Err(anyhow::Error::new(e).context(format!("renaming {} to {}{state}", tmp.display(), dir.display())));
    }
    if moved_aside {
        if let Err(e) = remove_path(old) {
            // The new output is complete and in place; only the old copy is left over.
            tracing::warn!(
                "{} is replaced, but removing its old copy {} failed: {e}",
                dir.display(),
                old.display()
            );
        }
    }
    Ok(())
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

/// An exclusive advisory lock on a lock file, held while this lives; the file is removed when it
/// is released (no `.lock` files left beside a user's outputs).
#[derive(Debug)]
pub struct LockFile {
    /// Holds the lock while it is open.
    _file: std::fs::File,
    path: PathBuf,
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Removed while still locked (the lock goes with `_file`, after this): a process that
        // opened the old file and locks it once this one lets go finds it gone from `path` and
        // tries again on a new one (`lock_exclusive`), so two never hold the lock at once.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Hold an exclusive advisory lock on `path` (created when missing) for as long as the returned
/// [`LockFile`] lives, or fail at once naming `what` when another process holds it (two `gcg
/// train` in one run directory, two `gcg predict` into one file).
pub fn lock_exclusive(path: &Path, what: &str) -> Result<LockFile> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(anyhow!(
                    "{what} is in use by another gcg process (it holds {}); wait for it to finish",
                    path.display()
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(anyhow::Error::new(e).context(format!("locking {}", path.display()))),
        }
        // The file locked must still be the one at `path`: its last holder removes it on release.
        let held = f.metadata().with_context(|| format!("reading {}", path.display()))?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                return Ok(LockFile {
                    _file: f,
                    path: path.to_path_buf(),
                })
            }
            _ => continue,
        }
    }
}

/// Test hook for crash safety: with `GCG_FAULT=SITE:N` in the environment the process aborts (no
/// destructor, no flush — as a kill would) the N-th time it reaches `site`. Sites: `atomic-file`
/// and `atomic-safetensors` (a temporary file complete, not yet renamed), `atomic-dir` (a
/// temporary folder complete, not yet swapped in), `atomic-dir-swap` (the new folder in place by
/// an exchange, the old one not yet removed; where exchange is unavailable, the old folder moved
/// aside and the new one not yet in place), `prediction-row` (half a prediction line written).
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
    use super::{
        clear_stale_temps_in, dead_writer_of, either_of, lock_exclusive, save_safetensors_atomic, swap_in, write_atomic, write_dir_atomic,
    };
    use candle_core::Tensor;
    use std::collections::BTreeMap;
    use std::path::Path;

    #[test]
    fn a_lock_is_exclusive_and_its_file_goes_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(".x.lock");
        let held = lock_exclusive(&p, "x").unwrap();
        let e = lock_exclusive(&p, "the thing x").unwrap_err().to_string();
        assert!(e.contains("the thing x is in use by another gcg process"), "{e}");
        drop(held);
        assert!(!p.exists(), "the lock file was left behind");
        // A handle on the removed file, locked (a process that opened it before its holder let
        // go), does not stop the next lock, which takes a new file.
        let stale = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        stale.try_lock().unwrap();
        let again = lock_exclusive(&p, "x").unwrap();
        assert!(p.exists());
        drop(again);
        drop(stale);
        assert!(!p.exists());
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_dir_atomic_replaces_a_folder_or_a_file_and_leaves_nothing_beside() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("old.txt"), "old").unwrap();
        write_dir_atomic(&dir, |t| Ok(std::fs::write(t.join("new.txt"), "new")?)).unwrap();
        assert_eq!(names(&dir), ["new.txt"]);
        assert_eq!(names(tmp.path()), ["out"]);
        let file = tmp.path().join("f");
        std::fs::write(&file, "a file").unwrap();
        write_dir_atomic(&file, |t| Ok(std::fs::write(t.join("new.txt"), "new")?)).unwrap();
        assert_eq!(names(&file), ["new.txt"]);
        assert_eq!(names(tmp.path()), ["f", "out"]);
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_cleared() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        // A pid no process has (above the kernel's pid_max of 2^22).
        let dead = 4_194_305u32;
        for n in [
            format!(".out.tmp-{dead}"),
            format!(".out.old-{dead}"),
            format!(".out.tmp-{}", std::process::id()),
        ] {
            std::fs::create_dir(root.path().join(&n)).unwrap();
            std::fs::write(root.path().join(&n).join("f"), &n).unwrap();
        }
        std::fs::create_dir(root.path().join(".other.tmp-1")).unwrap();
        // `out` is missing: the dead process's old copy is moved back, its temporary removed,
        // this process's own temporary and another folder's are left alone.
        let mut cleared = super::clear_stale_dir_temps(&dir).unwrap();
        cleared.sort();
        assert_eq!(cleared.len(), 2, "{cleared:?}");
        assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), format!(".out.old-{dead}"));
        let own = format!(".out.tmp-{}", std::process::id());
        let mut want = vec![".other.tmp-1".to_string(), own, "out".to_string()];
        want.sort();
        assert_eq!(names(root.path()), want);
        // With `out` present, a dead process's old copy is removed.
        std::fs::create_dir(root.path().join(format!(".out.old-{dead}"))).unwrap();
        assert_eq!(super::clear_stale_dir_temps(&dir).unwrap().len(), 1);
        assert_eq!(names(&dir), ["f"]);
    }

    #[test]
    fn atomic_writes_clear_the_temporaries_of_killed_writers() {
        let root = tempfile::tempdir().unwrap();
        let dead = 4_194_305u32; // above the kernel's pid_max of 2^22: no process has it
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let live = child.id();
        let plant = |n: String| {
            std::fs::write(root.path().join(&n), "half a write").unwrap();
            n
        };
        let own_dead = plant(format!(".f.json.tmp-{dead}"));
        let other_dead = plant(format!(".g.json.tmp-{dead}"));
        let own_live = plant(format!(".f.json.tmp-{live}"));
        let not_ours = plant(format!("f.json.tmp-{dead}"));
        std::fs::create_dir(root.path().join(format!(".d.tmp-{dead}"))).unwrap();
        std::fs::write(root.path().join(format!(".d.tmp-{dead}/x")), "x").unwrap();
        // A write of f.json removes its own dead temporaries only.
        write_atomic(&root.path().join("f.json"), b"{}").unwrap();
        let mut want = vec![
            format!(".d.tmp-{dead}"),
            other_dead.clone(),
            own_live.clone(),
            "f.json".into(),
            not_ours.clone(),
        ];
        want.sort();
        assert_eq!(names(root.path()), want);
        assert!(!names(root.path()).contains(&own_dead));
        // The folder sweep removes every dead writer's (files and folders), nothing else.
        let mut cleared = clear_stale_temps_in(root.path()).unwrap();
        cleared.sort();
        assert_eq!(cleared, [root.path().join(format!(".d.tmp-{dead}")), root.path().join(&other_dead)]);
        let mut want = vec![own_live.clone(), "f.json".into(), not_ours];
        want.sort();
        assert_eq!(names(root.path()), want);
        // Once the live writer is gone, its temporary is stale too.
        child.kill().unwrap();
        child.wait().unwrap();
        let t = Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        save_safetensors_atomic(&BTreeMap::from([("t".to_string(), t)]), &root.path().join("f.json")).unwrap();
        assert!(!root.path().join(&own_live).exists());
        for (name, dead_writer) in [
            (format!(".a.tmp-{dead}"), Some(dead)),
            (format!(".a.b.tmp-{dead}"), Some(dead)),
            (format!("a.tmp-{dead}"), None),
            (format!(".tmp-{dead}"), None),
            (".a.tmp-x".to_string(), None),
            (format!(".a.tmp-{}", std::process::id()), None),
        ] {
            assert_eq!(dead_writer_of(&name), dead_writer, "{name}");
        }
    }

    #[test]
    fn a_failed_swap_puts_the_old_folder_back() {
        let root = tempfile::tempdir().unwrap();
        let (dir, tmp, old) = (root.path().join("out"), root.path().join(".out.tmp"), root.path().join(".out.old"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("old.txt"), "old").unwrap();
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("new.txt"), "new").unwrap();
        // Renaming the new folder in fails; the other renames work.
        let rename = |from: &Path, to: &Path| {
            if from.ends_with(".out.tmp") {
                Err(std::io::Error::other("disk on fire"))
            } else {
                std::fs::rename(from, to)
            }
        };
        let err = format!("{:#}", swap_in(&tmp, &dir, &old, &rename).unwrap_err());
        assert!(
            err.contains("disk on fire") && err.contains("the old one is back in place"),
            "{err}"
        );
        assert_eq!(names(&dir), ["old.txt"]);
        assert_eq!(names(root.path()), ["out"]);
        // Moving the old one aside fails: nothing changes, the new folder is dropped.
        std::fs::create_dir(&tmp).unwrap();
        let err = format!(
            "{:#}",
            swap_in(&tmp, &dir, &old, &|_: &Path, _: &Path| Err(std::io::Error::other("busy"))).unwrap_err()
        );
        assert!(err.contains("busy") && err.contains("unchanged"), "{err}");
        assert_eq!(names(root.path()), ["out"]);
    }
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

/// `f(i, item)` for every item, item i ≥ 1 on a thread of its own and item 0 on this one; the
/// results in order. A thread that panics gives an error with the panic's message.
pub fn side_by_side<I: Send, T: Send>(items: Vec<I>, f: impl Fn(usize, I) -> Result<T> + Sync) -> Vec<Result<T>> {
    let f = &f;
    let mut items = items.into_iter();
    let Some(first) = items.next() else {
        return Vec::new();
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = items.enumerate().map(|(i, item)| scope.spawn(move || f(i + 1, item))).collect();
        let mut out = vec![f(0, first)];
        out.extend(handles.into_iter().map(|h| {
            h.join().unwrap_or_else(|payload| {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                Err(anyhow!("a thread panicked: {msg}"))
            })
        }));
        out
    })
}

/// Keep freed tensor buffers for reuse instead of handing them back to the kernel at once.
///
/// glibc serves allocations above its mmap threshold (128 KiB at start, raised as large blocks
/// are freed) with fresh pages and returns them on free: every layer's output of a big network
/// then costs page faults and zeroing, measured at ~17% of the ViT-g forward on the CPU. This
/// raises the threshold to glibc's maximum (32 MiB), turns its own mmap-per-allocation off
/// altogether (`M_MMAP_MAX` 0: a larger block comes from the heap too, and is reused once freed)
/// and raises the trim threshold to 1 GiB; a process's resident memory then stays near its peak.
/// Without the mmap step, blocks above 32 MiB still came and went as fresh pages: the ViT's
/// tensors at 32 frames a pass (activations of 46–135 MB) spent more time in the kernel than in
/// products, 1.2 frames/s against 2.5 with it.
///
/// A thread other than the main one allocates from its own arena, whose heaps hold blocks of at
/// most 64 MiB: glibc maps larger ones afresh whatever the settings. `one_heap` keeps every
/// thread on the main heap (`M_ARENA_MAX` 1), for a process whose big tensors live on another
/// thread (`gcg serve`'s model thread); it costs the threads a shared lock, which made `gcg demo`
/// (networks trained side by side on two threads, many mid-sized tensors) 20% slower.
///
/// Called by the `gcg` binary at start, before any other thread exists (a thread keeps the arena
/// it first allocated from); a no-op elsewhere than Linux with glibc.
pub fn keep_freed_memory(one_heap: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator parameters; it is called before other
    // threads allocate (at the start of main).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        if one_heap {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Work out the CPU thread count once for the whole process.
///
/// candle asks for its thread count on every matrix product and, unless `RAYON_NUM_THREADS`
/// is set, works it out again from `/proc/cpuinfo`: measured at ~10% of a tiny-preset training
/// step. This sets `RAYON_NUM_THREADS` to that count when the user has not set it (which candle
/// then reads instead). Called by the `gcg` binary at start, before any thread exists.
///
/// `threads` (the binary's `--threads`) sets the count for candle's CPU work and oneDNN's
/// products alike.
pub fn fix_thread_count(threads: Option<usize>) {
    if let Some(n) = threads {
        // SAFETY: called at the start of main, before other threads read the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string()) };
        crate::nn::linear::set_onednn_threads(n);
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: as above.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}
