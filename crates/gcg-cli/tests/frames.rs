//! `gcg frames` and `gcg bench decode` end to end (needs the `ffmpeg` tool; fails without it).

use std::path::Path;
use std::process::{Command, Output};

fn gcg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gcg")).args(args).output().expect("running gcg")
}

fn make_video(path: &Path) {
    make_video_of(path, "testsrc=size=96x64:rate=20:duration=2");
}

/// An H.264 mp4 of a lavfi source.
fn make_video_of(path: &Path, source: &str) {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", source])
        .args(["-c:v", "libx264", "-bf", "2", "-pix_fmt", "yuv420p"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("these tests need the `ffmpeg` tool ({e}); install it with `apt-get install ffmpeg`"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn frames_command_writes_jpegs_and_metadata_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("clip.mp4");
    make_video(&video);
    let out = dir.path().join("frames/clip");
    let o = gcg(&[
        "frames",
        "--video",
        video.to_str().unwrap(),
        "--num-frames",
        "6",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON summary on stdout");
    assert_eq!(summary["source_frames"], 40);
    assert_eq!(summary["indices"], serde_json::json!([3, 10, 16, 23, 30, 36]));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "frame_0.jpg",
            "frame_1.jpg",
            "frame_2.jpg",
            "frame_3.jpg",
            "frame_4.jpg",
            "frame_5.jpg",
            "frames.json"
        ]
    );
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("frames.json")).unwrap()).unwrap();
    let ts: Vec<f64> = meta["timestamps"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
    let want = [3.0, 10.0, 16.0, 23.0, 30.0, 36.0].map(|i| i / 20.0);
    assert!(ts.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-9), "{ts:?}");
    assert_eq!(meta["fps"], 20.0);
    assert_eq!(meta["duration"], 2.0);
    let img = image::open(out.join("frame_5.jpg")).unwrap();
    assert_eq!((img.width(), img.height()), (96, 64));

    // No overwrite without --force; with it the folder is replaced.
    let o = gcg(&[
        "frames",
        "--video",
        video.to_str().unwrap(),
        "--num-frames",
        "6",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let o = gcg(&[
        "frames",
        "--video",
        video.to_str().unwrap(),
        "--num-frames",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--force",
        "--sampling",
        "official",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["indices"], serde_json::json!([1, 14, 27]));

    // A broken input fails with its name and leaves nothing behind.
    let bad = dir.path().join("bad.mp4");
    std::fs::write(&bad, "not a video").unwrap();
    let out2 = dir.path().join("frames/bad");
    let o = gcg(&[
        "frames",
        "--video",
        bad.to_str().unwrap(),
        "--num-frames",
        "4",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bad.mp4"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let left: Vec<String> = std::fs::read_dir(dir.path().join("frames"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(left, ["clip"]);
}

#[test]
fn bench_decode_prints_throughput_json() {
    let o = gcg(&[
        "bench",
        "decode",
        "--synthetic",
        "--size",
        "64x48",
        "--seconds",
        "1",
        "--num-frames",
        "4",
        "--iters",
        "1",
        "--seek",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(r["source_frames"], 30);
    assert!(r["select"]["decoded_frames_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["preprocess"]["frames_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(
        r["seek"]["identical_frames"], 4,
        "seeking and selecting should return the same pictures"
    );
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `gcg frames` of `video` into `out` (T frames, `extra` flags); the JSON summary, or the failed run.
fn frames(video: &Path, out: &Path, t: usize, extra: &[&str]) -> Result<serde_json::Value, Output> {
    let t = t.to_string();
    let mut args = vec![
        "frames",
        "--video",
        video.to_str().unwrap(),
        "--num-frames",
        &t,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = gcg(&args);
    if o.status.success() {
        Ok(serde_json::from_slice(&o.stdout).expect("JSON summary on stdout"))
    } else {
        Err(o)
    }
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_frames_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("frames.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect()
}

#[test]
fn frame_folder_with_a_gap_is_an_error_or_filled_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("clip.mp4");
    make_video(&video);
    // A complete 6-frame folder (the reference), and a copy without frames.json and frame_1.jpg.
    let full = dir.path().join("full");
    frames(&video, &full, 6, &[]).unwrap();
    let videos = dir.path().join("videos");
    let gap = videos.join("gap");
    std::fs::create_dir_all(&gap).unwrap();
    for i in [0, 2, 3, 4, 5] {
        std::fs::copy(full.join(format!("frame_{i}.jpg")), gap.join(format!("frame_{i}.jpg"))).unwrap();
    }
    // Re-encoding the complete folder gives the reference bytes of each position.
    let reference = dir.path().join("reference");
    frames(&full, &reference, 6, &[]).unwrap();

    let e = stderr(&frames(&gap, &dir.path().join("out"), 6, &[]).expect_err("a gap must be an error"));
    assert!(
        e.contains("gap") && e.contains("frame_1.jpg") && e.contains("missing") && e.contains("1 of 6"),
        "{e}"
    );
    assert!(!dir.path().join("out").exists());

    // --lenient: the gap is filled with the previous frame, the others stay at their positions.
    let out = dir.path().join("lenient");
    let o = gcg(&[
        "frames",
        "--video",
        gap.to_str().unwrap(),
        "--num-frames",
        "6",
        "--out",
        out.to_str().unwrap(),
        "--lenient",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("frame_1.jpg"),
        "the warning names the filled file: {}",
        stderr(&o)
    );
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["source_frames"], 6);
    assert_eq!(summary["indices"], serde_json::json!([0, 1, 2, 3, 4, 5]));
    for (k, from) in [(0, 0), (1, 0), (2, 2), (3, 3), (4, 4), (5, 5)] {
        assert!(
            bytes(&out.join(format!("frame_{k}.jpg"))) == bytes(&reference.join(format!("frame_{from}.jpg"))),
            "position {k} should hold frame {from}"
        );
    }

    // gcg features reads frame folders the same way: the gap fails the video, --lenient fills it.
    let features = |store: &str, lenient: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gcg"));
        c.args(["features", "--videos"])
            .arg(&videos)
            .arg("--store")
            .arg(dir.path().join(store));
        c.args([
            "--preset",
            "tiny",
            "--random-weights",
            "--num-frames",
            "4",
            "--shard-mb",
            "0",
            "--jobs",
            "1",
        ]);
        if lenient {
            c.arg("--lenient");
        }
        c.output().unwrap()
    };
    let o = features("store", false);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("frame_1.jpg") && stderr(&o).contains("missing"),
        "{}",
        stderr(&o)
    );
    let o = features("store_lenient", true);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn frames_json_that_disagrees_with_the_files_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("clip.mp4");
    make_video(&video);
    let full = dir.path().join("full");
    frames(&video, &full, 8, &[]).unwrap();
    let want_ts = floats(&read_frames_json(&full)["timestamps"]);
    let reference = dir.path().join("reference");
    frames(&full, &reference, 8, &[]).unwrap();

    // frame_5.jpg missing: 8 timestamps for 7 files.
    let missing = dir.path().join("missing");
    frames(&video, &missing, 8, &[]).unwrap();
    std::fs::remove_file(missing.join("frame_5.jpg")).unwrap();
    let e = stderr(&frames(&missing, &dir.path().join("o1"), 8, &[]).unwrap_err());
    assert!(
        e.contains("missing") && e.contains("frames.json") && e.contains("frame_5.jpg") && e.contains("8 timestamps"),
        "{e}"
    );
    // An extra file past the timestamps.
    let extra = dir.path().join("extra");
    frames(&video, &extra, 8, &[]).unwrap();
    std::fs::copy(extra.join("frame_0.jpg"), extra.join("frame_8.jpg")).unwrap();
    let e = stderr(&frames(&extra, &dir.path().join("o2"), 8, &[]).unwrap_err());
    assert!(e.contains("extra") && e.contains("frame_8.jpg") && e.contains("frames.json"), "{e}");

    // --lenient: frame_5 is filled with frame_4 and every timestamp stays on its position.
    let out = dir.path().join("lenient");
    let s = frames(&missing, &out, 8, &["--lenient"]).unwrap();
    assert_eq!(s["indices"], serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7]));
    assert_eq!(floats(&s["timestamps"]), want_ts);
    assert_eq!(floats(&read_frames_json(&out)["timestamps"]), want_ts);
    assert!(bytes(&out.join("frame_5.jpg")) == bytes(&reference.join("frame_4.jpg")));
    assert!(bytes(&out.join("frame_6.jpg")) == bytes(&reference.join("frame_6.jpg")));
}

/// The number of frames ffmpeg decodes from `video` (ffprobe -count_frames).
fn decodable_frames(video: &Path) -> usize {
    let o = Command::new("ffprobe")
        .args([
            "-v",
            "quiet",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(video)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().trim_end_matches(',').parse().unwrap()
}

#[test]
fn truncated_video_with_exact_count_fails_or_is_honest() {
    let dir = tempfile::tempdir().unwrap();
    // 80 frames at 20 fps, index first (fast start), cut in half: the container still says 80.
    let whole = dir.path().join("whole.mp4");
    let out = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=96x64:rate=20:duration=4",
        ])
        .args(["-c:v", "libx264", "-g", "10", "-pix_fmt", "yuv420p", "-movflags", "+faststart"])
        .arg(&whole)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let video = dir.path().join("cut.mp4");
    let b = bytes(&whole);
    std::fs::write(&video, &b[..b.len() / 2]).unwrap();
    let n = decodable_frames(&video);
    assert!(n > 4 && n < 80, "the cut should leave part of the frames: {n}");

    for extra in [&["--exact-count"][..], &[]] {
        let e = stderr(&frames(&video, &dir.path().join("strict"), 4, extra).expect_err("a truncated video must fail"));
        assert!(
            e.contains("cut.mp4") && e.contains("80 frames") && e.contains(&format!("only {n} decode")),
            "{extra:?}: {e}"
        );
        assert!(
            e.contains("4.00 s") && e.contains(&format!("{:.2} s", n as f64 / 20.0)),
            "{extra:?}: {e}"
        );
    }

    for extra in [&["--exact-count", "--lenient"][..], &["--lenient"]] {
        let out = dir.path().join(format!("lenient{}", extra.len()));
        let o = gcg(&[
            &[
                "frames",
                "--video",
                video.to_str().unwrap(),
                "--num-frames",
                "4",
                "--out",
                out.to_str().unwrap(),
            ],
            extra,
        ]
        .concat());
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("cut.mp4") && stderr(&o).contains(&n.to_string()),
            "{extra:?}: {}",
            stderr(&o)
        );
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(s["source_frames"], n);
        let want: Vec<usize> = (0..4).map(|i| (2 * i + 1) * n / 8).collect();
        assert_eq!(s["indices"], serde_json::json!(want));
        let meta = read_frames_json(&out);
        let duration = meta["duration"].as_f64().unwrap();
        assert!(
            (duration - n as f64 / 20.0).abs() < 1e-9,
            "{extra:?}: duration {duration} for {n} frames"
        );
        let ts = floats(&meta["timestamps"]);
        assert!(ts.iter().zip(&want).all(|(t, &i)| (t - i as f64 / 20.0).abs() < 1e-9), "{ts:?}");
        assert!(ts.iter().all(|&t| t < duration), "{ts:?}");
    }
}

#[test]
fn more_than_a_hundred_frames_sample_like_a_few() {
    let dir = tempfile::tempdir().unwrap();
    // 200 frames at 20 fps.
    let video = dir.path().join("long.mp4");
    let out = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x48:rate=20:duration=10",
        ])
        .args(["-c:v", "libx264", "-bf", "2", "-pix_fmt", "yuv420p"])
        .arg(&video)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (t, sampling) in [(150usize, "uniform"), (101, "uniform"), (120, "official"), (250, "uniform")] {
        let o = dir.path().join(format!("f{t}{sampling}"));
        let s = frames(&video, &o, t, &["--sampling", sampling]).unwrap_or_else(|o| panic!("T = {t}: {}", stderr(&o)));
        assert_eq!(s["frames"], t);
        assert_eq!(s["source_frames"], 200);
        let want: Vec<usize> = match sampling {
            // Centres of T segments of 200 frames (repeats past 200).
            "uniform" => (0..t).map(|i| (2 * i + 1) * 200 / (2 * t)).collect(),
            // k = ⌊199 / 120⌋ = 1: frames 1..=120.
            _ => (1..=t).collect(),
        };
        assert_eq!(s["indices"], serde_json::json!(want), "T = {t}");
        let ts = floats(&s["timestamps"]);
        assert_eq!(ts.len(), t);
        assert!(ts.windows(2).all(|w| w[0] <= w[1]), "T = {t}: timestamps out of order");
        assert!(
            ts.iter().zip(&want).all(|(a, &i)| (a - i as f64 / 20.0).abs() < 1e-9),
            "T = {t}: {ts:?}"
        );
        assert_eq!(std::fs::read_dir(&o).unwrap().count(), t + 1);
    }
}

/// A file name that ffmpeg would parse as a URL or an option is read as the file it names
/// (relative, as a user types it): `file:y.mp4` used to decode y.mp4, another video, and so
/// poison the ask cache under its own content's id; `a:b.mp4` and an ISO time were unknown
/// protocols; `-dash.mp4` an option.
#[test]
fn file_names_that_look_like_urls_or_options_are_the_files_they_name() {
    let dir = tempfile::tempdir().unwrap();
    // y.mp4 has 40 frames at 96x64; the video under each odd name has 10 at 64x48.
    make_video(&dir.path().join("y.mp4"));
    let src = dir.path().join("src.mp4");
    make_video_of(&src, "testsrc=size=64x48:rate=10:duration=1");
    for (i, name) in ["file:y.mp4", "a:b.mp4", "2024-01-01T10:22:33.mp4", "concat:y.mp4", "-dash.mp4"]
        .iter()
        .enumerate()
    {
        std::fs::copy(&src, dir.path().join(name)).unwrap();
        let out = format!("out{i}");
        let o = Command::new(env!("CARGO_BIN_EXE_gcg"))
            .current_dir(dir.path())
            .args(["frames", &format!("--video={name}"), "--num-frames", "2", "--out", &out])
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["source_frames"], 10, "{name}: {summary}");
        let img = image::open(dir.path().join(&out).join("frame_0.jpg")).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48), "{name}");
    }
}
