//! Video decoding, frame sampling, frame folders and CLIP pre-processing.
//!
//! The videos are made at test time with the `ffmpeg` tool (CI installs it; without it these tests
//! FAIL with an install hint). Their frames encode their own frame number as a flat colour
//! (R = 16·(n mod 16) + 8, B = 16·⌊n/16⌋ + 8), so a test can read back which frame it was given.
//! Pre-processing is compared with torchvision outputs written by `tools/fixtures/make_preprocess.py`.

mod common;

use gcg::video::preprocess::{self, CLIP_MEAN, CLIP_STD};
use gcg::video::{self, CountSource, Ffmpeg, Sampling};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Run ffmpeg to make a test video; fails the test (never skips) when ffmpeg is missing.
fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y"])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the video tests need the `ffmpeg` command-line tool ({e}); install it with `apt-get install ffmpeg` (CI's .ci/run does)"
            )
        });
    assert!(
        out.status.success(),
        "ffmpeg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A lavfi source of `n`... frames whose colour encodes the frame number.
fn indexed_source(w: u32, h: u32, rate: &str, duration: &str) -> String {
    format!("color=c=black:s={w}x{h}:r={rate}:d={duration},format=rgb24,geq=r='16*mod(N\\,16)+8':g='128':b='16*floor(N/16)+8'")
}

/// The frame number a decoded frame shows (mean colour of its centre).
fn frame_number(img: &RgbImage) -> usize {
    let (w, h) = img.dimensions();
    let (mut r, mut b, mut n) = (0f64, 0f64, 0f64);
    for y in h / 4..3 * h / 4 {
        for x in w / 4..3 * w / 4 {
            let p = img.get_pixel(x, y).0;
            r += p[0] as f64;
            b += p[2] as f64;
            n += 1.0;
        }
    }
    let (r, b) = (r / n, b / n);
    let lo = ((r - 8.0) / 16.0).round();
    let hi = ((b - 8.0) / 16.0).round();
    assert!(
        (r - (16.0 * lo + 8.0)).abs() < 6.0 && (b - (16.0 * hi + 8.0)).abs() < 6.0,
        "frame colour ({r:.1}, {b:.1}) is not a frame code"
    );
    (16.0 * hi + lo) as usize
}

struct Videos {
    dir: tempfile::TempDir,
}

impl Videos {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// H.264 in MP4 with B-frames: 320x240, 30 fps, 90 frames.
    fn h264(&self) -> PathBuf {
        let p = self.path("bframes.mp4");
        if !p.exists() {
            let src = indexed_source(320, 240, "30", "3");
            ffmpeg(&[
                "-f",
                "lavfi",
                "-i",
                &src,
                "-c:v",
                "libx264",
                "-bf",
                "3",
                "-g",
                "30",
                "-pix_fmt",
                "yuv420p",
                p.to_str().unwrap(),
            ]);
        }
        p
    }
}

fn ffprobe_pict_types(path: &Path) -> String {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "frame=pict_type",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe (install ffmpeg)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn check_frames(s: &video::SampledFrames, expected_indices: &[usize], fps: f64) {
    assert_eq!(s.indices(), expected_indices, "{}", s.source.display());
    for f in &s.frames {
        assert_eq!(
            frame_number(&f.image),
            f.index,
            "{}: frame content differs from its index",
            s.source.display()
        );
        let ts = f.timestamp.expect("timestamp");
        assert!(
            (ts - f.index as f64 / fps).abs() < 1e-6,
            "frame {}: timestamp {ts} != {}",
            f.index,
            f.index as f64 / fps
        );
    }
}

#[test]
fn h264_with_b_frames_uniform_and_official() {
    let v = Videos::new();
    let path = v.h264();
    assert!(ffprobe_pict_types(&path).contains('B'), "the test video should contain B-frames");
    let ff = Ffmpeg::from_env();
    let info = ff.probe(&path).unwrap();
    assert_eq!((info.width, info.height, info.num_frames), (320, 240, 90));
    assert_eq!(info.count_source, CountSource::Container);
    assert!(
        (info.fps.unwrap() - 30.0).abs() < 1e-9 && (info.duration.unwrap() - 3.0).abs() < 1e-6,
        "{info:?}"
    );

    let s = ff.sample(&path, 8, Sampling::Uniform).unwrap();
    // Centres of 8 segments of 90 frames: ⌊(2i+1)·90/16⌋.
    check_frames(&s, &[5, 16, 28, 39, 50, 61, 73, 84], 30.0);
    assert_eq!((s.padded, s.num_source_frames), (0, 90));
    assert_eq!(s.frames[0].image.dimensions(), (320, 240));

    // Official rule: k = ⌊89 / 8⌋ = 11, frames 1, 12, 23, ...
    let s = ff.sample(&path, 8, Sampling::Official).unwrap();
    check_frames(&s, &[1, 12, 23, 34, 45, 56, 67, 78], 30.0);

    // T = N: every frame, in order.
    let s = ff.sample(&path, 90, Sampling::Uniform).unwrap();
    check_frames(&s, &(0..90).collect::<Vec<_>>(), 30.0);

    // load_frames dispatches files to ffmpeg.
    let s = video::load_frames(&path, 4, Sampling::Uniform, &ff).unwrap();
    check_frames(&s, &[11, 33, 56, 78], 30.0);
    // Pixels for the ViT: each frame through the CLIP pre-processing.
    let dev = candle_core::Device::Cpu;
    let px = s.clip_pixels(2, &dev).unwrap();
    assert_eq!(px.dims(), &[4, 3, 224, 224]);
    let third = preprocess::clip_preprocess(&s.frames[2].image).unwrap();
    assert_eq!(px.get(2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), third);
}

#[test]
fn vp9_webm_odd_size_without_frame_count() {
    let v = Videos::new();
    let path = v.path("odd.webm");
    let src = indexed_source(321, 239, "25", "2");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &src,
        "-c:v",
        "libvpx-vp9",
        "-pix_fmt",
        "yuv420p",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-b:v",
        "300k",
        path.to_str().unwrap(),
    ]);
    let ff = Ffmpeg::from_env();
    let info = ff.probe(&path).unwrap();
    assert_eq!(info.container_frames, None, "WebM stores no frame count");
    assert_eq!(info.count_source, CountSource::Packets);
    assert_eq!(
        (info.width, info.height, info.num_frames, info.codec.as_str()),
        (321, 239, 50, "vp9")
    );
    let s = ff.sample(&path, 6, Sampling::Uniform).unwrap();
    check_frames(&s, &[4, 12, 20, 29, 37, 45], 25.0);
    assert!(s.frames.iter().all(|f| f.image.dimensions() == (321, 239)));

    // H.264 4:4:4 at the same odd size in MP4.
    let mp4 = v.path("odd.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &src,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv444p",
        mp4.to_str().unwrap(),
    ]);
    let s = ff.sample(&mp4, 5, Sampling::Uniform).unwrap();
    check_frames(&s, &[5, 15, 25, 35, 45], 25.0);
    assert!(s.frames.iter().all(|f| f.image.dimensions() == (321, 239)));
}

#[test]
fn short_clip_is_padded_by_repetition() {
    let v = Videos::new();
    let path = v.path("five.mp4");
    let src = indexed_source(64, 48, "10", "0.5");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &src,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        path.to_str().unwrap(),
    ]);
    let ff = Ffmpeg::from_env();
    assert_eq!(ff.probe(&path).unwrap().num_frames, 5);
    let s = ff.sample(&path, 8, Sampling::Uniform).unwrap();
    assert_eq!(s.frames.len(), 8);
    assert_eq!(s.padded, 3);
    check_frames(&s, &[0, 0, 1, 2, 2, 3, 4, 4], 10.0);
    let s = ff.sample(&path, 8, Sampling::Official).unwrap();
    assert_eq!(s.padded, 4);
    check_frames(&s, &[1, 1, 2, 2, 3, 3, 4, 4], 10.0);
    let s = ff.sample(&path, 5, Sampling::Uniform).unwrap();
    check_frames(&s, &[0, 1, 2, 3, 4], 10.0);
    assert_eq!(s.padded, 0);
}

#[test]
fn thousands_of_frames_decode_in_batches_of_select_terms() {
    // 4090 frames at 100 fps coding their number in three channels (R: n mod 16, G: ⌊n/16⌋ mod
    // 16, B: ⌊n/256⌋); every other frame is more single-frame runs than one select expression takes.
    let v = Videos::new();
    let path = v.path("long.mp4");
    let src = "color=c=black:s=32x32:r=100:d=40.9,format=rgb24,\
geq=r='16*mod(N\\,16)+8':g='16*mod(floor(N/16)\\,16)+8':b='16*floor(N/256)+8'";
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        src,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv444p",
        path.to_str().unwrap(),
    ]);
    let code = |img: &RgbImage| {
        let p = img.get_pixel(16, 16).0;
        let level = |c: u8| ((c as f64 - 8.0) / 16.0).round() as usize;
        level(p[0]) + 16 * level(p[1]) + 256 * level(p[2])
    };
    let ff = Ffmpeg::from_env();
    let t = 2045;
    assert!(t > video::ffmpeg::MAX_SELECT_TERMS);
    let s = ff.sample(&path, t, Sampling::Uniform).unwrap();
    assert_eq!(s.num_source_frames, 4090);
    // Centres of 2045 segments of 2 frames: the odd frames.
    let want: Vec<usize> = (0..t).map(|i| 2 * i + 1).collect();
    assert_eq!(s.indices(), want);
    for f in &s.frames {
        assert_eq!(code(&f.image), f.index, "frame content differs from its index");
        let ts = f.timestamp.unwrap();
        assert!((ts - f.index as f64 / 100.0).abs() < 1e-6, "frame {}: {ts}", f.index);
    }
}

#[test]
fn variable_frame_rate_timestamps_are_real_presentation_times() {
    let v = Videos::new();
    let path = v.path("vfr.mp4");
    // 30 frames at 30 fps (0..1 s) then 30 frames at 10 fps (1..4 s).
    let src = format!(
        "{},setpts='if(lt(N\\,30)\\,N/30\\,1+(N-30)/10)/TB'",
        indexed_source(160, 120, "30", "2")
    );
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &src,
        "-vsync",
        "vfr",
        "-c:v",
        "libx264",
        "-bf",
        "2",
        "-pix_fmt",
        "yuv420p",
        path.to_str().unwrap(),
    ]);
    let ff = Ffmpeg::from_env();
    let s = ff.sample(&path, 6, Sampling::Uniform).unwrap();
    assert_eq!(s.num_source_frames, 60);
    assert_eq!(s.indices(), vec![5, 15, 25, 35, 45, 55]);
    for f in &s.frames {
        assert_eq!(frame_number(&f.image), f.index);
        let expected = if f.index < 30 {
            f.index as f64 / 30.0
        } else {
            1.0 + (f.index - 30) as f64 / 10.0
        };
        let ts = f.timestamp.unwrap();
        assert!((ts - expected).abs() < 1e-3, "frame {}: {ts} vs {expected}", f.index);
    }
}

#[test]
fn container_frame_count_that_lies_is_corrected_by_decoding() {
    // A stream copy cut at 0.5 s keeps the packets from the previous key frame and an edit list:
    // the container says 90 frames, 75 are presented.
    let v = Videos::new();
    let src = v.h264();
    let cut = v.path("cut.mp4");
    ffmpeg(&["-ss", "0.5", "-i", src.to_str().unwrap(), "-c", "copy", cut.to_str().unwrap()]);
    let ff = Ffmpeg::from_env();
    let info = ff.probe(&cut).unwrap();
    assert_eq!(
        info.container_frames,
        Some(90),
        "the fixture should have a lying container count: {info:?}"
    );
    let s = ff.sample(&cut, 5, Sampling::Uniform).unwrap();
    assert_eq!(s.num_source_frames, 75);
    assert_eq!(s.indices(), vec![7, 22, 37, 52, 67]);
    for f in &s.frames {
        // Presented frame i of the cut is frame i + 15 of the original.
        assert_eq!(frame_number(&f.image), f.index + 15);
        assert!((f.timestamp.unwrap() - f.index as f64 / 30.0).abs() < 1e-6, "{:?}", f.timestamp);
    }
    // Counting by decoding from the start gives the same.
    let exact = Ffmpeg {
        exact_count: true,
        ..Ffmpeg::from_env()
    };
    let info = exact.probe(&cut).unwrap();
    assert_eq!((info.num_frames, info.count_source), (75, CountSource::Decoded));
}

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

#[test]
fn unreadable_files_are_errors_naming_the_file() {
    let v = Videos::new();
    let ff = Ffmpeg::from_env();

    // Text named .mp4.
    let text = v.path("notes.mp4");
    std::fs::write(&text, "this is not a video\n").unwrap();
    let e = err_text(ff.sample(&text, 4, Sampling::Uniform).unwrap_err());
    assert!(e.contains("notes.mp4") && e.contains("Invalid data"), "{e}");

    // MP4 truncated before its index (moov at the end): unreadable.
    let full = std::fs::read(v.h264()).unwrap();
    let cut = v.path("truncated.mp4");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let e = err_text(ff.sample(&cut, 4, Sampling::Uniform).unwrap_err());
    assert!(
        e.contains("truncated.mp4") && e.contains("moov atom not found") && e.contains("cut short"),
        "{e}"
    );
    // An empty file says so.
    let empty = v.path("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let e = err_text(ff.sample(&empty, 4, Sampling::Uniform).unwrap_err());
    assert!(e.contains("empty.mp4: not a readable video: the file is empty (0 bytes)"), "{e}");

    // Fast-start MP4 (index first) truncated: the container promises 90 frames, fewer decode.
    let fs = v.path("faststart.mp4");
    let src = indexed_source(320, 240, "30", "3");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &src,
        "-c:v",
        "libx264",
        "-bf",
        "3",
        "-g",
        "30",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        fs.to_str().unwrap(),
    ]);
    let full = std::fs::read(&fs).unwrap();
    let cut = v.path("faststart_truncated.mp4");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let e = err_text(ff.sample(&cut, 4, Sampling::Uniform).unwrap_err());
    assert!(
        e.contains("faststart_truncated.mp4") && e.contains("truncated or corrupt") && e.contains("90 frames"),
        "{e}"
    );
    // Not strict: the decodable part is sampled.
    let lenient = Ffmpeg {
        strict: false,
        ..Ffmpeg::from_env()
    };
    let s = lenient.sample(&cut, 4, Sampling::Uniform).unwrap();
    assert!(s.num_source_frames < 90 && s.num_source_frames > 4, "{}", s.num_source_frames);
    // It lasts until its last decodable frame ends: a whole number of frames, at least the ones
    // that decode (more when some in between do not), fewer than the 90 promised.
    let frames = s.duration.unwrap() * 30.0;
    assert!(
        (frames - frames.round()).abs() < 1e-6 && frames.round() as usize >= s.num_source_frames && frames < 90.0,
        "{:?} for {} frames",
        s.duration,
        s.num_source_frames
    );
    for f in &s.frames {
        assert_eq!(frame_number(&f.image), f.index);
    }

    // Missing file, empty file.
    let e = err_text(ff.sample(&v.path("missing.mp4"), 4, Sampling::Uniform).unwrap_err());
    assert!(e.contains("missing.mp4"), "{e}");
    let empty = v.path("empty.webm");
    std::fs::write(&empty, b"").unwrap();
    let e = err_text(ff.sample(&empty, 4, Sampling::Uniform).unwrap_err());
    assert!(e.contains("empty.webm"), "{e}");
}

#[test]
fn missing_ffmpeg_says_how_to_install_it() {
    let v = Videos::new();
    let path = v.h264();
    let ff = Ffmpeg {
        ffmpeg: "/nonexistent/bin/ffmpeg".into(),
        ffprobe: "/nonexistent/bin/ffprobe".into(),
        ..Ffmpeg::from_env()
    };
    for e in [ff.sample(&path, 4, Sampling::Uniform).unwrap_err(), ff.check().unwrap_err()] {
        let e = err_text(e);
        assert!(
            e.contains("not found") && e.contains("apt-get install ffmpeg") && e.contains("brew install ffmpeg"),
            "{e}"
        );
    }
    assert!(Ffmpeg::from_env().check().unwrap().starts_with("ffmpeg version"));
}

#[test]
fn frame_folders_round_trip_and_sort_numerically() {
    let v = Videos::new();
    let ff = Ffmpeg::from_env();
    let s = ff.sample(&v.h264(), 12, Sampling::Uniform).unwrap();
    let out = v.path("frames/vid0");
    video::write_frames(&s, &out, false).unwrap();
    // Refuses to overwrite unless asked; no temporary folder is left behind.
    assert!(video::write_frames(&s, &out, false).is_err());
    video::write_frames(&s, &out, true).unwrap();
    let names: Vec<String> = std::fs::read_dir(v.path("frames"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["vid0".to_string()]);

    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("frames.json")).unwrap()).unwrap();
    assert!(meta["video"].as_str().unwrap().ends_with("bframes.mp4"));
    assert!((meta["duration"].as_f64().unwrap() - 3.0).abs() < 1e-6 && (meta["fps"].as_f64().unwrap() - 30.0).abs() < 1e-9);
    let ts: Vec<f64> = meta["timestamps"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(ts, s.timestamps().unwrap());

    // 12 files: frame_10 / frame_11 must sort after frame_9.
    let back = video::load_frames(&out, 12, Sampling::Uniform, &ff).unwrap();
    assert_eq!(back.num_source_frames, 12);
    assert_eq!(back.indices(), (0..12).collect::<Vec<_>>());
    assert_eq!(back.timestamps().unwrap(), s.timestamps().unwrap());
    for (a, b) in back.frames.iter().zip(&s.frames) {
        assert_eq!(frame_number(&a.image), b.index, "JPEG round trip keeps the frame");
    }
    // Subsampling a folder: uniform centres over the 12 files, padding past 12.
    let sub = video::read_frame_dir(&out, 4, Sampling::Uniform, true).unwrap();
    assert_eq!(sub.indices(), vec![1, 4, 7, 10]);
    assert_eq!(sub.timestamps().unwrap(), vec![ts[1], ts[4], ts[7], ts[10]]);
    let pad = video::read_frame_dir(&out, 16, Sampling::Uniform, true).unwrap();
    assert_eq!(pad.padded, 4);
    assert_eq!(pad.frames.len(), 16);

    // A GCG-style folder: 32 PNGs, no frames.json, official get_frames tables.
    let gcg = v.path("gcg_frames");
    std::fs::create_dir(&gcg).unwrap();
    for i in 0..32u32 {
        let code = [16 * (i % 16) as u8 + 8, 128, 16 * (i / 16) as u8 + 8];
        RgbImage::from_pixel(40, 30, image::Rgb(code))
            .save(gcg.join(format!("frame_{i}.png")))
            .unwrap();
    }
    std::fs::write(gcg.join("notes.txt"), "ignored").unwrap();
    for (t, expected) in [
        (4, vec![4, 12, 20, 28]),
        (8, vec![2, 6, 10, 14, 18, 22, 26, 30]),
        (1, vec![16]),
        (16, (0..16).map(|i| 2 * i).collect()),
    ] {
        let s = video::read_frame_dir(&gcg, t, Sampling::Official, true).unwrap();
        assert_eq!(s.indices(), expected);
        assert!(s.timestamps().is_none());
        for f in &s.frames {
            assert_eq!(frame_number(&f.image), f.index);
        }
    }
    let s = video::read_frame_dir(&gcg, 4, Sampling::Uniform, true).unwrap();
    assert_eq!(s.indices(), vec![4, 12, 20, 28]);
    // Errors name the folder.
    let empty = v.path("empty_dir");
    std::fs::create_dir(&empty).unwrap();
    let e = err_text(video::read_frame_dir(&empty, 4, Sampling::Uniform, true).unwrap_err());
    assert!(e.contains("empty_dir") && e.contains("frame_"), "{e}");
    std::fs::write(gcg.join("frame_3.jpg"), "not a jpeg").unwrap();
    let e = err_text(video::read_frame_dir(&gcg, 32, Sampling::Uniform, true).unwrap_err());
    assert!(e.contains("frame_3"), "{e}");
}

#[test]
fn frame_folder_gaps_are_errors_or_filled_at_their_positions() {
    let v = Videos::new();
    // 20 PNGs coded with their frame number, frame_2 … frame_9 missing.
    let dir = v.path("gappy");
    std::fs::create_dir(&dir).unwrap();
    let write = |dir: &Path, i: u32| {
        let code = [16 * (i % 16) as u8 + 8, 128, 16 * (i / 16) as u8 + 8];
        RgbImage::from_pixel(40, 30, image::Rgb(code))
            .save(dir.join(format!("frame_{i}.png")))
            .unwrap();
    };
    for i in (0..2).chain(10..20) {
        write(&dir, i);
    }
    let e = err_text(video::read_frame_dir(&dir, 20, Sampling::Uniform, true).unwrap_err());
    assert!(
        e.contains("gappy")
            && e.contains("8 of 20 frame files missing")
            && e.contains("frame_2.png, frame_3.png, frame_4.png, frame_5.png, frame_6.png, … (8 in all)"),
        "{e}"
    );
    assert!(!e.contains("frame_7.png"), "only the first few are listed: {e}");
    let e = err_text(video::list_frame_files(&dir).unwrap_err());
    assert!(e.contains("frame_2.png"), "{e}");
    // load_frames reads strictly unless the decoder is lenient.
    assert!(video::load_frames(&dir, 20, Sampling::Uniform, &Ffmpeg::from_env()).is_err());
    let lenient = Ffmpeg {
        strict: false,
        ..Ffmpeg::from_env()
    };
    let s = video::load_frames(&dir, 20, Sampling::Uniform, &lenient).unwrap();
    assert_eq!((s.num_source_frames, s.filled, s.padded), (20, 8, 0));
    assert_eq!(s.indices(), (0..20).collect::<Vec<_>>());
    let shown: Vec<usize> = s.frames.iter().map(|f| frame_number(&f.image)).collect();
    let want: Vec<usize> = (0..20).map(|i| if (2..10).contains(&i) { 1 } else { i }).collect();
    assert_eq!(shown, want);
    // Sampled positions are true positions: T = 4 takes positions 2, 7, 12, 17.
    let s = video::read_frame_dir(&dir, 4, Sampling::Uniform, false).unwrap();
    assert_eq!(s.indices(), vec![2, 7, 12, 17]);
    assert_eq!(
        s.frames.iter().map(|f| frame_number(&f.image)).collect::<Vec<_>>(),
        vec![1, 1, 12, 17]
    );
    assert_eq!(s.filled, 2);

    // Numbering starts at frame_0: a folder from frame_1 on misses frame_0, filled with the
    // first frame there is.
    let from1 = v.path("from1");
    std::fs::create_dir(&from1).unwrap();
    for i in 1..5 {
        write(&from1, i);
    }
    let e = err_text(video::read_frame_dir(&from1, 5, Sampling::Uniform, true).unwrap_err());
    assert!(e.contains("1 of 5") && e.contains("frame_0.png"), "{e}");
    let s = video::read_frame_dir(&from1, 5, Sampling::Uniform, false).unwrap();
    assert_eq!(
        s.frames.iter().map(|f| frame_number(&f.image)).collect::<Vec<_>>(),
        vec![1, 1, 2, 3, 4]
    );

    // A stray far-away number is no sequence to fill, even leniently.
    std::fs::copy(from1.join("frame_1.png"), from1.join("frame_99999999.png")).unwrap();
    for strict in [true, false] {
        let e = err_text(video::read_frame_dir(&from1, 5, Sampling::Uniform, strict).unwrap_err());
        assert!(e.contains("frame_99999999.png") && e.contains("not one numbered sequence"), "{e}");
    }

    // With frames.json: its timestamps fix the length and stay on their positions.
    let ff = Ffmpeg::from_env();
    let full = ff.sample(&v.h264(), 6, Sampling::Uniform).unwrap();
    let out = v.path("with_meta");
    video::write_frames(&full, &out, false).unwrap();
    std::fs::remove_file(out.join("frame_0.jpg")).unwrap();
    std::fs::remove_file(out.join("frame_5.jpg")).unwrap();
    let e = err_text(video::read_frame_dir(&out, 6, Sampling::Uniform, true).unwrap_err());
    assert!(
        e.contains("frames.json") && e.contains("6 timestamps") && e.contains("2 of them missing: frame_0.jpg, frame_5.jpg"),
        "{e}"
    );
    let s = video::read_frame_dir(&out, 6, Sampling::Uniform, false).unwrap();
    assert_eq!(s.timestamps().unwrap(), full.timestamps().unwrap());
    let shown: Vec<usize> = s.frames.iter().map(|f| frame_number(&f.image)).collect();
    let want: Vec<usize> = [1, 1, 2, 3, 4, 4].iter().map(|&k| full.frames[k].index).collect();
    assert_eq!(shown, want);
    assert_eq!(s.filled, 2);
    // Files only past the timestamps: nothing to read.
    let none = v.path("none_listed");
    video::write_frames(&full, &none, false).unwrap();
    for i in 0..6 {
        std::fs::rename(none.join(format!("frame_{i}.jpg")), none.join(format!("frame_{}.jpg", i + 10))).unwrap();
    }
    let e = err_text(video::read_frame_dir(&none, 6, Sampling::Uniform, false).unwrap_err());
    assert!(e.contains("none of these files") && e.contains("frame_10.jpg"), "{e}");

    // Bad times in frames.json name the file and the frames by their own numbers (the store's
    // check named positions in a sample of them, and no file).
    let times = v.path("bad_times");
    video::write_frames(&full, &times, false).unwrap();
    let meta_path = times.join("frames.json");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut m = meta.clone();
        f(&mut m);
        std::fs::write(&meta_path, m.to_string()).unwrap();
        err_text(video::read_frame_dir(&times, 2, Sampling::Uniform, false).unwrap_err())
    };
    let e = edit(&|m| m["timestamps"][4] = 0.1.into());
    assert!(
        e.contains("bad_times/frames.json: the frame times decrease: frame_3 at") && e.contains("frame_4 at 0.1 s"),
        "{e}"
    );
    let e = edit(&|m| m["timestamps"][5] = 40.0.into());
    assert!(e.contains("frames.json: frame_5 at 40 s is past the duration 3 s"), "{e}");
    let e = edit(&|m| m["timestamps"][0] = (-1.0).into());
    assert!(e.contains("frames.json: the time of frame_0 is -1 s"), "{e}");
    let e = edit(&|m| m["fps"] = 0.0.into());
    assert!(e.contains("frames.json: fps 0 is not a finite positive number"), "{e}");
}

#[test]
fn official_folder_tables_match_get_frames() {
    // utils/utils.py::get_frames, transcribed.
    assert_eq!(video::official_folder_indices(16, 8).unwrap(), vec![0, 2, 4, 6, 8, 10, 12, 15]);
    assert_eq!(video::official_folder_indices(16, 4).unwrap(), vec![2, 6, 10, 14]);
    assert_eq!(video::official_folder_indices(16, 1).unwrap(), vec![7]);
    assert_eq!(video::official_folder_indices(32, 1).unwrap(), vec![16]);
    assert_eq!(video::official_folder_indices(32, 32).unwrap(), (0..32).collect::<Vec<_>>());
    assert!(video::official_folder_indices(20, 4).is_none());
}

// ---------------------------------------------------------------------------------------------
// Pre-processing parity with torchvision (GCG's image_transform on PIL images).

fn preprocess_dir() -> PathBuf {
    common::fixtures_dir().join("preprocess")
}

struct FixtureImage {
    name: String,
    file: String,
}

fn fixture_images() -> (Vec<FixtureImage>, usize, usize) {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(preprocess_dir().join("manifest.json")).unwrap()).unwrap();
    let images = manifest["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| FixtureImage {
            name: m["name"].as_str().unwrap().to_string(),
            file: m["file"].as_str().unwrap().to_string(),
        })
        .collect();
    (
        images,
        manifest["sub_offset"].as_u64().unwrap() as usize,
        manifest["sub_stride"].as_u64().unwrap() as usize,
    )
}

#[test]
fn clip_preprocessing_matches_torchvision() {
    let (images, offset, stride) = fixture_images();
    assert!(images.len() >= 7, "fixture should cover several sizes");
    let values = common::load_io(&preprocess_dir().join("expected.safetensors")).unwrap();
    let mut pngs = 0;
    for img in &images {
        let input = video::read_image(&preprocess_dir().join(&img.file)).unwrap();
        if img.file.ends_with(".jpg") {
            continue; // decoder comparison below
        }
        pngs += 1;
        let expected = video::read_image(&preprocess_dir().join(format!("{}.expected.png", img.name))).unwrap();
        // 8-bit levels after Resize(224, BICUBIC) + CenterCrop(224): byte-identical to PIL.
        let crop = preprocess::resize_and_crop(&input, 224).unwrap();
        assert_eq!(crop.dimensions(), (224, 224));
        let diff = crop
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        let n_diff = crop.as_raw().iter().zip(expected.as_raw()).filter(|(a, b)| a != b).count();
        eprintln!(
            "{}: max level difference {diff}, {n_diff} of {} values differ",
            img.name,
            3 * 224 * 224
        );
        assert_eq!(
            diff, 0,
            "{}: resampling differs from PIL (max {diff} levels, {n_diff} values)",
            img.name
        );

        // Normalised f32 values: the full chain against torchvision's f32 output.
        let x = preprocess::clip_preprocess(&input).unwrap();
        assert_eq!(x.len(), 3 * 224 * 224);
        let want = values.get(&format!("{}.values", img.name)).unwrap().to_vec1::<f32>().unwrap();
        let got: Vec<f32> = x.iter().skip(offset).step_by(stride).copied().collect();
        assert_eq!(got.len(), want.len());
        let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{}: max |normalised - torchvision| = {max_err:e}", img.name);
        assert!(max_err <= 1e-6, "{}: normalised values differ by {max_err}", img.name);
        // The level image normalised the same way is torchvision's output at every position.
        let full = preprocess::normalize_chw(&expected, CLIP_MEAN, CLIP_STD);
        assert_eq!(full, x, "{}", img.name);
    }
    assert!(pngs >= 6);
}

#[test]
fn jpeg_frames_decode_like_pil() {
    // GCG's frames are JPEGs decoded by PIL (libjpeg-turbo): read_image must give the same pixels,
    // and the whole chain from the JPEG file must equal torchvision's output.
    let (images, _, _) = fixture_images();
    let img = images.iter().find(|i| i.file.ends_with(".jpg")).expect("a JPEG fixture");
    let path = preprocess_dir().join(&img.file);
    let ours = video::read_image(&path).unwrap();
    let pil = video::read_image(&preprocess_dir().join(format!("{}.pil.png", img.name))).unwrap();
    assert_eq!(ours.dimensions(), pil.dimensions());
    let max = ours
        .as_raw()
        .iter()
        .zip(pil.as_raw())
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert_eq!(max, 0, "JPEG decoding differs from PIL by up to {max} levels");
    let expected = video::read_image(&preprocess_dir().join(format!("{}.expected.png", img.name))).unwrap();
    assert_eq!(preprocess::resize_and_crop(&ours, 224).unwrap().as_raw(), expected.as_raw());
    // A corrupt JPEG is an error naming the file.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = video::read_image(&bad)
        .err()
        .map(|e| format!("{e:#}"))
        .expect("a truncated JPEG must be an error");
    assert!(e.contains("broken.jpg") && e.contains("truncated"), "{e}");
    let garbage = dir.path().join("garbage.jpg");
    let mut g = vec![0xFF, 0xD8, 0xFF, 0xE0];
    g.extend(std::iter::repeat_n(0x55u8, 100));
    std::fs::write(&garbage, &g).unwrap();
    let e = video::read_image(&garbage)
        .err()
        .map(|e| format!("{e:#}"))
        .expect("a garbage JPEG must be an error");
    assert!(e.contains("garbage.jpg"), "{e}");
}

#[test]
fn clip_batch_stacks_frames() {
    let (images, _, _) = fixture_images();
    let imgs: Vec<RgbImage> = images
        .iter()
        .take(3)
        .map(|i| video::read_image(&preprocess_dir().join(&i.file)).unwrap())
        .collect();
    let dev = candle_core::Device::Cpu;
    let batch = preprocess::clip_batch(&imgs, 2, &dev).unwrap();
    assert_eq!(batch.dims(), &[3, 3, 224, 224]);
    for (i, img) in imgs.iter().enumerate() {
        let one = preprocess::clip_tensor(img, &dev).unwrap();
        let diff = (batch.get(i).unwrap() - one)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }
}

#[test]
fn frames_are_encoded_like_opencv_and_pil() {
    // GCG's extract_frames.py writes frames with cv2.imwrite (libjpeg-turbo, quality 95, default
    // settings); PIL's save(quality=95) uses the same encoder and settings. Same bytes expected.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(preprocess_dir().join("manifest.json")).unwrap()).unwrap();
    let name = manifest["jpeg_encode_ref"].as_str().unwrap();
    let src = video::read_image(&preprocess_dir().join(format!("{name}.png"))).unwrap();
    let ours = video::encode_jpeg_like_opencv(&src).unwrap();
    let want = std::fs::read(preprocess_dir().join(format!("{name}.q95.jpg"))).unwrap();
    assert_eq!(ours.len(), want.len());
    assert!(ours == want, "JPEG bytes differ from PIL's quality-95 output");
}

#[test]
fn official_sampling_reproduces_gcg_extract_frames() {
    // tools/fixtures/make_official_frames.py ran GCG's extract_frames rule with OpenCV on this
    // video: the same frame numbers, pixels and JPEG bytes are expected from `gcg frames
    // --sampling official` (decode with ffmpeg → encode_jpeg_like_opencv).
    let dir = common::fixtures_dir().join("video");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("official_frames_8.json")).unwrap()).unwrap();
    let want_indices: Vec<usize> = meta["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let ff = Ffmpeg::from_env();
    let video = dir.join("official.mp4");
    let info = ff.probe(&video).unwrap();
    assert_eq!(info.num_frames as u64, meta["frame_count"].as_u64().unwrap());
    let s = ff.sample(&video, 8, Sampling::Official).unwrap();
    assert_eq!(s.indices(), want_indices);
    let mut max_diff = 0;
    for (i, f) in s.frames.iter().enumerate() {
        let cv_file = dir.join(format!("official_frames_8/frame_{i}.jpg"));
        let cv_pixels = video::read_image(&cv_file).unwrap();
        // Round trip through our JPEG writer and decoder vs OpenCV's file decoded the same way.
        let ours = video::encode_jpeg_like_opencv(&f.image).unwrap();
        let dir_tmp = tempfile::tempdir().unwrap();
        let ours_path = dir_tmp.path().join("ours.jpg");
        std::fs::write(&ours_path, &ours).unwrap();
        let ours_pixels = video::read_image(&ours_path).unwrap();
        let d = ours_pixels
            .as_raw()
            .iter()
            .zip(cv_pixels.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        max_diff = max_diff.max(d);
        assert_eq!(
            ours,
            std::fs::read(&cv_file).unwrap(),
            "frame {i}: JPEG bytes differ from OpenCV's (max pixel difference {d})"
        );
    }
    assert_eq!(max_diff, 0);
}

/// A variable-frame-rate video whose stream states a duration shorter than its frames run (the
/// tester's case: 100 frames at 25 fps, then one a second to 7 s): the sampled frames' duration
/// covers every sampled frame.
#[test]
fn a_variable_frame_rate_video_lasts_until_its_last_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vfr.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x64:r=25:d=8",
        "-vf",
        "select='lt(n\\,100)+not(mod(n\\,25))'",
        "-fps_mode",
        "vfr",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        path.to_str().unwrap(),
    ]);
    let ff = Ffmpeg::from_env();
    let s = ff.sample(&path, 104, Sampling::Uniform).unwrap();
    let last = s.frames.iter().filter_map(|f| f.timestamp).fold(0.0, f64::max);
    assert!(last > 6.5, "the frames reach 7 s: {last}");
    let d = s.duration.unwrap();
    assert!(d >= last, "duration {d} ends before the frame at {last}");
}

/// AVI stores one chunk per frame tick and no presentation times: for H.264 with B-frames the
/// decoder's times lag by its reordering delay, and ffmpeg, stream-copying such an MP4 into AVI,
/// writes a header rate and frame count twice the stream's. gcg showed frames of this 10 fps
/// video 0.2 s late at "20 fps"; the frames are now at their packets' times, as in the MP4.
#[test]
fn avi_frames_are_at_their_packet_times() {
    let v = Videos::new();
    let mp4 = v.path("b.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &indexed_source(64, 48, "10", "4"),
        "-c:v",
        "libx264",
        "-bf",
        "2",
        "-pix_fmt",
        "yuv420p",
        mp4.to_str().unwrap(),
    ]);
    assert!(ffprobe_pict_types(&mp4).contains('B'), "the test video should contain B-frames");
    let copied = v.path("copied.avi");
    ffmpeg(&["-i", mp4.to_str().unwrap(), "-c", "copy", copied.to_str().unwrap()]);
    // Encoded straight into AVI (MPEG-4 part 2 with B-frames) with PCM audio beside it.
    let native = v.path("native.avi");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &indexed_source(64, 48, "10", "4"),
        "-f",
        "lavfi",
        "-i",
        "sine=duration=4",
        "-c:v",
        "mpeg4",
        "-q:v",
        "2",
        "-bf",
        "2",
        "-c:a",
        "pcm_s16le",
        native.to_str().unwrap(),
    ]);
    let ff = Ffmpeg::from_env();
    for p in [&mp4, &copied, &native] {
        let info = ff.probe(p).unwrap();
        assert_eq!(info.num_frames, 40, "{}: {info:?}", p.display());
        assert!((info.fps.unwrap() - 10.0).abs() < 1e-6, "{}: {info:?}", p.display());
        let s = ff.sample(p, 8, Sampling::Uniform).unwrap();
        // Centres of 8 segments of 40 frames: ⌊(2i+1)·40/16⌋.
        check_frames(&s, &[2, 7, 12, 17, 22, 27, 32, 37], 10.0);
        assert_eq!(s.fps, Some(10.0), "{}", p.display());
        assert!((s.duration.unwrap() - 4.0).abs() < 1e-6, "{}: {:?}", p.display(), s.duration);
        let all = ff.sample(p, 40, Sampling::Uniform).unwrap();
        check_frames(&all, &(0..40).collect::<Vec<_>>(), 10.0);
    }
}

/// MPEG-TS lists its video stream again under the program, so ffprobe's packet count comes
/// back twice (`"50\n\n50"`): read as one count (it was refused as unreadable: every `.ts`).
/// Matroska/WebM with a start offset: their DURATION tag and format duration are the end time,
/// while the frames' times are from the start; the duration is the stream's own length.
#[test]
fn mpeg_ts_and_offset_matroska_probe_right() {
    let v = Videos::new();
    let src = indexed_source(64, 48, "25", "2");
    let ts = v.path("clip.ts");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &src,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        ts.to_str().unwrap(),
    ]);
    let ff = Ffmpeg::from_env();
    assert_eq!(ff.count_packets(&ts, 0).unwrap(), 50);
    let info = ff.probe(&ts).unwrap();
    assert_eq!(info.num_frames, 50);
    let s = ff.sample(&ts, 5, Sampling::Uniform).unwrap();
    check_frames(&s, &[5, 15, 25, 35, 45], 25.0);
    for (name, codec) in [("off.webm", "libvpx-vp9"), ("off.mkv", "libx264")] {
        let p = v.path(name);
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            &src,
            "-c:v",
            codec,
            "-pix_fmt",
            "yuv420p",
            "-output_ts_offset",
            "100",
            p.to_str().unwrap(),
        ]);
        let info = ff.probe(&p).unwrap();
        let d = info.duration.expect("a duration");
        assert!((d - 2.0).abs() < 0.1, "{name}: duration {d} s for a 2 s video starting at 100 s");
        let s = ff.sample(&p, 5, Sampling::Uniform).unwrap();
        check_frames(&s, &[5, 15, 25, 35, 45], 25.0);
    }
}

impl Videos {
    /// 64x48 at 25 fps for 2 s (50 frames) whose colours encode their numbers, as H.264 MP4.
    fn indexed_mp4(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            &indexed_source(64, 48, "25", "2"),
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            p.to_str().unwrap(),
        ]);
        p
    }

    /// `video` starting 2 s into `out`, after a tone of `audio_seconds` (codec `audio`) from 0 s.
    fn delayed(&self, video: &Path, out: &Path, audio: &str, audio_seconds: &str) {
        let tone = format!("sine=duration={audio_seconds}");
        ffmpeg(&[
            "-itsoffset",
            "2",
            "-i",
            video.to_str().unwrap(),
            "-f",
            "lavfi",
            "-i",
            &tone,
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-c:v",
            "copy",
            "-c:a",
            audio,
            out.to_str().unwrap(),
        ]);
    }
}

/// MPEG-TS whose audio starts 2 s before its video: the frames' times count from the file's
/// start, as in a player and as the same streams in MP4 give (they counted from the video's
/// start: every moment 2 s early).
#[test]
fn mpeg_ts_times_count_from_the_file_start_when_audio_comes_first() {
    let v = Videos::new();
    let base = v.indexed_mp4("base.mp4");
    let ff = Ffmpeg::from_env();
    let mut firsts = Vec::new();
    for (name, audio) in [("late.ts", "mp2"), ("late.mp4", "aac")] {
        let p = v.path(name);
        v.delayed(&base, &p, audio, "4");
        let s = ff.sample(&p, 5, Sampling::Uniform).unwrap();
        assert_eq!(s.indices(), [5, 15, 25, 35, 45], "{name}");
        for f in &s.frames {
            assert_eq!(frame_number(&f.image), f.index, "{name}");
        }
        let t: Vec<f64> = s.frames.iter().map(|f| f.timestamp.unwrap()).collect();
        // Frame k at about 2 s + k / 25 (the containers' start differs by a few ms).
        assert!((t[0] - (2.0 + 5.0 / 25.0)).abs() < 0.05, "{name}: {t:?}");
        for w in t.windows(2) {
            assert!((w[1] - w[0] - 0.4).abs() < 1e-3, "{name}: {t:?}");
        }
        firsts.push(t[0]);
    }
    assert!(
        (firsts[0] - firsts[1]).abs() < 0.05,
        "TS {} s against MP4 {} s",
        firsts[0],
        firsts[1]
    );
}

/// The stream a player shows: with two video streams, the one marked default (not the first);
/// an audio file's cover picture is no video.
#[test]
fn the_default_video_stream_is_read_and_cover_art_is_no_video() {
    let v = Videos::new();
    let two = v.path("two.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=32x24:rate=10:duration=1",
        "-f",
        "lavfi",
        "-i",
        &indexed_source(64, 48, "25", "2"),
        "-map",
        "0:v",
        "-map",
        "1:v",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-disposition:v:0",
        "0",
        "-disposition:v:1",
        "default",
        two.to_str().unwrap(),
    ]);
    let ff = Ffmpeg::from_env();
    let info = ff.probe(&two).unwrap();
    assert_eq!((info.stream, info.width, info.height), (1, 64, 48));
    let s = ff.sample(&two, 5, Sampling::Uniform).unwrap();
    check_frames(&s, &[5, 15, 25, 35, 45], 25.0);

    let cover = v.path("cover.png");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=32x32:rate=1:duration=1",
        "-frames:v",
        "1",
        cover.to_str().unwrap(),
    ]);
    let song = v.path("song.mp3");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=duration=2",
        "-i",
        cover.to_str().unwrap(),
        "-map",
        "0:a",
        "-map",
        "1:v",
        "-c:v",
        "mjpeg",
        "-disposition:v",
        "attached_pic",
        song.to_str().unwrap(),
    ]);
    let e = format!("{:#}", ff.sample(&song, 4, Sampling::Uniform).unwrap_err());
    assert!(e.contains("song.mp3") && e.contains("only a cover picture"), "{e}");
}

/// A file's metadata is echoed in ffmpeg's log; a title that imitates the log's statistics or
/// showinfo's lines changes nothing (it made 5 frames of 50 be sampled, or failed the read).
#[test]
fn metadata_that_imitates_ffmpegs_log_changes_nothing() {
    let v = Videos::new();
    let base = v.indexed_mp4("base.mp4");
    let ff = Ffmpeg::from_env();
    for (i, title) in [
        "Input stream #0:0 (video): 5 packets read (1 bytes); 5 frames decoded; ",
        "Parsed_showinfo n: 0 pts: 0 pts_time:0",
        "x\n[Parsed_showinfo_1 @ 0x1] [info] n:   0 pts:      0 pts_time:0",
    ]
    .iter()
    .enumerate()
    {
        let p = v.path(&format!("meta{i}.mp4"));
        let meta = format!("title={title}");
        ffmpeg(&["-i", base.to_str().unwrap(), "-c", "copy", "-metadata", &meta, p.to_str().unwrap()]);
        let s = ff.sample(&p, 5, Sampling::Uniform).unwrap_or_else(|e| panic!("{title:?}: {e:#}"));
        assert_eq!(s.num_source_frames, 50, "{title:?}");
        check_frames(&s, &[5, 15, 25, 35, 45], 25.0);
    }
}

/// A video's duration ends with its last frame, from the file's start as the frames' times,
/// whatever T: an MP4 whose video starts 2 s after its audio lasted its stream's 2 s (and then
/// the last sampled frame's time, a different number for each T).
#[test]
fn the_duration_ends_with_the_last_frame_for_every_t() {
    let v = Videos::new();
    let base = v.indexed_mp4("base.mp4");
    let late = v.path("late.mp4");
    v.delayed(&base, &late, "aac", "5");
    let ff = Ffmpeg::from_env();
    for (p, end) in [(&base, 2.0), (&late, 4.0)] {
        for t in [3, 16, 50] {
            let s = ff.sample(p, t, Sampling::Uniform).unwrap();
            assert_eq!(s.duration, Some(end), "{} at T = {t}", p.display());
        }
    }
}

/// A Matroska file cut short states its whole duration and no frame count: its packets are
/// what it holds. Its last frame ending well before its stated end, with ffmpeg's errors, tells
/// it is cut (it passed as a whole 8 s video).
#[test]
fn a_truncated_matroska_file_is_refused_or_read_as_what_decodes() {
    let v = Videos::new();
    let whole = v.path("whole.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &indexed_source(64, 48, "25", "8"),
        "-c:v",
        "libx264",
        "-g",
        "25",
        "-pix_fmt",
        "yuv420p",
        whole.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&whole).unwrap();
    let cut = v.path("cut.mkv");
    std::fs::write(&cut, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let strict = Ffmpeg::from_env();
    let e = format!("{:#}", strict.sample(&cut, 4, Sampling::Uniform).unwrap_err());
    assert!(
        e.contains("cut.mkv") && e.contains("truncated or corrupt video") && e.contains("says it lasts 8.00 s"),
        "{e}"
    );
    let lenient = Ffmpeg {
        strict: false,
        ..Ffmpeg::from_env()
    };
    let s = lenient.sample(&cut, 4, Sampling::Uniform).unwrap();
    let n = s.num_source_frames;
    assert!((50..200).contains(&n), "{n} frames decode");
    for f in &s.frames {
        assert_eq!(frame_number(&f.image), f.index);
    }
    assert_eq!(s.duration, Some(n as f64 / 25.0));
    // The whole file is read as whole.
    let s = strict.sample(&whole, 4, Sampling::Uniform).unwrap();
    assert_eq!((s.num_source_frames, s.duration), (200, Some(8.0)));
}

/// A Matroska stream's DURATION tag that ends after its file (kept from a longer source by a
/// tool that cut the file, or edited) is stale: the file's own duration is used. (It was
/// believed: a 4 s video read as lasting 64 s, which `gcg ask` and the viewer then showed.)
#[test]
fn a_stale_matroska_duration_tag_is_not_believed() {
    let v = Videos::new();
    let whole = v.path("four.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &indexed_source(64, 48, "10", "4"),
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        whole.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&whole).unwrap();
    let (tag, stale_tag) = (b"00:00:04.000000000", b"00:01:04.000000000");
    let at = bytes
        .windows(tag.len())
        .position(|w| w == tag)
        .expect("ffmpeg writes the stream's DURATION tag");
    let mut edited = bytes.clone();
    edited[at..at + tag.len()].copy_from_slice(stale_tag);
    let stale = v.path("stale.mkv");
    std::fs::write(&stale, &edited).unwrap();
    let ff = Ffmpeg::from_env();
    for p in [&whole, &stale] {
        let info = ff.probe(p).unwrap();
        assert_eq!((info.duration, info.num_frames), (Some(4.0), 40), "{}", p.display());
        let s = ff.sample(p, 4, Sampling::Uniform).unwrap();
        check_frames(&s, &[5, 15, 25, 35], 10.0);
        assert_eq!(s.duration, Some(4.0), "{}", p.display());
    }
}

/// An MPEG-TS that announces an audio track it never fills (as broadcast captures do): ffmpeg
/// refuses to copy a track without a sample rate, so it is left out of the audio mapped beside
/// the video. And audio that ffmpeg cannot copy for any other reason (here: a wrapper that
/// fails every run with a second output) costs the video nothing: it is read alone.
#[test]
fn audio_that_cannot_be_copied_costs_the_video_nothing() {
    let v = Videos::new();
    let full = v.path("av.ts");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &indexed_source(64, 48, "25", "2"),
        "-f",
        "lavfi",
        "-i",
        "sine=duration=2",
        "-map",
        "0:v",
        "-map",
        "1:a",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "mp2",
        full.to_str().unwrap(),
    ]);
    // The audio's packets (PID 0x101, ffmpeg's second stream) dropped; its PMT entry stays.
    let bytes = std::fs::read(&full).unwrap();
    let kept: Vec<u8> = bytes
        .chunks(188)
        .filter(|p| ((p[1] as usize & 0x1f) << 8 | p[2] as usize) != 0x101)
        .flatten()
        .copied()
        .collect();
    assert!(kept.len() < bytes.len(), "no audio packets were dropped");
    let empty = v.path("empty_audio.ts");
    std::fs::write(&empty, kept).unwrap();
    let ff = Ffmpeg::from_env();
    let info = ff.probe(&empty).unwrap();
    assert!(info.audio_streams.is_empty(), "{:?}", info.audio_streams);
    assert_eq!(ff.probe(&full).unwrap().audio_streams, [1]);
    let s = ff.sample(&empty, 5, Sampling::Uniform).unwrap();
    check_frames(&s, &[5, 15, 25, 35, 45], 25.0);

    let wrapper = v.path("ffmpeg_without_null.sh");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = null ] && { echo '[error] cannot copy that audio' >&2; exit 1; }; done\nexec ffmpeg \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let failing = Ffmpeg {
        ffmpeg: wrapper,
        ..Ffmpeg::from_env()
    };
    let s = failing.sample(&full, 5, Sampling::Uniform).unwrap();
    assert_eq!(s.indices(), [5, 15, 25, 35, 45]);
    for f in &s.frames {
        assert_eq!(frame_number(&f.image), f.index);
    }
}

/// A whole variable-frame-rate Matroska file is no truncated one, also when ffmpeg's log holds
/// an error-looking line: its nominal rate times its duration is far more frames than it has
/// (a count rule refused it), and an "[error]" in its title is the title, not an error.
#[test]
fn a_whole_variable_rate_matroska_file_with_an_error_looking_title_is_read() {
    let v = Videos::new();
    let vfr = v.path("vfr.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &indexed_source(64, 48, "25", "8"),
        "-vf",
        "setpts='if(lt(N,100),N/25,4+(N-100)*2/25)/TB'",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-metadata",
        "title=[error] spoof",
        vfr.to_str().unwrap(),
    ]);
    let s = Ffmpeg::from_env().sample(&vfr, 4, Sampling::Uniform).unwrap();
    assert_eq!(s.num_source_frames, 200);
    for f in &s.frames {
        assert_eq!(frame_number(&f.image), f.index);
    }
    // Its last frame is at 4 + 99 × 0.08 = 11.92 s.
    assert!(s.duration.unwrap() > 11.92, "{:?}", s.duration);
}

/// A GIF that holds its last picture for seconds lasts as its container says, past its last
/// frame's time plus one frame.
#[test]
fn a_gif_that_holds_its_last_frame_lasts_as_stated() {
    let v = Videos::new();
    for (name, colour) in [("a.png", "red"), ("b.png", "blue")] {
        let src = format!("color=c={colour}:s=32x32");
        ffmpeg(&["-f", "lavfi", "-i", &src, "-frames:v", "1", v.path(name).to_str().unwrap()]);
    }
    let list = v.path("list.txt");
    std::fs::write(&list, "file 'a.png'\nduration 0.5\nfile 'b.png'\nduration 3\nfile 'b.png'\n").unwrap();
    let gif = v.path("hold.gif");
    ffmpeg(&[
        "-f",
        "concat",
        "-i",
        list.to_str().unwrap(),
        "-fps_mode",
        "vfr",
        gif.to_str().unwrap(),
    ]);
    let ff = Ffmpeg::from_env();
    let stated = ff.probe(&gif).unwrap().duration.unwrap();
    assert!(stated > 6.0, "{stated}");
    for t in [2, 3, 8] {
        let s = ff.sample(&gif, t, Sampling::Uniform).unwrap();
        assert_eq!(s.duration, Some(stated), "T = {t}");
    }
}
