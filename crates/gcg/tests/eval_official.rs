//! `gcg::eval` against the numbers the official evaluation scripts printed
//! (`tools/fixtures/make_eval_refs.py`: NExT-QA `eval_mc.py`, NExT-GQA `eval_next.py` +
//! `eval_ground.py`, IntentQA `eval_intentqa.py`, Causal-VidQA `eval_mc.py`) for seeded
//! predictions on the real NExT-QA / NExT-GQA val and test files and on synthetic IntentQA /
//! Causal-VidQA annotations; and hand-worked edge cases.

mod data_fixtures;

use data_fixtures::{fixtures, unpack, write};
use gcg::data::nextgqa::Grounding;
use gcg::data::{causalvidqa, intentqa, nextgqa, nextqa, open_ended, Answer, Dataset, QaSample};
use gcg::eval::{evaluate, read_predictions, Metrics, Moments, PredictionRow, PredictionWriter, ProblemKind};
use serde_json::Value;
use std::io::Read;
use std::path::Path;

fn read_gz_json(path: &Path) -> Value {
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut s)
        .unwrap();
    serde_json::from_str(&s).unwrap()
}

/// Unpack the synthetic Causal-VidQA annotations (one JSON holding every video's text.json and
/// answer.json) into `dir/QA/{video}/`.
fn unpack_causal(dir: &Path) -> std::path::PathBuf {
    let all = read_gz_json(&fixtures().join("eval/causalvidqa_synthetic.json.gz"));
    let qa = dir.join("QA");
    for (video, v) in all.as_object().unwrap() {
        write(&qa, &format!("{video}/text.json"), &serde_json::to_string(&v["text"]).unwrap());
        write(&qa, &format!("{video}/answer.json"), &serde_json::to_string(&v["answer"]).unwrap());
    }
    qa
}

/// Round like Python's `'{:.Nf}'.format` (both round the exact binary value, ties to even).
fn printed(x: f64, decimals: usize) -> String {
    format!("{x:.decimals$}")
}

fn metric_names(m: &Metrics) -> Vec<String> {
    let mut v: Vec<String> = m.scores.iter().map(|s| s.name.clone()).collect();
    if let Some(g) = &m.grounding {
        v.extend(g.named().iter().map(|(n, _)| n.to_string()));
    }
    v.sort();
    v
}

#[test]
fn reproduces_the_official_scripts() {
    let refs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(fixtures().join("eval/refs.json")).unwrap()).unwrap();
    assert!(refs.len() >= 11);
    let tmp = tempfile::tempdir().unwrap();
    let mut max_abs_diff = 0.0f64;
    for r in &refs {
        let name = r["name"].as_str().unwrap();
        let dataset = Dataset::from_name(r["dataset"].as_str().unwrap()).unwrap();
        let ann = r["annotations"].as_str().unwrap();
        let samples: Vec<QaSample> = match dataset {
            Dataset::NextQa => nextqa::read(&unpack(tmp.path(), ann)).unwrap(),
            Dataset::NextGqa => nextgqa::read(&unpack(tmp.path(), ann)).unwrap(),
            Dataset::IntentQa => intentqa::read(&unpack(tmp.path(), ann)).unwrap(),
            Dataset::CausalVidQa => causalvidqa::read(&unpack_causal(&tmp.path().join(name)), None).unwrap(),
            // Scored in tests/star_trafficqa_vlep.rs against their own references.
            Dataset::Star | Dataset::TrafficQa | Dataset::Vlep | Dataset::OpenEnded => unreachable!(),
        };
        let grounding = r
            .get("grounding")
            .map(|g| Grounding::read(&unpack(tmp.path(), g.as_str().unwrap())).unwrap());

        // The committed predictions: one digit per annotation row (in file order), spans or null.
        let p = read_gz_json(&fixtures().join("eval").join(r["predictions"].as_str().unwrap()));
        assert_eq!(p["n"].as_u64().unwrap() as usize, samples.len(), "{name}");
        assert_eq!(p["first"].as_str().unwrap(), samples[0].key, "{name}");
        let digits: Vec<usize> = p["prediction"].as_str().unwrap().bytes().map(|b| (b - b'0') as usize).collect();
        let spans: Option<&Vec<Value>> = p.get("span").map(|s| s.as_array().unwrap());

        // Through the writer and the reader, as `gcg predict` + `gcg eval` would.
        let jsonl = tmp.path().join(format!("{name}.jsonl"));
        let mut w = PredictionWriter::create(&jsonl).unwrap();
        for (i, s) in samples.iter().enumerate() {
            let mut row = PredictionRow::for_sample(s, Answer::Choice(digits[i]));
            if let Some(sp) = spans.and_then(|v| v[i].as_array()) {
                row.span = Some([sp[0].as_f64().unwrap(), sp[1].as_f64().unwrap()]);
            }
            w.write(&row).unwrap();
        }
        let preds = read_predictions(&jsonl).unwrap();
        // The mixed span sets hold reversed and negative spans on purpose (the official script
        // scores them as given, and so do we): they are reported as implausible, nothing else.
        let only_implausible =
            |p: &[gcg::eval::predictions::Problem]| p.iter().all(|p| p.kind == gcg::eval::predictions::ProblemKind::Implausible);
        assert!(only_implausible(&preds.problems), "{name}: {:?}", preds.problems);
        let ev = evaluate(dataset, &samples, &preds, grounding.as_ref()).unwrap();
        assert!(only_implausible(&ev.problems), "{name}: {:?}", ev.problems);
        if !name.contains("mixed") {
            assert!(ev.problems.is_empty(), "{name}: {:?}", ev.problems);
        }
        let m = &ev.metrics;
        assert_eq!(m.missing, 0, "{name}");
        if spans.is_none() {
            // The official scripts' own result file ({"<video>_<qid>": {"prediction", "answer"}},
            // pretty-printed) reads to the same rows and scores.
            let dict: serde_json::Map<String, Value> = samples
                .iter()
                .zip(&digits)
                .map(|(s, &p)| {
                    let row = serde_json::json!({"prediction": p, "answer": serde_json::to_value(&s.answer).unwrap()});
                    (format!("{}_{}", s.video, s.qid), row)
                })
                .collect();
            let file = write(
                tmp.path(),
                &format!("{name}.result.json"),
                &serde_json::to_string_pretty(&dict).unwrap(),
            );
            let official = read_predictions(&file).unwrap();
            assert!(official.problems.is_empty(), "{name}: {:?}", official.problems);
            assert_eq!(official.rows.len(), samples.len(), "{name}");
            let ev2 = evaluate(dataset, &samples, &official, grounding.as_ref()).unwrap();
            assert_eq!(ev2.metrics.scores, m.scores, "{name}: the official result file");
        }

        let want_printed = r["printed"].as_object().unwrap();
        let want_raw = r["raw"].as_object().unwrap();
        let mut want_names: Vec<String> = want_printed.keys().cloned().collect();
        want_names.sort();
        assert_eq!(metric_names(m), want_names, "{name}: metric names");
        for (metric, text) in want_printed {
            let text = text.as_str().unwrap();
            let ours = m.get(metric).unwrap();
            let decimals = text.split('.').nth(1).map(str::len).unwrap_or(0);
            assert_eq!(printed(ours, decimals), text, "{name} {metric}: ours {ours}");
            let raw = want_raw[metric].as_f64().unwrap();
            if ours != raw {
                eprintln!("{name} {metric}: ours {ours:e} official {raw:e}");
            }
            max_abs_diff = max_abs_diff.max((ours - raw).abs());
            assert!(
                (ours - raw).abs() <= 1e-12 * raw.abs().max(1.0),
                "{name} {metric}: ours {ours} official {raw}"
            );
        }
        if let (Some(g), Some(kinds)) = (&m.grounding, r.get("span_kinds")) {
            // eval_ground.py skips questions without a span.
            assert_eq!(g.missing as u64, kinds["none"].as_u64().unwrap(), "{name}");
            assert_eq!(g.evaluated + g.missing, samples.len());
        }
    }
    // Same operations in the same order as the official code: bit-identical.
    assert_eq!(max_abs_diff, 0.0, "largest difference to the official raw values");
}

fn mc(video: &str, qid: &str, qtype: &str, answer: usize) -> QaSample {
    QaSample {
        dataset: Dataset::NextGqa,
        key: format!("{video}_{qid}"),
        qid: qid.into(),
        video: video.into(),
        question: format!("question {qid}"),
        options: (0..5).map(|i| format!("option {i}")).collect(),
        answer: Answer::Choice(answer),
        qtype: qtype.into(),
        extra: Default::default(),
    }
}

fn row(s: &QaSample, pred: usize, span: Option<[f64; 2]>) -> String {
    let mut r = PredictionRow::for_sample(s, Answer::Choice(pred));
    r.span = span;
    serde_json::to_string(&r).unwrap()
}

#[test]
fn grounding_edge_cases_worked_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let gsub = write(
        tmp.path(),
        "gsub.json",
        r#"{"v1": {"duration": 20, "fps": 30, "location": {"0": [[2, 6]], "1": [[1, 3], [5, 9]], "2": [[10, 12]], "3": [[4, 8]]}},
            "v2": {"duration": 15, "fps": 25, "location": {}},
            "v3": {"duration": 9.5, "fps": 29.97, "location": {"0": [[0, 5]]}}}"#,
    );
    let g = Grounding::read(&gsub).unwrap();
    let samples = vec![
        mc("v1", "0", "CW", 1),
        mc("v1", "1", "TP", 2),
        mc("v1", "2", "TN", 3),
        mc("v1", "3", "TC", 4),
        mc("v3", "0", "CH", 0),
        mc("v2", "0", "CW", 0), // its video has an empty location: not grounded
    ];
    let lines = [
        row(&samples[0], 1, Some([4.0, 8.0])),   // IoU 2/6, IoP 2/4, right
        row(&samples[1], 0, Some([2.0, 8.0])),   // covers both segments: best IoU 3/7, IoP 3/6; wrong
        row(&samples[2], 3, Some([11.0, 11.0])), // point inside: IoP 1; right
        row(&samples[3], 4, Some([9.0, 9.0])),   // point outside: 0; right
        row(&samples[4], 0, None),               // no span: skipped, missing
        row(&samples[5], 2, Some([1.0, 2.0])),   // not in gsub: ignored by grounding
    ];
    let p = write(tmp.path(), "preds.jsonl", &(lines.join("\n") + "\n"));
    let preds = read_predictions(&p).unwrap();
    let m = evaluate(Dataset::NextGqa, &samples, &preds, Some(&g)).unwrap().metrics;
    let gm = m.grounding.clone().unwrap();
    assert_eq!((gm.evaluated, gm.missing), (4, 1));
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    close(gm.m_iou, (2.0 / 6.0 + 3.0 / 7.0) / 4.0 * 100.0);
    close(gm.m_iop, (0.5 + 0.5 + 1.0 + 0.0) / 4.0 * 100.0);
    close(gm.iop_03, 75.0);
    close(gm.iop_05, 75.0);
    close(gm.iou_03, 50.0);
    close(gm.iou_05, 0.0);
    close(gm.acc_gqa, 50.0); // v1_0 and v1_2: IoP >= 0.5 and right
                             // QA on the grounded subset (v2_0 left out); TP counts as TN.
    close(m.get("CW").unwrap(), 100.0);
    close(m.get("CH").unwrap(), 100.0);
    close(m.get("TN").unwrap(), 50.0);
    close(m.get("TC").unwrap(), 100.0);
    close(m.get("C").unwrap(), 100.0);
    close(m.get("T").unwrap(), 200.0 / 3.0);
    close(m.get("overall").unwrap(), 80.0);
    assert_eq!(m.get("TP"), None);
    assert_eq!(m.get("D"), None, "no descriptive questions: no D group");
    let j = m.to_json();
    for k in [
        "overall", "CW", "CH", "TN", "TC", "C", "T", "mIoP", "IoP@0.3", "IoP@0.5", "mIoU", "IoU@0.3", "IoU@0.5", "Acc@GQA",
    ] {
        assert!(j[k].is_number(), "{k} in {j}");
    }
    assert_eq!(j["grounding_missing"], 1);
    assert_eq!(j["missing"], 0);
    assert_eq!(j["counts"]["TN"], 2);

    assert_eq!(gm.not_in_annotations, 0);
    assert!(j.get("grounding_not_in_annotations").is_none());

    // Annotations cut to v1's questions: v3's ground truth is not a prediction missing from
    // the file, it is counted apart (the metrics are those of v1's four spans).
    let cut = evaluate(Dataset::NextGqa, &samples[..4], &preds, Some(&g)).unwrap().metrics;
    let gc = cut.grounding.clone().unwrap();
    assert_eq!((gc.evaluated, gc.missing, gc.not_in_annotations), (4, 0, 1));
    close(gc.m_iop, gm.m_iop);
    assert_eq!(cut.to_json()["grounding_not_in_annotations"], 1);

    // Without gsub every question counts: v2_0 is wrong.
    let m = evaluate(Dataset::NextGqa, &samples, &preds, None).unwrap().metrics;
    close(m.get("CW").unwrap(), 50.0);
    assert!(m.grounding.is_none());

    // A question without any prediction counts as wrong and missing.
    let p2 = write(tmp.path(), "preds2.jsonl", &(lines[..5].join("\n") + "\n"));
    let m = evaluate(Dataset::NextQa, &samples, &read_predictions(&p2).unwrap(), None)
        .unwrap()
        .metrics;
    assert_eq!(m.missing, 1);
    close(m.get("CW").unwrap(), 50.0);
    close(m.get("overall").unwrap(), 400.0 / 6.0);
}

#[test]
fn prediction_problems_are_reported_with_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = vec![
        mc("v1", "0", "CW", 1),
        mc("v1", "1", "DC", 2),
        mc("v2", "0", "DL", 3),
        mc("v2", "1", "DO", 4),
    ];
    let lines = [
        row(&samples[0], 1, None),
        "{\"qid\": \"1\", \"video\": \"v1\", \"prediction\": 2".to_string(), // malformed JSON
        row(&samples[0], 3, None),                                           // duplicate of line 1
        row(&mc("v9", "0", "CW", 0), 0, None),                               // unknown question
        r#"{"qid": 0, "video": "v2", "type": "DL", "prediction": "option 3", "answer": 3}"#.to_string(), // text for MC
        row(&samples[1], 7, None),                                           // index out of range
        r#"{"qid": "1", "video": "v2", "type": "DO", "prediction": 4, "answer": 0}"#.to_string(), // answer differs
        r#"{"qid": "1", "video": "v1", "prediction": 2}"#.to_string(),       // no answer: read, stands in for line 6
        String::new(),
        r#"{"qid": "1", "video": "v1", "type": "DC", "prediction": 2, "answer": 2, "span": [1.0, 1e999]}"#.to_string(),
    ];
    let p = write(tmp.path(), "preds.jsonl", &(lines.join("\n") + "\n"));
    let preds = read_predictions(&p).unwrap();
    let ev = evaluate(Dataset::NextQa, &samples, &preds, None).unwrap();
    let got: Vec<(u64, ProblemKind)> = ev.problems.iter().map(|p| (p.line, p.kind)).collect();
    assert_eq!(
        got,
        vec![
            (2, ProblemKind::Malformed),
            (3, ProblemKind::Duplicate),
            (4, ProblemKind::Unknown),
            (5, ProblemKind::Invalid),
            (6, ProblemKind::Invalid),
            (7, ProblemKind::AnswerMismatch),
            (10, ProblemKind::Malformed),
        ]
    );
    assert!(ev.problems[1].message.contains("already predicted at line 1"), "{}", ev.problems[1]);
    assert!(
        ev.problems[2].to_string().starts_with("line 4: unknown question: video v9 qid 0"),
        "{}",
        ev.problems[2]
    );
    assert!(
        ev.problems[5]
            .message
            .contains("the row's answer is option 0, the annotation's option 4"),
        "{}",
        ev.problems[5]
    );
    // A row without `answer` (another tool's file) is scored against the annotation's.
    let bare = write(tmp.path(), "bare.jsonl", "{\"qid\": \"1\", \"video\": \"v1\", \"prediction\": 2}\n");
    let alone = evaluate(Dataset::NextQa, &samples, &read_predictions(&bare).unwrap(), None).unwrap();
    assert!(alone.problems.is_empty(), "{:?}", alone.problems);
    assert_eq!(alone.metrics.get("DC"), Some(100.0));
    // A byte-order mark does not cost the first row; an id of another type is named as such.
    let bom = write(
        tmp.path(),
        "bom.jsonl",
        "\u{feff}{\"qid\": 1, \"video\": \"v1\", \"prediction\": 2}\n",
    );
    let read = read_predictions(&bom).unwrap();
    assert_eq!((read.rows.len(), read.problems.len()), (1, 0), "{:?}", read.problems);
    let float = write(tmp.path(), "float.jsonl", "{\"qid\": 1.5, \"video\": \"v1\", \"prediction\": 2}\n");
    let read = read_predictions(&float).unwrap();
    assert!(
        read.problems[0].message.contains("expected a string or an integer id"),
        "{:?}",
        read.problems
    );
    // Counted: v1_0 right (line 1), v1_1 right (line 8: line 6 cannot answer it, and a later
    // row of the question stands in; it was dropped as a duplicate of line 6), v2_1 right (line
    // 7, the annotation's answer 4 is used); v2_0 has no usable prediction.
    let m = ev.metrics;
    assert_eq!(m.missing, 1);
    assert_eq!(m.get("overall"), Some(75.0));
    assert_eq!(m.get("DO"), Some(100.0));
    assert_eq!(m.get("DC"), Some(100.0));
}

/// The official scripts' result object keys rows by `"<video>_<qid>"` and looks each annotated
/// question up by that whole key: qids holding `_` (STAR's "Interaction_T1_13") are matched whole,
/// not at the key's last `_`, and a key that names two annotated questions is reported, naming
/// both, instead of being scored for one of them.
#[test]
fn official_result_keys_whose_qids_hold_underscores_are_matched_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = vec![
        mc("6H78U", "Interaction_T1_13", "CW", 1),
        mc("6H78U", "Sequence_T2_5", "DC", 2),
        mc("a_b", "c", "CW", 0),
        mc("a", "b_c", "CW", 1),
    ];
    let object = r#"{
        "6H78U_Interaction_T1_13": {"prediction": 1, "answer": 1},
        "6H78U_Sequence_T2_5": {"prediction": 0, "answer": 2},
        "a_b_c": {"prediction": 0, "answer": 0}
    }"#;
    let preds = read_predictions(&write(tmp.path(), "result.json", object)).unwrap();
    assert!(preds.joined_keys && preds.problems.is_empty(), "{:?}", preds.problems);
    let ev = evaluate(Dataset::NextQa, &samples, &preds, None).unwrap();
    assert_eq!(ev.problems.len(), 1, "{:?}", ev.problems);
    let p = &ev.problems[0];
    assert_eq!((p.line, p.kind), (3, ProblemKind::Unknown));
    assert!(
        p.message.contains("key a_b_c is ambiguous") && p.message.contains("video a_b qid c") && p.message.contains("video a qid b_c"),
        "{p}"
    );
    let m = &ev.metrics;
    assert_eq!(m.missing, 2);
    assert_eq!(m.get("DC"), Some(0.0));
    // The same rows as JSONL name their video and qid: no key is re-split there.
    let jsonl = write(
        tmp.path(),
        "preds.jsonl",
        "{\"qid\": \"T1_13\", \"video\": \"6H78U_Interaction\", \"prediction\": 1}\n",
    );
    let rows = read_predictions(&jsonl).unwrap();
    assert!(!rows.joined_keys);
    let ev = evaluate(Dataset::NextQa, &samples, &rows, None).unwrap();
    assert_eq!(ev.problems.len(), 1);
    assert_eq!(ev.problems[0].kind, ProblemKind::Unknown);
}

/// Entries of the official result object that are not `"<video>_<qid>": {"prediction": ...}`
/// are reported by their key, without positions in text the file does not hold, and the other
/// entries are scored (one bad entry used to send the whole file to the JSONL reader, which
/// found no row at all); an object none of whose entries has that form is not read as one.
#[test]
fn bad_entries_of_an_official_result_object_are_named_by_key_and_the_rest_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = vec![mc("v1", "0", "CW", 1), mc("v1", "1", "DC", 2), mc("v2", "0", "DL", 3)];
    let object = r#"{"v1_0": {"prediction": 1, "answer": 1}, "bogus": {"prediction": 1},
        "v1_1": 2, "v2_0": {"pred": 3}}"#;
    let preds = read_predictions(&write(tmp.path(), "result.json", object)).unwrap();
    assert!(preds.joined_keys);
    let got: Vec<(u64, ProblemKind, String)> = preds.problems.iter().map(|p| (p.line, p.kind, p.message.clone())).collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|(_, k, _)| *k == ProblemKind::Malformed), "{got:?}");
    assert!(got[0].2.starts_with("key bogus: the key is not \"<video>_<qid>\""), "{got:?}");
    assert!(
        got[1].2.starts_with("key v1_1: expected an object") && got[1].2.contains("found 2"),
        "{got:?}"
    );
    assert!(
        got[2].2.starts_with("key v2_0: missing field `prediction`") && !got[2].2.contains(" at line "),
        "{got:?}"
    );
    let ev = evaluate(Dataset::NextQa, &samples, &preds, None).unwrap();
    assert_eq!(ev.metrics.missing, 2);
    assert_eq!(ev.metrics.get("CW"), Some(100.0));
    // Another JSON object (a metrics file, say) is not taken for a result object: its one
    // problem says what was expected.
    let other = read_predictions(&write(tmp.path(), "metrics.json", "{\"acc\": {\"CW\": 1},\n\"count\": 3}")).unwrap();
    assert!(!other.joined_keys && other.rows.is_empty());
    assert!(other.problems[0].message.contains("expected JSONL"), "{:?}", other.problems);
}

#[test]
fn writer_appends_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("out/preds.jsonl");
    let samples = [mc("v1", "0", "CW", 1), mc("v1", "1", "TN", 2), mc("v2", "0", "TC", 0)];
    let mut full = PredictionRow::for_sample(&samples[0], Answer::Choice(1));
    full.span = Some([1.5, 4.0]);
    full.moments = Some(Moments {
        frames: vec![2, 5, 9],
        seconds: vec![1.5, 2.5, 4.0],
    });
    full.curve = Some(vec![0.1, 1.0 / 3.0, 2f64.sqrt() / 7.0, 1e-17]); // read back bit-exact
    {
        let mut w = PredictionWriter::create(&path).unwrap();
        w.write(&full).unwrap();
        w.write(&PredictionRow::for_sample(&samples[1], Answer::Choice(0))).unwrap();
        assert!(w.write(&full).is_err(), "a second row for a question is refused");
        w.sync().unwrap();
    }
    // A run killed mid-line.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"qid\": \"0\", \"video\": \"v2\", \"predic");
    std::fs::write(&path, &text).unwrap();

    let mut w = PredictionWriter::resume(&path).unwrap();
    assert_eq!(w.len(), 2);
    assert!(w.contains("v1", "0") && w.contains("v1", "1") && !w.contains("v2", "0"));
    w.write(&PredictionRow::for_sample(&samples[2], Answer::Choice(0))).unwrap();
    drop(w);
    let back = read_predictions(&path).unwrap();
    assert!(back.problems.is_empty(), "{:?}", back.problems);
    let rows: Vec<&PredictionRow> = back.rows.iter().map(|(_, r)| r).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0], &full);
    assert_eq!(back.rows[2].0, 3);
    assert_eq!(rows[2].video, "v2");
    // The JSON field names of the format.
    let first: Value = serde_json::from_str(std::fs::read_to_string(&path).unwrap().lines().next().unwrap()).unwrap();
    for k in ["qid", "video", "type", "prediction", "answer", "span", "moments", "curve"] {
        assert!(first.get(k).is_some(), "{k} in {first}");
    }
    assert_eq!(first["moments"]["frames"], serde_json::json!([2, 5, 9]));
    // `create` starts over; resume refuses a file that is not ours.
    let w = PredictionWriter::create(&path).unwrap();
    assert!(w.is_empty());
    let junk = write(tmp.path(), "junk.jsonl", "hello\n");
    assert!(PredictionWriter::resume(&junk).is_err());
}

#[test]
fn causal_vidqa_per_video_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let qa = tmp.path().join("QA");
    let text = std::fs::read_to_string(fixtures().join("data/causalvidqa/QA/vid_a/text.json")).unwrap();
    for v in ["A", "B"] {
        write(&qa, &format!("{v}/text.json"), &text);
        write(
            &qa,
            &format!("{v}/answer.json"),
            r#"{"descriptive": {"answer": 1}, "explanatory": {"answer": 2}, "predictive": {"answer": 3, "reason": 4}, "counterfactual": {"answer": 0, "reason": 1}}"#,
        );
    }
    let samples = causalvidqa::read(&qa, None).unwrap();
    // A: all right. B: D right, E wrong, PA right / PR wrong, CA wrong / CR right.
    let a = [1, 2, 3, 4, 0, 1];
    let b = [1, 0, 3, 0, 2, 1];
    let lines: Vec<String> = samples
        .iter()
        .zip(a.iter().chain(b.iter()))
        .map(|(s, &p)| serde_json::to_string(&PredictionRow::for_sample(s, Answer::Choice(p))).unwrap())
        .collect();
    let p = write(tmp.path(), "preds.jsonl", &(lines.join("\n") + "\n"));
    let m = evaluate(Dataset::CausalVidQa, &samples, &read_predictions(&p).unwrap(), None)
        .unwrap()
        .metrics;
    let want = [
        ("D", 100.0),
        ("E", 50.0),
        ("PA", 100.0),
        ("PR", 50.0),
        ("P", 50.0),
        ("CA", 50.0),
        ("CR", 100.0),
        ("C", 50.0),
        ("overall", 62.5),
    ];
    for (k, v) in want {
        assert_eq!(m.get(k), Some(v), "{k}");
    }
    assert_eq!(
        m.scores.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        want.iter().map(|(k, _)| *k).collect::<Vec<_>>()
    );
    // A video with a question missing from the annotations is left out (its 5 questions
    // counted as excluded): the scores are A's alone, all right.
    let m = evaluate(Dataset::CausalVidQa, &samples[..11], &read_predictions(&p).unwrap(), None)
        .unwrap()
        .metrics;
    assert_eq!((m.questions, m.excluded), (6, 5));
    for k in ["D", "E", "PA", "PR", "P", "CA", "CR", "C", "overall"] {
        assert_eq!(m.get(k), Some(100.0), "{k}");
    }
    // With no complete video there is nothing to score.
    let err = evaluate(Dataset::CausalVidQa, &samples[..5], &read_predictions(&p).unwrap(), None).unwrap_err();
    assert!(err.to_string().contains("no video has all six"), "{err}");
}

#[test]
fn open_ended_and_intentqa_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = open_ended::read(&fixtures().join("data/open_ended/msrvtt_test_qa.json")).unwrap();
    let preds = [
        r#"{"qid": 158581, "video": 7010, "type": "0", "prediction": "  Man ", "answer": "man"}"#,
        r#"{"qid": "158582", "video": "7010", "type": "3", "prediction": "garden", "answer": "kitchen"}"#,
        r#"{"qid": "158583", "video": "7011", "type": "1", "prediction": 2, "answer": "dance"}"#,
    ];
    let p = write(tmp.path(), "oe.jsonl", &(preds.join("\n") + "\n"));
    let ev = evaluate(Dataset::OpenEnded, &samples, &read_predictions(&p).unwrap(), None).unwrap();
    assert_eq!(ev.problems.len(), 1);
    assert_eq!((ev.problems[0].line, ev.problems[0].kind), (3, ProblemKind::Invalid));
    let m = ev.metrics;
    assert_eq!(m.get("overall"), Some(100.0 / 3.0));
    assert_eq!(m.missing, 1);
    let by: Vec<(&str, f64)> = m.by_type.iter().map(|s| (s.name.as_str(), s.value)).collect();
    assert_eq!(by, vec![("0", 100.0), ("1", 0.0), ("3", 0.0)]);
    assert_eq!(m.to_json()["by_type"]["0"]["correct"], 1);

    // IntentQA: TN and TP together as "TN&TP".
    let samples = intentqa::read(&fixtures().join("data/intentqa/sample.csv")).unwrap();
    let picks = [3, 0, 0, 4, 1]; // right, wrong (TN), right (CH), right (TP), wrong (CW)
    let lines: Vec<String> = samples
        .iter()
        .zip(picks)
        .map(|(s, p)| serde_json::to_string(&PredictionRow::for_sample(s, Answer::Choice(p))).unwrap())
        .collect();
    let p = write(tmp.path(), "intent.jsonl", &(lines.join("\n") + "\n"));
    let m = evaluate(Dataset::IntentQa, &samples, &read_predictions(&p).unwrap(), None)
        .unwrap()
        .metrics;
    assert_eq!(m.get("CW"), Some(50.0));
    assert_eq!(m.get("CH"), Some(100.0));
    assert_eq!(m.get("TN&TP"), Some(50.0));
    assert_eq!(m.get("TN"), None);
    assert_eq!(m.get("overall"), Some(60.0));
}

#[test]
fn a_nextgqa_answer_equal_to_two_options_accepts_both() {
    // The real test split's 3842638015_4: a3 = a4 = "happy" and NExT-GQA gives the answer as the
    // text "happy"; NExT-QA's file says option 4, a Python reader's `options.index` gives 3.
    let tmp = tempfile::tempdir().unwrap();
    let gqa = nextgqa::read(&unpack(tmp.path(), "data/nextgqa/test.csv")).unwrap();
    let qa = nextqa::read(&unpack(tmp.path(), "data/nextqa/test.csv")).unwrap();
    let pick = |all: &[QaSample]| -> Vec<QaSample> { all.iter().filter(|s| s.video == "3842638015").cloned().collect() };
    let (gqa, qa) = (pick(&gqa), pick(&qa));
    let happy = gqa.iter().find(|s| s.qid == "4").unwrap();
    assert_eq!((happy.options[3].as_str(), happy.options[4].as_str()), ("happy", "happy"));
    assert_eq!(happy.answer, Answer::Choice(3));
    assert!(happy.accepts(&Answer::Choice(4)) && !happy.accepts(&Answer::Choice(2)));
    let grounding = Grounding::read(&unpack(tmp.path(), "data/nextgqa/gsub_test.json")).unwrap();
    let segs = grounding.segments("3842638015", "4").unwrap().to_vec();

    for (pred, qa_right) in [(3usize, false), (4, true)] {
        // Every other question of the video answered wrong, so the accuracy shows this one.
        let mut lines = String::new();
        for s in &gqa {
            let Answer::Choice(a) = s.answer else { unreachable!() };
            let p = if s.qid == "4" { pred } else { (a + 1) % 5 };
            let span = (s.qid == "4").then_some(segs[0]);
            // Rows written by a NExT-QA-format run carry NExT-QA's answer index (4 here).
            let mut r = PredictionRow::for_sample(s, Answer::Choice(p));
            r.answer = Some(qa.iter().find(|q| q.qid == s.qid).unwrap().answer.clone());
            r.span = span;
            lines += &serde_json::to_string(&r).unwrap();
            lines.push('\n');
        }
        let path = write(tmp.path(), &format!("pred{pred}.jsonl"), &lines);
        let preds = read_predictions(&path).unwrap();
        let n = gqa.len();

        let ev = evaluate(Dataset::NextGqa, &gqa, &preds, None).unwrap();
        assert_eq!(ev.metrics.get("overall"), Some(100.0 / n as f64), "prediction {pred}");
        assert!(ev.problems.is_empty(), "equal-text answers are no mismatch: {:?}", ev.problems);
        let ev = evaluate(Dataset::NextGqa, &gqa, &preds, Some(&grounding)).unwrap();
        let g = ev.metrics.grounding.as_ref().unwrap();
        assert_eq!(
            (g.evaluated, g.acc_gqa),
            (1, 100.0),
            "prediction {pred}: QA right and IoP 1 on its own segment"
        );

        // NExT-QA's own scoring (`eval_mc.py`) compares indices: only 4 is right there.
        let ev = evaluate(Dataset::NextQa, &qa, &preds, None).unwrap();
        let want = if qa_right { 100.0 / qa.len() as f64 } else { 0.0 };
        assert_eq!(ev.metrics.get("overall"), Some(want), "NExT-QA, prediction {pred}");
    }
}

#[test]
fn usable_predictions_are_not_lost_to_bad_neighbours() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = [mc("v1", "0", "CW", 2), mc("v1", "1", "TN", 3), mc("v2", "0", "DC", 1)];
    // Line 1 cannot answer v1_0 (option 7 of 5): the row after it, a "duplicate", stands in.
    // v1_1's span does not read: its answer is still scored. Line 5 duplicates line 2.
    let text = "{\"video\": \"v1\", \"qid\": \"0\", \"prediction\": 7}\n\
                {\"video\": \"v1\", \"qid\": \"0\", \"prediction\": 2}\n\
                {\"video\": \"v1\", \"qid\": \"1\", \"prediction\": 3, \"span\": [4.0]}\n\
                {\"video\": \"v2\", \"qid\": \"0\", \"prediction\": 0, \"type\": \"CH\"}\n\
                {\"video\": \"v1\", \"qid\": \"0\", \"prediction\": 4}\n";
    let path = write(tmp.path(), "p.jsonl", text);
    let preds = read_predictions(&path).unwrap();
    let ev = evaluate(Dataset::NextQa, &samples, &preds, None).unwrap();
    let got: Vec<(u64, ProblemKind)> = ev.problems.iter().map(|p| (p.line, p.kind)).collect();
    assert_eq!(
        got,
        [
            (1, ProblemKind::Invalid),
            (3, ProblemKind::Malformed),
            (4, ProblemKind::TypeMismatch),
            (5, ProblemKind::Duplicate)
        ],
        "{:?}",
        ev.problems
    );
    assert!(
        ev.problems[1].message.contains("span left out (a span is [start, end] in seconds;"),
        "{}",
        ev.problems[1]
    );
    assert!(
        ev.problems[2].message.contains("the row's type is \"CH\", the annotation's \"DC\""),
        "{}",
        ev.problems[2]
    );
    assert_eq!(ev.metrics.missing, 0);
    assert_eq!(ev.metrics.get("CW"), Some(100.0), "line 2 scored for v1_0");
    assert_eq!(ev.metrics.get("TN"), Some(100.0), "v1_1 scored without its span");
    assert_eq!(ev.metrics.get("DC"), Some(0.0));
    // Moments whose frames and times disagree are left out; the answer is scored.
    let path = write(
        tmp.path(),
        "m.jsonl",
        "{\"video\": \"v1\", \"qid\": \"0\", \"prediction\": 2, \"moments\": {\"frames\": [1, 2], \"seconds\": [0.5]}}\n",
    );
    let preds = read_predictions(&path).unwrap();
    assert!(
        preds.problems[0].message.contains("moments: 2 frames but 1 times; left out"),
        "{:?}",
        preds.problems
    );
    assert!(preds.rows[0].1.moments.is_none());
    let ev = evaluate(Dataset::NextQa, &samples, &preds, None).unwrap();
    assert_eq!(ev.metrics.get("CW"), Some(100.0));

    // One JSON document that is neither rows nor the official object: the hint says JSONL.
    let path = write(tmp.path(), "doc.json", "{\n  \"predictions\": {\"v1_0\": 2}\n}\n");
    let preds = read_predictions(&path).unwrap();
    assert!(preds.problems[0].message.contains("expected JSONL"), "{:?}", preds.problems);
    // A JSON array of rows reads as its rows.
    let path = write(
        tmp.path(),
        "rows.json",
        "[\n {\"video\": \"v1\", \"qid\": 0, \"prediction\": 2},\n {\"video\": \"v2\", \"qid\": 0, \"prediction\": 1}\n]\n",
    );
    let ev = evaluate(Dataset::NextQa, &samples, &read_predictions(&path).unwrap(), None).unwrap();
    assert_eq!(
        (ev.metrics.get("CW"), ev.metrics.get("DC"), ev.metrics.missing),
        (Some(100.0), Some(100.0), 1)
    );
}
