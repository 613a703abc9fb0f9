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
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Write the folder `dir` atomically: `fill` writes its contents into a fresh temporary sibling
/// (`.{name}.tmp-{pid}`, a stale one is removed first), which is then renamed to `dir`. An existing
/// `dir` (a folder or a file) is moved aside (`.{name}.old-{pid}`) before the swap and removed
/// after it, so one complete output exists at every moment; when the new folder cannot be renamed
/// in, the old one is moved back. When `fill` fails, the temporary folder is removed and its error
/// returned. Returns what `fill` returned.
pub fn write_dir_atomic<T>(dir: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let name = dir
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a folder name", dir.display()))?
        .to_string_lossy()
        .to_string();
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
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
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    swap_in(&tmp, dir, &old, &|from, to| std::fs::rename(from, to))?;
    Ok(out)
}

/// Clear what killed writers of `dir` ([`write_dir_atomic`] in another process) left beside it:
/// a `.{name}.tmp-{pid}` folder of a process that is gone is removed; an `.{name}.old-{pid}` of
/// one is the previous `dir` caught between the two renames, so it is moved back when `dir` is
/// missing and removed otherwise. Whether a process is gone is read from `/proc` (where there is
/// none, nothing is touched). Returns the paths removed or moved back.
pub fn clear_stale_dir_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let proc = Path::new("/proc");
    let (Some(name), true) = (dir.file_name(), proc.is_dir()) else {
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
        } else {
            remove_path(&path).with_context(|| format!("removing {}, left by a killed process", path.display()))?;
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

#[cfg(test)]
mod tests {
    use super::{either_of, swap_in, write_dir_atomic};
    use std::path::Path;

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
}
