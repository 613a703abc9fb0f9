//! Writing a synthetic world to disk in the published formats.

use super::{frame_captions, render_video, QuestionKind, Split, SynthVideo, World};
use crate::video::{self, Ffmpeg, Frame, SampledFrames, Sampling};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Whether to encode `videos/{video}.mp4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mp4Mode {
    /// When `ffmpeg` (with libx264) runs and the frame size is even; otherwise skip with a warning.
    #[default]
    Auto,
    /// Always; an error when ffmpeg is missing or the frame size is odd.
    Always,
    /// Never (frame folders only).
    Never,
}

#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub mp4: Mp4Mode,
    /// Replace an existing output folder.
    pub overwrite: bool,
    /// Worker threads rendering and encoding videos (0 = all cores).
    pub threads: usize,
    pub ffmpeg: Ffmpeg,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            mp4: Mp4Mode::Auto,
            overwrite: false,
            threads: 0,
            ffmpeg: Ffmpeg::from_env(),
        }
    }
}

/// What [`write_world`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct WriteSummary {
    pub out: PathBuf,
    /// Videos per split (train, val, test).
    pub videos: BTreeMap<String, usize>,
    /// Questions per split.
    pub questions: BTreeMap<String, usize>,
    /// Questions per NExT-QA type code.
    pub types: BTreeMap<String, usize>,
    /// Questions per kind.
    pub kinds: BTreeMap<String, usize>,
    /// Frame images written.
    pub frames: usize,
    /// Whether `videos/*.mp4` were written.
    pub mp4: bool,
    /// Why no mp4 were written in `Auto` mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mp4_skipped: Option<String>,
    /// Lines of `captions.jsonl`.
    pub caption_frames: usize,
}

/// Write a world under `out` (atomically: everything goes to a temporary sibling folder that is
/// renamed into place; an existing `out` is replaced only with `overwrite`):
///
/// * `{train,val,test}.csv` — NExT-QA columns
///   `video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4` (answer = index);
/// * `map_vid_vidorID.json` — video id → mp4 path relative to `out/videos`, without `.mp4`
///   (the video id itself);
/// * `gsub_{train,val,test}.json` — NExT-GQA ground truth
///   `{video: {duration, fps, location: {qid: [[start, end]]}}}` in seconds (every question;
///   the span of its answer event, see the module docs);
/// * `frames/{video}/frame_{i}.jpg` for all frames + `frames.json` (the format of
///   [`video::write_frames`], timestamps `i / fps`);
/// * `videos/{video}.mp4` — H.264 (yuv420p, CRF 16) at `fps`, unless skipped (see [`Mp4Mode`]);
/// * `world.json` — the config and every video's events (frame ranges, spans, positions),
///   distractors and questions;
/// * `captions.jsonl` — one line per captioned frame (every `caption_every`-th):
///   `{"video", "split", "frame", "path" (relative to out), "time", "event" (index or null),
///   "captions": [...]}` (see [`super::frame_captions`]).
///
/// `progress` is called with the number of videos done so far.
pub fn write_world(world: &World, out: &Path, opts: &WriteOptions, progress: &(dyn Fn(usize) + Sync)) -> Result<WriteSummary> {
    let cfg = &world.config;
    cfg.validate()?;
    if out.exists() && !opts.overwrite {
        bail!("{} already exists (WriteOptions::overwrite replaces it)", out.display());
    }
    crate::util::check_replaceable_dir(out, "world.json", "a synthetic world")?;
    let (mp4, mp4_skipped) = decide_mp4(cfg.width, cfg.height, opts)?;

    let (frames, caption_frames) = crate::util::write_dir_atomic(out, |tmp| write_all(world, tmp, mp4, opts, progress))?;

    let mut videos = BTreeMap::new();
    let mut questions = BTreeMap::new();
    for s in Split::ALL {
        videos.insert(s.name().to_string(), world.videos_in(s).count());
        questions.insert(s.name().to_string(), world.videos_in(s).map(|v| v.questions.len()).sum());
    }
    let mut types = BTreeMap::new();
    let mut kinds = BTreeMap::new();
    for q in world.videos.iter().flat_map(|v| &v.questions) {
        *types.entry(q.qtype.clone()).or_insert(0) += 1;
        *kinds.entry(q.kind.name().to_string()).or_insert(0) += 1;
    }
    for k in QuestionKind::ALL {
        kinds.entry(k.name().to_string()).or_insert(0);
    }
    Ok(WriteSummary {
        out: out.to_path_buf(),
        videos,
        questions,
        types,
        kinds,
        frames,
        mp4,
        mp4_skipped,
        caption_frames,
    })
}

fn decide_mp4(width: u32, height: u32, opts: &WriteOptions) -> Result<(bool, Option<String>)> {
    if opts.mp4 == Mp4Mode::Never {
        return Ok((false, None));
    }
    let problem = if width % 2 != 0 || height % 2 != 0 {
        Some(format!("frame size {width}x{height} is odd; H.264 (yuv420p) needs even sides"))
    } else {
        match libx264_available(&opts.ffmpeg) {
            Ok(()) => None,
            Err(e) => Some(format!("{e:#}")),
        }
    };
    match (problem, opts.mp4) {
        (None, _) => Ok((true, None)),
        (Some(p), Mp4Mode::Always) => bail!("cannot write mp4 videos: {p}"),
        (Some(p), _) => {
            tracing::warn!("not writing mp4 videos: {p}");
            Ok((false, Some(p)))
        }
    }
}

fn libx264_available(ff: &Ffmpeg) -> Result<()> {
    ff.check()?;
    let out = Command::new(&ff.ffmpeg)
        .args(["-hide_banner", "-encoders"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{} -encoders`", ff.ffmpeg.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.lines().any(|l| l.split_whitespace().nth(1) == Some("libx264")) {
        bail!("`{}` has no libx264 encoder", ff.ffmpeg.display());
    }
    Ok(())
}

/// Encode RGB frames as H.264 mp4 (one ffmpeg process; frames piped as raw RGB). Settings that
/// make the file a function of the frames: one thread, bit-exact flags, no metadata.
fn encode_mp4(ff: &Ffmpeg, frames: &[image::RgbImage], fps: f64, path: &Path) -> Result<()> {
    let (w, h) = frames
        .first()
        .map(|f| f.dimensions())
        .ok_or_else(|| anyhow!("{}: no frames to encode", path.display()))?;
    let mut child = Command::new(&ff.ffmpeg)
        .args([
            "-nostdin",
            "-hide_banner",
            "-v",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
        ])
        .args(["-s", &format!("{w}x{h}"), "-framerate", &format!("{fps}"), "-i", "pipe:0"])
        .args([
            "-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", "16", "-pix_fmt", "yuv420p", "-threads", "1",
        ])
        .args(["-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1", "-f", "mp4"])
        .arg(crate::video::ffmpeg::file_url(path))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running `{}` to encode {}", ff.ffmpeg.display(), path.display()))?;
    let mut stdin = child.stdin.take().context("ffmpeg stdin pipe")?;
    let mut stderr = child.stderr.take().context("ffmpeg stderr pipe")?;
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).to_string()
    });
    let mut write_result = Ok(());
    for f in frames {
        if let Err(e) = stdin.write_all(f.as_raw()) {
            write_result = Err(e);
            break;
        }
    }
    drop(stdin);
    let status = child.wait().context("waiting for ffmpeg")?;
    let err = err_thread.join().map_err(|_| anyhow!("ffmpeg stderr reader panicked"))?;
    if !status.success() {
        bail!("ffmpeg failed to encode {} ({status}): {}", path.display(), err.trim());
    }
    write_result.with_context(|| format!("piping frames to ffmpeg for {}", path.display()))?;
    Ok(())
}

/// Everything under the temporary folder; returns (frames written, caption lines).
fn write_all(world: &World, dir: &Path, mp4: bool, opts: &WriteOptions, progress: &(dyn Fn(usize) + Sync)) -> Result<(usize, usize)> {
    let cfg = &world.config;
    std::fs::create_dir_all(dir.join("frames"))?;
    if mp4 {
        std::fs::create_dir_all(dir.join("videos"))?;
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        opts.threads
    }
    .clamp(1, world.videos.len().max(1));
    write_videos(world, dir, mp4, opts, threads, progress)?;
    for split in Split::ALL {
        write_split_annotations(world, split, dir)?;
    }
    let map: Map<String, Value> = world.videos.iter().map(|v| (v.id.clone(), Value::String(v.id.clone()))).collect();
    write_file(
        &dir.join("map_vid_vidorID.json"),
        serde_json::to_string(&Value::Object(map))?.as_bytes(),
    )?;
    write_file(&dir.join("world.json"), serde_json::to_string_pretty(world)?.as_bytes())?;
    let lines = write_captions(world, dir)?;
    Ok((world.videos.len() * cfg.frames, lines))
}

/// Renders, encodes and writes every video on `threads` workers (each video is a pure function of
/// its spec); the first error stops the others and is returned.
fn write_videos(
    world: &World,
    dir: &Path,
    mp4: bool,
    opts: &WriteOptions,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(v) = world.videos.get(i) else { break };
                match write_video(world, v, dir, mp4, opts) {
                    Ok(()) => progress(done.fetch_add(1, Ordering::Relaxed) + 1),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        if slot.is_none() {
                            *slot = Some(e.context(format!("video {}", v.id)));
                        }
                        break;
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One video: its rendered frames, `videos/{id}.mp4` (when `mp4`) and the `frames/{id}` folder.
fn write_video(world: &World, v: &SynthVideo, dir: &Path, mp4: bool, opts: &WriteOptions) -> Result<()> {
    let cfg = &world.config;
    let images = render_video(cfg, v);
    if mp4 {
        encode_mp4(&opts.ffmpeg, &images, cfg.fps, &dir.join("videos").join(format!("{}.mp4", v.id)))?;
    }
    let sampled = SampledFrames {
        source: PathBuf::from(&v.id),
        frames: images
            .into_iter()
            .enumerate()
            .map(|(index, image)| Frame {
                index,
                image: image.into(),
                timestamp: Some(cfg.frame_time(index)),
            })
            .collect(),
        duration: Some(cfg.duration()),
        fps: Some(cfg.fps),
        num_source_frames: cfg.frames,
        padded: 0,
        filled: 0,
        sampling: Sampling::Uniform,
    };
    video::write_frames(&sampled, &dir.join("frames").join(&v.id), false)
}

/// A split's annotations: `{split}.csv` (NExT-QA columns) and `gsub_{split}.json` (the grounding spans).
fn write_split_annotations(world: &World, split: Split, dir: &Path) -> Result<()> {
    let cfg = &world.config;
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "video",
        "frame_count",
        "width",
        "height",
        "question",
        "answer",
        "qid",
        "type",
        "a0",
        "a1",
        "a2",
        "a3",
        "a4",
    ])?;
    let mut gsub = Map::new();
    for v in world.videos_in(split) {
        let mut location = Map::new();
        for q in &v.questions {
            let mut row = vec![
                v.id.clone(),
                cfg.frames.to_string(),
                cfg.width.to_string(),
                cfg.height.to_string(),
                q.question.clone(),
                q.answer.to_string(),
                q.qid.to_string(),
                q.qtype.clone(),
            ];
            row.extend(q.options.iter().cloned());
            w.write_record(&row)?;
            location.insert(q.qid.to_string(), json!([[q.span[0], q.span[1]]]));
        }
        gsub.insert(
            v.id.clone(),
            json!({"duration": cfg.duration(), "fps": cfg.fps, "location": Value::Object(location)}),
        );
    }
    let bytes = w.into_inner().map_err(|e| anyhow!("writing the {} CSV: {e}", split.name()))?;
    write_file(&dir.join(format!("{}.csv", split.name())), &bytes)?;
    write_file(
        &dir.join(format!("gsub_{}.json", split.name())),
        serde_json::to_string(&Value::Object(gsub))?.as_bytes(),
    )
}

/// `captions.jsonl`: one line per captioned frame (every `caption_every`-th); returns the line count.
fn write_captions(world: &World, dir: &Path) -> Result<usize> {
    let cfg = &world.config;
    let mut captions = String::new();
    let mut lines = 0;
    for v in &world.videos {
        for i in (0..cfg.frames).step_by(cfg.caption_every) {
            let line = json!({
                "video": v.id,
                "split": v.split.name(),
                "frame": i,
                "path": format!("frames/{}/frame_{i}.jpg", v.id),
                "time": cfg.frame_time(i),
                "event": v.event_at(i),
                "captions": frame_captions(v, i),
            });
            captions.push_str(&serde_json::to_string(&line)?);
            captions.push('\n');
            lines += 1;
        }
    }
    write_file(&dir.join("captions.jsonl"), captions.as_bytes())?;
    Ok(lines)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
