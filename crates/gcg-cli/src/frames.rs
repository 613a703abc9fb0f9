//! `gcg frames`: sample T frames from a video (or a frame folder) and write them as
//! `frame_{i}.jpg` + `frames.json`; `gcg bench decode`: decoding and pre-processing speed.

use anyhow::{bail, Context, Result};
use clap::Args;
use gcg::video::{self, preprocess, Ffmpeg, Sampling};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct FramesArgs {
    /// Video file (anything ffmpeg reads) or a folder of frame_{i}.jpg|png.
    #[arg(long)]
    video: PathBuf,
    /// Frames to sample (T).
    #[arg(long, default_value_t = 32)]
    num_frames: usize,
    /// Output folder (written atomically: a temporary folder renamed into place).
    #[arg(long)]
    out: PathBuf,
    /// uniform (centres of T equal segments) | official (GCG's extract_frames.py rule).
    #[arg(long, default_value = "uniform")]
    sampling: Sampling,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
    /// Accept truncated/corrupt videos (use the frames that decode) instead of failing.
    #[arg(long)]
    lenient: bool,
    /// Count frames by decoding instead of trusting the container.
    #[arg(long)]
    exact_count: bool,
    /// ffmpeg decoder threads (default: ffmpeg's choice).
    #[arg(long)]
    threads: Option<usize>,
}

fn ffmpeg_from(threads: Option<usize>, lenient: bool, exact_count: bool) -> Ffmpeg {
    Ffmpeg {
        threads,
        strict: !lenient,
        exact_count,
        ..Ffmpeg::from_env()
    }
}

pub fn run_frames(a: FramesArgs) -> Result<()> {
    let ff = ffmpeg_from(a.threads, a.lenient, a.exact_count);
    let t0 = Instant::now();
    let frames = video::load_frames(&a.video, a.num_frames, a.sampling, &ff)?;
    video::write_frames(&frames, &a.out, a.force)?;
    let summary = json!({
        "video": a.video.display().to_string(),
        "out": a.out.display().to_string(),
        "frames": frames.frames.len(),
        "source_frames": frames.num_source_frames,
        "padded": frames.padded,
        "duration": frames.duration,
        "fps": frames.fps,
        "indices": frames.indices(),
        "timestamps": frames.frames.iter().map(|f| f.timestamp).collect::<Vec<_>>(),
        "seconds": t0.elapsed().as_secs_f64(),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

#[derive(Args)]
pub struct DecodeBenchArgs {
    /// Video to decode.
    #[arg(long, conflicts_with = "synthetic", required_unless_present = "synthetic")]
    video: Option<PathBuf>,
    /// Generate a test video with ffmpeg's testsrc2 (H.264, B-frames) in a temporary folder.
    #[arg(long)]
    synthetic: bool,
    /// Synthetic video: WIDTHxHEIGHT.
    #[arg(long, default_value = "640x360")]
    size: String,
    /// Synthetic video: seconds.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Synthetic video: frames per second.
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Synthetic video: key frame interval (GOP) in frames.
    #[arg(long, default_value_t = 250)]
    gop: u32,
    /// Frames sampled per video (T).
    #[arg(long, default_value_t = 32)]
    num_frames: usize,
    #[arg(long, default_value = "uniform")]
    sampling: Sampling,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Also time the seek-per-frame strategy (one ffmpeg process per frame).
    #[arg(long)]
    seek: bool,
    /// ffmpeg decoder threads (default: ffmpeg's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// Threads for the CLIP pre-processing.
    #[arg(long, default_value_t = 1)]
    preprocess_threads: usize,
}

fn make_synthetic(dir: &Path, a: &DecodeBenchArgs, ff: &Ffmpeg) -> Result<PathBuf> {
    let (w, h) = a
        .size
        .split_once('x')
        .with_context(|| format!("--size {:?}: expected WIDTHxHEIGHT", a.size))?;
    let (w, h): (u32, u32) = (w.parse()?, h.parse()?);
    let path = dir.join("synthetic.mp4");
    let src = format!("testsrc2=size={w}x{h}:rate={}:duration={}", a.fps, a.seconds);
    let out = std::process::Command::new(&ff.ffmpeg)
        .args(["-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", &src])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-bf",
            "3",
            "-g",
            &a.gop.to_string(),
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&path)
        .output()
        .with_context(|| format!("running {} (install ffmpeg: apt-get install ffmpeg)", ff.ffmpeg.display()))?;
    if !out.status.success() {
        bail!(
            "ffmpeg could not make the synthetic video: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(path)
}

pub fn run_bench_decode(a: DecodeBenchArgs) -> Result<()> {
    let ff = ffmpeg_from(a.threads, false, false);
    let version = ff.check()?;
    let tmp = tempfile::tempdir().context("creating a temporary folder")?;
    let path = match (&a.video, a.synthetic) {
        (Some(p), _) => p.clone(),
        (None, true) => make_synthetic(tmp.path(), &a, &ff)?,
        (None, false) => bail!("give --video PATH or --synthetic"),
    };
    let iters = a.iters.max(1);

    let t = Instant::now();
    let info = ff.probe(&path)?;
    let probe_s = t.elapsed().as_secs_f64();

    // One ffmpeg process with a select filter (what load_frames uses); warm-up first.
    let mut sampled = ff.sample(&path, a.num_frames, a.sampling)?;
    let t = Instant::now();
    for _ in 0..iters {
        sampled = ff.sample(&path, a.num_frames, a.sampling)?;
    }
    let select_s = t.elapsed().as_secs_f64() / iters as f64;

    let seek = if a.seek {
        let ts: Vec<f64> = sampled.frames.iter().map(|f| f.timestamp.unwrap_or(0.0)).collect();
        let t = Instant::now();
        let got = ff.decode_seek(&path, &ts)?;
        let s = t.elapsed().as_secs_f64();
        // Do both strategies return the same pictures?
        let same = got
            .iter()
            .zip(&sampled.frames)
            .filter(|((img, _), f)| img.as_raw() == f.image.as_raw())
            .count();
        Some(json!({"seconds_per_video": s, "frames_per_s": ts.len() as f64 / s, "identical_frames": same, "of": ts.len()}))
    } else {
        None
    };

    let images = sampled.images();
    let dev = candle_core::Device::Cpu;
    preprocess::clip_batch(&images, a.preprocess_threads, &dev)?;
    let t = Instant::now();
    for _ in 0..iters {
        preprocess::clip_batch(&images, a.preprocess_threads, &dev)?;
    }
    let pre_s = t.elapsed().as_secs_f64() / iters as f64;

    let report = json!({
        "ffmpeg": version,
        "video": if a.synthetic { format!("synthetic testsrc2 {} {}s {}fps gop {}", a.size, a.seconds, a.fps, a.gop) } else { path.display().to_string() },
        "codec": info.codec,
        "size": [info.width, info.height],
        "source_frames": info.num_frames,
        "count_source": info.count_source,
        "duration": info.duration,
        "fps": info.fps,
        "num_frames": a.num_frames,
        "sampling": a.sampling.to_string(),
        "probe_seconds": probe_s,
        "select": {
            "seconds_per_video": select_s,
            "sampled_frames_per_s": a.num_frames as f64 / select_s,
            "decoded_frames_per_s": info.num_frames as f64 / select_s,
        },
        "seek": seek,
        "preprocess": {
            "threads": a.preprocess_threads,
            "seconds_per_video": pre_s,
            "frames_per_s": images.len() as f64 / pre_s,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
