//! `--out` on something that exists: without `--force` the error names the real flag; with it
//! the output is replaced and the command succeeds, leaving nothing else beside it (the folder
//! moved aside during the swap is gone, also when `--out` was a file). `gcg synth` and
//! `gcg frames` (read from a frame folder, so no ffmpeg) are the commands with `--out`/`--force`.

use std::path::Path;
use std::process::{Command, Output};

fn gcg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gcg")).args(args).output().expect("running gcg")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The names in `dir`, sorted (hidden ones included).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

fn synth(out: &Path, seed: &str, force: bool) -> Output {
    let mut args = vec![
        "synth",
        "--videos",
        "2",
        "--seed",
        seed,
        "--out",
        out.to_str().unwrap(),
        "--no-mp4",
        "--threads",
        "1",
    ];
    if force {
        args.push("--force");
    }
    gcg(&args)
}

#[test]
fn synth_out_force_replaces_a_folder_or_a_file_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("p");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("world");
    let o = synth(&out, "1", false);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read(out.join("world.json")).unwrap();

    // Without --force: refused, and the hint is the flag the command has.
    let o = synth(&out, "2", false);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert!(!err.contains("overwrite to replace"), "{err}");
    assert_eq!(std::fs::read(out.join("world.json")).unwrap(), first);

    // With --force: replaced, exit 0, nothing left beside it.
    let o = synth(&out, "2", true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read(out.join("world.json")).unwrap(), first);
    assert_eq!(names(&parent), ["world"]);

    // --out naming an existing file: replaced by the folder, no hidden copy of the file left.
    let file = parent.join("notes");
    std::fs::write(&file, "a file").unwrap();
    let o = synth(&file, "3", false);
    assert!(!o.status.success() && stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a file");
    let o = synth(&file, "3", true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(file.join("world.json").is_file());
    assert_eq!(names(&parent), ["notes", "world"]);
}

#[test]
fn frames_out_force_replaces_a_folder_or_a_file_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    let o = synth(&world, "1", false);
    assert!(o.status.success(), "{}", stderr(&o));
    let video = world.join("frames/v00000");
    let parent = tmp.path().join("p");
    std::fs::create_dir(&parent).unwrap();
    let frames = |out: &Path, n: &str, force: bool| {
        let mut args = vec![
            "frames",
            "--video",
            video.to_str().unwrap(),
            "--num-frames",
            n,
            "--out",
            out.to_str().unwrap(),
        ];
        if force {
            args.push("--force");
        }
        gcg(&args)
    };
    let out = parent.join("clip");
    let o = frames(&out, "4", false);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = frames(&out, "3", false);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert!(!err.contains("use overwrite"), "{err}");
    assert_eq!(names(&out).len(), 5);

    let o = frames(&out, "3", true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(names(&out), ["frame_0.jpg", "frame_1.jpg", "frame_2.jpg", "frames.json"]);
    assert_eq!(names(&parent), ["clip"]);

    let file = parent.join("old.txt");
    std::fs::write(&file, "a file").unwrap();
    let o = frames(&file, "2", true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(names(&file), ["frame_0.jpg", "frame_1.jpg", "frames.json"]);
    assert_eq!(names(&parent), ["clip", "old.txt"]);

    // --out through a symbolic link: the folder it points to is replaced and the link kept (the
    // link itself was replaced by the new folder, the old frames left behind it).
    #[cfg(unix)]
    {
        let link = tmp.path().join("latest");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        let o = frames(&link, "2", true);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink(), "the link is kept");
        assert_eq!(names(&out), ["frame_0.jpg", "frame_1.jpg", "frames.json"]);
        assert_eq!(names(&parent), ["clip", "old.txt"], "nothing left beside the target");
        // A dangling link: the folder it names is created.
        let dangling = tmp.path().join("next");
        std::os::unix::fs::symlink(parent.join("new"), &dangling).unwrap();
        let o = frames(&dangling, "2", false);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(names(&parent.join("new")), ["frame_0.jpg", "frame_1.jpg", "frames.json"]);
    }
}

#[test]
fn a_replacement_killed_at_any_point_leaves_a_whole_folder_under_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("p");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("world");
    let o = synth(&out, "1", false);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read(out.join("world.json")).unwrap();
    let second = {
        let other = tmp.path().join("other");
        assert!(synth(&other, "2", false).status.success());
        std::fs::read(other.join("world.json")).unwrap()
    };
    assert_ne!(first, second);
    for (fault, want_after_kill) in [("atomic-dir:1", &first), ("atomic-dir-swap:1", &second)] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gcg"));
        c.args([
            "synth",
            "--videos",
            "2",
            "--seed",
            "2",
            "--no-mp4",
            "--threads",
            "1",
            "--force",
            "--out",
        ])
        .arg(&out)
        .env("GCG_FAULT", fault);
        let o = c.output().unwrap();
        assert!(
            !o.status.success() && stderr(&o).contains("injected fault"),
            "{fault}: {}",
            stderr(&o)
        );
        // Killed before the swap the old world is there; killed after it, the new one.
        assert_eq!(&std::fs::read(out.join("world.json")).unwrap(), want_after_kill, "{fault}");
        // The next replacement clears the killed one's leftovers and completes.
        let o = synth(&out, "1", true);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(std::fs::read(out.join("world.json")).unwrap(), first);
        assert_eq!(names(&parent), ["world"], "{fault}");
    }
}

#[test]
fn frames_killed_while_replacing_a_folder_leave_a_whole_one() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    assert!(synth(&world, "1", false).status.success());
    let video = world.join("frames/v00000");
    let out = tmp.path().join("p/clip");
    let frames = |n: &str, fault: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gcg"));
        c.args(["frames", "--video", video.to_str().unwrap(), "--num-frames", n, "--force", "--out"])
            .arg(&out);
        if let Some(f) = fault {
            c.env("GCG_FAULT", f);
        }
        c.output().unwrap()
    };
    assert!(frames("4", None).status.success());
    for (fault, frames_after_kill) in [("atomic-dir:1", 5), ("atomic-dir-swap:1", 3)] {
        assert!(frames("4", None).status.success());
        let o = frames("2", Some(fault));
        assert!(
            !o.status.success() && stderr(&o).contains("injected fault"),
            "{fault}: {}",
            stderr(&o)
        );
        // The old 4 frames (+ frames.json) before the swap, the new 2 after it: never a mix.
        assert_eq!(names(&out).len(), frames_after_kill, "{fault}: {:?}", names(&out));
        assert!(frames("2", None).status.success());
        assert_eq!(names(&out), ["frame_0.jpg", "frame_1.jpg", "frames.json"], "{fault}");
        assert_eq!(names(&tmp.path().join("p")), ["clip"], "{fault}");
    }
}

#[test]
fn frames_out_over_the_input_video_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    assert!(synth(&world, "1", false).status.success());
    let video = world.join("frames/v00000");
    let before = names(&video);
    let o = gcg(&[
        "frames",
        "--video",
        video.to_str().unwrap(),
        "--num-frames",
        "2",
        "--force",
        "--out",
        video.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("also the --video input"),
        "{}",
        stderr(&o)
    );
    assert_eq!(names(&video), before);
}

#[test]
fn force_never_replaces_a_folder_that_another_writer_made_nor_one_holding_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    // Someone's folder: --force would delete what it holds, unseen. Refused, kept whole.
    let mine = tmp.path().join("mine");
    std::fs::create_dir_all(mine.join("inner")).unwrap();
    std::fs::write(mine.join("inner/important.txt"), "keep me").unwrap();
    let o = synth(&mine, "1", true);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("is not a synthetic world") && err.contains("world.json"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(mine.join("inner/important.txt")).unwrap(), "keep me");

    let world = tmp.path().join("world");
    assert!(synth(&world, "1", false).status.success());
    let frames = |video: &Path, out: &Path| {
        gcg(&[
            "frames",
            "--video",
            video.to_str().unwrap(),
            "--num-frames",
            "2",
            "--force",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let video = world.join("frames/v00000");
    let o = frames(&video, &mine);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("is not a frames folder"), "{err}");
    assert_eq!(names(&mine), ["inner"]);

    // An --out above the input: replacing it would delete the video (and the whole world).
    let before = names(&world);
    let o = frames(&video, &world);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("holds the --video input"), "{err}");
    assert_eq!(names(&world), before);
    assert_eq!(names(&video).len(), names(&world.join("frames/v00001")).len());
    // A world over a world, and frames over frames, are still replaced.
    assert!(synth(&world, "2", true).status.success());
    let clip = tmp.path().join("clip");
    assert!(frames(&world.join("frames/v00000"), &clip).status.success());
    assert!(frames(&world.join("frames/v00001"), &clip).status.success());
}

#[test]
fn frames_refuses_times_a_store_would_refuse_naming_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    assert!(synth(&world, "1", false).status.success());
    let video = world.join("frames/v00000");
    let meta = video.join("frames.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    j["timestamps"][1] = (-1.0).into();
    std::fs::write(&meta, j.to_string()).unwrap();
    let out = tmp.path().join("clip");
    let o = gcg(&[
        "frames",
        "--video",
        video.to_str().unwrap(),
        "--num-frames",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("v00000/frames.json: the time of frame_1 is -1 s"),
        "{err}"
    );
    assert!(!out.exists());
}
