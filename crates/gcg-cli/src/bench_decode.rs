//! `gcg bench decode`: video decoding (ffmpeg, T sampled frames) and CLIP pre-processing
//! throughput, as JSON.

use crate::args::FrameSize;
use anyhow::{bail, Context, Result};
use clap::Args;
use gcg::video::{preprocess, Ffmpeg, Sampling};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct DecodeArgs {
    /// Video to decode.
    #[arg(long, conflicts_with = "synthetic", required_unless_present = "synthetic")]
    video: Option<PathBuf>,
    /// Generate a test video with ffmpeg's testsrc2 (H.264, B-frames) in a temporary folder.
    #[arg(long)]
    synthetic: bool,
    /// Synthetic video: frame size, N or WxH.
    #[arg(long, default_value = "640x360")]
    size: FrameSize,
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
    /// Frame sampling: uniform (centres of T equal segments) | official (GCG's extract_frames.py rule).
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

fn make_synthetic(dir: &Path, a: &DecodeArgs, ff: &Ffmpeg) -> Result<PathBuf> {
    let (w, h) = (a.size.width, a.size.height);
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

pub fn run(a: DecodeArgs) -> Result<()> {
    let ff = Ffmpeg {
        threads: a.threads,
        strict: true,
        exact_count: false,
        ..Ffmpeg::from_env()
    };
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
        let got = ff.decode_seek(&info, &ts)?;
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
