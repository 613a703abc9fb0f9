//! STAR, SUTD-TrafficQA and VLEP: the readers on small files in the published formats
//! (`tests/fixtures/data/{star,trafficqa,vlep}/`, written by
//! `tools/fixtures/make_star_trafficqa_vlep.py`; expected fields read off them with Python's
//! json), their errors, and the metrics against the numbers that script computed
//! (`tests/fixtures/eval/star_trafficqa_vlep_refs.json`: STAR per type + the mean of the four
//! types, TrafficQA per type + overall, VLEP by the official `standalone_eval/eval.py`).

mod data_fixtures;

use data_fixtures::{fixtures, write};
use gcg::data::{prompt, read_annotations, star, trafficqa, vlep, Answer, BadRow, Dataset, QaSample, ReadOptions};
use gcg::eval::{evaluate, read_predictions, PredictionRow, PredictionWriter, ProblemKind};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn star_file() -> PathBuf {
    fixtures().join("data/star/STAR_val.json")
}
fn traffic_file() -> PathBuf {
    fixtures().join("data/trafficqa/R3_test.jsonl")
}
fn vlep_file() -> PathBuf {
    fixtures().join("data/vlep/vlep_dev_release.jsonl")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn count_types(samples: &[QaSample]) -> Vec<(String, usize)> {
    let mut m = std::collections::BTreeMap::new();
    for s in samples {
        *m.entry(s.qtype.clone()).or_insert(0) += 1;
    }
    m.into_iter().collect()
}

/// The error of a strict read as a `BadRow`, and its text.
fn bad_row(err: anyhow::Error) -> (BadRow, String) {
    let text = format!("{err:#}");
    match err.downcast::<BadRow>() {
        Ok(b) => (b, text),
        Err(e) => panic!("expected a BadRow error, got: {e:#}"),
    }
}

fn read_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[test]
fn star_reads_the_published_json() {
    let samples = star::read(&star_file()).unwrap();
    assert_eq!(samples.len(), 20);
    let want: Vec<(String, usize)> = [("Feasibility", 3), ("Interaction", 7), ("Prediction", 4), ("Sequence", 6)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    assert_eq!(count_types(&samples), want);
    let s = &samples[0];
    assert_eq!(s.dataset, Dataset::Star);
    assert_eq!(
        (s.key.as_str(), s.qid.as_str(), s.video.as_str()),
        ("Sequence_T2_38", "Sequence_T2_38", "XEWQN")
    );
    assert_eq!(s.qtype, "Sequence");
    assert_eq!(s.question, "Which object did the person tidy up after they held the closet/cabinet");
    assert_eq!(
        s.options,
        strings(&["The pillow.", "The cup/glass/bottle.", "The shoe.", "The phone/camera."])
    );
    assert_eq!(s.answer, Answer::Choice(1));
    assert_eq!(s.extra["start"], "1.79");
    assert_eq!(s.extra["end"], "4.4");
    assert_eq!(s.extra["template"], "T2");
    // Entry 3 lists its choices as choice_id 2, 0, 3, 1: the options follow choice_id.
    let s = &samples[3];
    assert_eq!(s.qid, "Interaction_T2_34");
    assert_eq!(
        s.options,
        strings(&["The broom.", "The pillow.", "The cup/glass/bottle.", "The blanket."])
    );
    assert_eq!(s.answer, Answer::Choice(3));
    assert_eq!(s.answer_text(), "The blanket.");
    // Entry 5 carries a situations graph: ignored.
    assert_eq!(
        (samples[5].qid.as_str(), samples[5].answer.clone()),
        ("Sequence_T1_31", Answer::Choice(3))
    );
    // The generic entry point reads the same.
    let ann = read_annotations(Dataset::Star, &star_file(), &ReadOptions::strict()).unwrap();
    assert_eq!(ann.samples, samples);
}

/// The STAR fixture with entry `i` changed by `f`.
fn star_edited(dir: &Path, i: usize, f: impl Fn(&mut Value)) -> PathBuf {
    let mut all: Value = serde_json::from_str(&read_text(&star_file())).unwrap();
    f(&mut all[i]);
    write(dir, "STAR_val.json", &serde_json::to_string(&all).unwrap())
}

#[test]
fn star_errors_name_file_entry_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(Box<dyn Fn(&mut Value)>, &str, &str)> = vec![
        (
            Box::new(|q| {
                q.as_object_mut().unwrap().remove("answer");
            }),
            "answer",
            "STAR_test.json holds no answers",
        ),
        (
            Box::new(|q| q["answer"] = "The sofa.".into()),
            "answer",
            "equals none of the choices",
        ),
        (
            Box::new(|q| q["question_id"] = "Causal_T1_3".into()),
            "question_id",
            "question type (the id up to its first `_`) is `Causal`",
        ),
        (
            Box::new(|q| {
                q["choices"].as_array_mut().unwrap().pop();
            }),
            "choices",
            "expected 4 choices, found 3",
        ),
        (
            Box::new(|q| q["choices"][1]["choice_id"] = 0.into()),
            "choices",
            "choice_id 0 appears twice",
        ),
        (Box::new(|q| q["start"] = "soon".into()), "start", "expected a time in seconds"),
        (Box::new(|q| q["end"] = 0.5.into()), "end", "ends (0.5) before it starts (1.79)"),
        (Box::new(|q| q["video_id"] = Value::Null), "video_id", "expected the video id"),
    ];
    for (edit, column, reason) in cases {
        let path = star_edited(tmp.path(), 0, edit);
        let (b, text) = bad_row(star::read(&path).unwrap_err());
        // The entry is named by its index and its (possibly edited) id.
        let entry = if reason.contains("Causal") {
            "entry 0 (Causal_T1_3)"
        } else {
            "entry 0 (Sequence_T2_38)"
        };
        assert_eq!(b.file, path, "{text}");
        assert_eq!(b.entry.as_deref(), Some(entry), "{text}");
        assert_eq!(b.column.as_deref(), Some(column), "{text}");
        assert!(b.reason.contains(reason), "{text}");
        assert!(
            text.starts_with(&format!("{}, {entry}, column {column}: ", path.display())),
            "{text}"
        );
    }
    // A duplicate id; with --skip-bad-rows it is reported and the rest read.
    let first = serde_json::from_str::<Value>(&read_text(&star_file())).unwrap()[0].clone();
    let path = star_edited(tmp.path(), 7, |q| *q = first.clone());
    let (b, _) = bad_row(star::read(&path).unwrap_err());
    assert_eq!((b.entry.as_deref(), b.column.as_deref()), (Some("entry 7"), Some("question_id")));
    assert!(b.reason.contains("duplicate question_id Sequence_T2_38 (first at entry 0)"), "{b}");
    let ann = star::read_with(&path, &ReadOptions::skip_bad_rows()).unwrap();
    assert_eq!((ann.samples.len(), ann.bad_rows.len()), (19, 1));
    // Not a list.
    let path = write(tmp.path(), "obj.json", r#"{"question_id": "Interaction_T1_1"}"#);
    assert!(star::read(&path)
        .unwrap_err()
        .to_string()
        .contains("expected a list of STAR questions"));
    // Broken JSON: file, line and column.
    let path = write(tmp.path(), "broken.json", "[\n{\"question_id\": \"Interaction_T1_1\",\n}\n]");
    let (b, _) = bad_row(star::read(&path).unwrap_err());
    assert_eq!(b.line, Some(3));
}

#[test]
fn trafficqa_reads_the_published_jsonl() {
    let samples = trafficqa::read(&traffic_file()).unwrap();
    assert_eq!(samples.len(), 26, "the header row is not a question");
    let want: Vec<(String, usize)> = [("A", 5), ("C", 3), ("F", 4), ("I", 2), ("R", 3), ("U", 9)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    assert_eq!(count_types(&samples), want);
    // Line 2: [1024, 1850, "b_1faf6fbbhP_clip_037.mp4", 1, "Will the truck collide with the car?", "F",
    //          "Cloudy", "Sunny", "Violation of traffic rules by a pedestrian", "Two", 2]
    let s = &samples[0];
    assert_eq!(s.dataset, Dataset::TrafficQa);
    assert_eq!((s.key.as_str(), s.qid.as_str()), ("1024", "1024"));
    assert_eq!(s.video, "b_1faf6fbbhP_clip_037");
    assert_eq!(s.question, "Will the truck collide with the car");
    assert_eq!(s.qtype, "F");
    assert_eq!(
        s.options,
        strings(&["Cloudy", "Sunny", "Violation of traffic rules by a pedestrian", "Two"])
    );
    assert_eq!(s.answer, Answer::Choice(2));
    assert_eq!(s.extra["vid_id"], "1850");
    assert_eq!(s.extra["vid_filename"], "b_1faf6fbbhP_clip_037.mp4");
    assert_eq!(s.extra["perspective"], "1");
    assert_eq!(s.extra["candidates"], "4");
    // Line 5 has three candidates: the fourth slot stays, empty.
    let s = &samples[3];
    assert_eq!(s.qid, "1077");
    assert_eq!(
        s.options,
        strings(&["Rainy", "By keeping a safe distance", "The road was slippery.", ""])
    );
    assert_eq!(s.extra["candidates"], "3");
    assert_eq!(s.extra["perspective"], "3");
    // Eleven questions have fewer than four candidates, one only two.
    let short: Vec<usize> = samples
        .iter()
        .map(|s| s.options.iter().filter(|o| !o.is_empty()).count())
        .filter(|&n| n < 4)
        .collect();
    assert_eq!(short.len(), 11);
    assert_eq!(short.iter().filter(|&&n| n == 2).count(), 1);
    assert!(samples.iter().all(|s| s.options.len() == trafficqa::NUM_OPTIONS));
    // The prompt leaves the empty option out and keeps the letters of the others.
    assert_eq!(
        prompt(&samples[3]),
        "Question: Where was the blue car before the video?\nOptions: \nA: Rainy \nB: By keeping a safe distance \
         \nC: The road was slippery.\nAnswer: "
    );
}

/// The TrafficQA fixture with physical line `line` (1-based) replaced.
fn traffic_edited(dir: &Path, line: usize, new: &str) -> PathBuf {
    let mut lines: Vec<String> = read_text(&traffic_file()).lines().map(String::from).collect();
    lines[line - 1] = new.to_string();
    write(dir, "R3_test.jsonl", &(lines.join("\n") + "\n"))
}

#[test]
fn trafficqa_errors_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    // A valid row with a new record_id; each case breaks one thing in it.
    let ok =
        r#"[9999, 1850, "b_1faf6fbbhP_clip_037.mp4", 1, "Will the truck collide with the car?", "F", "Cloudy", "Sunny", "Two", "", 2]"#;
    let path = traffic_edited(tmp.path(), 4, ok);
    assert_eq!(trafficqa::read(&path).unwrap()[2].qid, "9999");
    let cases = [
        (
            ok.replace("\"F\"", "\"E\""),
            Some("5 (q_type)"),
            "expected a question type among U (basic understanding), A (attribution)",
        ),
        (
            ok.replace(", 2]", ", 3]"),
            Some("10 (answer)"),
            "the answer is option3, which is empty",
        ),
        (
            ok.replace(", 2]", ", 4]"),
            Some("10 (answer)"),
            "expected an option index 0-3, found 4",
        ),
        (
            ok.replace(", 1, \"Will", ", 2, \"Will"),
            Some("3 (perspective)"),
            "expected 1 (first person) or 3",
        ),
        (
            ok.replace("1850", "-5"),
            Some("1 (vid_id)"),
            "expected a non-negative integer, found -5",
        ),
        (ok.replace("\"Cloudy\", ", ""), None, "expected 11 fields"),
        (
            ok.replace("\"Cloudy\", \"Sunny\"", "\"\", \"\""),
            Some("6 (option0)"),
            "at least 2 non-empty options, found 1",
        ),
        (r#"{"record_id": 1}"#.to_string(), None, "expected a list [record_id, vid_id"),
        (ok.replace(']', ""), Some("121"), "invalid JSON"), // the line ends at column 121
    ];
    for (row, column, reason) in cases {
        let path = traffic_edited(tmp.path(), 4, &row);
        let (b, text) = bad_row(trafficqa::read(&path).unwrap_err());
        assert_eq!(b.file, path, "{text}");
        assert_eq!(b.line, Some(4), "{text}");
        assert_eq!(b.column.as_deref(), column, "{text}");
        assert!(b.reason.contains(reason), "{text}");
        assert!(text.starts_with(&format!("{}:4", path.display())), "{text}");
        // Skipped with --skip-bad-rows: the other 25 are read.
        let ann = trafficqa::read_with(&path, &ReadOptions::skip_bad_rows()).unwrap();
        assert_eq!((ann.samples.len(), ann.bad_rows.len()), (25, 1), "{text}");
        assert_eq!(ann.bad_rows[0].line, Some(4));
    }
    // A repeated record_id names the first line.
    let second = read_text(&traffic_file()).lines().nth(1).unwrap().to_string();
    let path = traffic_edited(tmp.path(), 9, &second);
    let (b, _) = bad_row(trafficqa::read(&path).unwrap_err());
    assert_eq!((b.line, b.column.as_deref()), (Some(9), Some("0 (record_id)")));
    assert!(b.reason.contains("duplicate record_id 1024 (first at line 2)"), "{b}");
    // Only the header: no questions.
    let header = read_text(&traffic_file()).lines().next().unwrap().to_string();
    let path = write(tmp.path(), "header.jsonl", &(header + "\n"));
    assert!(trafficqa::read(&path).unwrap_err().to_string().contains("no questions"));
    // A file without the header reads the same questions.
    let body: String = read_text(&traffic_file()).split_inclusive('\n').skip(1).collect();
    let path = write(tmp.path(), "noheader.jsonl", &body);
    assert_eq!(trafficqa::read(&path).unwrap(), trafficqa::read(&traffic_file()).unwrap());
    // Not UTF-8: file and line.
    let mut bytes = read_text(&traffic_file()).into_bytes();
    let at = bytes.iter().position(|&c| c == b'\n').unwrap() + 5;
    bytes[at] = 0xff;
    let path = tmp.path().join("latin1.jsonl");
    std::fs::write(&path, bytes).unwrap();
    let (b, _) = bad_row(trafficqa::read(&path).unwrap_err());
    assert_eq!(b.line, Some(2));
}

#[test]
fn vlep_reads_the_published_jsonl() {
    let samples = vlep::read(&vlep_file()).unwrap();
    assert_eq!(samples.len(), 13);
    // {"example_id": 20145, "vid_name": "friends_s07e16_seg02_clip_16_ep", "ts": [43.33, 46.35],
    //  "events": ["Joey will sit down on the couch.", "Joey will pour some coffee."], "answer": 0, "split": "dev"}
    let s = &samples[0];
    assert_eq!(s.dataset, Dataset::Vlep);
    assert_eq!((s.key.as_str(), s.qid.as_str()), ("20145", "20145"));
    assert_eq!(s.video, "friends_s07e16_seg02_clip_16_ep");
    assert_eq!(s.question, vlep::QUESTION);
    assert_eq!(
        s.options,
        strings(&["Joey will sit down on the couch.", "Joey will pour some coffee."])
    );
    assert_eq!(s.answer, Answer::Choice(0));
    assert_eq!(s.qtype, "");
    assert_eq!((s.extra["start"].as_str(), s.extra["end"].as_str()), ("43.33", "46.35"));
    assert_eq!(s.extra["split"], "dev");
    assert_eq!(samples[2].video, "9fbkc7eh73-_subs_029_00:16:00_00:55:00_ep");
    assert_eq!(samples[2].answer, Answer::Choice(1));
    assert_eq!(
        prompt(s),
        "Question: Which event is more likely to happen right after?\nOptions: \nA: Joey will sit down on the couch. \
         \nB: Joey will pour some coffee.\nAnswer: "
    );
}

#[test]
fn vlep_errors_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let lines: Vec<String> = read_text(&vlep_file()).lines().map(String::from).collect();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&lines[2]).unwrap();
        f(&mut v);
        let mut all = lines.clone();
        all[2] = v.to_string();
        write(tmp.path(), "vlep_dev_release.jsonl", &(all.join("\n") + "\n"))
    };
    let cases: Vec<(Box<dyn Fn(&mut Value)>, &str, &str)> = vec![
        (
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("answer");
            }),
            "answer",
            "vlep_test_release.jsonl holds no answers",
        ),
        (Box::new(|v| v["answer"] = 2.into()), "answer", "expected 0 or 1, found 2"),
        (Box::new(|v| v["ts"] = serde_json::json!([5.0, 1.0])), "ts", "0 <= start <= end"),
        (
            Box::new(|v| v["events"] = serde_json::json!(["one"])),
            "events",
            "expected 2 event texts",
        ),
        (Box::new(|v| v["events"][1] = "".into()), "events", "expected 2 event texts"),
        (Box::new(|v| v["vid_name"] = 7.into()), "vid_name", "expected the video name"),
        (Box::new(|v| v["example_id"] = Value::Null), "example_id", "expected the example id"),
    ];
    for (f, column, reason) in cases {
        let path = edit(&*f);
        let (b, text) = bad_row(vlep::read(&path).unwrap_err());
        assert_eq!(
            (b.file.as_path(), b.line, b.column.as_deref()),
            (path.as_path(), Some(3), Some(column)),
            "{text}"
        );
        assert!(b.reason.contains(reason), "{text}");
        assert!(text.starts_with(&format!("{}:3, column {column}: ", path.display())), "{text}");
        let ann = vlep::read_with(&path, &ReadOptions::skip_bad_rows()).unwrap();
        assert_eq!((ann.samples.len(), ann.bad_rows.len()), (12, 1));
    }
    let path = edit(&|v| v["example_id"] = 20145.into());
    let (b, _) = bad_row(vlep::read(&path).unwrap_err());
    assert!(b.reason.contains("duplicate example_id 20145 (first at line 1)"), "{b}");
    assert_eq!(b.line, Some(3));
    // Blank lines are skipped; line numbers stay those of the file.
    let mut with_blank = lines.clone();
    with_blank.insert(1, String::new());
    with_blank[3] = "{\"example_id\": 1,".into();
    let path = write(tmp.path(), "blank.jsonl", &(with_blank.join("\n") + "\n"));
    let (b, _) = bad_row(vlep::read(&path).unwrap_err());
    assert_eq!(b.line, Some(4));
    assert!(b.reason.contains("invalid JSON"), "{b}");
}

/// The reference prediction sets, as `gcg predict` would write them and `gcg eval` read them.
#[test]
fn metrics_match_the_reference_computation() {
    let refs: Vec<Value> = serde_json::from_str(&read_text(&fixtures().join("eval/star_trafficqa_vlep_refs.json"))).unwrap();
    assert_eq!(refs.len(), 6);
    let tmp = tempfile::tempdir().unwrap();
    for r in &refs {
        let name = r["name"].as_str().unwrap();
        let dataset = Dataset::from_name(r["dataset"].as_str().unwrap()).unwrap();
        let samples = read_annotations(
            dataset,
            &fixtures().join(r["annotations"].as_str().unwrap()),
            &ReadOptions::strict(),
        )
        .unwrap()
        .samples;
        let digits: Vec<usize> = r["prediction"].as_str().unwrap().bytes().map(|b| (b - b'0') as usize).collect();
        assert_eq!(digits.len(), samples.len(), "{name}");
        let jsonl = tmp.path().join(format!("{name}.jsonl"));
        let mut w = PredictionWriter::create(&jsonl).unwrap();
        for (s, &d) in samples.iter().zip(&digits) {
            w.write(&PredictionRow::for_sample(s, Answer::Choice(d))).unwrap();
        }
        drop(w);
        let ev = evaluate(dataset, &samples, &read_predictions(&jsonl).unwrap(), None).unwrap();
        assert!(ev.problems.is_empty(), "{name}: {:?}", ev.problems);
        let m = ev.metrics;
        assert_eq!((m.dataset, m.questions, m.missing), (dataset, samples.len(), 0), "{name}");
        let want = r["expected"].as_object().unwrap();
        let mut names: Vec<&str> = m.scores.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.pop(), Some("overall"), "{name}: overall comes last");
        let mut want_names: Vec<&str> = want.keys().map(String::as_str).filter(|k| *k != "overall").collect();
        want_names.sort();
        names.sort();
        assert_eq!(names, want_names, "{name}");
        for (metric, v) in want {
            // Same operations in the same order as the reference: bit-identical.
            assert_eq!(m.get(metric), v.as_f64(), "{name} {metric}");
        }
        if let Some(printed) = r.get("printed") {
            // VLEP's script prints round(x, 2).
            let p = printed["overall"].as_f64().unwrap();
            assert_eq!(format!("{:.2}", m.overall()), format!("{p:.2}"), "{name}");
        }
        assert_eq!(m.to_json()["dataset"], r["dataset"], "{name}");
    }
}

fn preds_file(dir: &Path, name: &str, rows: &[(&QaSample, usize)]) -> PathBuf {
    let lines: Vec<String> = rows
        .iter()
        .map(|(s, p)| serde_json::to_string(&PredictionRow::for_sample(s, Answer::Choice(*p))).unwrap())
        .collect();
    write(dir, name, &(lines.join("\n") + "\n"))
}

#[test]
fn metrics_worked_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    // STAR, only Interaction and Prediction questions: 2 of 3 and 1 of 1 right (one missing).
    let all = star::read(&star_file()).unwrap();
    let inter: Vec<&QaSample> = all.iter().filter(|s| s.qtype == "Interaction").take(3).collect();
    let pred = all.iter().find(|s| s.qtype == "Prediction").unwrap();
    let right = |s: &QaSample| match s.answer {
        Answer::Choice(i) => i,
        _ => unreachable!(),
    };
    let samples: Vec<QaSample> = inter.iter().map(|s| (*s).clone()).chain([pred.clone()]).collect();
    let p = preds_file(
        tmp.path(),
        "star.jsonl",
        &[(inter[0], right(inter[0])), (inter[1], right(inter[1])), (pred, right(pred))],
    );
    let m = evaluate(Dataset::Star, &samples, &read_predictions(&p).unwrap(), None)
        .unwrap()
        .metrics;
    assert_eq!(m.missing, 1);
    assert_eq!(m.get("Interaction"), Some(200.0 / 3.0));
    assert_eq!(m.get("Prediction"), Some(100.0));
    assert_eq!(m.get("Sequence"), None, "types without questions are left out");
    // The mean of the type accuracies (83.3), not the accuracy over questions (75).
    assert_eq!(m.overall(), (200.0 / 3.0 + 100.0) / 2.0);
    assert_eq!(m.to_json()["counts"]["overall"], 4);

    // TrafficQA: a pick of an empty option is a wrong answer, not an invalid row.
    let traffic = trafficqa::read(&traffic_file()).unwrap();
    let s3 = &traffic[3]; // options 0-2, answer 2
    let s0 = &traffic[0];
    let p = preds_file(tmp.path(), "traffic.jsonl", &[(s3, 3), (s0, 2)]);
    let ev = evaluate(Dataset::TrafficQa, &traffic[..4], &read_predictions(&p).unwrap(), None).unwrap();
    assert!(ev.problems.is_empty(), "{:?}", ev.problems);
    assert_eq!(ev.metrics.get("R"), Some(0.0));
    assert_eq!(ev.metrics.get("F"), Some(100.0));
    assert_eq!(ev.metrics.overall(), 25.0);
    assert_eq!(ev.metrics.missing, 2);

    // VLEP: an index past the two events is invalid (and the example counts as wrong).
    let v = vlep::read(&vlep_file()).unwrap();
    let p = preds_file(tmp.path(), "vlep.jsonl", &[(&v[0], 2), (&v[1], right(&v[1]))]);
    let ev = evaluate(Dataset::Vlep, &v[..2], &read_predictions(&p).unwrap(), None).unwrap();
    assert_eq!(ev.problems.len(), 1);
    assert_eq!((ev.problems[0].line, ev.problems[0].kind), (1, ProblemKind::Invalid));
    assert_eq!(ev.metrics.overall(), 50.0);
    assert_eq!(ev.metrics.scores.len(), 1);
}
