//! Helpers for the dataset / evaluation tests: committed annotation fixtures (gzip copies of the
//! real NExT-QA / NExT-GQA files and small hand-made ones) unpacked into a temporary directory.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `tests/fixtures/{rel}`, decompressed into `dir` when `{rel}.gz` is what is committed.
pub fn unpack(dir: &Path, rel: &str) -> PathBuf {
    let plain = fixtures().join(rel);
    if plain.exists() {
        return plain;
    }
    let gz = fixtures().join(format!("{rel}.gz"));
    let f = std::fs::File::open(&gz).unwrap_or_else(|e| panic!("fixture {} missing: {e}", gz.display()));
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut text)
        .unwrap_or_else(|e| panic!("decompressing {}: {e}", gz.display()));
    let out = dir.join(rel);
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, text).unwrap();
    out
}

/// Write `text` to `dir/name` and return the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}
