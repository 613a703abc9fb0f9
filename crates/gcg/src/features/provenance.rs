//! What made the records of a feature store, recorded with each of them so that a rerun with
//! other settings is never mistaken for "already stored": [`Extractor`] per video (frame
//! sampling, ViT + CLIP image weights; T is the entry's frame count) and a text-encoder identity
//! per question (CLIP text weights, tokenizer).
//!
//! Weights are identified by a fingerprint of their files, cheap enough for every run: for each
//! file (sorted by name), its name, its size and its first and last 64 KiB. That covers a
//! safetensors header and a `.pth` zip's central directory (which holds the CRC-32 of every
//! tensor), so other weights give another fingerprint, while moving or copying the files does not.

use crate::models::Preset;
use crate::store::Extractor;
use anyhow::{ensure, Context, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const EDGE: u64 = 64 << 10;

/// `fnv1a64:<hex>` of the files' names, sizes and first and last 64 KiB.
pub fn files_fingerprint(files: &[PathBuf]) -> Result<String> {
    ensure!(!files.is_empty(), "no weight files to fingerprint");
    let mut files = files.to_vec();
    files.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
    let mut h = crate::util::Fnv64::default();
    for path in &files {
        h.update(
            path.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
                .as_bytes(),
        );
        hash_edges(&mut h, path)?;
    }
    Ok(h.tagged())
}

/// Feeds a file's size and its first and last 64 KiB to `h`.
fn hash_edges(h: &mut crate::util::Fnv64, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {} to fingerprint it", path.display()))?;
    let len = f.metadata()?.len();
    h.update(&len.to_le_bytes());
    let mut buf = Vec::new();
    (&mut f).take(EDGE).read_to_end(&mut buf)?;
    if len > EDGE {
        f.seek(SeekFrom::Start(len.saturating_sub(EDGE).max(EDGE)))?;
        f.read_to_end(&mut buf)?;
    }
    h.update(&buf);
    Ok(())
}

/// What a video's features were made from, to tell a replaced file from the one stored: for a
/// video file its size and first and last 64 KiB (where MP4's and Matroska's indexes live; not
/// its name, so a moved or renamed copy is the same video); for a frame folder the names,
/// sizes and edges of its files. `fnv1a64:<hex>`.
pub fn source_fingerprint(path: &Path) -> Result<String> {
    let mut h = crate::util::Fnv64::default();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("listing {}", path.display()))?;
        // Hidden files (.DS_Store, an editor's swap file) are not the frames.
        files.retain(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')));
        files.sort();
        h.update(b"folder");
        for f in &files {
            h.update(
                f.file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default()
                    .as_bytes(),
            );
            h.update(&[0]);
            hash_edges(&mut h, f)?;
        }
    } else {
        hash_edges(&mut h, path)?;
    }
    Ok(h.tagged())
}

fn listed(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_file() && p.file_name().is_some_and(|n| keep(&n.to_string_lossy())) {
            out.push(p);
        }
    }
    ensure!(!out.is_empty(), "no weight files found in {}", dir.display());
    Ok(out)
}

/// The files the ViT is loaded from (see [`super::frozen::load_vit`]): an HF snapshot's
/// `config.json` and safetensors, or the GCG release's `eva_vit_g.pth` (+ its post-layernorm).
pub fn vit_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join("config.json").exists() {
        listed(dir, |n| n == "config.json" || n.ends_with(".safetensors"))
    } else {
        listed(dir, |n| n == "eva_vit_g.pth" || n == "eva_vit_post_layernorm.pth")
    }
}

/// The GCG release's CLIP image-head files in `dir`.
pub fn clip_image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    listed(dir, |n| n.starts_with("eva_clip_last_vision_") && n.ends_with(".pth"))
}

/// The GCG release's CLIP text-tower file in `dir`.
pub fn clip_text_files(dir: &Path) -> Result<Vec<PathBuf>> {
    listed(dir, |n| n == "eva_clip_text_model.pth")
}

fn preset_name(p: Preset) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{p:?}"))
}

/// The networks of `gcg features`: seeded random ones, or the weight files' fingerprints.
pub fn image_models(preset: Preset, random_seed: Option<u64>, vit_dir: Option<&Path>, clip_dir: Option<&Path>) -> Result<String> {
    Ok(match random_seed {
        Some(seed) => format!("random {} seed {seed}", preset_name(preset)),
        None => {
            let vit = vit_dir.context("the ViT weight directory")?;
            let clip = clip_dir.context("the CLIP weight directory")?;
            format!(
                "vit {} + clip image {}",
                files_fingerprint(&vit_files(vit)?)?,
                files_fingerprint(&clip_image_files(clip)?)?
            )
        }
    })
}

/// An [`Extractor`] from its parts (the arithmetic not recorded: [`Extractor::with_precision`]).
pub fn extractor(sampling: impl Into<String>, models: impl Into<String>) -> Extractor {
    Extractor {
        sampling: sampling.into(),
        models: models.into(),
        precision: None,
    }
}

/// How networks run in `dtype` on `dev` compute, for [`Extractor::precision`]: the dtype's
/// name, and for f32 the matmul precision where it changes the arithmetic (`high` on a CPU where
/// gcg's AMX kernels run: products from bf16 pairs; elsewhere `high` computes as `highest`).
pub fn precision(dtype: candle_core::DType, dev: &candle_core::Device) -> String {
    use crate::nn::linear::{amx_tiles, matmul_precision, MatmulPrecision};
    match dtype {
        candle_core::DType::F32 if matmul_precision() == MatmulPrecision::High && dev.is_cpu() && amx_tiles().is_some() => {
            format!("f32, matmul precision {}", matmul_precision().as_str())
        }
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The text encoder of `gcg labels`: seeded random CLIP text weights or their fingerprint, and
/// the tokenizer file's fingerprint.
pub fn text_encoder(preset: Preset, random_seed: Option<u64>, clip_dir: Option<&Path>, tokenizer: &Path) -> Result<String> {
    let model = match random_seed {
        Some(seed) => format!("random {} seed {seed}", preset_name(preset)),
        None => format!(
            "clip text {}",
            files_fingerprint(&clip_text_files(clip_dir.context("the CLIP weight directory")?)?)?
        ),
    };
    Ok(format!("{model}, tokenizer {}", files_fingerprint(&[tokenizer.to_path_buf()])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_fingerprints_follow_content_not_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        // A "video" larger than both edges, and a copy under another name.
        let mut bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(p("a.mp4"), &bytes).unwrap();
        std::fs::write(p("b.mp4"), &bytes).unwrap();
        let a = source_fingerprint(&p("a.mp4")).unwrap();
        assert!(a.starts_with("fnv1a64:"), "{a}");
        assert_eq!(source_fingerprint(&p("b.mp4")).unwrap(), a, "a renamed copy is the same video");
        // A byte in the last 64 KiB, or one more byte: another video.
        bytes[299_000] ^= 1;
        std::fs::write(p("b.mp4"), &bytes).unwrap();
        assert_ne!(source_fingerprint(&p("b.mp4")).unwrap(), a);
        bytes[299_000] ^= 1;
        bytes.push(0);
        std::fs::write(p("b.mp4"), &bytes).unwrap();
        assert_ne!(source_fingerprint(&p("b.mp4")).unwrap(), a);

        // Frame folders: a frame's content or name changes it; the folder's own name does not.
        for d in ["f1", "f2"] {
            std::fs::create_dir(p(d)).unwrap();
            std::fs::write(p(d).join("frame_0.jpg"), b"zero").unwrap();
            std::fs::write(p(d).join("frame_1.jpg"), b"one").unwrap();
        }
        let f = source_fingerprint(&p("f1")).unwrap();
        assert_eq!(source_fingerprint(&p("f2")).unwrap(), f);
        assert_ne!(f, a);
        std::fs::write(p("f2").join("frame_1.jpg"), b"ONE").unwrap();
        assert_ne!(source_fingerprint(&p("f2")).unwrap(), f);
        std::fs::write(p("f2").join("frame_1.jpg"), b"one").unwrap();
        std::fs::rename(p("f2").join("frame_1.jpg"), p("f2").join("frame_2.jpg")).unwrap();
        assert_ne!(source_fingerprint(&p("f2")).unwrap(), f);
        std::fs::write(p("f1").join(".DS_Store"), b"finder").unwrap();
        assert_eq!(source_fingerprint(&p("f1")).unwrap(), f, "hidden files are not frames");
        assert!(source_fingerprint(&p("missing.mp4")).is_err());
    }
}
