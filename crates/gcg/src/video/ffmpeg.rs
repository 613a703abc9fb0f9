//! Video decoding through the `ffmpeg` / `ffprobe` command-line tools (subprocesses).
//!
//! * [`Ffmpeg::probe`]: `ffprobe -show_streams -show_format` (JSON) → the video stream a player
//!   shows (the default one, never a cover picture), its size, fps, start and length, and the
//!   container's frame count (`nb_frames`), or a packet count (demuxing only) when the container
//!   has none (WebM/Matroska) or one that disagrees with duration × fps.
//! * [`Ffmpeg::decode_indices`]: ONE ffmpeg process per video; a `select` filter keeps the wanted
//!   frame numbers (counted in presentation order after decoding), `showinfo` reports their
//!   timestamps, and the frames come back as PPM images over a pipe (the PPM header carries the
//!   size, so rotated streams need no guessing). ffmpeg's final statistics
//!   (`-v verbose`) give the number of frames actually decoded, which checks the container's
//!   claim in the same pass. The `select` expression sums runs of consecutive frame numbers as a
//!   balanced tree (ffmpeg refuses a flat sum of more than 100 terms), so any T takes one pass up
//!   to [`MAX_SELECT_TERMS`] runs, and one more per further batch (measured on 2 cores: T = 800 of
//!   900 frames at 320×240 in 0.8 s; seeking takes ~0.1 s per frame).
//! * [`Ffmpeg::decode_seek`]: one process per frame with an input seek — kept for comparison
//!   (`gcg bench decode`); it is slower for typical GOP lengths.
//!
//! Timestamps are the frames' presentation times in seconds from the start of the file (ffmpeg's
//! default time shift, with the file's audio mapped too so that MPEG-TS counts from the file's
//! start as well), computed from the integer pts and the filter time base. The video's duration
//! is the container's unless that ends before its last frame (decoded for its time); a Matroska
//! stream's DURATION tag that ends after the file's own duration is stale and not used. AVI keeps
//! no presentation times: its frames are at its packets' times (one chunk per frame tick), read
//! by `ffprobe -show_entries packet=dts_time`, which also give its frame count and rate (the
//! decoder's times lag by its reordering delay). Files are named to ffmpeg as `file:` URLs of
//! their absolute paths ([`file_url`]), and its log is read by its lines' own prefixes, never by
//! text a file's metadata could imitate.

use super::{Frame, SampledFrames, Sampling};
use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// How the frame count of a video was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountSource {
    /// The container's `nb_frames` (consistent with duration × fps).
    Container,
    /// Number of video packets (demuxed, not decoded).
    Packets,
    /// Frames actually decoded.
    Decoded,
}

/// What `ffprobe` says about the video stream of a file that a player shows (see
/// [`Ffmpeg::probe`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VideoInfo {
    pub path: PathBuf,
    /// The stream's index in the file (`-map 0:{stream}`).
    #[serde(default)]
    pub stream: usize,
    /// The file's audio streams that carry audio (a sample rate), by index. Decoding maps them
    /// as well, copied to nothing: an MPEG-TS file's times then start where the file starts, as
    /// in a player, and not where its video starts.
    #[serde(default)]
    pub audio_streams: Vec<usize>,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    /// Average frame rate (`avg_frame_rate`, else `r_frame_rate`); None when unknown.
    pub fps: Option<f64>,
    /// `r_frame_rate`: the rate at which every frame's time falls on a tick (for a variable frame
    /// rate, its highest rate); None when unknown.
    #[serde(default)]
    pub tick_rate: Option<f64>,
    /// The stream's own length in seconds (stream, else container); None when unknown.
    pub duration: Option<f64>,
    /// Seconds from the file's start (where the frames' times count from) to the stream's start:
    /// a video that begins after its audio (0 when they begin together).
    #[serde(default)]
    pub start: f64,
    /// The container's frame count (`nb_frames`), when it has one.
    pub container_frames: Option<usize>,
    /// The frame count used for sampling.
    pub num_frames: usize,
    pub count_source: CountSource,
    /// AVI only: each video packet's time (its decoding time: AVI stores one chunk per frame
    /// tick and no presentation times), in file order, from the file's start. The n-th frame
    /// in presentation order is shown at the n-th of them; the decoder's own times for such a
    /// file lag by its reordering delay (B-frames: +0.2 s for two at 10 fps). Empty otherwise.
    #[serde(skip)]
    pub packet_times: Vec<f64>,
}

/// Frames decoded by [`Ffmpeg::decode_indices`], in increasing frame order.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// `(frame index, image, timestamp in seconds)` for each requested index that exists.
    pub frames: Vec<(usize, RgbImage, Option<f64>)>,
    /// Frames the decoder produced in total (from ffmpeg's final statistics), when reported.
    pub total_decoded: Option<usize>,
    /// Error-level lines ffmpeg printed (demuxer/decoder problems), without the process failing.
    pub error_lines: Vec<String>,
}

/// The `ffmpeg` and `ffprobe` executables and decoding options.
#[derive(Debug, Clone)]
pub struct Ffmpeg {
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
    /// Decoder threads (`-threads`); None lets ffmpeg choose.
    pub threads: Option<usize>,
    /// Refuse videos that decode to fewer frames than the container promises while ffmpeg
    /// reports errors (truncated or corrupt files). With `false` the decodable part is used.
    pub strict: bool,
    /// Always count frames by decoding (slow, exact) instead of trusting the container.
    pub exact_count: bool,
}

impl Default for Ffmpeg {
    fn default() -> Self {
        Self::from_env()
    }
}

const INSTALL_HINT: &str = "install FFmpeg (Debian/Ubuntu: `apt-get install ffmpeg`; Fedora: `dnf install ffmpeg`; \
macOS: `brew install ffmpeg`; conda: `conda install -c conda-forge ffmpeg`) or point GCG_FFMPEG / GCG_FFPROBE at the executables";

/// A file's path as ffmpeg and ffprobe must read it: `file:` and the absolute path. Given as is,
/// a name is parsed as a URL or an option first: `file:y.mp4` opens y.mp4, `a:b.mp4` and
/// `2024-01-01T10:22:33.mp4` are unknown protocols, `-x.mp4` is an option.
pub fn file_url(path: &Path) -> std::ffi::OsString {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut url = std::ffi::OsString::from("file:");
    url.push(abs.as_os_str());
    url
}

/// Keep the last `n` lines of a tool's stderr (for error messages).
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

fn is_error_line(line: &str) -> bool {
    matches!(log_line(line).0, Some("error" | "fatal" | "panic"))
}

/// A line of ffmpeg's log (`-loglevel level+…`) as its level tag and its text: the leading
/// `[name @ 0x…]` context tags (FFmpeg 6.1+ also `[in#0/mov,… @ 0x…]`) and the `[level]` tag
/// come off. Text from a file (its metadata, echoed in the input's description) is never a tag.
fn log_line(line: &str) -> (Option<&str>, &str) {
    let mut rest = line;
    while let Some(tag) = rest.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        if tag.0.contains(" @ ") {
            rest = tag.1;
            continue;
        }
        let level = matches!(
            tag.0,
            "quiet" | "panic" | "fatal" | "error" | "warning" | "info" | "verbose" | "debug" | "trace"
        );
        if level {
            return (Some(tag.0), tag.1);
        }
        break;
    }
    (None, rest)
}

/// Parse `"30000/1001"` or `"25"`; None for `0/0`, zero or garbage.
fn parse_rate(s: &str) -> Option<f64> {
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let (a, b): (f64, f64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            if b == 0.0 {
                return None;
            }
            a / b
        }
        None => s.trim().parse().ok()?,
    };
    (v.is_finite() && v > 0.0).then_some(v)
}

/// Parse `"12.345"` or `"00:01:02.5"` (Matroska's DURATION tag) as seconds.
fn parse_seconds(s: &str) -> Option<f64> {
    let s = s.trim();
    let v = if s.contains(':') {
        let mut total = 0.0;
        for part in s.split(':') {
            total = total * 60.0 + part.parse::<f64>().ok()?;
        }
        total
    } else {
        s.parse().ok()?
    };
    (v.is_finite() && v > 0.0).then_some(v)
}

/// A count from ffprobe's `csv=p=0` output. Some containers list the stream again under its
/// program (MPEG-TS: `"100\n\n100"`): every line that holds a value must hold the same one.
fn csv_count(out: &str) -> Result<usize> {
    let values: Vec<&str> = out
        .lines()
        .map(|l| l.trim().trim_end_matches(','))
        .filter(|l| !l.is_empty())
        .collect();
    let first = values.first().ok_or_else(|| anyhow!("no value"))?;
    let n: usize = first.parse().with_context(|| format!("{first:?} is not a count"))?;
    if values.iter().any(|v| v != first) {
        bail!("the values {values:?} differ");
    }
    Ok(n)
}

fn json_str<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

impl Ffmpeg {
    /// `ffmpeg`/`ffprobe` from `$GCG_FFMPEG`/`$GCG_FFPROBE` or the `PATH`; strict, container counts.
    pub fn from_env() -> Self {
        let get = |var: &str, default: &str| std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(default));
        Self {
            ffmpeg: get("GCG_FFMPEG", "ffmpeg"),
            ffprobe: get("GCG_FFPROBE", "ffprobe"),
            threads: None,
            strict: true,
            exact_count: false,
        }
    }

    fn spawn_error(&self, tool: &Path, e: std::io::Error) -> anyhow::Error {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("`{}` was not found: {INSTALL_HINT}", tool.display())
        } else {
            anyhow!("cannot run `{}`: {e}", tool.display())
        }
    }

    /// Check that both tools run; returns ffmpeg's version line.
    pub fn check(&self) -> Result<String> {
        let mut version = String::new();
        for tool in [&self.ffmpeg, &self.ffprobe] {
            let out = Command::new(tool)
                .arg("-version")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| self.spawn_error(tool, e))?;
            if !out.status.success() {
                bail!("`{} -version` failed ({}): {INSTALL_HINT}", tool.display(), out.status);
            }
            if version.is_empty() {
                version = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string();
            }
        }
        Ok(version)
    }

    /// Run ffprobe with `args` followed by the file; stdout on success, a descriptive error naming
    /// the file (with ffprobe's stderr tail) otherwise.
    fn ffprobe_run(&self, path: &Path, args: &[&str]) -> Result<(String, String)> {
        let out = Command::new(&self.ffprobe)
            .args(["-v", "error", "-hide_banner"])
            .args(args)
            .arg(file_url(path))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(&self.ffprobe, e))?;
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success() {
            if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
                bail!("{}: not a readable video: the file is empty (0 bytes)", path.display());
            }
            // MP4/MOV keep their index (the moov atom) at the end unless made for streaming: a
            // file cut short has none.
            let hint = if stderr.contains("moov atom not found") {
                " — an MP4/MOV file without its index (moov atom): cut short, e.g. an unfinished download, copy or \
                 recording"
            } else {
                ""
            };
            bail!(
                "{}: not a readable video (ffprobe {}): {}{hint}",
                path.display(),
                out.status,
                tail(&stderr, 8).trim_end()
            );
        }
        Ok((String::from_utf8_lossy(&out.stdout).to_string(), stderr))
    }

    /// Probe a video file: size, fps, duration and a frame count (see [`CountSource`]).
    pub fn probe(&self, path: &Path) -> Result<VideoInfo> {
        if !path.is_file() {
            bail!("{}: no such video file", path.display());
        }
        let (stdout, stderr) = self.ffprobe_run(path, &["-of", "json", "-show_streams", "-show_format"])?;
        let v: serde_json::Value =
            serde_json::from_str(&stdout).with_context(|| format!("{}: cannot parse ffprobe's JSON output", path.display()))?;
        let streams: &[serde_json::Value] = v.get("streams").and_then(|s| s.as_array()).map_or(&[], |s| s.as_slice());
        let kind = |s: &serde_json::Value| json_str(s, "codec_type").unwrap_or_default().to_string();
        let flag = |s: &serde_json::Value, name: &str| s.get("disposition").and_then(|d| d.get(name)).and_then(|x| x.as_i64()) == Some(1);
        // The stream a player shows: a video stream that is not a cover picture, the one marked
        // default if any, else the first.
        let videos: Vec<&serde_json::Value> = streams.iter().filter(|s| kind(s) == "video" && !flag(s, "attached_pic")).collect();
        let covers = streams.iter().filter(|s| kind(s) == "video").count() - videos.len();
        // An audio stream listed without audio (MPEG-TS announces tracks it may never fill)
        // has no sample rate; ffmpeg refuses to copy it.
        let audio_streams: Vec<usize> = streams
            .iter()
            .filter(|s| kind(s) == "audio" && json_str(s, "sample_rate").and_then(|r| r.parse::<u32>().ok()).unwrap_or(0) > 0)
            .filter_map(|s| s.get("index").and_then(|i| i.as_u64()).map(|i| i as usize))
            .collect();
        let chosen = videos.iter().find(|s| flag(s, "default")).or(videos.first()).copied();
        let stream = chosen.ok_or_else(|| {
            let said = tail(&stderr, 4);
            let said = if said.trim().is_empty() {
                String::new()
            } else {
                format!(" (ffprobe: {})", said.trim())
            };
            let has_audio = v
                .get("format")
                .and_then(|f| f.get("nb_streams"))
                .and_then(|n| n.as_u64())
                .unwrap_or(0)
                > 0;
            let what = if covers > 0 {
                "it has no video stream, only a cover picture (audio only?)"
            } else if has_audio {
                "it has no video stream (audio only?)"
            } else {
                "no video stream found"
            };
            anyhow!("{}: {what}{said}", path.display())
        })?;
        let index = stream.get("index").and_then(|x| x.as_u64()).unwrap_or(0) as usize;
        let codec = json_str(stream, "codec_name").unwrap_or("unknown").to_string();
        let width = stream.get("width").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
        let height = stream.get("height").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
        if width == 0 || height == 0 {
            bail!(
                "{}: video stream ({codec}) has no picture size; not a decodable video",
                path.display()
            );
        }
        let tick_rate = json_str(stream, "r_frame_rate").and_then(parse_rate);
        let fps = json_str(stream, "avg_frame_rate").and_then(parse_rate).or(tick_rate);
        let tag_duration = stream.get("tags").and_then(|t| t.as_object()).and_then(|t| {
            t.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("duration"))
                .and_then(|(_, v)| v.as_str())
                .and_then(parse_seconds)
        });
        // Matroska / WebM give no stream duration; their DURATION tag and the format's duration
        // are the end time, which counts a start offset (the frames' times are from the start).
        let format = v.get("format");
        let matroska = format
            .and_then(|f| json_str(f, "format_name"))
            .is_some_and(|n| n.contains("matroska"));
        // Start times may be 0 or negative (parse_seconds takes lengths: > 0).
        let start_time = |v: &serde_json::Value| {
            json_str(v, "start_time")
                .and_then(|t| t.trim().parse::<f64>().ok())
                .filter(|t| t.is_finite())
        };
        let stream_start = start_time(stream);
        let format_start = format.and_then(start_time);
        // Where a Matroska end time counts from (its length is the end less this).
        let end_counts_from = stream_start.or(format_start).filter(|&t| matroska && t > 0.0);
        let format_end = format.and_then(|f| json_str(f, "duration")).and_then(parse_seconds);
        // A stream ends within its segment: a DURATION tag past the segment's end is stale (kept
        // from a longer source by a tool that cut the file, or edited) and the segment's is used.
        let tag_duration = match (tag_duration, format_end) {
            (Some(tag), Some(seg)) if matroska && tag > seg * 1.01 + 0.05 => {
                tracing::warn!(
                    "{}: the video stream's DURATION tag ({tag:.2} s) ends after its file ({seg:.2} s); using the file's",
                    path.display()
                );
                Some(seg)
            }
            (tag, _) => tag,
        };
        let duration = json_str(stream, "duration").and_then(parse_seconds).or_else(|| {
            let end = tag_duration.or(format_end)?;
            Some(match end_counts_from {
                Some(t) if end > t => end - t,
                _ => end,
            })
        });
        let offset = match (stream_start, format_start) {
            (Some(s), Some(f)) if s > f => s - f,
            _ => 0.0,
        };
        let container_frames = json_str(stream, "nb_frames")
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0);
        let avi = format
            .and_then(|f| json_str(f, "format_name"))
            .is_some_and(|n| n.split(',').any(|n| n == "avi"));
        let packet_times = if avi {
            self.packet_times(path, index)?
                .into_iter()
                .map(|t| t - format_start.unwrap_or(0.0))
                .collect()
        } else {
            Vec::new()
        };
        // An AVI's header rate can count ticks that hold no frame (ffmpeg writes an H.264 stream
        // with B-frames copied from MP4 at twice its rate, and twice the frames): its packets'
        // times give the rate of its frames.
        let fps = match (fps, packet_rate(&packet_times)) {
            (Some(f), Some(p)) if (f - p).abs() > 0.01 * p => {
                tracing::info!(
                    "{}: the AVI header's frame rate {f:.3} disagrees with its {} packets' ({p:.3}); using the packets'",
                    path.display(),
                    packet_times.len()
                );
                Some(p)
            }
            (None, p) => p,
            (f, _) => f,
        };
        let expected = match (duration, fps) {
            (Some(d), Some(f)) => Some(d * f),
            _ => None,
        };
        let plausible = |n: usize| match expected {
            Some(e) => (n as f64 - e).abs() <= (0.02 * e).max(2.0),
            None => true,
        };
        let (num_frames, count_source) = if self.exact_count {
            (self.count_decoded(path, index)?, CountSource::Decoded)
        } else if !packet_times.is_empty() {
            (packet_times.len(), CountSource::Packets)
        } else {
            match container_frames {
                Some(n) if plausible(n) => (n, CountSource::Container),
                _ => {
                    if let Some(n) = container_frames {
                        // Common for a variable frame rate, whose average rate is not frames
                        // over duration; the decoding checks the count in any case.
                        tracing::info!(
                            "{}: container says {n} frames but duration × fps = {:.1}; counting packets",
                            path.display(),
                            expected.unwrap_or(f64::NAN)
                        );
                    }
                    (self.count_packets(path, index)?, CountSource::Packets)
                }
            }
        };
        if num_frames == 0 {
            bail!("{}: the video stream has no frames", path.display());
        }
        Ok(VideoInfo {
            path: path.to_path_buf(),
            stream: index,
            audio_streams,
            codec,
            width,
            height,
            fps,
            tick_rate,
            duration,
            start: offset,
            container_frames,
            num_frames,
            count_source,
            packet_times,
        })
    }

    /// The times of stream `stream`'s packets in seconds (file order; demuxing only). Empty when
    /// a packet has no time.
    pub fn packet_times(&self, path: &Path, stream: usize) -> Result<Vec<f64>> {
        let (out, _) = self.ffprobe_run(
            path,
            &[
                "-select_streams",
                &stream.to_string(),
                "-show_entries",
                "packet=dts_time",
                "-of",
                "csv=p=0",
            ],
        )?;
        let times: Option<Vec<f64>> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| l.trim_end_matches(',').parse::<f64>().ok().filter(|t| t.is_finite()))
            .collect();
        Ok(times.unwrap_or_default())
    }

    /// Number of packets of stream `stream` (demuxing only; equals the frame count for common
    /// codecs).
    pub fn count_packets(&self, path: &Path, stream: usize) -> Result<usize> {
        let (out, _) = self.ffprobe_run(
            path,
            &[
                "-count_packets",
                "-select_streams",
                &stream.to_string(),
                "-show_entries",
                "stream=nb_read_packets",
                "-of",
                "csv=p=0",
            ],
        )?;
        csv_count(&out).with_context(|| format!("{}: cannot read ffprobe's packet count from {:?}", path.display(), out.trim()))
    }

    /// Number of frames by decoding the whole stream (exact, slower). Fails on decoder errors
    /// when `strict` is set and the count falls short of the container's claim.
    pub fn count_decoded(&self, path: &Path, stream: usize) -> Result<usize> {
        let (out, _) = self.ffprobe_run(
            path,
            &[
                "-count_frames",
                "-select_streams",
                &stream.to_string(),
                "-show_entries",
                "stream=nb_read_frames",
                "-of",
                "csv=p=0",
            ],
        )?;
        csv_count(&out).with_context(|| format!("{}: cannot read ffprobe's frame count from {:?}", path.display(), out.trim()))
    }

    /// The option that passes frames through without rate conversion: `-fps_mode` from FFmpeg
    /// 5.1 on (where `-vsync` is deprecated), `-vsync` before. Cached per executable.
    fn passthrough_option(&self) -> &'static str {
        static CACHE: OnceLock<Mutex<HashMap<PathBuf, &'static str>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(v) = cache.lock().ok().and_then(|c| c.get(&self.ffmpeg).copied()) {
            return v;
        }
        let version = Command::new(&self.ffmpeg)
            .arg("-version")
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_string())
            .unwrap_or_default();
        let opt = if has_fps_mode(&version) { "-fps_mode" } else { "-vsync" };
        if let Ok(mut c) = cache.lock() {
            c.insert(self.ffmpeg.clone(), opt);
        }
        opt
    }

    /// Output options: frames passed through unchanged (no duplication/dropping to a constant
    /// rate), as RGB PPM images on stdout.
    fn ppm_output(&self, cmd: &mut Command) {
        cmd.args([self.passthrough_option(), "passthrough"]);
        cmd.args(["-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24", "pipe:1"]);
    }

    /// A second output that copies the file's audio to nothing. ffmpeg counts time from the
    /// first packet it reads of the streams it maps; with the video alone, an MPEG-TS (or -PS)
    /// file whose audio starts first would have its frames' times counted from the video's start
    /// (2 s early for video 2 s after the audio), where a player counts from the file's start.
    fn audio_alongside(&self, info: &VideoInfo, cmd: &mut Command) {
        for i in &info.audio_streams {
            cmd.args(["-map", &format!("0:{i}")]);
        }
        cmd.args(["-c:a", "copy", "-vn", "-sn", "-dn", "-f", "null", "-"]);
    }

    fn base_command(&self) -> Command {
        let mut cmd = Command::new(&self.ffmpeg);
        cmd.args(["-nostdin", "-hide_banner", "-nostats", "-loglevel", "level+verbose"]);
        if let Some(t) = self.threads {
            cmd.args(["-threads", &t.to_string()]);
        }
        cmd
    }

    /// Decode the frames with the given indices (presentation order, 0-based): one ffmpeg process
    /// for up to [`MAX_SELECT_TERMS`] runs of consecutive indices (any T in practice), one more
    /// per further such batch. Indices past the end of the stream are simply absent from the
    /// result.
    pub fn decode_indices(&self, info: &VideoInfo, indices: &[usize]) -> Result<Decoded> {
        let wanted = unique(indices);
        if wanted.is_empty() {
            bail!("decode_indices: no frame indices requested for {}", info.path.display());
        }
        let mut out: Option<Decoded> = None;
        for batch in index_runs(&wanted).chunks(MAX_SELECT_TERMS) {
            let part = self.decode_runs(info, batch)?;
            match &mut out {
                None => out = Some(part),
                // Every pass decodes the whole stream: its count and errors are the first pass's.
                Some(d) => d.frames.extend(part.frames),
            }
        }
        Ok(out.expect("at least one batch of indices"))
    }

    /// One ffmpeg process that keeps the frames of `runs` (sorted, disjoint, inclusive ranges).
    fn decode_runs(&self, video: &VideoInfo, runs: &[(usize, usize)]) -> Result<Decoded> {
        let info = video;
        let path = info.path.as_path();
        let wanted: Vec<usize> = runs.iter().flat_map(|&(a, b)| a..=b).collect();
        let filter = format!("select='{}',showinfo", select_expr(runs));
        let command = |audio: bool| {
            let mut cmd = self.base_command();
            cmd.arg("-i").arg(file_url(path));
            cmd.args(["-map", &format!("0:{}", info.stream), "-an", "-sn", "-dn", "-vf", &filter]);
            self.ppm_output(&mut cmd);
            if audio {
                self.audio_alongside(info, &mut cmd);
            }
            cmd
        };
        let audio = !info.audio_streams.is_empty();
        let (mut images, mut stderr, mut status) = self.run_ppm(command(audio))?;
        if !status.success() && audio {
            // Audio that cannot even be copied must not cost the video: read it alone (for
            // MPEG-TS its times may then count from the video's start). A video that fails
            // alone too is reported by that run's errors.
            let errors: Vec<String> = stderr.lines().filter(|l| is_error_line(l)).map(String::from).collect();
            (images, stderr, status) = self.run_ppm(command(false))?;
            if status.success() {
                tracing::warn!(
                    "{}: ffmpeg failed with the file's audio mapped beside the video; read the video alone ({})",
                    path.display(),
                    tail(&errors.join("\n"), 3)
                );
            }
        }
        if !status.success() {
            bail!(
                "{}: ffmpeg could not decode the video ({status}): {}",
                path.display(),
                tail(&filter_log(&stderr), 10)
            );
        }
        let info = parse_showinfo(&stderr);
        if info.len() != images.len() {
            bail!(
                "{}: ffmpeg returned {} frames but reported {} timestamps",
                path.display(),
                images.len(),
                info.len()
            );
        }
        if images.len() > wanted.len() {
            bail!(
                "{}: ffmpeg returned {} frames for {} requested indices",
                path.display(),
                images.len(),
                wanted.len()
            );
        }
        let total_decoded = parse_total_decoded(&stderr);
        // An AVI's frames are shown at its packets' times, when every packet decoded to a frame.
        let packet_times =
            (!video.packet_times.is_empty() && total_decoded == Some(video.packet_times.len())).then_some(video.packet_times.as_slice());
        let frames = wanted
            .iter()
            .zip(images)
            .zip(info)
            .map(|((&i, img), ts)| (i, img, packet_times.map_or(ts, |p| p.get(i).copied().or(ts))))
            .collect();
        Ok(Decoded {
            frames,
            total_decoded,
            error_lines: stderr.lines().filter(|l| is_error_line(l)).map(String::from).collect(),
        })
    }

    /// Decode one frame at each timestamp by seeking (one ffmpeg process per frame; the frame
    /// shown at `t`, i.e. the first with pts ≥ t). For comparison with [`Ffmpeg::decode_indices`].
    pub fn decode_seek(&self, info: &VideoInfo, timestamps: &[f64]) -> Result<Vec<(RgbImage, Option<f64>)>> {
        let path = info.path.as_path();
        let mut out = Vec::with_capacity(timestamps.len());
        for &t in timestamps {
            let mut cmd = self.base_command();
            cmd.args(["-ss", &format!("{:.6}", t.max(0.0))]).arg("-i").arg(file_url(path));
            let map = format!("0:{}", info.stream);
            cmd.args(["-map", &map, "-an", "-sn", "-dn", "-frames:v", "1", "-vf", "showinfo"]);
            self.ppm_output(&mut cmd);
            let (mut images, stderr, status) = self.run_ppm(cmd)?;
            if !status.success() || images.is_empty() {
                bail!(
                    "{}: ffmpeg could not decode a frame at {t:.3}s ({status}): {}",
                    path.display(),
                    tail(&filter_log(&stderr), 10)
                );
            }
            // With an input seek, showinfo's times are relative to the seek point.
            let ts = parse_showinfo(&stderr).first().copied().flatten().map(|r| r + t);
            out.push((images.swap_remove(0), ts));
        }
        Ok(out)
    }

    /// Run an ffmpeg command whose stdout is a PPM stream; returns the images, stderr and status.
    fn run_ppm(&self, mut cmd: Command) -> Result<(Vec<RgbImage>, String, std::process::ExitStatus)> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(&self.ffmpeg, e))?;
        let mut stderr_pipe = child.stderr.take().context("ffmpeg stderr pipe")?;
        let err_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr_pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).to_string()
        });
        let stdout = child.stdout.take().context("ffmpeg stdout pipe")?;
        let mut reader = BufReader::with_capacity(1 << 20, stdout);
        let mut images = Vec::new();
        let read_result = (|| -> Result<()> {
            while let Some(img) = read_ppm(&mut reader)? {
                images.push(img);
            }
            Ok(())
        })();
        if read_result.is_err() {
            let _ = child.kill();
        }
        let status = child.wait().context("waiting for ffmpeg")?;
        let stderr = err_thread.join().map_err(|_| anyhow!("ffmpeg stderr reader panicked"))?;
        read_result.with_context(|| format!("reading ffmpeg's frames: {}", tail(&filter_log(&stderr), 6)))?;
        Ok((images, stderr, status))
    }

    /// Probe, sample `t` frames with `sampling` and decode them (see the module docs). The
    /// container's frame count is checked against the decoder's in the same pass; when they differ
    /// the indices are recomputed from the real count and decoded again. Fewer frames than `t`
    /// are padded by repetition (with a warning).
    ///
    /// A video that decodes to fewer frames than its container promises, with decoder errors
    /// (truncated or corrupt), is an error naming both counts and durations when `strict`, also
    /// when the count came from decoding (`exact_count`); otherwise the decodable part is used and
    /// the duration is that of the decoded frames.
    pub fn sample(&self, path: &Path, t: usize, sampling: Sampling) -> Result<SampledFrames> {
        if t == 0 {
            bail!("{}: asked for 0 frames", path.display());
        }
        let mut info = self.probe(path)?;
        // What the container promises: its frame count, or duration × fps; with a count from
        // decoding (`exact_count`) the probe's number is already the decoder's.
        let by_duration = match (info.duration, info.fps) {
            (Some(d), Some(f)) => Some((d * f).round() as usize),
            _ => None,
        };
        let promised = match info.count_source {
            CountSource::Decoded => info.container_frames.or(by_duration),
            _ => Some(info.num_frames),
        };
        // One frame's length at the higher of the average and the tick rate (a variable rate's
        // average would make the last frame long).
        let rate = info.fps.into_iter().chain(info.tick_rate).fold(0.0, f64::max);
        let frame_len = if rate > 0.0 { 1.0 / rate } else { 0.0 };
        let stated_end = info.duration.map(|d| info.start + d);
        let mut truncated = false;
        let mut indices = super::sample_indices(info.num_frames, t, sampling);
        // The sampled frames and the last one, whose time gives the video's end.
        let with_last = |indices: &[usize], n: usize| {
            let mut all = indices.to_vec();
            all.push(n.saturating_sub(1));
            unique(&all)
        };
        let read = with_last(&indices, info.num_frames);
        let mut decoded = self.decode_indices(&info, &read)?;
        let mut total = decoded.total_decoded;
        if total.is_none() && info.count_source == CountSource::Decoded {
            total = Some(info.num_frames);
        }
        if total.is_none() && decoded.frames.len() < read.len() {
            // This ffmpeg does not print decode statistics: count by decoding.
            total = Some(self.count_decoded(path, info.stream)?);
        }
        if let Some(n) = total {
            if n == 0 {
                bail!(
                    "{}: no frame could be decoded: {}",
                    path.display(),
                    tail(&decoded.error_lines.join("\n"), 8)
                );
            }
            let short = promised.filter(|&c| n < c);
            // A count from packets (Matroska, WebM, AVI) is what the file holds, not what it was
            // meant to: a file cut short ends, by its last frame's time, well before its stated
            // end (a count from its duration and nominal rate would be wrong at a variable rate).
            let last_end = decoded
                .frames
                .iter()
                .find(|f| f.0 == n - 1)
                .and_then(|f| f.2)
                .map(|t| t + frame_len);
            let ends_early = match (info.count_source, stated_end, last_end) {
                (CountSource::Packets, Some(s), Some(e)) if s - e > (0.05 * s).max(1.0) => Some((s, e)),
                _ => None,
            };
            truncated = !decoded.error_lines.is_empty() && (short.is_some() || ends_early.is_some());
            if truncated {
                let secs = |frames: usize| info.fps.map(|f| format!(" ({:.2} s)", frames as f64 / f)).unwrap_or_default();
                let what = match (short, ends_early) {
                    (Some(claimed), _) => format!(
                        "{}: truncated or corrupt video: the container promises {claimed} frames{} but only {n} decode{}",
                        path.display(),
                        secs(claimed),
                        secs(n)
                    ),
                    (None, Some((s, e))) => format!(
                        "{}: truncated or corrupt video: the container says it lasts {s:.2} s but its {n} frames end at {e:.2} s",
                        path.display()
                    ),
                    (None, None) => unreachable!("truncated needs a short count or an early end"),
                };
                if self.strict {
                    bail!(
                        "{what} (to use them anyway: non-strict decoding, `--lenient`); ffmpeg said:\n{}",
                        tail(&decoded.error_lines.join("\n"), 8)
                    );
                }
                tracing::warn!("{what}; using the {n} decodable frames (timestamps and duration are theirs)");
            }
            if n < promised.unwrap_or(n) {
                // The container's duration covers frames that do not decode.
                if let Some(f) = info.fps {
                    info.duration = Some(info.duration.map_or(n as f64 / f, |d| d.min(n as f64 / f)));
                }
            }
            if n != info.num_frames {
                tracing::warn!(
                    "{}: {:?} frame count {} is wrong, {n} frames decode; resampling",
                    path.display(),
                    info.count_source,
                    info.num_frames
                );
                info.num_frames = n;
                info.count_source = CountSource::Decoded;
                let new_indices = super::sample_indices(n, t, sampling);
                decoded = self.decode_indices(&info, &with_last(&new_indices, n))?;
                indices = new_indices;
            }
        }
        // Each decoded picture once: a frame repeated (padding) shares it.
        let by_index: std::collections::HashMap<usize, (std::sync::Arc<RgbImage>, Option<f64>)> = decoded
            .frames
            .into_iter()
            .map(|(i, img, ts)| (i, (std::sync::Arc::new(img), ts)))
            .collect();
        let mut frames = Vec::with_capacity(t);
        for &i in &indices {
            let (img, ts) = by_index.get(&i).ok_or_else(|| {
                anyhow!(
                    "{}: frame {i} of {} could not be decoded; ffmpeg said: {}",
                    path.display(),
                    info.num_frames,
                    tail(&decoded.error_lines.join("\n"), 6)
                )
            })?;
            let ts = ts.or_else(|| info.fps.map(|f| i as f64 / f));
            frames.push(Frame {
                index: i,
                image: img.clone(),
                timestamp: ts,
            });
        }
        let padded = t - unique(&indices).len();
        if padded > 0 {
            tracing::warn!(
                "{}: only {} frames for {t} requested; padded by repeating frames",
                path.display(),
                unique(&indices).len()
            );
        }
        // The video lasts (from the file's start, as every frame's time) as long as the container
        // says (its start plus its length: a GIF may hold its last frame for seconds), unless
        // that ends before its last frame (a variable rate's stated length, a cut file): then
        // until the last frame's end. Without the last frame's time: at least the latest frame.
        let last_frame = by_index.get(&(info.num_frames - 1)).and_then(|(_, ts)| *ts);
        let stated = info
            .duration
            .or_else(|| info.fps.map(|f| info.num_frames as f64 / f))
            .map(|d| info.start + d);
        let latest = frames.iter().filter_map(|f| f.timestamp).fold(f64::NEG_INFINITY, f64::max);
        let duration = match (last_frame, stated) {
            (Some(t), Some(s)) if !truncated && s >= t => Some(s),
            (Some(t), _) => Some(t + frame_len),
            (None, _) => stated.map(|d| d.max(latest)).or((latest > 0.0).then_some(latest)),
        };
        Ok(SampledFrames {
            source: path.to_path_buf(),
            frames,
            duration,
            fps: info.fps,
            num_source_frames: info.num_frames,
            padded,
            filled: 0,
            sampling,
        })
    }
}

/// The frame rate of packets at `times` (ascending): frames over the time from the first to the
/// last, less one; None for fewer than two packets or no time between them.
fn packet_rate(times: &[f64]) -> Option<f64> {
    let (first, last) = (times.first()?, times.last()?);
    let span = last - first;
    (times.len() >= 2 && span > 0.0).then(|| (times.len() - 1) as f64 / span)
}

/// Whether an `ffmpeg -version` line names a release with `-fps_mode` (5.1+); development builds
/// (`N-…`, `git-…`) and unparsable versions are taken as recent.
fn has_fps_mode(version_line: &str) -> bool {
    let Some(v) = version_line.split_whitespace().nth(2) else {
        return true;
    };
    let v = v.trim_start_matches('n');
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
    match major {
        Some(m) => (m, minor) >= (5, 1),
        None => true,
    }
}

/// Most terms (runs of consecutive frame numbers) in one `select` expression: at most ~30 bytes
/// each with their share of the parentheses, so the `-vf` argument stays well under Linux's
/// 128 KiB limit on one argument.
pub const MAX_SELECT_TERMS: usize = 2000;

/// Sorted unique frame numbers as inclusive runs of consecutive numbers: [1, 2, 3, 7] → (1, 3), (7, 7).
fn index_runs(sorted: &[usize]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in sorted {
        match runs.last_mut() {
            Some((_, b)) if *b + 1 == i => *b = i,
            _ => runs.push((i, i)),
        }
    }
    runs
}

/// A `select` expression (commas escaped for the filter graph) that is 1 exactly on the frames of
/// `runs`: `eq(n\,a)` or `between(n\,a\,b)` per run, summed as a balanced tree of parentheses.
/// ffmpeg's expression parser refuses a flat sum of more than 100 terms; the tree is only
/// ⌈log₂ terms⌉ deep.
fn select_expr(runs: &[(usize, usize)]) -> String {
    match runs {
        [] => "0".into(),
        [(a, b)] if a == b => format!("eq(n\\,{a})"),
        [(a, b)] => format!("between(n\\,{a}\\,{b})"),
        _ => {
            let (left, right) = runs.split_at(runs.len() / 2);
            format!("({}+{})", select_expr(left), select_expr(right))
        }
    }
}

fn unique(indices: &[usize]) -> Vec<usize> {
    let mut u = indices.to_vec();
    u.sort_unstable();
    u.dedup();
    u
}

/// stderr without the per-frame `showinfo` chatter and verbose lines (for error messages); lines
/// longer than 300 characters (a filter expression echoed back) are cut.
fn filter_log(stderr: &str) -> String {
    const LONG: usize = 300;
    stderr
        .lines()
        .filter(|l| !l.contains("Parsed_showinfo") && !l.contains("[verbose]"))
        .map(|l| match l.char_indices().nth(LONG) {
            Some((cut, _)) => format!("{} … ({} characters)", &l[..cut], l.len()),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Timestamps (seconds) of the frames that passed `showinfo`, in order: `pts × a / b`, with the
/// time base a/b from showinfo's `config in time_base: a/b` line (one rounding: pts 195584 in
/// 1/12800 is 15.28, where pts × (1/12800) gave 15.280000000000001).
fn parse_showinfo(stderr: &str) -> Vec<Option<f64>> {
    let mut time_base: Option<(f64, f64)> = None;
    let mut out = Vec::new();
    for line in stderr.lines() {
        // The filter's own lines start with its log context; a file's metadata (echoed in the
        // input's description) can hold any text but never starts a line.
        if !line.starts_with("[Parsed_showinfo_") {
            continue;
        }
        if let Some(rest) = line.split("config in time_base:").nth(1) {
            let tb = rest.split(',').next().unwrap_or("").trim();
            time_base = tb
                .split_once('/')
                .and_then(|(a, b)| Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?)));
            continue;
        }
        if line.contains(" n:") && line.contains(" pts:") {
            let pts = line
                .split(" pts:")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|s| s.parse::<i64>().ok());
            let pts_time = line
                .split("pts_time:")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|s| s.parse::<f64>().ok());
            let ts = match (pts, time_base) {
                (Some(p), Some((a, b))) if a > 0.0 && b > 0.0 && (a / b).is_finite() => Some(p as f64 * a / b),
                _ => pts_time,
            };
            out.push(ts);
        }
    }
    out
}

/// `N frames decoded` from ffmpeg's verbose final statistics for input stream 0: the last such
/// line, whose text (after its tags) starts with `Input stream #0:` (a file's metadata, echoed
/// before, can hold the same words but after its key).
fn parse_total_decoded(stderr: &str) -> Option<usize> {
    stderr
        .lines()
        .filter_map(|l| {
            let text = log_line(l).1.trim_start_matches(' ');
            let (before, _) = text.strip_prefix("Input stream #0:")?.split_once("frames decoded")?;
            before.split(';').next_back()?.split_whitespace().last()?.parse().ok()
        })
        .last()
}

fn read_token<R: BufRead>(r: &mut R) -> Result<Option<String>> {
    let mut tok = Vec::new();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let b = buf[0];
        if b.is_ascii_whitespace() {
            r.consume(1);
            if tok.is_empty() {
                continue;
            }
            break;
        }
        tok.push(b);
        r.consume(1);
    }
    Ok((!tok.is_empty()).then(|| String::from_utf8_lossy(&tok).to_string()))
}

/// Read one binary PPM (`P6`, maxval 255) image; None at a clean end of stream. The single
/// whitespace byte after maxval is consumed by `read_token`.
fn read_ppm<R: BufRead>(r: &mut R) -> Result<Option<RgbImage>> {
    let Some(magic) = read_token(r)? else { return Ok(None) };
    if magic != "P6" {
        bail!("unexpected data in ffmpeg's PPM stream (magic {magic:?})");
    }
    let mut num = || -> Result<u32> {
        let t = read_token(r)?.ok_or_else(|| anyhow!("truncated PPM header"))?;
        t.parse().with_context(|| format!("bad PPM header field {t:?}"))
    };
    let (w, h, maxval) = (num()?, num()?, num()?);
    if maxval != 255 {
        bail!("PPM maxval {maxval} (expected 255)");
    }
    let mut data = vec![0u8; w as usize * h as usize * 3];
    r.read_exact(&mut data).context("truncated PPM frame data")?;
    RgbImage::from_raw(w, h, data).map(Some).context("PPM frame of inconsistent size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_and_durations() {
        assert_eq!(parse_rate("25/1"), Some(25.0));
        assert!((parse_rate("30000/1001").unwrap() - 29.97).abs() < 1e-3);
        assert_eq!(parse_rate("0/0"), None);
        assert_eq!(parse_seconds("00:00:04.000000000"), Some(4.0));
        assert_eq!(parse_seconds("01:02:03.5"), Some(3723.5));
        assert_eq!(parse_seconds("N/A"), None);
    }

    #[test]
    fn parses_ffmpeg_logs() {
        let log = "[Parsed_showinfo_1 @ 0x1] [info] config in time_base: 1/15360, frame_rate: 30/1\n\
[Parsed_showinfo_1 @ 0x1] [info] n:   0 pts:   1536 pts_time:0.1     pos:     8184 fmt:rgb24\n\
[Parsed_showinfo_1 @ 0x1] [info] n:   1 pts: 102400 pts_time:6.66667 pos:   612227 fmt:rgb24\n\
[verbose]   Input stream #0:0 (video): 1800 packets read (5435172 bytes); 1799 frames decoded; \n";
        let ts = parse_showinfo(log);
        assert_eq!(ts.len(), 2);
        assert!((ts[0].unwrap() - 0.1).abs() < 1e-12);
        assert!((ts[1].unwrap() - 102400.0 / 15360.0).abs() < 1e-12);
        // One rounding: what the time is, not a product of two rounded numbers.
        let log25 = "[Parsed_showinfo_1 @ 0x1] [info] config in time_base: 1/12800, frame_rate: 25/1\n\
[Parsed_showinfo_1 @ 0x1] [info] n:  10 pts: 195584 pts_time:15.28   pos:     8184 fmt:rgb24\n";
        assert_eq!(parse_showinfo(log25), [Some(15.28)]);
        assert_ne!(195584.0 * (1.0 / 12800.0), 15.28);
        assert_eq!(parse_total_decoded(log), Some(1799));
        let v7 = "[verbose]   Input stream #0:0 (video): 12 packets read (100 bytes); 11 frames decoded; 0 decode errors; \n";
        assert_eq!(parse_total_decoded(v7), Some(11));
        // FFmpeg 6.1 and 7 tag the line with the input's context.
        let ff7 = "[in#0/mov,mp4,m4a,3gp,3g2,mj2 @ 0x5581] [verbose]   Input stream #0:0 (video): 90 packets read (8000 bytes); 89 frames decoded; 0 decode errors; \n";
        assert_eq!(parse_total_decoded(ff7), Some(89));
        // Metadata echoed before the statistics is no statistics line, and no error line.
        let meta = "[info]     title           : Input stream #0:0 (video): 5 packets read (1 bytes); 5 frames decoded; \n";
        assert_eq!(parse_total_decoded(meta), None);
        assert_eq!(parse_total_decoded(&format!("{meta}{v7}")), Some(11));
        assert!(!is_error_line("[info]     title           : [error] spoof"));
        assert!(is_error_line("[h264 @ 0x55f0] [error] Invalid NAL unit size (684 > 537)."));
        assert!(is_error_line("[in#0/matroska,webm @ 0x1] [error] File ended prematurely"));
        assert!(is_error_line(
            "[error] Error while decoding stream #0:0: Invalid data found when processing input"
        ));
        assert!(!is_error_line("[h264 @ 0x55f0] [warning] something"));
    }

    #[test]
    fn select_expressions_are_balanced_sums_of_runs() {
        assert_eq!(index_runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 7), (9, 10)]);
        assert_eq!(index_runs(&[5]), vec![(5, 5)]);
        assert_eq!(select_expr(&[(4, 4)]), "eq(n\\,4)");
        assert_eq!(
            select_expr(&index_runs(&[1, 2, 3, 7, 9, 10])),
            "(between(n\\,1\\,3)+(eq(n\\,7)+between(n\\,9\\,10)))"
        );
        // A full batch of far-apart single frames: nesting ⌈log₂ 2000⌉ = 11 deep, and the
        // argument far below 128 KiB.
        let runs: Vec<(usize, usize)> = (0..MAX_SELECT_TERMS).map(|i| (1_000_000 + 2 * i, 1_000_000 + 2 * i)).collect();
        let e = select_expr(&runs);
        let depth = e
            .chars()
            .scan(0i32, |d, c| {
                *d += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                Some(*d)
            })
            .max()
            .unwrap();
        assert_eq!(depth, 11 + 1, "11 levels of sums + the eq( call");
        assert!(e.len() < 64 * 1024, "{} bytes", e.len());
        assert_eq!(e.matches("eq(").count(), MAX_SELECT_TERMS);
    }

    #[test]
    fn long_log_lines_are_cut() {
        let long = format!("[error] Error while parsing expression '{}'", "eq(n,1)+".repeat(100));
        let log = filter_log(&format!("{long}\n[error] short line"));
        assert!(log.lines().next().unwrap().ends_with(&format!("… ({} characters)", long.len())));
        assert_eq!(log.lines().nth(1), Some("[error] short line"));
    }

    #[test]
    fn picks_the_passthrough_option_by_version() {
        assert!(has_fps_mode(
            "ffmpeg version 5.1.9-0+deb12u1 Copyright (c) 2000-2026 the FFmpeg developers"
        ));
        assert!(has_fps_mode("ffmpeg version n7.1 Copyright"));
        assert!(has_fps_mode("ffmpeg version 6.0-static https://johnvansickle.com/ffmpeg/"));
        assert!(has_fps_mode("ffmpeg version N-112233-gabcdef Copyright"));
        assert!(!has_fps_mode("ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright"));
        assert!(!has_fps_mode("ffmpeg version 5.0.1 Copyright"));
    }

    #[test]
    fn reads_ppm_streams() {
        let mut bytes = b"P6\n2 1\n255\n".to_vec();
        bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        bytes.extend_from_slice(b"P6\n1 1\n255\n");
        bytes.extend_from_slice(&[10, 32, 9]); // data bytes that look like whitespace
        let mut r = std::io::Cursor::new(bytes);
        let a = read_ppm(&mut r).unwrap().unwrap();
        assert_eq!(a.dimensions(), (2, 1));
        assert_eq!(a.as_raw(), &vec![1, 2, 3, 4, 5, 6]);
        let b = read_ppm(&mut r).unwrap().unwrap();
        assert_eq!(b.as_raw(), &vec![10, 32, 9]);
        assert!(read_ppm(&mut r).unwrap().is_none());
    }
}
