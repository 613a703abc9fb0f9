//! Runs that cannot silently mix with other runs (issue #12): a new run never writes into another
//! run's directory, prediction files are resumed only by the checkpoint that wrote them, a resumed
//! run logs each step once, a bad config leaves nothing behind, and a run works from any working
//! directory. One `gcg demo --quick` (shared by the tests) provides the runs.

use gcg::run::RunConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn gcg_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gcg"));
    c.args(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.output().expect("running gcg")
}

fn gcg(args: &[&str]) -> Output {
    gcg_in(None, args)
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn fails(o: &Output, what: &str, needles: &[&str]) -> String {
    assert!(!o.status.success(), "{what} succeeded");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    for n in needles {
        assert!(err.contains(n), "{what}: the error lacks {n:?}:\n{err}");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The quick demo's output folder (made once per test binary).
fn demo() -> &'static Path {
    static DEMO: OnceLock<PathBuf> = OnceLock::new();
    DEMO.get_or_init(|| {
        let out = tempfile::tempdir().unwrap().keep().join("demo");
        ok(
            &gcg(&["demo", "--quick", "--seed", "0", "--out", s(&out), "--quiet"]),
            "gcg demo --quick",
        );
        out
    })
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn rows(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (qid, video, prediction, moments) of every row.
fn answers(p: &Path) -> Vec<(Value, Value, Value, Value)> {
    rows(p)
        .into_iter()
        .map(|r| (r["qid"].clone(), r["video"].clone(), r["prediction"].clone(), r["moments"].clone()))
        .collect()
}

/// The training rows of a metrics log: (step, loss).
fn steps(run: &Path) -> Vec<(u64, f64)> {
    rows(&run.join("metrics.jsonl"))
        .iter()
        .filter(|r| r.get("split").is_none())
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

/// A run config file made from a demo run's config.
fn write_config(path: &Path, cfg: &RunConfig) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, toml::to_string(cfg).unwrap()).unwrap();
}

#[test]
fn a_new_run_into_an_existing_run_dir_is_refused_and_overwrite_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    copy_dir(&demo().join("runs/uniform"), &run);
    let mut cfg = RunConfig::from_run_dir(&run).unwrap();
    cfg.train.max_steps = Some(2);
    let toml = tmp.path().join("run.toml");
    write_config(&toml, &cfg);
    let metrics = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let weights = std::fs::read(run.join("checkpoints/last/weights.safetensors")).unwrap();
    let old_meta = json(&run.join("predictions-test.jsonl.meta.json"));

    // What a killed atomic write of the run's own files leaves counts as the run's.
    std::fs::write(run.join(".metrics.jsonl.tmp-999999"), "partial").unwrap();
    let r = gcg(&["train", "--config", s(&toml), "--quiet"]);
    fails(
        &r,
        "a new run into a finished run",
        &["already holds a run", "--resume", "--overwrite"],
    );
    assert_eq!(
        std::fs::read(run.join("metrics.jsonl")).unwrap(),
        metrics,
        "the old log was touched"
    );
    assert_eq!(std::fs::read(run.join("checkpoints/last/weights.safetensors")).unwrap(), weights);

    // --overwrite starts over: a fresh log, new checkpoints, test predictions of the new model.
    ok(
        &gcg(&["train", "--config", s(&toml), "--overwrite", "--quiet"]),
        "gcg train --overwrite",
    );
    assert_eq!(steps(&run).iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2]);
    let meta = json(&run.join("predictions-test.jsonl.meta.json"));
    assert_ne!(
        meta["weights_hash"], old_meta["weights_hash"],
        "test predictions of the old checkpoint were kept"
    );
    let fresh = tmp.path().join("fresh.jsonl");
    ok(
        &gcg(&["predict", "--run", s(&run), "--split", "test", "--out", s(&fresh), "--quiet"]),
        "gcg predict",
    );
    assert_eq!(answers(&run.join("predictions-test.jsonl")), answers(&fresh));
    assert!(!std::fs::read_dir(&run)
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".overwritten")));
}

#[test]
fn a_run_never_scores_predictions_of_another_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("uniform");
    copy_dir(&demo().join("runs/uniform"), &run);
    // Another checkpoint's predictions where the run's belong (as a previous run left them).
    for f in ["predictions-test.jsonl", "predictions-test.jsonl.meta.json"] {
        std::fs::copy(demo().join("runs/grounding").join(f), run.join(f)).unwrap();
    }
    ok(&gcg(&["train", "--resume", s(&run), "--quiet"]), "gcg train --resume");
    let own = demo().join("runs/uniform");
    assert_eq!(
        answers(&run.join("predictions-test.jsonl")),
        answers(&own.join("predictions-test.jsonl"))
    );
    assert_eq!(json(&run.join("metrics-test.json")), json(&own.join("metrics-test.json")));
}

#[test]
fn predict_resumes_only_a_file_of_the_same_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (uniform, grounding) = (demo().join("runs/uniform"), demo().join("runs/grounding"));
    let out = tmp.path().join("p.jsonl");
    let predict = |run: &Path, out: &Path| gcg(&["predict", "--run", s(run), "--split", "test", "--out", s(out), "--quiet"]);
    ok(&predict(&uniform, &out), "gcg predict");
    let full = std::fs::read_to_string(&out).unwrap();

    let err = fails(&predict(&grounding, &out), "predict into another run's file", &["another model"]);
    assert!(err.contains(s(&uniform)) && err.contains(s(&grounding)), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), full, "the file was changed");

    // A partial file of the same checkpoint is completed.
    let first: String = full.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&out, first).unwrap();
    ok(&predict(&uniform, &out), "gcg predict (resumed)");
    assert_eq!(answers(&out), answers(&tmp.path().join("p.jsonl")));
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), full.lines().count());

    // A plain JSONL (no provenance) is not added to, but `gcg eval` reads it as before.
    let plain = tmp.path().join("plain.jsonl");
    std::fs::write(&plain, full.lines().take(2).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    fails(&predict(&uniform, &plain), "predict into a plain file", &["plain.jsonl.meta.json"]);
    let world = demo().join("world");
    let r = gcg(&[
        "eval",
        "--dataset",
        "nextqa",
        "--annotations",
        s(&world.join("test.csv")),
        "--predictions",
        s(&plain),
    ]);
    ok(&r, "gcg eval of a plain file");
}

#[test]
fn a_resumed_run_logs_each_step_once() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::copy(demo().join("runs/uniform/config.json"), run.join("config.json")).unwrap();
    let train = |max_steps: u64| {
        let o = gcg(&[
            "train",
            "--resume",
            s(&run),
            "--set",
            "train.epochs=3",
            "--set",
            &format!("train.max_steps={max_steps}"),
            "--quiet",
        ]);
        ok(&o, &format!("gcg train --resume (max_steps {max_steps})"));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    // Nothing to resume yet (a run killed before its first checkpoint): it says so.
    let err = train(2);
    assert!(err.contains("no checkpoint to resume from"), "{err}");
    let at2 = tmp.path().join("last-at-2");
    copy_dir(&run.join("checkpoints/last"), &at2);
    assert!(!train(5).contains("no checkpoint to resume from"));
    let want = steps(&run);
    assert_eq!(want.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    // Killed after logging step 5 but before checkpointing after step 2: the last checkpoint is
    // the one of step 2 again.
    std::fs::remove_dir_all(run.join("checkpoints/last")).unwrap();
    copy_dir(&at2, &run.join("checkpoints/last"));
    let _ = train(5);
    assert_eq!(steps(&run), want, "steps 3..5 are logged once, with the same losses");
}

#[test]
fn a_bad_config_leaves_no_run_dir_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let base = RunConfig::from_run_dir(&demo().join("runs/uniform")).unwrap();
    let run = tmp.path().join("new-run");
    // A test split whose videos the store does not hold.
    let unknown = tmp.path().join("unknown.csv");
    let header = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n";
    std::fs::write(&unknown, format!("{header}nosuchvideo,64,64,64,what,1,0,DO,a,b,c,d,e\n")).unwrap();
    let world = demo().join("world");
    for (what, edit, needle) in [
        ("a missing train file", "missing", "missing.csv"),
        ("epochs = 0", "epochs", "epochs"),
        ("warmup_fraction = 2", "warmup", "warmup_fraction"),
        ("a test split not in the store", "test", "checking [data] test before training"),
        ("the test split's spans as val_grounding", "gsub", "has spans for none of the"),
        ("frames unlike the store's T", "frames", "[model.grounding] frames"),
    ] {
        let mut cfg = base.clone();
        cfg.run_dir = Some(run.clone());
        match edit {
            "missing" => cfg.data.train = Some(tmp.path().join("missing.csv")),
            "epochs" => cfg.train.epochs = 0,
            "test" => cfg.data.test = Some(unknown.clone()),
            "gsub" => cfg.data.val_grounding = Some(world.join("gsub_test.json")),
            "frames" => cfg.model.grounding.frames += 4,
            _ => cfg.train.warmup_fraction = 2.0,
        }
        let toml = tmp.path().join("run.toml");
        write_config(&toml, &cfg);
        fails(&gcg(&["train", "--config", s(&toml), "--quiet"]), what, &[needle]);
        assert!(!run.exists(), "{what}: {} was left behind", run.display());
    }
}

#[test]
fn a_run_works_from_any_working_directory_and_after_a_move() {
    let tmp = tempfile::tempdir().unwrap();
    // A project folder whose config names everything relative to itself.
    let proj = tmp.path().join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    std::os::unix::fs::symlink(demo(), proj.join("demo")).unwrap();
    let mut cfg = RunConfig::from_run_dir(&demo().join("runs/uniform")).unwrap();
    cfg.run_dir = Some("runs/rel".into());
    cfg.weights.tokenizers = Some("demo/tokenizers".into());
    cfg.data.store = "demo/store".into();
    for (slot, name) in [
        (&mut cfg.data.train, "train.csv"),
        (&mut cfg.data.val, "val.csv"),
        (&mut cfg.data.test, "test.csv"),
        (&mut cfg.data.val_grounding, "gsub_val.json"),
        (&mut cfg.data.test_grounding, "gsub_test.json"),
    ] {
        *slot = Some(PathBuf::from("demo/world").join(name));
    }
    cfg.train.max_steps = Some(1);
    write_config(&proj.join("run.toml"), &cfg);
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    ok(
        &gcg_in(Some(&elsewhere), &["train", "--config", "../proj/run.toml", "--quiet"]),
        "gcg train from another directory",
    );
    let trained = proj.join("runs/rel");
    let stored = json(&trained.join("config.json"));
    assert!(Path::new(stored["data"]["store"].as_str().unwrap()).is_absolute(), "{stored}");
    // Moved, and used from yet another directory.
    let moved = tmp.path().join("moved");
    std::fs::rename(&trained, &moved).unwrap();
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    ok(
        &gcg_in(
            Some(&other),
            &["predict", "--run", "../moved", "--split", "test", "--out", "p.jsonl", "--quiet"],
        ),
        "gcg predict --run of a moved run",
    );
    assert_eq!(answers(&other.join("p.jsonl")), answers(&moved.join("predictions-test.jsonl")));
}

/// With `val_grounding`, validation answers the val questions that have spans (those `gcg eval`
/// scores for NExT-GQA) and logs NExT-GQA's grounding metrics: the logged numbers equal `gcg
/// eval`'s on `gcg predict`'s file of the same checkpoint.
#[test]
fn validation_with_spans_scores_what_eval_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let world = demo().join("world");
    // Spans for half of the val videos only.
    let gsub = json(&world.join("gsub_val.json"));
    let kept: serde_json::Map<String, Value> = gsub
        .as_object()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, (k, v))| (k.clone(), v.clone()))
        .collect();
    let cut = tmp.path().join("gsub_val_half.json");
    std::fs::write(&cut, Value::Object(kept).to_string()).unwrap();
    let mut cfg = RunConfig::from_run_dir(&demo().join("runs/grounding")).unwrap();
    let run = tmp.path().join("run");
    cfg.run_dir = Some(run.clone());
    cfg.data.val_grounding = Some(cut.clone());
    cfg.data.test = None;
    cfg.data.test_grounding = None;
    cfg.train.epochs = 1;
    cfg.train.grounding_warmup_epochs = 0;
    let toml = tmp.path().join("run.toml");
    write_config(&toml, &cfg);
    let o = gcg(&["train", "--config", s(&toml)]);
    ok(&o, "gcg train with val_grounding");
    let val: Vec<Value> = rows(&run.join("metrics.jsonl"))
        .into_iter()
        .filter(|r| r["split"] == "val")
        .collect();
    assert_eq!(val.len(), 1, "{val:?}");
    let row = &val[0];
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("mIoP"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let p = tmp.path().join("p.jsonl");
    let val_csv = cfg.data.val.clone().unwrap();
    ok(
        &gcg(&[
            "predict",
            "--run",
            s(&run),
            "--checkpoint",
            "last",
            "--split",
            "val",
            "--out",
            s(&p),
            "--quiet",
        ]),
        "gcg predict --split val",
    );
    let m = tmp.path().join("m.json");
    ok(
        &gcg(&[
            "eval",
            "--dataset",
            "nextqa",
            "--annotations",
            s(&val_csv),
            "--grounding",
            s(&cut),
            "--predictions",
            s(&p),
            "--json",
            s(&m),
        ]),
        "gcg eval",
    );
    let m = json(&m);
    let annotated = std::fs::read_to_string(&val_csv).unwrap().lines().count() - 1;
    let spans: usize = json(&cut)
        .as_object()
        .unwrap()
        .values()
        .map(|v| v["location"].as_object().unwrap().len())
        .sum();
    assert!(spans < annotated, "the cut file should leave questions without spans");
    assert_eq!(row["grounding_evaluated"], spans);
    for (logged, scored) in [
        ("accuracy", "overall"),
        ("mIoP", "mIoP"),
        ("IoP@0.5", "IoP@0.5"),
        ("mIoU", "mIoU"),
        ("Acc@GQA", "Acc@GQA"),
    ] {
        let (a, b) = (row[logged].as_f64().unwrap(), m[scored].as_f64().unwrap());
        assert!((a - b).abs() < 1e-9, "{logged} {a} against eval's {scored} {b}\n{row}\n{m}");
    }
}

/// `gcg train --resume RUN` (4 steps over 2 epochs, a checkpoint after every step, then the test
/// split's predictions), aborted at the N-th crossing of a write site when `fault` is given.
fn train_with_fault(run: &Path, fault: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gcg"));
    c.args(["train", "--resume", s(run), "--quiet"]);
    for set in ["train.epochs=2", "train.max_steps=4", "train.checkpoint_every=1"] {
        c.args(["--set", set]);
    }
    if let Some(f) = fault {
        c.env("GCG_FAULT", f);
    }
    c.output().expect("running gcg")
}

/// What a finished run left: its last weights (bytes), training rows (step, loss) and test answers.
type RunResult = (Vec<u8>, Vec<(u64, f64)>, Vec<(Value, Value, Value, Value)>);

fn run_result(run: &Path) -> RunResult {
    (
        std::fs::read(run.join("checkpoints/last/weights.safetensors")).unwrap(),
        steps(run),
        answers(&run.join("predictions-test.jsonl")),
    )
}

/// Every file a reader could meet in the run is whole: a checkpoint folder present under its
/// name has all its files, each readable.
fn assert_whole(run: &Path, what: &str) {
    for ck in ["last", "best"] {
        let dir = run.join("checkpoints").join(ck);
        if !dir.exists() {
            continue;
        }
        for f in ["weights.safetensors", "optimizer.safetensors"] {
            gcg::weights::SafetensorsSource::open(dir.join(f)).unwrap_or_else(|e| panic!("{what}: {ck}/{f}: {e:#}"));
        }
        json(&dir.join("state.json"));
        json(&dir.join("config.json"));
    }
}

#[test]
fn a_run_killed_at_any_write_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = |name: &str| {
        let run = tmp.path().join(name);
        std::fs::create_dir_all(&run).unwrap();
        std::fs::copy(demo().join("runs/uniform/config.json"), run.join("config.json")).unwrap();
        run
    };
    let base = fresh("base");
    ok(&train_with_fault(&base, None), "the uninterrupted run");
    let want = run_result(&base);
    assert_eq!(want.1.len(), 4);
    // Each kind of write site once, and the first and a later checkpoint.
    for fault in [
        "atomic-safetensors:3",
        "atomic-file:2",
        "atomic-dir:1",
        "atomic-dir:3",
        "atomic-dir-swap:2",
        "prediction-row:2",
    ] {
        let run = fresh(&fault.replace(':', "-"));
        let o = train_with_fault(&run, Some(fault));
        assert!(!o.status.success(), "{fault}: the fault site was not reached");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("injected fault"),
            "{fault}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_whole(&run, fault);
        ok(&train_with_fault(&run, None), &format!("the run resumed after {fault}"));
        assert_whole(&run, fault);
        let got = run_result(&run);
        assert!(got.0 == want.0, "{fault}: the final weights differ from the uninterrupted run's");
        assert_eq!(got.1, want.1, "{fault}: training rows");
        assert_eq!(got.2, want.2, "{fault}: test answers");
        let litter: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(litter.is_empty(), "{fault}: left {litter:?}");
    }
}

#[test]
fn a_run_is_not_started_among_other_files_nor_changed_by_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let base = RunConfig::from_run_dir(&demo().join("runs/uniform")).unwrap();
    // A run_dir holding someone's files (here: the working directory of a user).
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("notes.txt"), "mine").unwrap();
    let mut cfg = base.clone();
    cfg.run_dir = Some(home.clone());
    cfg.train.max_steps = Some(1);
    let toml = tmp.path().join("run.toml");
    write_config(&toml, &cfg);
    fails(
        &gcg(&["train", "--config", s(&toml), "--quiet"]),
        "a run among other files",
        &["notes.txt", "not a run's"],
    );
    let mut names: Vec<String> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["notes.txt"]);

    // A finished run resumed with another mode is refused; its config is untouched.
    let run = tmp.path().join("run");
    copy_dir(&demo().join("runs/grounding"), &run);
    let before = std::fs::read(run.join("config.json")).unwrap();
    fails(
        &gcg(&["train", "--resume", s(&run), "--set", "model.mode=\"oracle\"", "--quiet"]),
        "a resume that changes the mode",
        &["cannot change its [model] settings"],
    );
    assert_eq!(std::fs::read(run.join("config.json")).unwrap(), before);
}

#[test]
fn one_process_per_run_and_per_prediction_file_and_outputs_never_overwrite_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    copy_dir(&demo().join("runs/uniform"), &run);
    // Another process holds the run (as a running `gcg train` does).
    let held = gcg::util::lock_exclusive(&run.join(gcg::run::RUN_LOCK), "test").unwrap();
    fails(
        &gcg(&["train", "--resume", s(&run), "--set", "train.epochs=3", "--quiet"]),
        "a second train in one run directory",
        &["in use by another gcg process"],
    );
    drop(held);
    // Another process writes the prediction file.
    let out = tmp.path().join("p.jsonl");
    let held = gcg::util::lock_exclusive(&gcg::eval::PredictionWriter::lock_path(&out), "test").unwrap();
    fails(
        &gcg(&["predict", "--run", s(&run), "--split", "test", "--out", s(&out), "--quiet"]),
        "a second predict into one file",
        &["in use by another gcg process"],
    );
    drop(held);

    // --json / --out naming an input is refused and the input is intact.
    let world = demo().join("world");
    let ann = tmp.path().join("test.csv");
    std::fs::copy(world.join("test.csv"), &ann).unwrap();
    let text = std::fs::read(&ann).unwrap();
    fails(
        &gcg(&[
            "predict",
            "--run",
            s(&run),
            "--annotations",
            s(&ann),
            "--out",
            s(&out),
            "--json",
            s(&ann),
            "--quiet",
        ]),
        "predict --json over the annotations",
        &["--json", "also the --annotations input"],
    );
    ok(
        &gcg(&["predict", "--run", s(&run), "--annotations", s(&ann), "--out", s(&out), "--quiet"]),
        "gcg predict",
    );
    let preds = std::fs::read(&out).unwrap();
    fails(
        &gcg(&[
            "eval",
            "--dataset",
            "nextqa",
            "--annotations",
            s(&ann),
            "--predictions",
            s(&out),
            "--json",
            s(&out),
        ]),
        "eval --json over the predictions",
        &["also the --predictions input"],
    );
    assert_eq!(std::fs::read(&ann).unwrap(), text);
    assert_eq!(std::fs::read(&out).unwrap(), preds);

    // A grounding file of another split: the error names both files; one covering part of
    // the split says how many questions it leaves out.
    fails(
        &gcg(&[
            "eval",
            "--dataset",
            "nextqa",
            "--annotations",
            s(&ann),
            "--predictions",
            s(&out),
            "--grounding",
            s(&world.join("gsub_val.json")),
        ]),
        "eval against another split's spans",
        &["has spans in the grounding annotations", "gsub_val.json", "test.csv"],
    );
}

/// Every byte of `files`, to compare before and after a refused command.
fn contents(files: &[&Path]) -> Vec<Vec<u8>> {
    files
        .iter()
        .map(|f| std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
        .collect()
}

#[test]
fn outputs_never_land_on_what_the_command_reads_on_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    copy_dir(&demo().join("runs/uniform"), &run);
    let store = tmp.path().join("store");
    copy_dir(&demo().join("store"), &store);
    let out = tmp.path().join("p.jsonl");
    let predict = |out: &Path, json: Option<&Path>| {
        let mut args = vec![
            "predict",
            "--run",
            s(&run),
            "--split",
            "test",
            "--store",
            s(&store),
            "--out",
            s(out),
            "--quiet",
        ];
        if let Some(j) = json {
            args.extend(["--json", s(j)]);
        }
        gcg(&args)
    };
    ok(&predict(&out, None), "gcg predict");
    let weights = run.join("checkpoints/best/weights.safetensors");
    let sidecar = tmp.path().join("p.jsonl.meta.json");
    let (config, index) = (run.join("config.json"), store.join("index.json"));
    let kept = [
        weights.as_path(),
        config.as_path(),
        index.as_path(),
        sidecar.as_path(),
        out.as_path(),
    ];
    let before = contents(&kept);
    for (target, needle) in [
        (&weights, "also the trained weights input"),
        (&config, "also the run's config input"),
        (&index, "lies inside the feature store"),
        (&sidecar, "also the --out's provenance input"),
    ] {
        fails(
            &predict(&out, Some(target)),
            &format!("--json {}", target.display()),
            &["--json", needle],
        );
    }
    fails(
        &predict(&store.join("p.jsonl"), None),
        "--out inside the store",
        &["--out", "lies inside the feature store"],
    );
    assert_eq!(contents(&kept), before, "a refused command changed a file it reads");
    // An existing file that is not a metrics file is not replaced either; a metrics file is.
    let notes = tmp.path().join("notes.json");
    std::fs::write(&notes, "[1, 2, 3]\n").unwrap();
    fails(&predict(&out, Some(&notes)), "--json over a foreign file", &["not a metrics file"]);
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "[1, 2, 3]\n");
    let metrics = tmp.path().join("m.json");
    std::fs::write(&metrics, "").unwrap(); // as `mktemp` leaves it
    ok(&predict(&out, Some(&metrics)), "predict --json (an empty file)");
    ok(&predict(&out, Some(&metrics)), "predict --json (replacing its metrics)");
    assert!(json(&metrics)["questions"].as_u64().is_some_and(|n| n > 0));

    // `gcg eval` scores a file without the annotated answers (another tool's) the same.
    let bare = tmp.path().join("bare.jsonl");
    let text: String = rows(&out)
        .into_iter()
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("answer");
            format!("{r}\n")
        })
        .collect();
    std::fs::write(&bare, text).unwrap();
    let ann = demo().join("world/test.csv");
    let score = |p: &Path, j: &Path| {
        ok(
            &gcg(&[
                "eval",
                "--dataset",
                "nextqa",
                "--annotations",
                s(&ann),
                "--predictions",
                s(p),
                "--json",
                s(j),
                "--strict",
            ]),
            "gcg eval",
        );
        json(j)["overall"].clone()
    };
    assert_eq!(score(&bare, &tmp.path().join("e1.json")), score(&out, &tmp.path().join("e2.json")));
}

#[test]
fn predictions_are_not_continued_over_changed_data_nor_made_from_stale_labels_or_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let run = demo().join("runs/uniform");
    let world = demo().join("world");
    let ann = tmp.path().join("test.csv");
    std::fs::copy(world.join("test.csv"), &ann).unwrap();
    let out = tmp.path().join("p.jsonl");
    let predict = |ann: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec!["predict", "--run", s(&run), "--annotations", s(ann), "--out", s(out), "--quiet"];
        args.extend(extra);
        gcg(&args)
    };
    ok(&predict(&ann, &out, &[]), "gcg predict");
    let full = std::fs::read_to_string(&out).unwrap();
    // Killed after two rows; then the annotations change in place (a row's type, which the
    // labels do not depend on): the two rows are not continued with rows of the new file.
    std::fs::write(&out, full.lines().take(2).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let text = std::fs::read_to_string(&ann).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut f: Vec<String> = lines[1].split(',').map(String::from).collect();
    f[7] = if f[7] == "DL" { "DO".into() } else { "DL".into() };
    lines[1] = f.join(",");
    std::fs::write(&ann, lines.join("\n") + "\n").unwrap();
    fails(
        &predict(&ann, &out, &[]),
        "resuming over changed annotations",
        &["from other data", "test.csv"],
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().lines().count(),
        2,
        "the refused file changed"
    );

    // A question edited since `gcg labels`: its stored labels and text embeddings are stale.
    let mut f: Vec<String> = lines[2].split(',').map(String::from).collect();
    let key = format!("{}_{}", f[0], f[6]);
    f[4] = "what totally different question".into();
    lines[2] = f.join(",");
    std::fs::write(&ann, lines.join("\n") + "\n").unwrap();
    fails(
        &predict(&ann, &tmp.path().join("q.jsonl"), &[]),
        "predicting an edited question",
        &[&key, "other texts", "gcg labels"],
    );

    // The frozen parts come from [weights]: a run predicts with the model it trained.
    let fresh = tmp.path().join("w.jsonl");
    fails(
        &predict(&world.join("test.csv"), &fresh, &["--set", "weights.seed=5"]),
        "predict --run --set weights.seed",
        &["cannot change its [weights]"],
    );
    fails(
        &predict(&world.join("test.csv"), &fresh, &["--set", "model.alpha_con=0.5"]),
        "predict --run --set model.*",
        &["cannot change its [model]"],
    );
    let other = demo().join("runs/grounding/checkpoints/best/weights.safetensors");
    fails(
        &predict(
            &world.join("test.csv"),
            &fresh,
            &["--set", &format!("weights.init=\"{}\"", s(&other))],
        ),
        "predict --run --set weights.init",
        &["cannot change its [weights]"],
    );
    assert!(!fresh.exists());
}
