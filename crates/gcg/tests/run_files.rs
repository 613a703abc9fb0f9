//! The files of a run that must never mix runs: prediction files carry their provenance and are
//! resumed only by the model that wrote them; a resumed run's metrics log holds each step once.

use gcg::data::{Answer, Dataset, QaSample};
use gcg::eval::{read_predictions, OnMismatch, PredictionRow, PredictionWriter, Provenance};
use gcg::rng::SeededRng;
use gcg::train::checkpoint::TrainState;
use gcg::train::trainer::RunDir;

fn sample(video: &str, qid: &str) -> QaSample {
    QaSample {
        dataset: Dataset::NextQa,
        key: format!("{video}_{qid}"),
        qid: qid.into(),
        video: video.into(),
        question: "why".into(),
        options: (0..5).map(|i| format!("option {i}")).collect(),
        answer: Answer::Choice(1),
        qtype: "CW".into(),
        extra: Default::default(),
    }
}

fn prov(run: &str, weights_hash: &str) -> Provenance {
    Provenance {
        run_dir: Some(run.into()),
        weights: Some(format!("{run}/checkpoints/best/weights.safetensors")),
        weights_hash: Some(weights_hash.into()),
        annotations: "/data/test.csv".into(),
        store: "/data/store".into(),
        config_hash: "fnv1a64:0000000000000001".into(),
        inputs_hash: Some("fnv1a64:0000000000000003".into()),
    }
}

fn chain(e: &anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

#[test]
fn a_prediction_file_is_resumed_only_by_the_model_that_wrote_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("preds.jsonl");
    let (a, b) = (prov("/runs/a", "fnv1a64:aaaa"), prov("/runs/b", "fnv1a64:bbbb"));
    let mut w = PredictionWriter::open(&path, &a, OnMismatch::Refuse).unwrap();
    w.write(&PredictionRow::for_sample(&sample("v1", "0"), Answer::Choice(1))).unwrap();
    drop(w);
    // The sidecar says what wrote it; the JSONL stays plain (read as before).
    assert_eq!(Provenance::read(&path).unwrap(), Some(a.clone()));
    assert!(Provenance::path_of(&path).ends_with("preds.jsonl.meta.json"));
    let back = read_predictions(&path).unwrap();
    assert_eq!((back.rows.len(), back.problems.len()), (1, 0));

    // The same model resumes (the run directory may have moved).
    let moved = Provenance {
        run_dir: Some("/elsewhere/a".into()),
        ..a.clone()
    };
    let w = PredictionWriter::open(&path, &moved, OnMismatch::Refuse).unwrap();
    assert!(w.contains("v1", "0"));
    drop(w);

    // Another checkpoint is refused, naming both; the file is left alone.
    let before = std::fs::read(&path).unwrap();
    let e = PredictionWriter::open(&path, &b, OnMismatch::Refuse)
        .err()
        .expect("another model's file was resumed");
    let msg = chain(&e);
    for needle in ["another model", "/runs/a", "fnv1a64:aaaa", "/runs/b", "fnv1a64:bbbb"] {
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // So are another annotation file and another config.
    for other in [
        Provenance {
            annotations: "/data/val.csv".into(),
            ..a.clone()
        },
        Provenance {
            config_hash: "fnv1a64:0000000000000002".into(),
            ..a.clone()
        },
        // The same paths with other contents (a store recomputed in place, edited annotations).
        Provenance {
            inputs_hash: Some("fnv1a64:0000000000000004".into()),
            ..a.clone()
        },
    ] {
        assert!(PredictionWriter::open(&path, &other, OnMismatch::Refuse).is_err());
    }

    // A run's own file is started over for its new checkpoint, never reused.
    let w = PredictionWriter::open(&path, &b, OnMismatch::Replace).unwrap();
    assert!(w.is_empty());
    drop(w);
    assert_eq!(Provenance::read(&path).unwrap(), Some(b.clone()));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");

    // A file with rows and no sidecar (another tool's) is not added to.
    let plain = tmp.path().join("plain.jsonl");
    std::fs::write(
        &plain,
        serde_json::to_string(&PredictionRow::for_sample(&sample("v1", "0"), Answer::Choice(2))).unwrap() + "\n",
    )
    .unwrap();
    let msg = chain(
        &PredictionWriter::open(&plain, &a, OnMismatch::Refuse)
            .err()
            .expect("a plain file was resumed"),
    );
    assert!(msg.contains("plain.jsonl.meta.json"), "{msg}");
    assert_eq!(read_predictions(&plain).unwrap().rows.len(), 1, "plain files still read");
}

#[test]
fn resuming_drops_the_metrics_rows_logged_after_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::new(tmp.path().join("run")).unwrap();
    let step = |s: u64, e: u64| serde_json::json!({"step": s, "epoch": e, "loss": 1.0});
    for s in 1..=3 {
        run.log(&step(s, 0)).unwrap();
    }
    run.log(&serde_json::json!({"split": "val", "epoch": 0, "step": 3, "accuracy": 50.0, "best": true}))
        .unwrap();
    for s in 4..=6 {
        run.log(&step(s, 1)).unwrap();
    }
    run.log(&serde_json::json!({"split": "val", "epoch": 1, "step": 6, "accuracy": 60.0, "best": true}))
        .unwrap();
    // Killed while writing a row.
    let mut text = std::fs::read_to_string(run.metrics()).unwrap();
    text.push_str("{\"step\": 7, \"ep");
    std::fs::write(run.metrics(), &text).unwrap();

    // The last checkpoint was at step 5, in epoch 1.
    let state = TrainState {
        step: 5,
        epoch: 1,
        batch_in_epoch: 2,
        rng: SeededRng::new(0),
        best_metric: Some(50.0),
        best_step: Some(3),
        skipped_nonfinite: 0,
    };
    assert_eq!(run.truncate_log(&state).unwrap(), 3);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(run.metrics())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = rows
        .iter()
        .filter(|r| r.get("split").is_none())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5]);
    let vals: Vec<u64> = rows
        .iter()
        .filter(|r| r.get("split").is_some())
        .map(|r| r["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(vals, [0], "the validation of the unfinished epoch goes");
    // Nothing more to drop.
    assert_eq!(run.truncate_log(&state).unwrap(), 0);
}
