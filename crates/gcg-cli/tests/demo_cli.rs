//! `gcg demo --quick` end to end: every stage runs through the real commands' library paths and
//! leaves a well-formed report; the run directories it leaves work with `gcg predict` and
//! `gcg eval`, which reproduce the demo's own predictions and metrics.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn gcg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gcg")).args(args).output().expect("running gcg")
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn percent(v: &Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!((0.0..=100.0).contains(&x), "{what} = {x} is not a percentage");
    x
}

#[test]
fn quick_demo_writes_a_well_formed_report_that_predict_and_eval_reproduce() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = out.to_str().unwrap();
    let r = gcg(&["demo", "--quick", "--seed", "1", "--out", o, "--quiet"]);
    ok(&r, "gcg demo --quick");

    // report.json: the documented keys, percentages, and the run's time.
    let rep = json(&out.join("report.json"));
    assert_eq!(rep["seed"], 1);
    let secs = rep["seconds"].as_f64().expect("seconds");
    assert!(secs > 0.0 && secs < 600.0, "seconds = {secs}");
    for mode in ["uniform", "grounding", "oracle"] {
        let m = &rep["modes"][mode];
        for k in ["accuracy", "IoP@0.5", "mIoU", "IoP@0.3", "IoU@0.5", "mIoP", "Acc@GQA", "event_hit"] {
            percent(&m[k], &format!("{mode} {k}"));
        }
    }
    // Only the grounding mode has a warm-up (2 epochs in the quick demo), before the same joint
    // budget as the others.
    let steps = |mode: &str, k: &str| rep["modes"][mode][k].as_u64().unwrap_or_else(|| panic!("{mode} {k}"));
    assert!(steps("grounding", "warmup_steps") > 0);
    for mode in ["uniform", "oracle"] {
        assert_eq!(steps(mode, "warmup_steps"), 0, "{mode}");
        assert_eq!(steps(mode, "steps"), steps("grounding", "steps"), "{mode}");
    }
    assert_eq!(steps("grounding", "warmup_steps"), 2 * steps("grounding", "steps"));
    // The oracle selects the pseudo-labelled moments, so its hit rate is the pseudo-labels'.
    assert_eq!(rep["modes"]["oracle"]["event_hit"], rep["pseudo_labels"]["event_hit"]);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "| uniform |",
        "| grounding |",
        "| oracle |",
        "figures/accuracy.svg",
        "figures/training.svg",
        "figures/grounding-warmup.svg",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}");
    }
    let figures: Vec<_> = std::fs::read_dir(out.join("figures")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(figures.len() >= 3, "figures: {figures:?}");
    for f in &figures {
        let s = std::fs::read_to_string(f).unwrap();
        assert!(
            s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
            "{} is not an SVG",
            f.display()
        );
    }
    assert!(md.contains("example-1.svg"), "report.md shows no grounding example");

    // The run directories are ordinary runs: `gcg predict` gives the demo's predictions again...
    let run = out.join("runs/grounding");
    let again = tmp.path().join("again.jsonl");
    let metrics = tmp.path().join("again-metrics.json");
    let r = gcg(&[
        "predict",
        "--run",
        run.to_str().unwrap(),
        "--split",
        "test",
        "--out",
        again.to_str().unwrap(),
        "--json",
        metrics.to_str().unwrap(),
        "--quiet",
    ]);
    ok(&r, "gcg predict");
    let rows = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (rows(&run.join("predictions-test.jsonl")), rows(&again));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["qid"], y["qid"]);
        assert_eq!(x["video"], y["video"]);
        assert_eq!(x["prediction"], y["prediction"]);
        assert_eq!(x["moments"], y["moments"]);
        assert!(y["span"].is_array(), "grounding predictions carry a span");
    }
    // ... and `gcg eval` scores them exactly as the demo reported.
    let world = out.join("world");
    let scored = tmp.path().join("scored.json");
    let r = gcg(&[
        "eval",
        "--dataset",
        "nextqa",
        "--annotations",
        world.join("test.csv").to_str().unwrap(),
        "--grounding",
        world.join("gsub_test.json").to_str().unwrap(),
        "--predictions",
        run.join("predictions-test.jsonl").to_str().unwrap(),
        "--json",
        scored.to_str().unwrap(),
        "--strict",
    ]);
    ok(&r, "gcg eval");
    let scored = json(&scored);
    let m = &rep["modes"]["grounding"];
    for (k, r) in [("overall", "accuracy"), ("IoP@0.5", "IoP@0.5"), ("mIoU", "mIoU")] {
        let x = scored[k].as_f64().unwrap_or_else(|| panic!("gcg eval wrote no {k}"));
        let y = m[r].as_f64().unwrap();
        assert!((x - y).abs() < 0.006, "{k}: gcg eval {x} vs report {y}");
    }
    assert_eq!(json(&metrics)["overall"], scored["overall"]);

    // `gcg train --resume` on the finished run trains no further and scores the test split again.
    let uniform = out.join("runs/uniform");
    let before = json(&uniform.join("metrics-test.json"));
    let r = gcg(&["train", "--resume", uniform.to_str().unwrap(), "--quiet"]);
    ok(&r, "gcg train --resume");
    assert_eq!(json(&uniform.join("metrics-test.json")), before);
}

#[test]
fn demo_refuses_to_overwrite_a_folder_that_is_not_a_demo() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("precious.txt"), "keep me").unwrap();
    let r = gcg(&["demo", "--quick", "--out", tmp.path().to_str().unwrap(), "--quiet"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("not a demo output"), "{err}");
    assert_eq!(std::fs::read_to_string(tmp.path().join("precious.txt")).unwrap(), "keep me");
}

/// Every file under `dir` (relative path → bytes).
fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_demo_killed_while_replacing_another_leaves_it_intact_and_a_rerun_works() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("p");
    let out = parent.join("demo");
    let o = out.to_str().unwrap();
    ok(&gcg(&["demo", "--quick", "--seed", "2", "--out", o, "--quiet"]), "the first demo");
    let before = snapshot(&out);
    assert!(before.contains_key("report.md") && before.contains_key("runs/grounding/config.json"));

    // A second demo into the same folder, killed once it is writing features into its staging
    // folder beside the first.
    let mut child = Command::new(env!("CARGO_BIN_EXE_gcg"))
        .args(["demo", "--quick", "--seed", "3", "--out", o, "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let staging = loop {
        let found = names(&parent)
            .into_iter()
            .filter(|n| n != "demo")
            .map(|n| parent.join(n))
            .find(|p| p.join("store").exists());
        if let Some(s) = found {
            break s;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the second demo ended ({status}) before a staging folder with a store appeared beside {o}");
        }
        assert!(t0.elapsed().as_secs() < 300, "no staging folder after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        staging.file_name().unwrap().to_string_lossy().starts_with(".demo."),
        "{}",
        staging.display()
    );
    let after = snapshot(&out);
    let changed: Vec<&String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(changed.is_empty(), "the killed demo changed the first one: {changed:?}");

    // A rerun completes, removes the killed run's staging folder and leaves the same layout with
    // its paths pointing at the final folder.
    ok(&gcg(&["demo", "--quick", "--seed", "3", "--out", o, "--quiet"]), "the rerun");
    assert_eq!(names(&parent), ["demo"]);
    assert_eq!(json(&out.join("report.json"))["seed"], 3);
    let cfg = json(&out.join("runs/grounding/config.json"));
    let store = Path::new(cfg["data"]["store"].as_str().unwrap());
    assert_eq!(store, std::path::absolute(out.join("store")).unwrap());
    let meta = json(&out.join("runs/grounding/predictions-test.jsonl.meta.json"));
    assert_eq!(Path::new(meta["store"].as_str().unwrap()), store);
    assert!(!std::fs::read_to_string(out.join("store/index.json")).unwrap().contains(".demo."));
    // `gcg predict` into the run's own prediction file finds the same provenance (paths and config
    // hash) and resumes it: nothing to redo, the file unchanged.
    let preds = out.join("runs/grounding/predictions-test.jsonl");
    let rows = std::fs::read(&preds).unwrap();
    let run = out.join("runs/grounding");
    let r = gcg(&[
        "predict",
        "--run",
        run.to_str().unwrap(),
        "--split",
        "test",
        "--out",
        preds.to_str().unwrap(),
        "--quiet",
    ]);
    ok(&r, "gcg predict resuming the demo's predictions");
    assert_eq!(std::fs::read(&preds).unwrap(), rows);
}
