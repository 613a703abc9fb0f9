//! `gcg ask`'s library path against `gcg predict`'s: a question asked about a demo video (its
//! frame folder decoded again, its features computed into the ask cache, its texts embedded
//! live) gets the same answer, option scores, moments and p(t) as the same question answered from
//! the demo's feature store: bit for bit when the model sees the same batch, within 1e-5 (of the
//! largest value) in another batch, whose prompts are padded together differently and whose
//! matrix products round differently in the last bits.

use gcg::ask::{AskOptions, Asker, FrontEndSpec, GroundedAnswer, Question};
use gcg::data::{self, BatchLoader, BatchOptions, Dataset, QaSample, ReadOptions};
use gcg::demo::{run_demo, DemoConfig};
use gcg::model::Answered;
use gcg::run::{self, Checkpoint, RunConfig};
use std::collections::BTreeMap;
use std::path::Path;

/// Answers of `samples` through the store, as `gcg predict` computes them, `batch` at a time.
fn predicted(cfg: &RunConfig, samples: &[QaSample], batch: usize) -> BTreeMap<String, Answered> {
    let (store, embed_dim) = run::open_store(cfg).unwrap();
    let built = run::build_model(cfg, embed_dim).unwrap();
    let loader = BatchLoader::new(
        store.snapshot(),
        samples.to_vec(),
        BatchOptions {
            batch_size: batch,
            features: Some(built.feature_dtype()),
            prompts: Some(built.model.prompt_encoder()),
            ..BatchOptions::default()
        },
    )
    .unwrap();
    let mut out = BTreeMap::new();
    for b in loader.epoch(0) {
        let b = b.unwrap();
        for a in built.model.answer(&b).unwrap() {
            out.insert(a.key.clone(), a);
        }
    }
    out
}

fn run_config(demo: &Path, mode: &str) -> RunConfig {
    let dir = demo.join("runs").join(mode);
    let mut cfg = RunConfig::from_run_dir(&dir).unwrap();
    cfg.weights.init = Some(run::checkpoint_weights(&dir, Checkpoint::best_or_last(&dir)).unwrap());
    cfg
}

/// The same answer; option scores and p(t) equal (`tol` = 0) or within `tol` relative.
fn same(ask: &GroundedAnswer, pred: &Answered, s: &QaSample, tol: f32) {
    let key = &s.key;
    assert_eq!(
        ask.answer_index,
        match pred.prediction {
            data::Answer::Choice(i) => Some(i),
            _ => None,
        },
        "{key}"
    );
    assert_eq!(ask.answer, s.options[ask.answer_index.unwrap()], "{key}");
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len(), "{key}: {what}");
        // Relative to the vector's largest value (p(t)'s tails are ~1e-30).
        let scale = a.iter().chain(b).fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * scale, "{key}: {what} {a:?} vs {b:?} (tolerance {tol})");
        }
    };
    close(
        ask.option_scores.as_deref().unwrap(),
        pred.option_scores.as_deref().unwrap(),
        "option scores",
    );
    let frames: Vec<usize> = ask.moments.iter().map(|m| m.frame).collect();
    assert_eq!(frames, pred.frames, "{key}: moments");
    let times: Vec<f64> = ask.moments.iter().map(|m| m.time.unwrap()).collect();
    assert_eq!(times, pred.seconds, "{key}: moment times");
    assert_eq!(ask.p.is_some(), pred.curve.is_some(), "{key}: p(t)");
    if let (Some(a), Some(b)) = (&ask.p, &pred.curve) {
        close(a, b, "p(t)");
    }
    let span = ask.span.unwrap();
    assert_eq!(span, [times[0], *times.last().unwrap()], "{key}: span");
}

#[test]
fn ask_answers_a_demo_video_exactly_as_predict_answers_it_from_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let mut cfg = DemoConfig::quick(4);
    cfg.modes = vec![gcg::model::Mode::Uniform, gcg::model::Mode::Grounding];
    run_demo(&cfg, &demo, &mut |_| {}).unwrap();
    let test = data::read_annotations(Dataset::NextQa, &demo.join("world/test.csv"), &ReadOptions::default())
        .unwrap()
        .samples;
    let videos: Vec<String> = {
        let mut v: Vec<String> = test.iter().map(|s| s.video.clone()).collect();
        v.dedup();
        v.truncate(3);
        v
    };
    for mode in ["grounding", "uniform"] {
        let rc = run_config(&demo, mode);
        let samples: Vec<QaSample> = test.iter().filter(|s| videos.contains(&s.video)).cloned().collect();
        // `gcg predict`'s batches of 8 questions from several videos, and batches of one
        // video's questions (as `gcg ask` makes them).
        let want = predicted(&rc, &samples, rc.train.batch_size);
        let per_video: BTreeMap<String, Answered> = videos
            .iter()
            .flat_map(|v| {
                let qs: Vec<QaSample> = samples.iter().filter(|s| &s.video == v).cloned().collect();
                predicted(&rc, &qs, qs.len())
            })
            .collect();
        let opts = AskOptions {
            cache_root: tmp.path().join("cache"),
            ..AskOptions::default()
        };
        let asker = Asker::open(&rc, &FrontEndSpec::Demo { dir: demo.clone() }, &opts).unwrap();
        for v in &videos {
            let qs: Vec<&QaSample> = samples.iter().filter(|s| &s.video == v).collect();
            let questions: Vec<Question> = qs
                .iter()
                .map(|s| Question {
                    question: format!("{}?", s.question),
                    options: s.options.clone(),
                })
                .collect();
            let video = asker.prepare(&demo.join("world/frames").join(v)).unwrap();
            // The second mode finds the video in the cache the first one filled.
            assert_eq!(video.cached, mode == "uniform", "{mode} {v}");
            assert_eq!(video.num_frames, 32);
            // The frames decoded again and encoded into the ask cache are the store's, bit for bit.
            let stored = gcg::store::Store::open(demo.join("store")).unwrap().snapshot();
            let cached = gcg::store::Store::open(&asker.cache).unwrap().snapshot();
            assert_eq!(
                stored.features(v).unwrap().bytes(),
                cached.features(&video.id).unwrap().bytes(),
                "{v}: ViT features"
            );
            assert_eq!(
                stored.frame_embeds(v).unwrap().bytes(),
                cached.frame_embeds(&video.id).unwrap().bytes(),
                "{v}: CLIP frame embeddings"
            );
            assert_eq!(stored.video(v).unwrap().timestamps, video.timestamps, "{v}: frame times");
            // Several questions in one call (batched) and each alone give the same answers.
            let together = asker.ask(&video, &questions).unwrap();
            for ((q, s), a) in questions.iter().zip(&qs).zip(&together) {
                // The same batch as `gcg predict` with batches of one video's questions: the
                // same bits. Other batches (8 questions of several videos, or one alone): within
                // 1e-5.
                same(a, &per_video[&s.key], s, 0.0);
                same(a, &want[&s.key], s, 1e-5);
                let alone = asker.ask(&video, std::slice::from_ref(q)).unwrap();
                same(&alone[0], &want[&s.key], s, 1e-5);
                assert_eq!(a.p.is_some(), mode == "grounding", "{mode}: p(t) only in grounding mode");
            }
        }
    }
}

#[test]
fn bad_questions_are_refused_by_name() {
    let q = |question: &str, options: &[&str]| Question {
        question: question.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
    };
    for (bad, says) in [
        (q("  ? ", &[]), "the question is empty"),
        (q("what?", &["one"]), "one option"),
        (q("what?", &["a", "b", "c", "d", "e", "f"]), "6 options"),
        (q("what?", &["a", " "]), "option B is empty"),
        (q(&"x".repeat(1001), &[]), "1001 characters"),
    ] {
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
    q("what happened?", &[]).validate().unwrap();
    q("what happened?", &["a", "b"]).validate().unwrap();
    // A misspelt key is an error naming it: ignored, `option` would turn a multiple-choice
    // question into an open-ended one.
    let e = serde_json::from_str::<Question>(r#"{"question": "what?", "option": ["a", "b"]}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `option`"), "{e}");
    let ok: Question = serde_json::from_str(r#"{"question": "what?", "options": ["a", "b"]}"#).unwrap();
    assert_eq!(ok, q("what?", &["a", "b"]));
}

#[test]
fn content_ids_follow_the_bytes_not_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a.mp4"), tmp.path().join("b.mp4"), tmp.path().join("c.mp4"));
    std::fs::write(&a, b"same bytes").unwrap();
    std::fs::write(&b, b"same bytes").unwrap();
    std::fs::write(&c, b"other bytes").unwrap();
    let id = |p: &Path| gcg::ask::content_id(p).unwrap();
    assert_eq!(id(&a), id(&b));
    assert_ne!(id(&a), id(&c));
    assert!(id(&a).starts_with("sha256-") && id(&a).len() == 7 + 32);
    // Frame folders: names and bytes of their files.
    let (d1, d2) = (tmp.path().join("d1"), tmp.path().join("d2"));
    for d in [&d1, &d2] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("frame_0.jpg"), b"x").unwrap();
    }
    assert_eq!(id(&d1), id(&d2));
    std::fs::write(d2.join("frame_1.jpg"), b"y").unwrap();
    assert_ne!(id(&d1), id(&d2));
    let empty = tmp.path().join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    assert!(gcg::ask::content_id(&empty).unwrap_err().to_string().contains("empty"));
}
