//! `gcg frames` and `gcg bench decode` end to end (needs the `ffmpeg` tool; fails without it).

use std::path::Path;
use std::process::{Command, Output};

fn gcg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gcg")).args(args).output().expect("running gcg")
}

fn make_video(path: &Path) {
    let out = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=96x64:rate=20:duration=2",
        ])
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
