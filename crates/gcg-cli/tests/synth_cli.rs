//! `gcg synth` end to end: flags and config files reach the world, the summary is JSON, bad
//! flags are errors.

use serde_json::Value;
use std::process::{Command, Output};

fn gcg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gcg")).args(args).output().expect("running gcg")
}

#[test]
fn synth_writes_a_world_from_flags_and_config_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("world");
    let o = out.to_str().unwrap();
    let r = gcg(&[
        "synth",
        "--seed",
        "3",
        "--videos",
        "5",
        "--out",
        o,
        "--no-mp4",
        "--frames",
        "48",
        "--event-frames",
        "7",
        "--questions",
        "3",
        "--kinds",
        "color,after",
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let s: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(s["videos"]["train"], 3);
    assert_eq!(s["videos"]["val"], 1);
    assert_eq!(s["questions"]["train"], 9);
    assert_eq!(s["mp4"], false);
    assert_eq!(s["frames"], 5 * 48);
    assert_eq!(s["kinds"]["shape"], 0);
    assert_eq!(s["types"]["DO"].as_u64().unwrap() + s["types"]["TN"].as_u64().unwrap(), 15);
    let world: Value = serde_json::from_str(&std::fs::read_to_string(out.join("world.json")).unwrap()).unwrap();
    assert_eq!(world["config"]["frames"], 48);
    for v in world["videos"].as_array().unwrap() {
        for e in v["events"].as_array().unwrap() {
            assert_eq!(e["end"].as_u64().unwrap() - e["start"].as_u64().unwrap(), 6);
        }
    }
    assert!(out.join("frames/v00004/frame_47.jpg").is_file());
    assert!(!out.join("frames/v00004/frame_48.jpg").exists());
    assert!(!out.join("videos").exists());

    // The same world again fails without --force.
    let again = gcg(&["synth", "--videos", "2", "--out", o, "--no-mp4"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // A TOML config, overridden by a flag.
    let cfg = tmp.path().join("synth.toml");
    std::fs::write(&cfg, "seed = 3\nvideos = 5\nframes = 48\nevent_frames = [7, 7]\nquestions_per_video = 3\nkinds = [\"color\", \"after\"]\nval_fraction = 0.2\ntest_fraction = 0.2\n").unwrap();
    let out2 = tmp.path().join("world2");
    let r = gcg(&[
        "synth",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--no-mp4",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for f in [
        "train.csv",
        "gsub_val.json",
        "world.json",
        "captions.jsonl",
        "frames/v00002/frame_9.jpg",
    ] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(out2.join(f)).unwrap(), "{f}");
    }
    let printed = gcg(&[
        "synth",
        "--config",
        cfg.to_str().unwrap(),
        "--seed",
        "4",
        "--out",
        "unused",
        "--print-config",
    ]);
    let c: Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!((c["seed"].as_u64(), c["videos"].as_u64()), (Some(4), Some(5)));
}

#[test]
fn synth_rejects_bad_flags_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("w");
    let o = o.to_str().unwrap();
    for (args, want) in [
        (vec!["--kinds", "colour"], "unknown question kind `colour`"),
        (vec!["--event-frames", "6-x"], "--event-frames"),
        (vec!["--frames", "10"], "frames 10"),
        (vec!["--size", "30"], "event_size"),
    ] {
        let mut all = vec!["synth", "--out", o, "--no-mp4"];
        all.extend(args.iter());
        let r = gcg(&all);
        let err = String::from_utf8_lossy(&r.stderr).to_string();
        assert!(!r.status.success() && err.contains(want), "{args:?}: {err}");
    }
    assert!(!tmp.path().join("w").exists());
}
