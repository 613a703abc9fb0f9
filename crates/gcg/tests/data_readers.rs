//! Annotation readers on the real NExT-QA / NExT-GQA val and test files (committed gzip copies),
//! malformed copies of them, and hand-made IntentQA / Causal-VidQA / open-ended fixtures in
//! their published formats. Expected values were read off the files with Python's csv / json.

mod data_fixtures;

use data_fixtures::{fixtures, unpack, write};
use gcg::data::nextgqa::{FrameTimes, Grounding};
use gcg::data::nextqa::VideoPaths;
use gcg::data::{causalvidqa, intentqa, nextgqa, nextqa, open_ended, read_annotations};
use gcg::data::{Answer, BadRow, Dataset, QaSample, ReadOptions};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

fn count_types(samples: &[QaSample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in samples {
        *m.entry(s.qtype.clone()).or_insert(0) += 1;
    }
    m
}

fn types(list: &[(&str, usize)]) -> BTreeMap<String, usize> {
    list.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The error of a strict read as a `BadRow`.
fn bad_row(err: anyhow::Error) -> BadRow {
    match err.downcast::<BadRow>() {
        Ok(b) => b,
        Err(e) => panic!("expected a BadRow error, got: {e:#}"),
    }
}

/// Replace field `col` (0-based) of physical line `line` (1-based) of a CSV without quotes.
fn edit_line(text: &str, line: usize, f: impl Fn(&mut Vec<String>)) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut fields: Vec<String> = lines[line - 1].split(',').map(String::from).collect();
    f(&mut fields);
    lines[line - 1] = fields.join(",");
    lines.join("\n") + "\n"
}

#[test]
fn nextqa_val_and_test() {
    let tmp = tempfile::tempdir().unwrap();
    let val = nextqa::read(&unpack(tmp.path(), "data/nextqa/val.csv")).unwrap();
    assert_eq!(val.len(), 4996);
    assert_eq!(
        count_types(&val),
        types(&[
            ("CW", 1924),
            ("TN", 895),
            ("CH", 683),
            ("TC", 663),
            ("DO", 305),
            ("DL", 295),
            ("DC", 177),
            ("TP", 54)
        ])
    );
    let first = &val[0];
    assert_eq!(first.dataset, Dataset::NextQa);
    assert_eq!(first.video, "4010069381");
    assert_eq!(first.qid, "6");
    assert_eq!(first.key, "4010069381_6");
    assert_eq!(first.qtype, "CH");
    assert_eq!(first.question, "how do the two man play the instrument");
    assert_eq!(
        first.options,
        strings(&[
            "roll the handle",
            "tap their feet",
            "strum the string",
            "hit with sticks",
            "pat with hand"
        ])
    );
    assert_eq!(first.answer, Answer::Choice(0));
    assert_eq!(first.extra["frame_count"], "369");
    assert_eq!(first.extra["width"], "640");
    assert_eq!(first.extra["height"], "480");
    let last = val.last().unwrap();
    assert_eq!(last.key, "6233408665_8");
    assert_eq!(last.answer, Answer::Choice(3));
    assert_eq!(last.answer_text(), "clap");
    assert_eq!(last.qtype, "TN");

    let test = nextqa::read(&unpack(tmp.path(), "data/nextqa/test.csv")).unwrap();
    assert_eq!(test.len(), 8564);
    assert_eq!(
        count_types(&test),
        types(&[
            ("CW", 3329),
            ("TN", 1399),
            ("CH", 1173),
            ("TC", 1165),
            ("DO", 600),
            ("DL", 483),
            ("DC", 322),
            ("TP", 93)
        ])
    );
    assert_eq!(test[0].key, "2574374895_8");
    assert_eq!(test[0].answer_text(), "lay on floor");
    let last = test.last().unwrap();
    assert_eq!(
        (last.key.as_str(), last.qtype.as_str(), last.answer_text()),
        ("7964565242_3", "DL", "water tap")
    );
    assert_eq!(last.extra["width"], "646");

    // The generic entry point reads the same.
    let again = read_annotations(Dataset::NextQa, &tmp.path().join("data/nextqa/test.csv"), &ReadOptions::strict()).unwrap();
    assert_eq!(again.samples, test);
    assert!(again.bad_rows.is_empty());
}

#[test]
fn nextqa_video_map() {
    let tmp = tempfile::tempdir().unwrap();
    let map = VideoPaths::read(&unpack(tmp.path(), "data/nextqa/map_vid_vidorID.json")).unwrap();
    // The committed copy holds the entries of the val and test videos.
    assert_eq!(map.len(), 1570);
    assert_eq!(map.get("4010069381"), Some("1106/4010069381"));
    assert_eq!(
        map.video_file(Path::new("/videos"), "4010069381").unwrap(),
        Path::new("/videos/1106/4010069381.mp4")
    );
    let val = nextqa::read(&unpack(tmp.path(), "data/nextqa/val.csv")).unwrap();
    assert!(val.iter().all(|s| map.get(&s.video).is_some()), "every val video has a path");
    let err = map.video_file(Path::new("/videos"), "123").unwrap_err();
    assert!(err.to_string().contains("video 123"), "{err}");
}

#[test]
fn nextgqa_val_and_test() {
    let tmp = tempfile::tempdir().unwrap();
    for (split, n, n_videos, empty, tys) in [
        (
            "val",
            3358,
            570,
            vec!["2830899473", "2940373590", "6272786009"],
            types(&[("CW", 1474), ("TN", 879), ("CH", 481), ("TC", 472), ("TP", 52)]),
        ),
        (
            "test",
            5553,
            999,
            vec![
                "2906873825",
                "4394765300",
                "5571348093",
                "5624778109",
                "6889066554",
                "6994417868",
                "7158973140",
                "8870296245",
                "9938542916",
            ],
            types(&[("CW", 2456), ("TN", 1356), ("TC", 852), ("CH", 796), ("TP", 93)]),
        ),
    ] {
        let gqa = nextgqa::read(&unpack(tmp.path(), &format!("data/nextgqa/{split}.csv"))).unwrap();
        assert_eq!(gqa.len(), n, "{split}");
        assert_eq!(count_types(&gqa), tys, "{split}");
        assert!(gqa.iter().all(|s| s.dataset == Dataset::NextGqa));

        // Same questions and options as NExT-QA; the text answer maps to NExT-QA's index
        // except for the two questions where that is impossible (listed below).
        let qa = nextqa::read(&unpack(tmp.path(), &format!("data/nextqa/{split}.csv"))).unwrap();
        let qa: HashMap<&str, &QaSample> = qa.iter().map(|s| (s.key.as_str(), s)).collect();
        let mut differ = Vec::new();
        for s in &gqa {
            let q = qa[s.key.as_str()];
            assert_eq!(s.question, q.question);
            if s.options != q.options || s.answer != q.answer {
                differ.push(s.key.clone());
            }
        }
        // val 7987845241_6: NExT-GQA replaced option a4 by its answer text; test 3842638015_4:
        // a3 == a4 == "happy", the first equal option is taken (NExT-QA says 4).
        let want: Vec<String> = if split == "val" {
            strings(&["7987845241_6"])
        } else {
            strings(&["3842638015_4"])
        };
        assert_eq!(differ, want, "{split}");

        let g = Grounding::read(&unpack(tmp.path(), &format!("data/nextgqa/gsub_{split}.json"))).unwrap();
        assert_eq!(g.videos.len(), n_videos);
        assert_eq!(g.num_questions(), n);
        let empty_found: Vec<&str> = g
            .videos
            .iter()
            .filter(|v| v.location.is_empty())
            .map(|v| v.video.as_str())
            .collect();
        assert_eq!(empty_found, empty);
        for s in &gqa {
            let segs = g.segments(&s.video, &s.qid).unwrap_or_else(|| panic!("{} has no segments", s.key));
            assert!(!segs.is_empty() && segs.iter().all(|[a, b]| a <= b));
        }
        let ft = FrameTimes::read(&unpack(tmp.path(), &format!("data/nextgqa/frame2time_{split}.json"))).unwrap();
        assert_eq!(ft.len(), n_videos);
    }
    let val = nextgqa::read(&tmp.path().join("data/nextgqa/val.csv")).unwrap();
    assert_eq!(val[0].key, "4882821564_1");
    assert_eq!(val[0].answer, Answer::Choice(2));
    assert_eq!(val[0].answer_text(), "unwrap it");
    let test = nextgqa::read(&tmp.path().join("data/nextgqa/test.csv")).unwrap();
    let happy = test.iter().find(|s| s.key == "3842638015_4").unwrap();
    assert_eq!(happy.answer, Answer::Choice(3));

    let g = Grounding::read(&tmp.path().join("data/nextgqa/gsub_val.json")).unwrap();
    let v = g.video("10001787725").unwrap();
    assert_eq!((v.duration, v.fps), (34.0, 29.97));
    assert_eq!(g.segments("10001787725", "3").unwrap(), &[[12.1, 17.1], [20.0, 23.5], [29.7, 33.2]]);
    assert_eq!(g.segments("10001787725", "2"), None);
    // File order is kept.
    assert_eq!(g.videos[0].video, "10001787725");
    assert_eq!(
        v.location.iter().map(|(q, _)| q.as_str()).collect::<Vec<_>>(),
        vec!["1", "3", "5", "7"]
    );
    let gt = Grounding::read(&tmp.path().join("data/nextgqa/gsub_test.json")).unwrap();
    assert_eq!(gt.videos[0].video, "10109006686");
    assert_eq!(gt.videos.last().unwrap().video, "9969305386");
    assert_eq!(gt.segments("9969305386", "9").unwrap(), &[[0.4, 5.4]]);

    let ft = FrameTimes::read(&tmp.path().join("data/nextgqa/frame2time_test.json")).unwrap();
    let t = ft.get("10109006686").unwrap();
    assert_eq!((t.len(), t[0], t[1], t[2]), (32, 1.2, 2.2, 3.2));
}

#[test]
fn malformed_nextqa_rows_name_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let path = unpack(tmp.path(), "data/nextqa/val.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let check = |name: &str, text: &str, line: u64, column: &str, reason: &str| {
        let p = write(tmp.path(), name, text);
        let b = bad_row(nextqa::read(&p).unwrap_err());
        assert_eq!(b.file, p, "{name}");
        assert_eq!(b.line, Some(line), "{name}: {b}");
        assert_eq!(b.column.as_deref(), Some(column), "{name}: {b}");
        assert!(b.reason.contains(reason), "{name}: `{}` lacks `{reason}`", b.reason);
        let shown = b.to_string();
        assert!(shown.contains(&format!("{name}:{line}")) && shown.contains(column), "{shown}");
    };
    // Bad answer index.
    check(
        "bad_answer.csv",
        &edit_line(&text, 3, |f| f[5] = "7".into()),
        3,
        "6 (answer)",
        "expected an option index 0-4, found `7`",
    );
    check(
        "neg_answer.csv",
        &edit_line(&text, 40, |f| f[5] = "-1".into()),
        40,
        "6 (answer)",
        "found `-1`",
    );
    // Missing column in a row (the last option dropped).
    check(
        "short_row.csv",
        &edit_line(&text, 10, |f| drop(f.pop())),
        10,
        "13 (a4)",
        "expected 13 fields (as the header), found 12",
    );
    // An extra field.
    check("long_row.csv", &edit_line(&text, 11, |f| f.push("x".into())), 11, "14", "found 14");
    // Unparsable numbers.
    check(
        "bad_count.csv",
        &edit_line(&text, 100, |f| f[1] = "12a".into()),
        100,
        "2 (frame_count)",
        "expected a non-negative integer, found `12a`",
    );
    check(
        "bad_qid.csv",
        &edit_line(&text, 4997, |f| f[6] = "x".into()),
        4997,
        "7 (qid)",
        "found `x`",
    );
    // Unknown question type, empty option, empty question.
    check(
        "bad_type.csv",
        &edit_line(&text, 5, |f| f[7] = "XX".into()),
        5,
        "8 (type)",
        "found `XX`",
    );
    check(
        "empty_option.csv",
        &edit_line(&text, 6, |f| f[10] = "".into()),
        6,
        "11 (a2)",
        "empty field",
    );
    check(
        "empty_question.csv",
        &edit_line(&text, 7, |f| f[4] = " ".into()),
        7,
        "5 (question)",
        "empty field",
    );
    // A duplicated question.
    let mut dup = text.clone();
    if !dup.ends_with('\n') {
        dup.push('\n');
    }
    dup.push_str(text.lines().nth(1).unwrap());
    dup.push('\n');
    check(
        "dup.csv",
        &dup,
        4998,
        "7 (qid)",
        "duplicate question 4010069381_6 (first at line 2)",
    );
    // The header lacks a column: line 1, the column named.
    let no_a3 = text
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(',').collect();
            f.remove(11);
            f.join(",")
        })
        .collect::<Vec<_>>()
        .join("\n");
    check("no_a3.csv", &no_a3, 1, "a3", "the header lacks column(s) a3");
    // NExT-GQA columns are not NExT-QA's.
    let gqa = unpack(tmp.path(), "data/nextgqa/val.csv");
    let b = bad_row(nextqa::read(&gqa).unwrap_err());
    assert_eq!((b.line, b.column.as_deref()), (Some(1), Some("video")));
    // Invalid UTF-8 in a field.
    let mut bytes = text.as_bytes().to_vec();
    let at = text.lines().take(2).map(|l| l.len() + 1).sum::<usize>() + "4882821564,2697,640,480,wh".len();
    bytes[at] = 0xff;
    let p = tmp.path().join("utf8.csv");
    std::fs::write(&p, bytes).unwrap();
    let b = bad_row(nextqa::read(&p).unwrap_err());
    assert_eq!((b.line, b.column.as_deref()), (Some(3), Some("5 (question)")), "{b}");
}

#[test]
fn skip_mode_reports_bad_rows_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let path = unpack(tmp.path(), "data/nextqa/val.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let t = edit_line(&text, 3, |f| f[5] = "9".into());
    let t = edit_line(&t, 50, |f| f[2] = "wide".into());
    let t = edit_line(&t, 51, |f| drop(f.pop()));
    let p = write(tmp.path(), "three_bad.csv", &t);
    let got = nextqa::read_with(&p, &ReadOptions::skip_bad_rows()).unwrap();
    assert_eq!(got.samples.len(), 4996 - 3);
    let lines: Vec<(Option<u64>, Option<&str>)> = got.bad_rows.iter().map(|b| (b.line, b.column.as_deref())).collect();
    assert_eq!(
        lines,
        vec![
            (Some(3), Some("6 (answer)")),
            (Some(50), Some("3 (width)")),
            (Some(51), Some("13 (a4)"))
        ]
    );
    assert!(got.bad_rows.iter().all(|b| b.file == p));
    // The good rows are exactly the others, in order.
    let all = nextqa::read(&path).unwrap();
    let kept: Vec<&QaSample> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| ![1, 48, 49].contains(i))
        .map(|(_, s)| s)
        .collect();
    assert_eq!(got.samples.iter().collect::<Vec<_>>(), kept);

    // NExT-GQA: an answer that is none of the options.
    let gpath = unpack(tmp.path(), "data/nextgqa/test.csv");
    let gtext = std::fs::read_to_string(&gpath).unwrap();
    let g = write(
        tmp.path(),
        "unknown_answer.csv",
        &edit_line(&gtext, 20, |f| f[5] = "dance wildly".into()),
    );
    let b = bad_row(nextgqa::read(&g).unwrap_err());
    assert_eq!((b.line, b.column.as_deref()), (Some(20), Some("6 (answer)")));
    assert!(b.reason.contains("the answer `dance wildly` equals none of the options"), "{b}");
    let got = nextgqa::read_with(&g, &ReadOptions::skip_bad_rows()).unwrap();
    assert_eq!((got.samples.len(), got.bad_rows.len()), (5552, 1));
    // An option index where NExT-GQA has the answer's text: the error says it looks like NExT-QA.
    let g = write(tmp.path(), "index_answer.csv", &edit_line(&gtext, 20, |f| f[5] = "2".into()));
    let b = bad_row(nextgqa::read(&g).unwrap_err());
    assert!(
        b.reason.contains("looks like a NExT-QA-format file") && b.reason.contains("--dataset nextqa"),
        "{b}"
    );
    // The real test split's one answer equal to two options (3842638015, qid 4: a3 = a4 = "happy")
    // is read as the first, as Python's `options.index(answer)` would.
    let all = nextgqa::read(&gpath).unwrap();
    let s = all.iter().find(|s| s.video == "3842638015" && s.qid == "4").unwrap();
    assert_eq!((s.options[3].as_str(), s.options[4].as_str()), ("happy", "happy"));
    assert_eq!(s.answer, gcg::data::Answer::Choice(3));
}

#[test]
fn a_grounding_head_count_that_does_not_divide_its_width_names_the_key_and_the_choices() {
    let g = gcg::grounding::GroundingConfig {
        dim: 24,
        heads: 4,
        ..gcg::grounding::GroundingConfig::tiny()
    };
    let e = g.validate().unwrap_err().to_string();
    for needle in [
        "inner width 6",
        "CLIP width 24",
        "[model.grounding] heads",
        "[1, 2, 3, 6]",
        "heads=3",
    ] {
        assert!(e.contains(needle), "{e} lacks {needle}");
    }
}

#[test]
fn malformed_grounding_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = r#"{"1": {"duration": 10, "fps": 30, "location": {"0": [[1.0, 2.0]], "1": [[3, 4], [5, 6]]}},
                 "2": {"duration": 12.5, "fps": 29.97, "location": {}}}"#;
    let g = Grounding::read(&write(tmp.path(), "ok.json", ok)).unwrap();
    assert_eq!(g.videos.len(), 2);
    assert_eq!(g.segments("1", "1").unwrap(), &[[3.0, 4.0], [5.0, 6.0]]);
    assert!(g.video("2").unwrap().location.is_empty());

    let cases = [
        (
            r#"{"1": {"duration": 10, "fps": 30, "location": {"0": [[2.0, 1.0]]}}}"#,
            "location.0",
            "start 2 is after end 1",
        ),
        (
            r#"{"1": {"duration": 10, "fps": 30, "location": {"0": [[1.0]]}}}"#,
            "location.0",
            "expected [start, end]",
        ),
        (
            r#"{"1": {"duration": 10, "fps": 30, "location": {"0": [["a", 1]]}}}"#,
            "location.0",
            "two finite numbers",
        ),
        (r#"{"1": {"fps": 30, "location": {}}}"#, "duration", "missing field"),
        (
            r#"{"1": {"duration": "x", "fps": 30, "location": {}}}"#,
            "duration",
            "non-negative number",
        ),
        (r#"{"1": {"duration": 3, "fps": 30, "location": []}}"#, "location", "found an array"),
    ];
    for (i, (json, column, reason)) in cases.iter().enumerate() {
        let p = write(tmp.path(), &format!("bad{i}.json"), json);
        let b = bad_row(Grounding::read(&p).unwrap_err());
        assert_eq!(b.entry.as_deref(), Some("video 1"), "{b}");
        assert_eq!(b.column.as_deref(), Some(*column), "{b}");
        assert!(b.reason.contains(reason), "{b}");
        let skipped = Grounding::read_with(&p, &ReadOptions::skip_bad_rows()).unwrap();
        assert_eq!(skipped.bad_rows.len(), 1);
    }
    // A JSON syntax error names the line.
    let p = write(
        tmp.path(),
        "syntax.json",
        "{\"1\": {\"duration\": 10,\n \"fps\": 30,\n \"location\": {\"0\": [[1, 2]],}}}",
    );
    let b = bad_row(Grounding::read(&p).unwrap_err());
    assert_eq!(b.line, Some(3), "{b}");
}

#[test]
fn intentqa_sample() {
    let p = fixtures().join("data/intentqa/sample.csv");
    let s = intentqa::read(&p).unwrap();
    assert_eq!(s.len(), 5);
    assert!(s.iter().all(|x| x.dataset == Dataset::IntentQa));
    assert_eq!(s[0].key, "5001_2");
    assert_eq!(s[0].answer_text(), "to let the wind catch it");
    assert_eq!(s[0].extra["action"], "lift");
    assert_eq!(s[0].extra["lemma"], "lift");
    assert_eq!(s[0].extra["lemma_id"], "77");
    assert_eq!(s[0].extra["frame_count"], "900");
    // Quoted fields: a comma inside a question and doubled quotes inside an option.
    assert_eq!(s[2].question, "how does the man keep the boat steady, while the boy climbs in");
    assert_eq!(s[2].answer_text(), "holds the side with both hands");
    assert_eq!(s[3].answer_text(), "look at the man");
    assert_eq!(s[3].options[3], "take off his \"lucky\" shoes");
    assert_eq!(s[3].qtype, "TP");
    // A trailing question mark is dropped.
    assert_eq!(s[4].question, "why did the dog bark at the door");
    assert_eq!(s[4].extra["lemma_id"], "12");

    // IntentQA requires its action / lemma columns.
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&p).unwrap().replace(",action,", ",verb,");
    let b = bad_row(intentqa::read(&write(tmp.path(), "no_action.csv", &text)).unwrap_err());
    assert_eq!((b.line, b.column.as_deref()), (Some(1), Some("action")));
}

#[test]
fn causalvidqa_folders() {
    let qa = fixtures().join("data/causalvidqa/QA");
    let all = causalvidqa::read(&qa, None).unwrap();
    assert_eq!(all.len(), 12);
    let keys: Vec<&str> = all.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "vid_a_0", "vid_a_1", "vid_a_2", "vid_a_3", "vid_a_4", "vid_a_5", "vid_b_0", "vid_b_1", "vid_b_2", "vid_b_3", "vid_b_4",
            "vid_b_5"
        ]
    );
    let tys: Vec<&str> = all[..6].iter().map(|s| s.qtype.as_str()).collect();
    assert_eq!(tys, vec!["D", "E", "PA", "PR", "CA", "CR"]);
    let b = &all[6..];
    assert_eq!(b[0].question, "Where are the children playing");
    assert_eq!(b[0].answer_text(), "On a beach.");
    assert_eq!(b[1].answer_text(), "He sees a boat.");
    assert_eq!(b[3].question, "What will the girl do after finishing the sandcastle");
    assert_eq!(b[3].options[0], "She is proud of it.");
    assert_eq!(b[3].extra["part"], "reason");
    assert_eq!(b[3].extra["given_answer"], "Take a photo of it.");
    assert_eq!(b[5].extra["category"], "counterfactual");

    // A split from the release's pickle keeps its order.
    let split = causalvidqa::read_split(&fixtures().join("data/causalvidqa/split.pkl")).unwrap();
    assert_eq!(split, strings(&["vid_b", "vid_a"]));
    let s = causalvidqa::read(&qa, Some(&split)).unwrap();
    assert_eq!(s[0].key, "vid_b_0");
    assert_eq!(s[6].key, "vid_a_0");

    // Broken videos: an out-of-range index, a missing file, a missing reason list.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("QA");
    for v in ["vid_a", "vid_b", "vid_c", "vid_d"] {
        let src = if v == "vid_a" || v == "vid_c" { "vid_a" } else { "vid_b" };
        for f in ["text.json", "answer.json"] {
            let t = std::fs::read_to_string(qa.join(src).join(f)).unwrap();
            write(&root, &format!("{v}/{f}"), &t);
        }
    }
    let answer_b = root.join("vid_b/answer.json");
    let t = std::fs::read_to_string(&answer_b)
        .unwrap()
        .replace("\"reason\": 0}, \"counterfactual\"", "\"reason\": 5}, \"counterfactual\"");
    std::fs::write(&answer_b, t).unwrap();
    std::fs::remove_file(root.join("vid_c/answer.json")).unwrap();
    let text_d = root.join("vid_d/text.json");
    let t = std::fs::read_to_string(&text_d)
        .unwrap()
        .replace("\"reason\": [\"Water", "\"reasons\": [\"Water");
    std::fs::write(&text_d, t).unwrap();

    let e = bad_row(causalvidqa::read(&root, None).unwrap_err());
    assert_eq!(e.file, answer_b);
    assert_eq!(
        (e.entry.as_deref(), e.column.as_deref()),
        (Some("video vid_b"), Some("predictive.reason"))
    );
    assert!(e.reason.contains("expected an option index 0-4, found 5"), "{e}");
    let got = causalvidqa::read_with(&root, None, &ReadOptions::skip_bad_rows()).unwrap();
    assert_eq!(got.samples.len(), 6);
    assert!(got.samples.iter().all(|s| s.video == "vid_a"));
    let bad: Vec<(String, Option<&str>)> = got
        .bad_rows
        .iter()
        .map(|b| (b.file.strip_prefix(&root).unwrap().display().to_string(), b.column.as_deref()))
        .collect();
    assert_eq!(
        bad,
        vec![
            ("vid_b/answer.json".to_string(), Some("predictive.reason")),
            ("vid_c/answer.json".to_string(), None),
            ("vid_d/text.json".to_string(), Some("counterfactual.reason")),
        ]
    );
    assert!(got.bad_rows[1].reason.contains("file not found"));
}

#[test]
fn open_ended_formats() {
    let dir = fixtures().join("data/open_ended");
    let msrvtt = open_ended::read(&dir.join("msrvtt_test_qa.json")).unwrap();
    assert_eq!(msrvtt.len(), 3);
    assert_eq!(
        (
            msrvtt[0].key.as_str(),
            msrvtt[0].video.as_str(),
            msrvtt[0].question.as_str(),
            msrvtt[0].qtype.as_str()
        ),
        ("158581", "7010", "who is talking to the camera", "0")
    );
    assert_eq!(msrvtt[1].answer, Answer::Text("kitchen".into()));
    assert!(!msrvtt[0].is_multiple_choice());
    let msvd = open_ended::read(&dir.join("msvd_test_qa.json")).unwrap();
    assert_eq!(
        (
            msvd[1].key.as_str(),
            msvd[1].video.as_str(),
            msvd[1].answer_text(),
            msvd[1].qtype.as_str()
        ),
        ("1", "2", "two", "")
    );
    // ActivityNet-QA: questions and answers in two files, joined on question_id.
    let anet = open_ended::read(&dir.join("anet_test_q.json")).unwrap();
    assert_eq!(anet.len(), 3);
    assert_eq!(
        (
            anet[2].key.as_str(),
            anet[2].video.as_str(),
            anet[2].answer_text(),
            anet[2].qtype.as_str()
        ),
        ("v_9eniCub7u60_0", "v_9eniCub7u60", "2", "7")
    );
    assert_eq!(anet[1].answer_text(), "white");

    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "bad_qa.json",
        r#"[{"answer": "a", "id": 1, "question": "q", "video_id": 1}, {"answer": ["x"], "id": 2, "question": "q", "video_id": 1}, {"answer": "b", "id": 1, "question": "q2", "video_id": 2}, {"answer": "c", "question": "q", "video_id": 3}]"#,
    );
    let b = bad_row(open_ended::read(&p).unwrap_err());
    assert_eq!((b.entry.as_deref(), b.column.as_deref()), (Some("entry 1"), Some("answer")));
    let got = open_ended::read_with(&p, &ReadOptions::skip_bad_rows()).unwrap();
    assert_eq!(got.samples.len(), 1);
    let bad: Vec<(Option<&str>, Option<&str>)> = got.bad_rows.iter().map(|b| (b.entry.as_deref(), b.column.as_deref())).collect();
    assert_eq!(
        bad,
        vec![
            (Some("entry 1"), Some("answer")),
            (Some("entry 2"), Some("id")),
            (Some("entry 3"), Some("id|question_id|qid"))
        ]
    );
    assert!(got.bad_rows[1].reason.contains("duplicate question id 1 (first at entry 0)"));
}

/// The first `n` lines of `text`, LF-terminated.
fn head_lines(text: &str, n: usize) -> String {
    text.lines().take(n).map(|l| format!("{l}\n")).collect()
}

/// `text` (LF, ending in a newline) as LF and CRLF, each with and without the last newline.
fn line_ending_variants(text: &str) -> Vec<(&'static str, String)> {
    assert!(text.ends_with('\n') && !text.contains('\r'));
    let crlf = text.replace('\n', "\r\n");
    vec![
        ("lf", text.to_string()),
        ("lf-no-final-newline", text.trim_end_matches('\n').to_string()),
        ("crlf", crlf.clone()),
        ("crlf-no-final-newline", crlf.trim_end_matches("\r\n").to_string()),
    ]
}

#[test]
fn line_numbers_are_physical_lines_with_lf_and_crlf() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(unpack(tmp.path(), "data/nextqa/val.csv")).unwrap();
    let base = head_lines(&text, 8);
    let row = |n: usize| text.lines().nth(n - 1).unwrap().to_string();
    // (name, LF text, expected line, column, reason); the lines are counted by hand.
    let mut cases: Vec<(&str, String, u64, &str, String)> = vec![
        (
            "answer7",
            edit_line(&base, 5, |f| f[5] = "7".into()),
            5,
            "6 (answer)",
            "found `7`".into(),
        ),
        (
            "extra_field",
            edit_line(&base, 2, |f| f.push("x".into())),
            2,
            "14",
            "found 14".into(),
        ),
        ("duplicate", format!("{base}{}\n", row(4)), 9, "7 (qid)", "(first at line 4)".into()),
    ];
    // A quoted question with a line break in it (row 3 spans lines 3-4) and an empty line: the
    // bad answer of the old row 4 is on physical line 6.
    let mut lines: Vec<String> = base.lines().map(String::from).collect();
    let mut f: Vec<String> = lines[2].split(',').map(String::from).collect();
    f[4] = "\"how does the man cycling,\nsell the watch\"".into();
    lines[2] = f.join(",");
    lines.insert(3, String::new());
    let mut f: Vec<String> = lines[4].split(',').map(String::from).collect();
    f[5] = "9".into();
    lines[4] = f.join(",");
    cases.push(("quoted_newline", lines.join("\n") + "\n", 6, "6 (answer)", "found `9`".into()));
    for (name, lf, line, column, reason) in &cases {
        for (variant, t) in line_ending_variants(lf) {
            let p = write(tmp.path(), &format!("{name}-{variant}.csv"), &t);
            let b = bad_row(nextqa::read(&p).unwrap_err());
            assert_eq!(
                (b.line, b.column.as_deref()),
                (Some(*line), Some(*column)),
                "{name} ({variant}): {b}"
            );
            assert!(b.reason.contains(reason.as_str()), "{name} ({variant}): {b}");
            assert!(b.to_string().contains(&format!(".csv:{line},")), "{b}");
        }
    }
    // The same quoted-newline file without the bad answer reads, the question keeps its break.
    let ok = cases[3].1.replace(",9,", ",3,");
    for (variant, t) in line_ending_variants(&ok) {
        let p = write(tmp.path(), &format!("quoted-ok-{variant}.csv"), &t);
        let got = nextqa::read(&p).unwrap_or_else(|e| panic!("{variant}: {e:#}"));
        assert_eq!(got.len(), 7, "{variant}");
        assert!(
            got[1].question.starts_with("how does the man cycling,"),
            "{variant}: {:?}",
            got[1].question
        );
    }
}

#[test]
fn an_unclosed_quote_is_named_and_swallows_no_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(unpack(tmp.path(), "data/nextqa/val.csv")).unwrap();
    let base = head_lines(&text, 11);
    let good = nextqa::read(&write(tmp.path(), "base.csv", &base)).unwrap();
    assert_eq!(good.len(), 10);
    // Line 4 opens a quote in its question that is never closed.
    let unclosed = edit_line(&base, 4, |f| f[4] = format!("\"{}", f[4]));
    // Line 4 opens a quote that a stray quote on line 7 closes: lines 4-7 would be one row
    // of 13 fields.
    let stray = edit_line(&unclosed, 7, |f| f[4] = format!("the \"big {}", f[4]));
    for (name, lf) in [("unclosed", &unclosed), ("stray", &stray)] {
        for (variant, t) in line_ending_variants(lf) {
            let p = write(tmp.path(), &format!("{name}-{variant}.csv"), &t);
            let b = bad_row(nextqa::read(&p).unwrap_err());
            assert_eq!(b.file, p);
            assert_eq!(
                (b.line, b.column.as_deref()),
                (Some(4), Some("5 (question)")),
                "{name} ({variant}): {b}"
            );
            assert!(b.reason.contains("quote opened on line 4"), "{name} ({variant}): {b}");
            // Skipping bad rows drops line 4 alone and reads every later row.
            let got = nextqa::read_with(&p, &ReadOptions::skip_bad_rows()).unwrap();
            assert_eq!(got.bad_rows.len(), 1, "{name} ({variant}): {:?}", got.bad_rows);
            assert_eq!(got.bad_rows[0].line, Some(4));
            let keys: Vec<&str> = got.samples.iter().map(|s| s.key.as_str()).collect();
            let want: Vec<&str> = good
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 2)
                .map(|(_, s)| s.key.as_str())
                .collect();
            assert_eq!(keys, want, "{name} ({variant})");
        }
    }
}
