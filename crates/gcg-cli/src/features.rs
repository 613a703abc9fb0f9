//! `gcg features`: videos → frozen ViT features and CLIP frame embeddings in a feature store.
//!
//! Test hooks (environment variables, for simulating a kill):
//! * `GCG_FEATURES_ABORT_AFTER=N` aborts the process (no clean-up, like `kill -9`) once N videos
//!   have been computed in this run, whether or not their shard was written yet;
//! * `GCG_STORE_FAULT=point:N[:abort|error]` crashes the store writer (see `store_args.rs`).

use crate::args::{progress_bar, RandomWeightsArgs};
use crate::store_args::{finish_report, writer_options};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use gcg::features::extract::{
    decoded_frames, extract_features, safetensors_frames, ExtractOptions, ExtractProgress, FeatureModels, FrameSource, VideoFrames,
    VideoJob,
};
use gcg::features::{frozen, provenance};
use gcg::models::Preset;
use gcg::run::{DeviceKind, Precision};
use gcg::store::WriterOptions;
use gcg::video::{Ffmpeg, Sampling};
use gcg::weights::hub::{self, Need};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct FeaturesArgs {
    /// The videos: a directory (every video file or frame folder in it; the id is the name without
    /// extension) or a text file with one video per line (`path` or `id<TAB>path`; relative to the
    /// list's folder). Videos are decoded with ffmpeg; frame folders hold `frame_{i}.jpg|png`
    /// (the official `frames_32/{video}`); `.safetensors` files hold pre-decoded frames
    /// (`pixel_values` [T, 3, S, S], CLIP pre-processed; optional `timestamps`, `duration`, `fps`).
    #[arg(long, required_unless_present = "import_h5")]
    videos: Option<PathBuf>,
    /// The feature store directory (created when missing).
    #[arg(long)]
    store: PathBuf,
    /// Frames sampled per video (T).
    #[arg(long, default_value_t = 32)]
    num_frames: usize,
    /// The ViT weights: an HF InstructBLIP snapshot or a GCG release directory (eva_vit_g.pth), or
    /// a Hugging Face model id (`Salesforce/instructblip-flan-t5-xl`, `WHB139426/GCG`) resolved
    /// through the HF cache (missing files downloaded unless HF_HUB_OFFLINE=1).
    #[arg(long, required_unless_present_any = ["random_weights", "import_h5"])]
    weights: Option<PathBuf>,
    /// The GCG CLIP branch files (eva_clip_*.pth): a directory or a model id (`WHB139426/GCG`);
    /// default: --weights.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// Network sizes: tiny | instructblip-flan-t5-xl (EVA ViT-g + EVA-CLIP-g).
    #[arg(long, default_value = "instructblip-flan-t5-xl")]
    preset: Preset,
    #[command(flatten)]
    random: RandomWeightsArgs,
    /// Decoding threads.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Frame sampling: uniform (centres of T equal segments) | official (GCG's extract_frames.py rule).
    #[arg(long, default_value = "uniform")]
    sampling: Sampling,
    /// Use the decodable part of truncated or corrupt videos instead of failing them, and fill
    /// the gaps of a frame folder (a missing frame_{i}) with the nearest earlier frame.
    #[arg(long)]
    lenient: bool,
    /// Where to run: cpu | cuda (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    /// Compute dtype: f32 | bf16 | f16 (default: f32 on cpu, f16 on cuda as the official
    /// extraction's autocast).
    #[arg(long)]
    dtype: Option<Precision>,
    /// Frames per ViT forward pass.
    #[arg(long, default_value_t = 32)]
    frame_batch: usize,
    /// Shard size in MiB (a shard is written when this much is buffered).
    #[arg(long, default_value_t = 512.0)]
    shard_mb: f64,
    /// Write buffered videos at least this often (seconds), bounding the work a kill loses
    /// (Ctrl-C or SIGTERM stops after the video being encoded and writes what is done).
    #[arg(long, default_value_t = 120.0)]
    flush_secs: f64,
    /// Recompute videos already in the store.
    #[arg(long)]
    overwrite: bool,
    /// Store only the CLIP frame embeddings and frame times, not the ViT features (T × 257 ×
    /// 1408 f16 = 23 MB a video at T = 32 for EVA ViT-g): train with `[data] online_vit = true`,
    /// which decodes the frames again and runs the ViT in the loop.
    #[arg(long, conflicts_with = "import_h5")]
    embeddings_only: bool,
    /// NExT-QA's map_vid_vidorID.json (video id → file path without extension): a file whose
    /// name is a path's last part is stored under that path's id (the ids the annotations use).
    /// In NExT-QA's release the two are the same; a `--videos` folder is walked down into its
    /// folders (`NExTVideo/<folder>/<id>.mp4`) either way.
    #[arg(long)]
    id_map: Option<PathBuf>,
    /// Import the official feature file (`feats_wo_norm_32.h5`, datasets `{video}_frame_{i}`)
    /// instead of computing features (needs a build with `--features hdf5`).
    #[arg(long)]
    import_h5: Option<PathBuf>,
    /// With --import-h5: NExT-GQA's frame2time_*.json ({video: [seconds, ...]}) for the frame times.
    #[arg(long)]
    frame2time: Option<PathBuf>,
    /// With --import-h5: NExT-GQA's gsub_*.json ({video: {duration, fps, ...}}) for duration and fps.
    #[arg(long)]
    gsub: Option<PathBuf>,
}

/// A flag that SIGINT (Ctrl-C) or SIGTERM sets: `gcg features` then stops after the video being
/// encoded and writes the videos done so far, which the buffering (`--flush-secs`) would
/// otherwise lose. The handler puts the default action back, so a second signal ends the
/// process at once.
fn stop_on_signals() -> &'static std::sync::atomic::AtomicBool {
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    extern "C" fn on_signal(sig: libc::c_int) {
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: signal() is async-signal-safe; SIG_DFL is a valid handler.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic and calls signal(), both async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }
    &STOP
}

/// Videos of a directory or a list file.
pub fn video_jobs(spec: &Path, id_map: Option<&Path>) -> Result<Vec<VideoJob>> {
    let mut jobs = Vec::new();
    if spec.is_dir() {
        dir_jobs(spec, &mut jobs)?;
    } else {
        let text = std::fs::read_to_string(spec).with_context(|| format!("reading the video list {}", spec.display()))?;
        let base = spec.parent().unwrap_or(Path::new("."));
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, path) = match line.split_once('\t') {
                Some((id, p)) => (Some(id.trim().to_string()), p.trim()),
                None => (None, line),
            };
            let path = base.join(path);
            let id = match id {
                Some(id) if !id.is_empty() => id,
                Some(_) => bail!("{} line {}: empty video id", spec.display(), i + 1),
                None => (if path.is_dir() { path.file_name() } else { path.file_stem() })
                    .map(|s| s.to_string_lossy().to_string())
                    .ok_or_else(|| anyhow!("{} line {}: {} has no file name", spec.display(), i + 1, path.display()))?,
            };
            jobs.push(VideoJob { id, path });
        }
    }
    if let Some(map) = id_map {
        let text = std::fs::read_to_string(map).with_context(|| format!("reading {}", map.display()))?;
        let m: HashMap<String, String> =
            serde_json::from_str(&text).with_context(|| format!("{} should map video ids to paths", map.display()))?;
        let by_stem: HashMap<String, String> = m
            .into_iter()
            .map(|(id, p)| (Path::new(&p).file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or(p), id))
            .collect();
        for j in &mut jobs {
            if let Some(id) = by_stem.get(&j.id) {
                j.id = id.clone();
            }
        }
    }
    ensure!(!jobs.is_empty(), "no videos found in {}", spec.display());
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for j in &jobs {
        if let Some(first) = seen.insert(&j.id, &j.path) {
            bail!(
                "{}: two videos have the id {}: {} and {} (the store keeps one video per id)",
                spec.display(),
                j.id,
                first.display(),
                j.path.display()
            );
        }
    }
    Ok(jobs)
}

/// The videos under a directory, in name order: its files (id: the file stem) and frame
/// folders (a folder holding `frame_{i}.jpg` / `.png` files; id: the folder's name), and those
/// of its other folders, walked down (NExT-QA's release keeps `NExTVideo/<folder>/<id>.mp4`).
/// A folder holding neither files nor folders is listed as a frame folder, whose reading then
/// says what it lacks. Hidden entries are skipped, and so are feature stores (a folder with
/// `index.json` or `shards/`: `--store` may lie inside the video folder) and files of kinds that
/// are never videos (annotations, lists, archives, documents; see [`NOT_VIDEOS`]), with a note.
fn dir_jobs(dir: &Path, jobs: &mut Vec<VideoJob>) -> Result<()> {
    let mut skipped = Vec::new();
    walk_videos(dir, jobs, &mut skipped)?;
    if !skipped.is_empty() {
        let shown: Vec<String> = skipped.iter().take(5).map(|p| p.display().to_string()).collect();
        tracing::warn!(
            "{}: skipped {} entries that are no videos (feature stores, {} files): {}{}",
            dir.display(),
            skipped.len(),
            NOT_VIDEOS.join("/"),
            shown.join(", "),
            if skipped.len() > 5 { ", …" } else { "" }
        );
    }
    Ok(())
}

/// Extensions of files a video folder may hold beside its videos (lower case).
const NOT_VIDEOS: [&str; 20] = [
    "txt", "md", "json", "jsonl", "csv", "tsv", "pkl", "pickle", "h5", "hdf5", "log", "toml", "yaml", "yml", "py", "sh", "zip", "tar",
    "gz", "pdf",
];

fn walk_videos(dir: &Path, jobs: &mut Vec<VideoJob>, skipped: &mut Vec<PathBuf>) -> Result<()> {
    let list = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(d)
            .with_context(|| format!("listing {}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        paths.sort();
        Ok(paths)
    };
    let is_frame = |p: &Path| {
        let name = p.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        name.starts_with("frame_") && [".jpg", ".jpeg", ".png"].iter().any(|e| name.ends_with(e))
    };
    for p in list(dir)? {
        if p.is_dir() {
            if p.join("index.json").is_file() || p.join("shards").is_dir() {
                skipped.push(p);
                continue;
            }
            let inner = list(&p)?;
            if !inner.is_empty() && !inner.iter().any(|q| is_frame(q)) {
                walk_videos(&p, jobs, skipped)?;
                continue;
            }
        } else if p
            .extension()
            .is_some_and(|e| NOT_VIDEOS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
        {
            skipped.push(p);
            continue;
        }
        let id = if p.is_dir() { p.file_name() } else { p.file_stem() };
        let id = id
            .map(|s| s.to_string_lossy().to_string())
            .ok_or_else(|| anyhow!("{} has no file name", p.display()))?;
        jobs.push(VideoJob { id, path: p });
    }
    Ok(())
}

/// Pre-processed frames of one video: pre-decoded `.safetensors` frame files as they are,
/// videos and frame folders through the decoder and the CLIP pre-processing.
struct Frames {
    ffmpeg: Ffmpeg,
    sampling: Sampling,
    image_size: usize,
}

impl FrameSource for Frames {
    fn frames(&self, job: &VideoJob, num_frames: usize) -> Result<VideoFrames> {
        if job.path.is_file() && job.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
            safetensors_frames(job, num_frames)
        } else {
            decoded_frames(job, num_frames, self.sampling, &self.ffmpeg, self.image_size)
        }
    }
}

fn abort_after() -> Result<Option<usize>> {
    match std::env::var("GCG_FEATURES_ABORT_AFTER") {
        Ok(s) if !s.is_empty() => Ok(Some(s.parse().with_context(|| format!("GCG_FEATURES_ABORT_AFTER={s:?}"))?)),
        _ => Ok(None),
    }
}

fn compute_dtype(asked: Option<Precision>, dev: &Device) -> DType {
    match asked {
        None if dev.is_cuda() => DType::F16,
        other => Precision::resolve(other, dev),
    }
}

pub fn run(a: FeaturesArgs) -> Result<()> {
    let dev = a.device.open()?;
    let dtype = compute_dtype(a.dtype, &dev);
    let (vit_cfg, clip_cfg) = frozen::preset(a.preset);
    let writer = writer_options(a.shard_mb, a.flush_secs)?;

    // The CLIP branch's files (a directory, or a model id resolved through the HF cache).
    let clip_dir = if a.random.random_weights {
        None
    } else {
        let spec = a
            .clip
            .clone()
            .or_else(|| a.weights.clone())
            .ok_or_else(|| anyhow!("--clip (the GCG eva_clip_*.pth files) is needed without --random-weights"))?;
        Some(hub::locate(&spec, Need::ClipBranch)?)
    };
    let clip = match &clip_dir {
        None => frozen::random_clip_image(&clip_cfg, &dev, dtype, a.random.seed)?,
        Some(dir) => frozen::load_clip_image(dir, &clip_cfg, &dev, dtype)?,
    };

    let seed = a.random.random_weights.then_some(a.random.seed);
    if let Some(h5) = &a.import_h5 {
        let clip_models = match (seed, clip_dir.as_deref()) {
            (Some(_), _) => provenance::image_models(a.preset, seed, None, None)?,
            (None, Some(dir)) => format!("clip image {}", provenance::files_fingerprint(&provenance::clip_image_files(dir)?)?),
            (None, None) => bail!("--clip is needed without --random-weights"),
        };
        return import_h5(&a, h5, &clip, writer, clip_models);
    }

    let videos = a.videos.as_ref().ok_or_else(|| anyhow!("--videos is required"))?;
    let jobs = video_jobs(videos, a.id_map.as_deref())?;
    let vit_dir = if a.random.random_weights {
        None
    } else {
        let spec = a
            .weights
            .as_ref()
            .ok_or_else(|| anyhow!("--weights is needed without --random-weights"))?;
        Some(hub::locate(spec, Need::Vit)?)
    };
    let vit = match &vit_dir {
        None => frozen::random_vit(&vit_cfg, &dev, dtype, a.random.seed)?,
        Some(dir) => frozen::load_vit(dir, &vit_cfg, &dev, dtype)?,
    };
    let models = FeatureModels {
        vit: &vit,
        clip: &clip,
        frame_batch: a.frame_batch,
    };
    let models_id = provenance::image_models(a.preset, seed, vit_dir.as_deref(), clip_dir.as_deref())?;
    let opts = ExtractOptions {
        num_frames: a.num_frames,
        jobs: a.jobs,
        overwrite: a.overwrite,
        writer,
        extractor: Some(provenance::extractor(a.sampling.to_string(), models_id).with_precision(provenance::precision(dtype, &dev))),
        embeddings_only: a.embeddings_only,
        interrupted: Some(stop_on_signals()),
    };
    let abort = abort_after()?;
    let pb = progress_bar(0, false);
    pb.set_prefix("features");
    let mut done = 0usize;
    let source = Frames {
        ffmpeg: Ffmpeg {
            strict: !a.lenient,
            ..Ffmpeg::from_env()
        },
        sampling: a.sampling,
        image_size: vit.config.image_size,
    };
    let report = extract_features(&a.store, &jobs, &source, &models, &opts, &mut |ev| match ev {
        ExtractProgress::Start { total, skipped } => {
            pb.set_length((total - skipped) as u64);
            if skipped > 0 {
                pb.println(format!("{skipped} of {total} videos are already in the store"));
            }
        }
        ExtractProgress::Done { video, .. } => {
            pb.inc(1);
            pb.set_message(video.to_string());
            done += 1;
            if abort == Some(done) {
                eprintln!("GCG_FEATURES_ABORT_AFTER={done}: aborting");
                std::process::abort();
            }
        }
        ExtractProgress::Failed { video, error } => {
            pb.inc(1);
            pb.println(format!("failed: {video}: {error}"));
        }
    })?;
    pb.finish_and_clear();
    let e = report.encoding;
    if e.frames > 0 {
        let gflop = vit.config.flops_per_frame() as f64 * e.frames as f64 / 1e9;
        eprintln!(
            "ViT: {} frames in {:.1} s ({:.2} frames/s, {:.0} GFLOP/s); CLIP branch: {:.1} s",
            e.frames,
            e.vit_seconds,
            e.frames as f64 / e.vit_seconds,
            gflop / e.vit_seconds,
            e.clip_seconds
        );
    }
    finish_report(report.done, report.skipped, &report.failed, 0, "videos")
}

#[cfg(not(feature = "hdf5"))]
fn import_h5(
    _a: &FeaturesArgs,
    h5: &Path,
    _clip: &gcg::models::clip_branch::ClipImageHead,
    _w: WriterOptions,
    _clip_models: String,
) -> Result<()> {
    bail!(
        "--import-h5 {}: this gcg was built without HDF5 support (rebuild with `--features hdf5`, which needs libhdf5-dev)",
        h5.display()
    )
}

#[cfg(feature = "hdf5")]
fn import_h5(
    a: &FeaturesArgs,
    h5: &Path,
    clip: &gcg::models::clip_branch::ClipImageHead,
    writer: WriterOptions,
    clip_models: String,
) -> Result<()> {
    use gcg::features::h5import::{import_official_h5, ImportOptions, VideoTimes};
    let times = VideoTimes::from_files(a.frame2time.as_deref(), a.gsub.as_deref())?;
    let pb = progress_bar(0, false);
    pb.set_prefix("import-h5");
    let report = import_official_h5(
        h5,
        &a.store,
        clip,
        &times,
        &ImportOptions {
            num_frames: a.num_frames,
            overwrite: a.overwrite,
            writer,
            clip_models: Some(clip_models),
        },
        &mut |ev| match ev {
            ExtractProgress::Start { total, skipped } => pb.set_length((total - skipped) as u64),
            ExtractProgress::Done { video, .. } => {
                pb.inc(1);
                pb.set_message(video.to_string());
            }
            ExtractProgress::Failed { video, error } => {
                pb.inc(1);
                pb.println(format!("failed: {video}: {error}"));
            }
        },
    )?;
    pb.finish_and_clear();
    finish_report(report.done, report.skipped, &report.failed, 0, "videos")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--videos DIR` in NExT-QA's release layout (`NExTVideo/<folder>/<id>.mp4`): the folders
    /// are walked down, frame folders stay videos, hidden entries are skipped, `--id-map` renames
    /// by the map's last path part, and two videos of one id are an error naming both.
    #[test]
    fn a_video_folder_is_walked_down_to_its_videos_and_frame_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("NExTVideo");
        let touch = |rel: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"").unwrap();
        };
        for rel in [
            "0101/2909445186.mp4",
            "0102/3006489447.mp4",
            "extra.mkv",
            "frames_v/frame_0.jpg",
            "frames_v/frame_1.jpg",
            ".hidden/x.mp4",
            // Not videos: annotations beside the videos, a feature store inside the folder.
            "val.csv",
            "README.TXT",
            "store/index.json",
            "store/shards/videos-1.safetensors",
            "store2/shards/videos-1.safetensors",
        ] {
            touch(rel);
        }
        std::fs::create_dir_all(root.join("empty")).unwrap();
        let ids = |jobs: &[VideoJob]| {
            jobs.iter()
                .map(|j| (j.id.clone(), j.path.strip_prefix(&root).unwrap().to_path_buf()))
                .collect::<Vec<_>>()
        };
        let jobs = video_jobs(&root, None).unwrap();
        let want = [
            ("2909445186", "0101/2909445186.mp4"),
            ("3006489447", "0102/3006489447.mp4"),
            ("empty", "empty"),
            ("extra", "extra.mkv"),
            ("frames_v", "frames_v"),
        ]
        .map(|(i, p)| (i.to_string(), PathBuf::from(p)));
        assert_eq!(ids(&jobs), want);
        // The release's map: id → "<folder>/<id>" (here one id renamed, to see the map applied).
        let map = tmp.path().join("map.json");
        std::fs::write(&map, r#"{"v1": "0101/2909445186", "3006489447": "0102/3006489447"}"#).unwrap();
        let jobs = video_jobs(&root, Some(&map)).unwrap();
        assert_eq!(jobs[0].id, "v1");
        assert_eq!(jobs[1].id, "3006489447");
        touch("0103/2909445186.mp4");
        let e = format!("{:#}", video_jobs(&root, None).unwrap_err());
        assert!(e.contains("2909445186") && e.contains("0101") && e.contains("0103"), "{e}");
    }
}
