//! From videos to frames: decoding (through the `ffmpeg`/`ffprobe` tools), frame sampling, frame
//! folders and the CLIP pre-processing of frames.
//!
//! Entry points:
//! * [`load_frames`] — a video file or a folder of `frame_{i}.jpg|png` → T RGB frames + timestamps;
//! * [`Ffmpeg`] — the decoder (probe, count, decode selected frame numbers);
//! * [`sample_indices`] — the uniform (segment centres) and official (GCG `extract_frames.py`) rules;
//! * [`uniform_indices`] — K evenly spaced indices over T, endpoints included ([`UniformRule`]);
//! * [`write_frames`] — `frame_{i}.jpg` + `frames.json`, written atomically;
//! * [`preprocess`] — CLIP pre-processing bit-compatible with PIL + torchvision.
//!
//! # Sampling rules
//! With N frames in the video and T wanted:
//! * **uniform**: frame `⌊(2i+1)·N / (2T)⌋` for i = 0..T — the centre of the i-th of T equal
//!   segments. When N < T the same formula repeats frames in temporal order (padding).
//! * **official**: GCG's `utils/extract_frames.py` reads frame 0 and discards it, then keeps every
//!   `k = max(⌊(N−1)/T⌋, 1)`-th frame starting at frame 1: indices `1 + j·k` for j = 0..T−1 (those
//!   < N). Note the off-by-one of the original: frame 0 is never used and the interval uses N−1,
//!   so the last `N−1−T·k` frames are never reached. N comes from OpenCV's
//!   `CAP_PROP_FRAME_COUNT` there (the container's claim); here it is the checked count. When fewer
//!   than T frames result (N ≤ T; the original then writes fewer files and its loader fails),
//!   they are padded by repetition like the uniform rule.
//!
//! For a frame folder (the official `frames_32/{video}/frame_{i}.jpg`) with M frames, the official
//! rule is `utils/utils.py::get_frames(lst, T)`: fixed index tables for M ∈ {32, 16} and
//! T ∈ {16, 8, 4, 1}, all M frames otherwise when M is 32 or 16; other (M, T) fall back to the
//! uniform rule (with a warning). The uniform rule is the same formula as for videos.
//!
//! # Frame folders
//! Position i of a folder is the file `frame_{i}`, numbered from `frame_0` up to the last file, or
//! to the length of `frames.json`'s timestamps when the folder has one. A gap (or a file that
//! disagrees with `frames.json`) is an error naming the files; read leniently, each missing frame
//! is the nearest earlier one, so every other frame keeps its position and timestamp.

pub mod ffmpeg;
pub mod preprocess;

pub use ffmpeg::{CountSource, Decoded, Ffmpeg, VideoInfo};

/// The version of how video files are read (which stream, where time starts, where the video
/// ends). Caches of what was read (the ask cache) are keyed by it: 2 = the default stream, times
/// from the file's start in MPEG-TS too, the duration at the last frame's end; 3 = a Matroska
/// stream's DURATION tag that ends after its file is stale (the file's duration is used); 4 = an
/// AVI's frames are at its packets' times, its rate theirs.
pub const READING_RULES: u32 = 4;

use anyhow::{anyhow, bail, ensure, Context, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// How T frames are chosen from a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Centres of T equal segments.
    #[default]
    Uniform,
    /// GCG's `extract_frames.py` rule for videos (`get_frames` for frame folders).
    Official,
}

impl std::str::FromStr for Sampling {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(Self::Uniform),
            "official" => Ok(Self::Official),
            other => bail!("unknown sampling {other:?} (expected uniform or official)"),
        }
    }
}

impl std::fmt::Display for Sampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Uniform => "uniform",
            Self::Official => "official",
        })
    }
}

/// One sampled frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Index of the frame in the source (video frame number in presentation order, or position
    /// in the numerically sorted frame folder).
    pub index: usize,
    /// Shared: a frame repeated to pad a short video (or standing in for a missing file) is the
    /// same picture, not a copy (a 4096² frame is 50 MB).
    pub image: std::sync::Arc<RgbImage>,
    /// Presentation time in seconds from the start of the video (None for a frame folder without
    /// a `frames.json`).
    pub timestamp: Option<f64>,
}

/// T frames sampled from one video (or frame folder), in temporal order.
#[derive(Debug, Clone)]
pub struct SampledFrames {
    pub source: PathBuf,
    pub frames: Vec<Frame>,
    /// Video duration in seconds, when known.
    pub duration: Option<f64>,
    /// Average frame rate, when known.
    pub fps: Option<f64>,
    /// Frames in the source (video frames after checking, or files in the folder).
    pub num_source_frames: usize,
    /// How many of the T frames are repeats (source shorter than T).
    pub padded: usize,
    /// How many of the T frames stand in for a file missing from a frame folder (lenient
    /// reading: the nearest earlier frame, at the missing frame's position).
    pub filled: usize,
    pub sampling: Sampling,
}

impl SampledFrames {
    pub fn images(&self) -> Vec<RgbImage> {
        self.frames.iter().map(|f| (*f.image).clone()).collect()
    }
    /// The same frames with every picture larger than `max_side` on its longest side shrunk to
    /// it (aspect kept, a triangle filter); smaller ones shared as they are.
    pub fn downscaled(&self, max_side: u32) -> SampledFrames {
        let mut out = self.clone();
        // A picture shared by several frames (padding) is shrunk once and stays shared.
        let mut done: std::collections::HashMap<*const RgbImage, std::sync::Arc<RgbImage>> = Default::default();
        for f in &mut out.frames {
            let (w, h) = f.image.dimensions();
            if w.max(h) > max_side {
                let small = done.entry(std::sync::Arc::as_ptr(&f.image)).or_insert_with(|| {
                    let scale = max_side as f64 / w.max(h) as f64;
                    let (nw, nh) = (
                        ((w as f64 * scale).round() as u32).max(1),
                        ((h as f64 * scale).round() as u32).max(1),
                    );
                    std::sync::Arc::new(image::imageops::resize(&*f.image, nw, nh, image::imageops::FilterType::Triangle))
                });
                f.image = small.clone();
            }
        }
        out
    }
    pub fn indices(&self) -> Vec<usize> {
        self.frames.iter().map(|f| f.index).collect()
    }
    /// The frames CLIP-pre-processed for the ViT: `[T, 3, 224, 224]` f32 on `dev`
    /// (see [`preprocess::clip_batch`]).
    pub fn clip_pixels(&self, threads: usize, dev: &candle_core::Device) -> Result<candle_core::Tensor> {
        preprocess::clip_batch_refs(&self.frames.iter().map(|f| &*f.image).collect::<Vec<_>>(), threads, dev)
    }
    /// All timestamps, or None if any frame has none.
    pub fn timestamps(&self) -> Option<Vec<f64>> {
        self.frames.iter().map(|f| f.timestamp).collect()
    }
}

/// Repeat `avail` (in order) to length `t`: element `⌊(2i+1)·m/(2t)⌋` (nearest in time).
fn pad_to(avail: &[usize], t: usize) -> Vec<usize> {
    let m = avail.len();
    if m >= t {
        return avail[..t].to_vec();
    }
    (0..t).map(|i| avail[(2 * i + 1) * m / (2 * t)]).collect()
}

/// Frame indices for T frames out of N (see the module docs). Always returns T indices in
/// non-decreasing order (repeats when N is too small); empty when N = 0.
pub fn sample_indices(n: usize, t: usize, sampling: Sampling) -> Vec<usize> {
    if n == 0 || t == 0 {
        return Vec::new();
    }
    match sampling {
        Sampling::Uniform => (0..t).map(|i| (2 * i + 1) * n / (2 * t)).collect(),
        Sampling::Official => {
            let k = ((n - 1) / t).max(1);
            let avail: Vec<usize> = (0..t).map(|j| 1 + j * k).take_while(|&i| i < n).collect();
            if avail.is_empty() {
                // N = 1: the original skips frame 0 and gets nothing; use the only frame.
                vec![0; t]
            } else {
                pad_to(&avail, t)
            }
        }
    }
}

/// How [`uniform_indices`] spaces `count` indices over `0..frames` (the endpoints included).
/// The run config's `uniform_rule` takes `round` or `official-truncate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UniformRule {
    /// round(linspace(0, T−1, K)) (SPEC §6), linspace as NumPy computes it: i·step with
    /// step = (T−1)/(K−1).
    Round,
    /// `torch.linspace(0, T−1, K, dtype=torch.int)` as the official code: truncation
    /// (T = 32, K = 4 → 0, 10, 20, 31 instead of 0, 10, 21, 31).
    OfficialTruncate,
    /// round(i·(T−1)/(K−1)) with the product taken first, so an exact half (T = 35, K = 29,
    /// i = 21 → 25.5) rounds up where [`UniformRule::Round`]'s i·step may fall just below it: the
    /// frame choice of feature extraction from pixel files and of the official HDF5 import. Not a
    /// run-config choice.
    #[serde(skip)]
    RoundExact,
}

/// `count` evenly spaced indices into `0..frames` (first and last included), by `rule`:
/// `uniform_indices(32, 4, UniformRule::OfficialTruncate)` = [0, 10, 20, 31]. `count = 1` gives
/// [0]; `count = 0` gives none.
pub fn uniform_indices(frames: usize, count: usize, rule: UniformRule) -> Vec<usize> {
    if count == 0 {
        return Vec::new();
    }
    if count == 1 {
        return vec![0];
    }
    let last = frames.saturating_sub(1);
    let end = last as f64;
    let step = end / (count - 1) as f64;
    (0..count)
        .map(|i| match rule {
            UniformRule::Round => (i as f64 * step).round() as usize,
            // ATen's integral linspace: the first half counts up from the start, the second half
            // down from the end, and the value is truncated.
            UniformRule::OfficialTruncate => {
                let x = if i < count / 2 {
                    i as f64 * step
                } else {
                    end - step * (count - 1 - i) as f64
                };
                x.trunc() as usize
            }
            UniformRule::RoundExact => ((i as f64) * last as f64 / (count - 1) as f64).round() as usize,
        })
        .collect()
}

/// GCG's `get_frames(lst, T)` index table for a folder of M frames, when it defines one.
pub fn official_folder_indices(m: usize, t: usize) -> Option<Vec<usize>> {
    Some(match (m, t) {
        (32, 16) => (0..16).map(|i| 2 * i).collect(),
        (32, 8) => (0..8).map(|i| 4 * i + 2).collect(),
        (32, 4) => vec![4, 12, 20, 28],
        (32, 1) => vec![16],
        (16, 8) => vec![0, 2, 4, 6, 8, 10, 12, 15],
        (16, 4) => vec![2, 6, 10, 14],
        (16, 1) => vec![7],
        (32, 32) | (16, 16) => (0..m).collect(),
        _ => return None,
    })
}

/// Numeric key of `frame_{i}.{jpg,jpeg,png}`.
fn frame_number(name: &str) -> Option<usize> {
    let stem = name.strip_prefix("frame_")?;
    let (num, ext) = stem.rsplit_once('.')?;
    let ext = ext.to_ascii_lowercase();
    if !matches!(ext.as_str(), "jpg" | "jpeg" | "png") {
        return None;
    }
    num.parse().ok()
}

/// The `frame_{i}` image files of a folder as found: (number, path), sorted numerically
/// (`frame_10` after `frame_9`); two files for one number or none at all are errors.
fn scan_frame_files(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading frame folder {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading frame folder {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(i) = frame_number(&name) {
            files.push((i, entry.path()));
        }
    }
    files.sort_by_key(|(i, _)| *i);
    if let Some(w) = files.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!(
            "{}: two files for frame {} ({} and {})",
            dir.display(),
            w[0].0,
            w[0].1.display(),
            w[1].1.display()
        );
    }
    if files.is_empty() {
        bail!("{}: no frame_{{i}}.jpg / .png files in the folder", dir.display());
    }
    Ok(files)
}

/// The first few of `names` and how many there are: `frame_3.jpg, frame_7.jpg` or
/// `frame_3.jpg, frame_4.jpg, frame_5.jpg, frame_6.jpg, frame_7.jpg, … (12 in all)`.
fn few_names(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", … ({} in all)", names.len()));
    }
    s
}

/// A frame folder's files by position: position i is `frame_{i}`, numbered from 0 up to the
/// last file (or to the length of `frames.json`'s timestamps when there is one).
struct FrameFolder {
    /// The file of each position; None where it is missing (only when reading leniently).
    files: Vec<Option<PathBuf>>,
    meta: Option<FramesJson>,
}

impl FrameFolder {
    /// Read `dir` (and its `frames.json`). A gap in the numbering, or files that disagree with
    /// `frames.json`, is an error naming the files when `strict`; otherwise a warning, and the
    /// missing positions stay empty (extra files past `frames.json` are ignored).
    fn read(dir: &Path, strict: bool) -> Result<Self> {
        let found = scan_frame_files(dir)?;
        let meta_path = dir.join("frames.json");
        let meta: Option<FramesJson> = if meta_path.is_file() {
            let text = std::fs::read_to_string(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", meta_path.display()))?)
        } else {
            None
        };
        if let Some(m) = &meta {
            check_folder_times(&meta_path, m)?;
        }
        let len = match &meta {
            Some(m) => m.timestamps.len(),
            None => found.last().map_or(0, |(i, _)| i + 1),
        };
        if len == 0 {
            bail!("{}: no timestamps, but the folder holds frame files", meta_path.display());
        }
        if meta.is_none() && len > 16 * found.len() + 1024 {
            // Not a sequence with gaps (and too long to fill): e.g. frame_0 … frame_9 + frame_99999999.
            bail!(
                "{}: {} frame files numbered up to {}: not one numbered sequence from frame_0",
                dir.display(),
                found.len(),
                found.last().map(|(_, p)| p.display().to_string()).unwrap_or_default()
            );
        }
        // Missing files are named with the folder's own extension.
        let ext = found[0]
            .1
            .extension()
            .map(|e| e.to_string_lossy().to_string())
            .unwrap_or_else(|| "jpg".into());
        let mut files: Vec<Option<PathBuf>> = vec![None; len];
        let mut extra = Vec::new();
        for (i, p) in found {
            match files.get_mut(i) {
                Some(slot) => *slot = Some(p),
                None => extra.push(p),
            }
        }
        let missing: Vec<usize> = (0..len).filter(|&i| files[i].is_none()).collect();
        let missing_names: Vec<String> = missing.iter().map(|i| format!("frame_{i}.{ext}")).collect();
        let extra_names: Vec<String> = extra
            .iter()
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().to_string())
            .collect();
        if missing.len() == len {
            bail!(
                "{}: {len} timestamps for frame_0 … frame_{}, but none of these files is in the folder (it holds {})",
                meta_path.display(),
                len - 1,
                few_names(&extra_names)
            );
        }
        if missing.is_empty() && extra.is_empty() {
            return Ok(Self { files, meta });
        }
        let what = if meta.is_some() {
            let mut parts = Vec::new();
            if !missing.is_empty() {
                parts.push(format!("{} of them missing: {}", missing.len(), few_names(&missing_names)));
            }
            if !extra.is_empty() {
                parts.push(format!("{} extra file(s) past them: {}", extra.len(), few_names(&extra_names)));
            }
            format!(
                "{}: {len} timestamps for frame_0 … frame_{}, but the frame files disagree: {}",
                meta_path.display(),
                len - 1,
                parts.join("; ")
            )
        } else {
            format!(
                "{}: {} of {len} frame files missing from the numbered sequence frame_0 … frame_{}: {}",
                dir.display(),
                missing.len(),
                len - 1,
                few_names(&missing_names)
            )
        };
        if strict {
            let why = if meta.is_some() {
                "the frames and their timestamps would not match"
            } else {
                "the frames after a gap would shift to earlier positions"
            };
            bail!("{what} ({why}; to fill each missing frame with the nearest earlier one instead: lenient reading, `--lenient`)");
        }
        let mut what = what;
        if !missing.is_empty() {
            what.push_str("; each missing frame is filled with the nearest earlier one (the first when none is earlier), the others keep their positions");
        }
        if !extra.is_empty() {
            what.push_str("; the extra files are ignored");
        }
        tracing::warn!("{what}");
        Ok(Self { files, meta })
    }

    /// The position whose file stands in for position `i`: `i` itself, else the nearest earlier
    /// position with a file, else the nearest later one.
    fn source_of(&self, i: usize) -> usize {
        if self.files[i].is_some() {
            return i;
        }
        (0..i)
            .rev()
            .chain(i + 1..self.files.len())
            .find(|&j| self.files[j].is_some())
            .expect("a frame folder has at least one file")
    }
}

/// The `frame_{i}` image files of a folder in order (`frame_10` after `frame_9`), numbered from
/// `frame_0` without gaps (up to the length of `frames.json`'s timestamps when there is one); a
/// gap or a file that disagrees with `frames.json` is an error naming the files.
pub fn list_frame_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(FrameFolder::read(dir, true)?.files.into_iter().flatten().collect())
}

/// Decode a JPEG with libjpeg-turbo's decoder (through `mozjpeg`), with the settings Pillow uses
/// (accurate integer IDCT, "fancy" chroma up-sampling): the pixels equal `Image.open(f).convert("RGB")`.
fn decode_jpeg_like_pil(bytes: &[u8]) -> Result<RgbImage> {
    // libjpeg errors unwind (without the panic hook) through the C code; catch them here.
    let result = std::panic::catch_unwind(|| -> std::io::Result<(usize, usize, Vec<u8>)> {
        let mut d = mozjpeg::Decompress::new_mem(bytes)?;
        d.dct_method(mozjpeg::DctMethod::IntegerSlow);
        d.do_fancy_upsampling(true);
        let mut started = d.rgb()?;
        let (w, h) = (started.width(), started.height());
        let data = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok((w, h, data))
    });
    let (w, h, data) = match result {
        Ok(r) => r?,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()));
            bail!("libjpeg: {}", msg.unwrap_or_else(|| "decoding failed".into()));
        }
    };
    RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| anyhow!("libjpeg returned a buffer of the wrong size for {w}x{h}"))
}

/// Decode one image file as RGB. JPEGs are decoded exactly as PIL (libjpeg-turbo) decodes them;
/// other formats (PNG, ...) through the `image` crate; grey or RGBA become RGB like PIL's
/// `convert('RGB')`.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        // libjpeg only warns about a premature end of data (and pads the image); PIL refuses such
        // files ("image file is truncated"). A complete file has an end-of-image marker after its last
        // start-of-scan marker (scan data cannot contain FF D9: 0xFF bytes are stuffed).
        let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
        let has_eoi = last_sos.is_some_and(|p| bytes[p..].windows(2).any(|w| w == [0xFF, 0xD9]));
        if last_sos.is_some() && !has_eoi {
            bail!("{}: truncated JPEG (no end-of-image marker after the image data)", path.display());
        }
        match decode_jpeg_like_pil(&bytes) {
            Ok(img) => return Ok(img),
            Err(e) => {
                // e.g. CMYK JPEGs, which libjpeg does not convert to RGB: try the image crate.
                if let Ok(img) = image::load_from_memory(&bytes) {
                    return Ok(img.to_rgb8());
                }
                return Err(e.context(format!("decoding JPEG image {}", path.display())));
            }
        }
    }
    let img = image::load_from_memory(&bytes).with_context(|| format!("decoding image {}", path.display()))?;
    Ok(img.to_rgb8())
}

/// The metadata file written next to the frames.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FramesJson {
    pub video: String,
    pub duration: Option<f64>,
    pub fps: Option<f64>,
    pub timestamps: Vec<Option<f64>>,
    #[serde(default)]
    pub indices: Vec<usize>,
    #[serde(default)]
    pub num_source_frames: Option<usize>,
    #[serde(default)]
    pub sampling: Option<Sampling>,
}

/// The times of a frame folder's `frames.json`, checked as the store checks a video's (finite,
/// ≥ 0, non-decreasing, within the duration), with errors naming the file and the frames
/// (`frame_{i}`: the folder's own numbering, not the positions of a sample of them).
fn check_folder_times(path: &Path, m: &FramesJson) -> Result<()> {
    for (name, v) in [("duration", m.duration), ("fps", m.fps)] {
        if let Some(v) = v {
            ensure!(
                v.is_finite() && v > 0.0,
                "{}: {name} {v} is not a finite positive number",
                path.display()
            );
        }
    }
    let tolerance = crate::util::time_tolerance(m.fps);
    let mut last: Option<(usize, f64)> = None;
    for (i, t) in m.timestamps.iter().enumerate() {
        let Some(t) = *t else { continue };
        ensure!(
            t.is_finite() && t >= 0.0,
            "{}: the time of frame_{i} is {t} s (times must be finite and ≥ 0)",
            path.display()
        );
        if let Some((j, u)) = last {
            ensure!(
                t >= u,
                "{}: the frame times decrease: frame_{j} at {u} s, frame_{i} at {t} s",
                path.display()
            );
        }
        if let Some(d) = m.duration {
            ensure!(
                t <= d + tolerance,
                "{}: frame_{i} at {t} s is past the duration {d} s (+ {tolerance} s tolerance)",
                path.display()
            );
        }
        last = Some((i, t));
    }
    Ok(())
}

/// Read T frames from a folder of `frame_{i}` images, numbered from `frame_0`. Timestamps (and
/// duration/fps) come from a `frames.json` in the folder when there is one (as written by
/// [`write_frames`]).
///
/// A gap in the numbering (or files that disagree with `frames.json`) is an error naming the
/// files when `strict`; otherwise each missing frame is filled with the nearest earlier one (a
/// warning names them) and every frame keeps its true position and timestamp.
pub fn read_frame_dir(dir: &Path, t: usize, sampling: Sampling, strict: bool) -> Result<SampledFrames> {
    if t == 0 {
        bail!("{}: asked for 0 frames", dir.display());
    }
    let folder = FrameFolder::read(dir, strict)?;
    let m = folder.files.len();
    let indices = match sampling {
        Sampling::Uniform => sample_indices(m, t, Sampling::Uniform),
        Sampling::Official => match official_folder_indices(m, t) {
            Some(ix) => ix,
            None => {
                tracing::warn!(
                    "{}: GCG's get_frames has no rule for {m} frames → {t}; using uniform sampling",
                    dir.display()
                );
                sample_indices(m, t, Sampling::Uniform)
            }
        },
    };
    let mut distinct = indices.clone();
    distinct.dedup();
    let padded = t - distinct.len();
    if padded > 0 {
        tracing::warn!("{}: only {m} frames for {t} requested; padded by repeating frames", dir.display());
    }
    let mut frames: Vec<Frame> = Vec::with_capacity(t);
    let mut images: std::collections::HashMap<usize, std::sync::Arc<RgbImage>> = std::collections::HashMap::new();
    let mut filled = 0;
    for &i in &indices {
        let source = folder.source_of(i);
        if source != i {
            filled += 1;
        }
        let image = match images.get(&source) {
            Some(img) => img.clone(),
            None => {
                let file = folder.files[source].as_ref().expect("source_of gives a position with a file");
                let img = std::sync::Arc::new(read_image(file)?);
                images.insert(source, img.clone());
                img
            }
        };
        let timestamp = folder.meta.as_ref().and_then(|m| m.timestamps[i]);
        frames.push(Frame {
            index: i,
            image,
            timestamp,
        });
    }
    Ok(SampledFrames {
        source: dir.to_path_buf(),
        frames,
        duration: folder.meta.as_ref().and_then(|m| m.duration),
        fps: folder.meta.as_ref().and_then(|m| m.fps),
        num_source_frames: m,
        padded,
        filled,
        sampling,
    })
}

/// T frames from a video file (decoded with `ffmpeg`) or a frame folder (read strictly, or
/// leniently, as `ffmpeg.strict` says; see [`read_frame_dir`]).
pub fn load_frames(path: &Path, t: usize, sampling: Sampling, ffmpeg: &Ffmpeg) -> Result<SampledFrames> {
    if path.is_dir() {
        read_frame_dir(path, t, sampling, ffmpeg.strict)
    } else if path.exists() {
        ffmpeg.sample(path, t, sampling)
    } else {
        Err(anyhow!("{}: no such video file or frame folder", path.display()))
    }
}

/// Encode RGB as a baseline JPEG of quality 95 with libjpeg-turbo's standard settings (4:2:0,
/// Annex K tables, no optimised Huffman tables): what `cv2.imwrite(f, frame)` in GCG's
/// `extract_frames.py` writes (OpenCV's defaults), and byte-identical to PIL's `save(quality=95)`.
pub fn encode_jpeg_like_opencv(img: &RgbImage) -> Result<Vec<u8>> {
    let (w, h) = img.dimensions();
    let result = std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_fastest_defaults(); // libjpeg-turbo behaviour: no trellis, no progressive scans
        c.set_size(w as usize, h as usize);
        c.set_quality(95.0);
        let mut started = c.start_compress(Vec::new())?;
        started.write_scanlines(img.as_raw())?;
        started.finish()
    });
    match result {
        Ok(r) => Ok(r?),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()));
            bail!("libjpeg: {}", msg.unwrap_or_else(|| "encoding failed".into()))
        }
    }
}

/// Write `frame_{i}.jpg` (JPEG quality 95, see [`encode_jpeg_like_opencv`]) and
/// `frames.json` into `out`, atomically: everything goes to a temporary sibling folder that is
/// renamed into place. An existing `out` is replaced only when `overwrite` is set.
pub fn write_frames(frames: &SampledFrames, out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() && !overwrite {
        bail!(
            "{} already exists (write_frames replaces it only with overwrite = true)",
            out.display()
        );
    }
    crate::util::check_replaceable_dir(out, "frames.json", "a frames folder")?;
    crate::util::write_dir_atomic(out, |tmp| {
        for (i, f) in frames.frames.iter().enumerate() {
            let path = tmp.join(format!("frame_{i}.jpg"));
            let bytes = encode_jpeg_like_opencv(&f.image).with_context(|| format!("encoding {}", path.display()))?;
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        }
        let meta = FramesJson {
            video: frames.source.display().to_string(),
            duration: frames.duration,
            fps: frames.fps,
            timestamps: frames.frames.iter().map(|f| f.timestamp).collect(),
            indices: frames.indices(),
            num_source_frames: Some(frames.num_source_frames),
            sampling: Some(frames.sampling),
        };
        let json = serde_json::to_string_pretty(&meta)?;
        std::fs::write(tmp.join("frames.json"), json).with_context(|| format!("writing {}", tmp.join("frames.json").display()))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_index_rules_differ_where_documented() {
        // 21·34/28 = 25.5 exactly; i·step falls just below it.
        assert_eq!(uniform_indices(35, 29, UniformRule::Round)[21], 25);
        assert_eq!(uniform_indices(35, 29, UniformRule::RoundExact)[21], 26);
        assert_eq!(uniform_indices(32, 4, UniformRule::RoundExact), vec![0, 10, 21, 31]);
        assert_eq!(uniform_indices(5, 3, UniformRule::RoundExact), vec![0, 2, 4]);
        assert_eq!(uniform_indices(9, 1, UniformRule::OfficialTruncate), vec![0]);
        assert!(uniform_indices(9, 0, UniformRule::Round).is_empty());
    }

    #[test]
    fn uniform_is_segment_centres() {
        assert_eq!(sample_indices(32, 4, Sampling::Uniform), vec![4, 12, 20, 28]);
        assert_eq!(sample_indices(10, 10, Sampling::Uniform), (0..10).collect::<Vec<_>>());
        assert_eq!(sample_indices(5, 8, Sampling::Uniform), vec![0, 0, 1, 2, 2, 3, 4, 4]);
        assert_eq!(sample_indices(0, 8, Sampling::Uniform), Vec::<usize>::new());
    }

    #[test]
    fn official_skips_frame_zero() {
        // N = 100, T = 32: k = 99 / 32 = 3 → 1, 4, ..., 94.
        let ix = sample_indices(100, 32, Sampling::Official);
        assert_eq!(ix.len(), 32);
        assert_eq!(ix[0], 1);
        assert_eq!(ix[31], 94);
        // N = 5, T = 8: k = 1 → 1..4, padded.
        assert_eq!(sample_indices(5, 8, Sampling::Official), vec![1, 1, 2, 2, 3, 3, 4, 4]);
        assert_eq!(sample_indices(1, 3, Sampling::Official), vec![0, 0, 0]);
    }

    #[test]
    fn downscaled_pictures_keep_their_aspect_and_their_sharing() {
        let big = std::sync::Arc::new(RgbImage::from_pixel(1280, 720, image::Rgb([200, 10, 10])));
        let tall = std::sync::Arc::new(RgbImage::from_pixel(300, 1000, image::Rgb([0, 0, 0])));
        let small = std::sync::Arc::new(RgbImage::from_pixel(100, 50, image::Rgb([1, 2, 3])));
        let frame = |index, image: &std::sync::Arc<RgbImage>| Frame {
            index,
            image: image.clone(),
            timestamp: Some(index as f64),
        };
        let s = SampledFrames {
            source: PathBuf::from("v.mp4"),
            frames: vec![frame(0, &big), frame(0, &big), frame(1, &tall), frame(2, &small)],
            duration: Some(3.0),
            fps: Some(1.0),
            num_source_frames: 3,
            padded: 1,
            filled: 0,
            sampling: Sampling::Uniform,
        };
        let d = s.downscaled(640);
        let dims: Vec<(u32, u32)> = d.frames.iter().map(|f| f.image.dimensions()).collect();
        assert_eq!(dims, [(640, 360), (640, 360), (192, 640), (100, 50)]);
        assert!(std::sync::Arc::ptr_eq(&d.frames[0].image, &d.frames[1].image));
        assert!(std::sync::Arc::ptr_eq(&d.frames[3].image, &small));
        assert_eq!(d.frames[0].image.get_pixel(320, 180), &image::Rgb([200, 10, 10]));
        assert_eq!(d.indices(), s.indices());
    }

    #[test]
    fn frame_names_sort_numerically() {
        assert_eq!(frame_number("frame_10.jpg"), Some(10));
        assert_eq!(frame_number("frame_2.PNG"), Some(2));
        assert_eq!(frame_number("frames.json"), None);
        assert_eq!(frame_number("frame_x.jpg"), None);
    }
}
