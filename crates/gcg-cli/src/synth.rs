//! `gcg synth`: write a synthetic grounded VideoQA world (see `gcg::synth`).

use crate::args::{check_out, progress_bar, FrameSize};
use anyhow::{Context, Result};
use clap::Args;
use gcg::synth::{self, Mp4Mode, QuestionKind, SynthConfig, World, WriteOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder (written atomically: a temporary folder renamed into place).
    #[arg(long)]
    out: PathBuf,
    /// A config file (JSON or TOML with the fields of SynthConfig); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Random seed (same seed and config → byte-identical files). [default: 0]
    #[arg(long)]
    seed: Option<u64>,
    /// Number of videos (all splits). [default: 200]
    #[arg(long)]
    videos: Option<usize>,
    /// Frames per video. [default: 64]
    #[arg(long)]
    frames: Option<usize>,
    /// Frames per second. [default: 8]
    #[arg(long)]
    fps: Option<f64>,
    /// Frame size: N or WxH. [default: 64]
    #[arg(long)]
    size: Option<FrameSize>,
    /// Events per video. [default: 2]
    #[arg(long)]
    events: Option<usize>,
    /// Event length in frames: N or MIN-MAX. [default: 6-8]
    #[arg(long, value_parser = parse_range)]
    event_frames: Option<[usize; 2]>,
    /// Minimum number of event-free frames between two events. [default: 4]
    #[arg(long)]
    event_gap: Option<usize>,
    /// Event shape size in pixels. [default: 20]
    #[arg(long)]
    event_size: Option<u32>,
    /// How far an event's shape drifts (pixels) while visible. [default: 4]
    #[arg(long)]
    event_motion: Option<f64>,
    /// Moving grey circles per video. [default: 3]
    #[arg(long)]
    distractors: Option<usize>,
    /// Questions per video. [default: 4]
    #[arg(long)]
    questions: Option<usize>,
    /// Question kinds, comma-separated: color | shape | location | after | before. [default: all]
    #[arg(long, value_delimiter = ',')]
    kinds: Option<Vec<QuestionKind>>,
    /// Share of videos in the validation split. [default: 0.15]
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Share of videos in the test split. [default: 0.15]
    #[arg(long)]
    test_fraction: Option<f64>,
    /// Caption every n-th frame in captions.jsonl. [default: 1]
    #[arg(long)]
    caption_every: Option<usize>,
    /// Do not write videos/*.mp4 (frame folders only).
    #[arg(long, conflicts_with = "mp4")]
    no_mp4: bool,
    /// Require videos/*.mp4 (fail without ffmpeg); by default they are written when ffmpeg runs.
    #[arg(long)]
    mp4: bool,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the config (JSON) that the flags give and exit.
    #[arg(long)]
    print_config: bool,
}

/// `--event-frames`: `N` or `MIN-MAX`.
fn parse_range(s: &str) -> Result<[usize; 2]> {
    let parse = |x: &str| {
        x.trim()
            .parse::<usize>()
            .with_context(|| format!("`{s}`: expected N or MIN-MAX frames"))
    };
    Ok(match s.split_once('-') {
        Some((a, b)) => [parse(a)?, parse(b)?],
        None => {
            let n = parse(s)?;
            [n, n]
        }
    })
}

fn read_config(path: &Path) -> Result<SynthConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    if is_toml {
        toml::from_str(&text).with_context(|| format!("parsing {} as a synth config (TOML)", path.display()))
    } else {
        serde_json::from_str(&text).with_context(|| format!("parsing {} as a synth config (JSON)", path.display()))
    }
}

fn config_from(a: &SynthArgs) -> Result<SynthConfig> {
    let mut c = match &a.config {
        Some(p) => read_config(p)?,
        None => SynthConfig::default(),
    };
    if let Some(x) = a.seed {
        c.seed = x;
    }
    if let Some(x) = a.videos {
        c.videos = x;
    }
    if let Some(x) = a.frames {
        c.frames = x;
    }
    if let Some(x) = a.fps {
        c.fps = x;
    }
    if let Some(size) = a.size {
        (c.width, c.height) = (size.width, size.height);
    }
    if let Some(x) = a.events {
        c.events = x;
    }
    if let Some(range) = a.event_frames {
        c.event_frames = range;
    }
    if let Some(x) = a.event_gap {
        c.event_gap = x;
    }
    if let Some(x) = a.event_size {
        c.event_size = x;
    }
    if let Some(x) = a.event_motion {
        c.event_motion = x;
    }
    if let Some(x) = a.distractors {
        c.distractors = x;
    }
    if let Some(x) = a.questions {
        c.questions_per_video = x;
    }
    if let Some(kinds) = &a.kinds {
        c.kinds = kinds.clone();
    }
    if let Some(x) = a.val_fraction {
        c.val_fraction = x;
    }
    if let Some(x) = a.test_fraction {
        c.test_fraction = x;
    }
    if let Some(x) = a.caption_every {
        c.caption_every = x;
    }
    c.validate()?;
    Ok(c)
}

pub fn run(a: SynthArgs) -> Result<()> {
    let cfg = config_from(&a)?;
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    check_out(&a.out, a.force)?;
    gcg::util::check_replaceable_dir(&a.out, "world.json", "a synthetic world")?;
    let t0 = Instant::now();
    let world = World::generate(&cfg)?;
    let opts = WriteOptions {
        mp4: if a.no_mp4 {
            Mp4Mode::Never
        } else if a.mp4 {
            Mp4Mode::Always
        } else {
            Mp4Mode::Auto
        },
        overwrite: a.force,
        threads: a.threads,
        ..WriteOptions::default()
    };
    let bar = progress_bar(cfg.videos as u64, false);
    bar.set_prefix("synth");
    bar.set_message("videos");
    let summary = synth::write_world(&world, &a.out, &opts, &|n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    let (t, k) = (32, 4);
    let out = json!({
        "out": summary.out.display().to_string(),
        "seed": cfg.seed,
        "videos": summary.videos,
        "questions": summary.questions,
        "types": summary.types,
        "kinds": summary.kinds,
        "frames_per_video": cfg.frames,
        "fps": cfg.fps,
        "size": [cfg.width, cfg.height],
        "frames": summary.frames,
        "mp4": summary.mp4,
        "mp4_skipped": summary.mp4_skipped,
        "caption_frames": summary.caption_frames,
        "uniform_hit_rate": {"t": t, "k": k, "rate": synth::uniform_hit_rate(&world, t, k)},
        "seconds": t0.elapsed().as_secs_f64(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
