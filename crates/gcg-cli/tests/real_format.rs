//! The real NExT-GQA files through the commands a user runs (issue #13, item 9): the published
//! `val.csv` / `test.csv` (answer texts, real video ids and qids) and `gsub_test.json`, a store of
//! random-weight tiny-network features made for those video ids (T = 4) by `gcg features`, their
//! pseudo-labels by `gcg labels`, one training epoch on a subset by `gcg train --config`, then
//! `gcg predict` and `gcg eval` with NExT-GQA's grounding metrics. The networks are random, so the
//! numbers say nothing about GCG; what is checked is that real-format files flow end to end and
//! that every stage agrees with the others.

use candle_core::{Device, Tensor};
use gcg::SeededRng;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gcg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gcg")).args(args).output().expect("running gcg")
}

fn ok(o: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{what} failed:\n{}\n{err}", String::from_utf8_lossy(&o.stdout));
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn gunzip(path: &Path) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// The header and the rows of the first `videos` videos of a published CSV (rows unchanged).
fn first_videos(csv: &str, videos: usize, skip: usize) -> (String, Vec<String>) {
    let mut lines = csv.lines();
    let header = lines.next().unwrap().to_string();
    let mut seen: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    for line in lines {
        let video = line.split(',').next().unwrap().to_string();
        if !seen.contains(&video) {
            seen.push(video.clone());
        }
        let i = seen.iter().position(|v| *v == video).unwrap();
        if i >= skip && i < skip + videos {
            rows.push(line.to_string());
        }
    }
    (header, rows)
}

fn video_of(row: &str) -> String {
    row.split(',').next().unwrap().to_string()
}

/// A pre-decoded video: 8 random 42×42 frames spread over `duration` seconds.
fn write_video(dir: &Path, id: &str, duration: f64, seed: u64) {
    let mut rng = SeededRng::new(seed);
    let n = 8;
    let pixels = Tensor::from_vec(rng.normal_vec(n * 3 * 42 * 42, 0.0, 1.0), (n, 3, 42, 42), &Device::Cpu).unwrap();
    let ts: Vec<f64> = (0..n).map(|i| (i as f64 + 0.5) * duration / n as f64).collect();
    let map: HashMap<String, Tensor> = [
        ("pixel_values".to_string(), pixels),
        ("timestamps".to_string(), Tensor::new(ts, &Device::Cpu).unwrap()),
    ]
    .into();
    candle_core::safetensors::save(&map, dir.join(format!("{id}.safetensors"))).unwrap();
}

#[test]
fn real_nextgqa_files_flow_from_features_to_grounding_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = fixtures().join("data/nextgqa");
    let val = gunzip(&data.join("val.csv.gz"));
    let test = gunzip(&data.join("test.csv.gz"));
    let gsub: Value = serde_json::from_str(&gunzip(&data.join("gsub_test.json.gz"))).unwrap();

    // Real rows: 6 validation videos to train on, 3 more to validate on, 4 test videos.
    let (header, train_rows) = first_videos(&val, 6, 0);
    let (_, val_rows) = first_videos(&val, 3, 6);
    let (test_header, test_rows) = first_videos(&test, 4, 0);
    let write_csv = |name: &str, header: &str, rows: &[String]| {
        let p = root.join(name);
        std::fs::write(&p, format!("{header}\n{}\n", rows.join("\n"))).unwrap();
        p
    };
    let train_csv = write_csv("train.csv", &header, &train_rows);
    let val_csv = write_csv("val.csv", &header, &val_rows);
    let test_csv = write_csv("test.csv", &test_header, &test_rows);
    let gsub_path = root.join("gsub_test.json");
    std::fs::write(&gsub_path, gsub.to_string()).unwrap();

    // One "decoded video" per real video id, as long as the real video (from the gsub when it
    // lists it).
    let videos = root.join("videos");
    std::fs::create_dir(&videos).unwrap();
    let mut ids: Vec<String> = train_rows.iter().chain(&val_rows).chain(&test_rows).map(|r| video_of(r)).collect();
    ids.sort();
    ids.dedup();
    for (i, id) in ids.iter().enumerate() {
        let duration = gsub[id]["duration"].as_f64().unwrap_or(30.0);
        write_video(&videos, id, duration, 50 + i as u64);
    }
    let store = root.join("store");
    let err = ok(
        &gcg(&[
            "features",
            "--videos",
            s(&videos),
            "--store",
            s(&store),
            "--preset",
            "tiny",
            "--random-weights",
            "--seed",
            "1",
            "--num-frames",
            "4",
        ]),
        "gcg features",
    );
    assert!(err.contains(&format!("{} videos done", ids.len())), "{err}");
    let bpe = fixtures().join("tokenizers/clip/bpe_first3000.txt.gz");
    for csv in [&train_csv, &val_csv, &test_csv] {
        ok(
            &gcg(&[
                "labels",
                "--store",
                s(&store),
                "--annotations",
                s(csv),
                "--dataset",
                "nextgqa",
                "--preset",
                "tiny",
                "--random-weights",
                "--seed",
                "2",
                "--top-k",
                "2",
                "--clip-tokenizer",
                s(&bpe),
            ]),
            &format!("gcg labels {}", csv.display()),
        );
    }

    // One epoch of GCG (grounding mode) on the real questions, with the test split scored at the end.
    let config = root.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "run_dir = \"runs/real\"\n\
             [weights]\npreset = \"tiny\"\ntokenizers = \"{}\"\nseed = 3\n\
             [model]\nmode = \"grounding\"\n[model.grounding]\nframes = 4\nmoments = 2\nheads = 2\n\
             [data]\ndataset = \"nextgqa\"\nstore = \"store\"\ntrain = \"train.csv\"\nval = \"val.csv\"\n\
             test = \"test.csv\"\ntest_grounding = \"gsub_test.json\"\nworkers = 1\n\
             [train]\nepochs = 1\nbatch_size = 2\ngrad_accum = 2\nlr = 1e-4\ngrounding_lr = 1e-3\n",
            fixtures().join("tokenizers/snapshot").display()
        ),
    )
    .unwrap();
    let printed = gcg(&["train", "--config", s(&config), "--print-config"]);
    ok(&printed, "gcg train --print-config");
    let resolved: toml::Table = String::from_utf8_lossy(&printed.stdout).parse().unwrap();
    assert_eq!(resolved["train"]["grad_accum"].as_integer(), Some(2));
    assert_eq!(resolved["train"]["weight_decay"].as_float(), Some(0.02), "defaults are filled in");
    assert!(!root.join("runs/real").exists(), "--print-config trains nothing");
    ok(&gcg(&["train", "--config", s(&config), "--quiet"]), "gcg train");
    let run = root.join("runs/real");
    let rows: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train_questions = train_rows.len();
    let steps = rows.iter().filter(|r| r.get("loss").is_some_and(|l| l.is_f64())).count();
    assert_eq!(
        steps,
        train_questions.div_ceil(2).div_ceil(2),
        "one epoch of 2 × 2 questions per step"
    );
    assert!(rows.iter().any(|r| r["split"] == "val"), "validated at the epoch's end");

    // The user's own prediction and scoring of the test split agree with what training wrote.
    let preds = root.join("preds.jsonl");
    ok(
        &gcg(&["predict", "--run", s(&run), "--split", "test", "--out", s(&preds), "--quiet"]),
        "gcg predict",
    );
    let lines: Vec<Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), test_rows.len());
    let by_key: BTreeMap<(String, String), &Value> = lines
        .iter()
        .map(|r| {
            (
                (r["video"].as_str().unwrap().to_string(), r["qid"].as_str().unwrap().to_string()),
                r,
            )
        })
        .collect();
    for row in &test_rows {
        let f: Vec<&str> = row.split(',').collect();
        let r = by_key[&(f[0].to_string(), f[6].to_string())];
        let span = r["span"].as_array().unwrap();
        let duration = gsub[f[0]]["duration"].as_f64().unwrap();
        let (a, b) = (span[0].as_f64().unwrap(), span[1].as_f64().unwrap());
        assert!(0.0 <= a && a <= b && b <= duration, "{row}: span {span:?} in a {duration} s video");
    }
    let metrics = root.join("metrics.json");
    ok(
        &gcg(&[
            "eval",
            "--dataset",
            "nextgqa",
            "--annotations",
            s(&test_csv),
            "--grounding",
            s(&gsub_path),
            "--predictions",
            s(&preds),
            "--json",
            s(&metrics),
        ]),
        "gcg eval",
    );
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let from_run: Value = serde_json::from_str(&std::fs::read_to_string(run.join("metrics-test.json")).unwrap()).unwrap();
    for key in ["overall", "Acc@GQA", "mIoP", "IoP@0.3", "IoP@0.5", "mIoU", "IoU@0.3", "IoU@0.5"] {
        assert!(m[key].is_f64(), "{key} missing from {m}");
        assert_eq!(m[key], from_run[key], "{key}: gcg eval and the run's own scoring differ");
    }
    // `gcg ask` about a test video with the same random front end (ViT seed 1, CLIP text seed
    // 2) answers as `gcg predict` did, within rounding; with another front end it is refused.
    let row = test_rows[0].split(',').map(str::to_string).collect::<Vec<_>>();
    let (video, qid) = (row[0].clone(), row[6].clone());
    let question_header: Vec<&str> = test_header.split(',').collect();
    let col = |name: &str| question_header.iter().position(|c| *c == name).unwrap();
    let options: Vec<String> = (0..5).map(|i| row[col(&format!("a{i}"))].clone()).collect();
    let video_file = videos.join(format!("{video}.safetensors"));
    let ask_cache = root.join("ask-cache");
    let ask = |extra: &[&str]| {
        let mut args = vec![
            "ask",
            "--json",
            "--video",
            s(&video_file),
            "--question",
            &row[col("question")],
            "--cache",
            s(&ask_cache),
            "--random-weights",
            "--clip-tokenizer",
            s(&bpe),
        ];
        for o in &options {
            args.extend(["--option", o.as_str()]);
        }
        args.extend(extra);
        gcg(&args)
    };
    let o = ask(&["--run", s(&run), "--seed", "1", "--text-seed", "2"]);
    ok(&o, "gcg ask");
    let a: Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = by_key[&(video.clone(), qid.clone())];
    assert_eq!(a["answer_index"], p["prediction"], "{a}\n{p}");
    let frames: Vec<&Value> = a["moments"].as_array().unwrap().iter().map(|m| &m["frame"]).collect();
    let want: Vec<&Value> = p["moments"]["frames"].as_array().unwrap().iter().collect();
    assert_eq!(frames, want);
    let o = ask(&["--run", s(&run), "--seed", "1", "--text-seed", "3"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("embedded its questions with the text encoder") && err.contains("seed 2"),
        "{err}"
    );
    let o = ask(&["--run", s(&run), "--seed", "4", "--text-seed", "2"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("image networks"));
    // A model without a run (`--config`: random tiny weights in uniform mode, the zero-shot
    // shape): uniform moments, no p(t).
    let zero_shot = root.join("uniform.toml");
    std::fs::write(
        &zero_shot,
        format!(
            "[weights]\npreset = \"tiny\"\ntokenizers = \"{}\"\n[model]\nmode = \"uniform\"\n\
             [model.grounding]\nframes = 4\nmoments = 2\nheads = 2\n[data]\nstore = \"store\"\n",
            fixtures().join("tokenizers/snapshot").display()
        ),
    )
    .unwrap();
    let o = ask(&["--config", s(&zero_shot), "--seed", "1", "--text-seed", "2"]);
    ok(&o, "gcg ask --config");
    let a: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(a["p"].is_null(), "{a}");
    let frames: Vec<u64> = a["moments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["frame"].as_u64().unwrap())
        .collect();
    assert_eq!(frames, [0, 3], "uniform K = 2 of T = 4");
    assert_eq!(a["option_scores"].as_array().unwrap().len(), 5);

    let scored = m["questions"].as_u64().unwrap() as usize;
    let spanned = test_rows
        .iter()
        .filter(|r| {
            let f: Vec<&str> = r.split(',').collect();
            gsub[f[0]]["location"].get(f[6]).is_some()
        })
        .count();
    assert_eq!(scored, spanned, "NExT-GQA scores the questions with spans");
}
