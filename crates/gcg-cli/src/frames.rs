//! `gcg frames`: sample T frames from a video (or a frame folder) and write them as
//! `frame_{i}.jpg` + `frames.json`.

use anyhow::{Context, Result};
use clap::Args;
use gcg::video::{self, Ffmpeg, Sampling};
use serde_json::json;
use std::path::PathBuf;
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
    /// Frame sampling: uniform (centres of T equal segments) | official (GCG's extract_frames.py rule).
    #[arg(long, default_value = "uniform")]
    sampling: Sampling,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
    /// Use the decodable part of truncated or corrupt videos instead of failing them, and fill
    /// the gaps of a frame folder (a missing frame_{i}) with the nearest earlier frame.
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
    crate::args::check_not_an_input("--out", &a.out, &[("--video", Some(&a.video))])?;
    crate::args::check_out(&a.out, a.force)?;
    gcg::util::check_replaceable_dir(&a.out, "frames.json", "a frames folder")?;
    let ff = ffmpeg_from(a.threads, a.lenient, a.exact_count);
    let t0 = Instant::now();
    let frames = video::load_frames(&a.video, a.num_frames, a.sampling, &ff)?;
    // The times a feature store would refuse (a frame folder's own frames.json can hold any) are
    // refused here, naming the input, not later by `gcg features`.
    let times: Vec<f64> = frames.frames.iter().filter_map(|f| f.timestamp).collect();
    gcg::store::check_times(&times, frames.duration, frames.fps).with_context(|| format!("{}: the frame times", a.video.display()))?;
    video::write_frames(&frames, &a.out, a.force)?;
    let summary = json!({
        "video": a.video.display().to_string(),
        "out": a.out.display().to_string(),
        "frames": frames.frames.len(),
        "source_frames": frames.num_source_frames,
        "padded": frames.padded,
        "filled": frames.filled,
        "duration": frames.duration,
        "fps": frames.fps,
        "indices": frames.indices(),
        "timestamps": frames.frames.iter().map(|f| f.timestamp).collect::<Vec<_>>(),
        "seconds": t0.elapsed().as_secs_f64(),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
