//! `gcg eval` end to end: the official NExT-QA / NExT-GQA numbers from a JSONL prediction file,
//! the JSON it writes, problem reports and `--strict`.

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn gunzip(rel: &str) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(fixtures().join(rel)).unwrap())
        .read_to_string(&mut s)
        .unwrap();
    s
}

fn gcg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gcg")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The JSONL rows of a committed compact prediction set (one digit per annotation row, spans),
/// written by hand from the CSV so the binary is tested on its own.
fn jsonl_from_compact(csv_text: &str, preds: &Value, video_col: &str) -> String {
    let mut rdr = csv::Reader::from_reader(csv_text.as_bytes());
    let headers = rdr.headers().unwrap().clone();
    let col = |n: &str| headers.iter().position(|h| h == n).unwrap();
    let digits = preds["prediction"].as_str().unwrap().as_bytes();
    let mut out = String::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.unwrap();
        let answer = rec.get(col("answer")).unwrap();
        let answer: usize = answer
            .parse()
            .unwrap_or_else(|_| (0..5).position(|k| rec.get(col(&format!("a{k}"))).unwrap() == answer).unwrap());
        let mut row = serde_json::json!({
            "qid": rec.get(col("qid")).unwrap(),
            "video": rec.get(col(video_col)).unwrap(),
            "type": rec.get(col("type")).unwrap(),
            "prediction": (digits[i] - b'0') as usize,
            "answer": answer,
        });
        if let Some(s) = preds.get("span").and_then(|s| s[i].as_array()) {
            row["span"] = Value::Array(s.clone());
        }
        out.push_str(&row.to_string());
        out.push('\n');
    }
    out
}

#[test]
fn eval_reproduces_official_numbers_on_real_files() {
    let refs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(fixtures().join("eval/refs.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["nextqa_val_partial", "nextgqa_test_partial_mixed"] {
        let r = refs.iter().find(|r| r["name"] == name).unwrap();
        let ann_rel = r["annotations"].as_str().unwrap();
        let csv_text = gunzip(&format!("{ann_rel}.gz"));
        let ann = tmp.path().join(format!("{name}.csv"));
        std::fs::write(&ann, &csv_text).unwrap();
        let preds: Value = serde_json::from_str(&gunzip(&format!("eval/{}", r["predictions"].as_str().unwrap()))).unwrap();
        let video_col = if r["dataset"] == "nextqa" { "video" } else { "video_id" };
        let jsonl = tmp.path().join(format!("{name}.jsonl"));
        std::fs::write(&jsonl, jsonl_from_compact(&csv_text, &preds, video_col)).unwrap();
        let json_out = tmp.path().join(format!("{name}.metrics.json"));
        let mut args = vec![
            "eval",
            "--dataset",
            r["dataset"].as_str().unwrap(),
            "--annotations",
            ann.to_str().unwrap(),
            "--predictions",
            jsonl.to_str().unwrap(),
            "--json",
            json_out.to_str().unwrap(),
        ];
        // The mixed span set holds reversed and negative spans on purpose: scored as the official
        // script does, reported as implausible, so only the other files pass --strict.
        let mixed = name.contains("mixed");
        if !mixed {
            args.push("--strict");
        }
        let gsub;
        if let Some(g) = r.get("grounding") {
            gsub = tmp.path().join(format!("{name}.gsub.json"));
            std::fs::write(&gsub, gunzip(&format!("{}.gz", g.as_str().unwrap()))).unwrap();
            args.extend(["--grounding", gsub.to_str().unwrap()]);
        }
        let (code, stdout, stderr) = gcg(&args);
        assert_eq!(code, 0, "{name}: {stderr}");
        let m: Value = serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
        if mixed {
            let problems: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  line ")).collect();
            assert!(
                !problems.is_empty() && problems.iter().all(|l| l.contains("implausible span")),
                "{name}: {stderr}"
            );
            let mut strict = args.clone();
            strict.push("--strict");
            assert_eq!(gcg(&strict).0, 1, "{name}: --strict refuses implausible spans");
            assert!(!json_out.exists(), "{name}: the non-strict run's metrics stayed at --json");
        }
        for (metric, text) in r["printed"].as_object().unwrap() {
            let text = text.as_str().unwrap();
            let decimals = text.split('.').nth(1).map(str::len).unwrap_or(0);
            let ours = m[metric].as_f64().unwrap_or_else(|| panic!("{name}: {metric} missing in {m}"));
            assert_eq!(format!("{ours:.decimals$}"), text, "{name} {metric}");
            assert_eq!(ours, r["raw"][metric].as_f64().unwrap(), "{name} {metric}");
            // The table shows every metric with two decimals.
            let shown = format!("{ours:.2}");
            assert!(
                stdout
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(metric) && l.contains(&shown)),
                "{name} {metric}:\n{stdout}"
            );
        }
        assert_eq!(m["missing"], 0);
        assert_eq!(m["dataset"], r["dataset"]);
        if r.get("grounding").is_some() {
            assert_eq!(m["grounding_missing"], r["span_kinds"]["none"]);
        }
    }
}

#[test]
fn eval_reports_problems_and_strict_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("val.csv"),
        "video_id,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n\
         v1,100,640,480,why did he jump,to catch it,0,CW,to run,to catch it,to sit,to eat,to sleep\n\
         v1,100,640,480,what did he do after jumping,fall,1,TP,fall,smile,run,sit,wave\n\
         v2,200,640,480,how did she open it,pull,0,CH,push,pull,kick,cut,bite\n",
    )
    .unwrap();
    std::fs::write(d.join("gsub.json"), r#"{"v1": {"duration": 10, "fps": 30, "location": {"0": [[2, 4]], "1": [[5, 9]]}}, "v2": {"duration": 8, "fps": 30, "location": {"0": [[0, 4]]}}}"#).unwrap();
    std::fs::write(
        d.join("preds.jsonl"),
        [
            r#"{"qid": "0", "video": "v1", "type": "CW", "prediction": 1, "answer": 1, "span": [2.0, 3.0]}"#,
            r#"{"qid": "1", "video": "v1", "type": "TP", "prediction": 0, "answer": 0, "span": [7.0, 7.0]}"#,
            r#"{"qid": "1", "video": "v1", "type": "TP", "prediction": 3, "answer": 0}"#,
            r#"not json"#,
            r#"{"qid": "5", "video": "v7", "type": "CW", "prediction": 0, "answer": 0}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();
    let base = [
        "eval",
        "--dataset",
        "nextgqa",
        "--annotations",
        &p("val.csv"),
        "--grounding",
        &p("gsub.json"),
        "--predictions",
        &p("preds.jsonl"),
    ];
    let mut args: Vec<&str> = base.to_vec();
    let json_path = p("m.json");
    args.extend(["--json", &json_path]);
    let (code, stdout, stderr) = gcg(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
    assert!(stderr.contains("line 3: duplicate"), "{stderr}");
    assert!(stderr.contains("line 4: malformed"), "{stderr}");
    assert!(stderr.contains("line 5: unknown question: video v7 qid 5"), "{stderr}");
    assert!(stdout.contains("1 without a prediction"), "{stdout}");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    // v1_0 right, v1_1 (TP) right, v2_0 missing: CW 100, TN 100, CH 0, overall 2/3.
    assert_eq!(m["CW"], 100.0);
    assert_eq!(m["TN"], 100.0);
    assert_eq!(m["CH"], 0.0);
    assert_eq!(m["overall"].as_f64().unwrap(), 200.0 / 3.0);
    // Spans: v1_0 [2,3] in [2,4]: IoU 0.5, IoP 1; v1_1 point 7 inside [5,9]: IoP 1; v2_0 none.
    assert_eq!(m["grounding_missing"], 1);
    assert_eq!(m["mIoU"], 25.0);
    assert_eq!(m["mIoP"], 100.0);
    assert_eq!(m["IoU@0.5"], 50.0);
    assert_eq!(m["Acc@GQA"], 100.0);
    assert_eq!(m["problems"].as_array().unwrap().len(), 3);
    assert_eq!(m["problems"][0]["line"], 3);
    assert_eq!(m["problems"][0]["kind"], "duplicate");
    // The file names what it scored.
    assert_eq!(m["inputs"]["predictions"], p("preds.jsonl"));
    assert_eq!(m["inputs"]["annotations"], p("val.csv"));
    assert_eq!(m["inputs"]["grounding"], p("gsub.json"));
    assert_eq!(m["inputs"]["split"], Value::Null);
    assert!(!stderr.contains("QA accuracy only"), "{stderr}");
    // Without --grounding: the accuracies, and a note on what the grounding metrics need.
    let no_spans: Vec<&str> = base
        .iter()
        .copied()
        .filter(|a| *a != "--grounding" && !a.ends_with("gsub.json"))
        .collect();
    let (code, stdout, stderr) = gcg(&no_spans);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("QA accuracy only") && stderr.contains("--grounding gsub_"),
        "{stderr}"
    );
    assert!(!stdout.contains("mIoP"), "{stdout}");
    // Their spans are named as not scored (they were ignored silently).
    assert!(stderr.contains("2 rows carry a span, which is not scored"), "{stderr}");

    // A usage error (an option of another dataset) stops before anything is read: the earlier
    // metrics stay.
    let mut usage = base.to_vec();
    usage.extend(["--split", "videos.txt", "--json", &json_path]);
    let (code, _, stderr) = gcg(&usage);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--split is for --dataset causalvidqa") && !stderr.contains("removed"),
        "{stderr}"
    );
    // --strict refuses, and writes no metrics file that could pass for a result; the metrics an
    // earlier run left at that path go too (they were kept, looking like this run's).
    assert!(Path::new(&json_path).exists());
    let mut strict = base.to_vec();
    strict.extend(["--strict", "--json", &json_path]);
    let (code, _, stderr) = gcg(&strict);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--strict") && stderr.contains("m.json not written"), "{stderr}");
    assert!(stderr.contains("m.json were an earlier run's: removed"), "{stderr}");
    assert!(!Path::new(&json_path).exists());
    let (code, _, stderr) = gcg(&strict);
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.contains("earlier run's"), "{stderr}");
    // A directory is named as one.
    let mut to_dir = base.to_vec();
    std::fs::create_dir(d.join("out")).unwrap();
    let dir_path = p("out");
    to_dir.extend(["--json", &dir_path]);
    let (code, _, stderr) = gcg(&to_dir);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is a directory: the metrics JSON goes to a file"), "{stderr}");
    // A --json path that is not a metrics file is refused up front and kept, failure or not.
    std::fs::write(&json_path, "notes\n").unwrap();
    let (code, _, stderr) = gcg(&strict);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is not a metrics file"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&json_path).unwrap(), "notes\n");
    std::fs::remove_file(&json_path).unwrap();

    // A malformed annotation row fails with its place, or is skipped and reported.
    let csv = std::fs::read_to_string(d.join("val.csv")).unwrap().replace("pull,0,CH", "tug,0,CH");
    std::fs::write(d.join("bad.csv"), csv).unwrap();
    let mut bad = base.to_vec();
    let bad_path = p("bad.csv");
    bad[4] = &bad_path;
    let (code, _, stderr) = gcg(&bad);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("bad.csv:4, column 6 (answer): the answer `tug` equals none of the options"),
        "{stderr}"
    );
    bad.push("--skip-bad-rows");
    let (code, stdout, stderr) = gcg(&bad);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("skipped annotation row: ") && stderr.contains("bad.csv:4"),
        "{stderr}"
    );
    assert!(stdout.contains("(2 questions"), "{stdout}");

    // A prediction file with no usable row is an error naming it, not NaN metrics and exit 0.
    for (name, text) in [("empty.jsonl", ""), ("junk.jsonl", "not json\n{}\n")] {
        std::fs::write(d.join(name), text).unwrap();
        let mut args = base.to_vec();
        let path = p(name);
        args[8] = &path;
        let (code, stdout, stderr) = gcg(&args);
        assert_eq!(code, 1, "{name}: {stdout} {stderr}");
        assert!(
            stderr.contains(name) && stderr.contains("no usable prediction row"),
            "{name}: {stderr}"
        );
        assert!(!stdout.contains("NaN"), "{name}: {stdout}");
    }
}

/// Spans that cannot be moments of the video are reported (and fail `--strict`) but scored as
/// given, as the official script would; a negative option index is a malformed row that says so.
#[test]
fn implausible_spans_and_negative_indices_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("val.csv"),
        "video_id,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n\
         v1,100,640,480,why did he jump,to catch it,0,CW,to run,to catch it,to sit,to eat,to sleep\n\
         v1,100,640,480,what did he do after jumping,fall,1,TP,fall,smile,run,sit,wave\n\
         v2,200,640,480,how did she open it,pull,0,CH,push,pull,kick,cut,bite\n\
         v2,200,640,480,what did she do first,kick,1,TP,push,pull,kick,cut,bite\n",
    )
    .unwrap();
    std::fs::write(
        d.join("gsub.json"),
        r#"{"v1": {"duration": 10, "fps": 30, "location": {"0": [[2, 4]], "1": [[5, 9]]}}, "v2": {"duration": 8, "fps": 30, "location": {"0": [[0, 4]], "1": [[1, 2]]}}}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("preds.jsonl"),
        [
            r#"{"qid": "0", "video": "v1", "type": "CW", "prediction": 1, "answer": 1, "span": [7.0, 2.0]}"#,
            r#"{"qid": "1", "video": "v1", "type": "TP", "prediction": 0, "answer": 0, "span": [-3.0, -1.0]}"#,
            r#"{"qid": "0", "video": "v2", "type": "CH", "prediction": 1, "answer": 1, "span": [0.0, 1e300]}"#,
            r#"{"qid": "1", "video": "v2", "type": "TP", "prediction": -1, "answer": 2, "span": [1.0, 2.0]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();
    let base = [
        "eval",
        "--dataset",
        "nextgqa",
        "--annotations",
        &p("val.csv"),
        "--grounding",
        &p("gsub.json"),
        "--predictions",
        &p("preds.jsonl"),
    ];
    let (code, stdout, stderr) = gcg(&base);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("line 1: implausible span") && stderr.contains("ends before it starts"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 2: implausible span") && stderr.contains("starts before the video"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 3: implausible span") && stderr.contains("after the video's end at 8 s"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 4: malformed") && stderr.contains("option index -1 is negative"),
        "{stderr}"
    );
    assert!(!stderr.contains("untagged enum"), "{stderr}");
    // Scored as given: three answers right of four questions, the fourth missing.
    assert!(stdout.contains("1 without a prediction"), "{stdout}");
    let mut strict = base.to_vec();
    strict.push("--strict");
    let (code, _, stderr) = gcg(&strict);
    assert_eq!(code, 1, "{stderr}");
}

/// STAR, TrafficQA and VLEP through the binary: the committed reference prediction sets
/// (`eval/star_trafficqa_vlep_refs.json`) as JSONL rows built here from the annotation files
/// with plain JSON (not the library's readers), and the numbers the reference computed.
#[test]
fn eval_scores_star_trafficqa_and_vlep() {
    let refs: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("eval/star_trafficqa_vlep_refs.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["star_val_partial", "trafficqa_test_random", "vlep_dev_partial"] {
        let r = refs.iter().find(|r| r["name"] == name).unwrap();
        let ann = fixtures().join(r["annotations"].as_str().unwrap());
        let text = std::fs::read_to_string(&ann).unwrap();
        // (video, qid, answer index) of each question, in file order.
        let questions: Vec<(String, String, u64)> = match r["dataset"].as_str().unwrap() {
            "star" => serde_json::from_str::<Vec<Value>>(&text)
                .unwrap()
                .iter()
                .map(|q| {
                    let answer = q["choices"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|c| c["choice"] == q["answer"])
                        .unwrap();
                    (
                        q["video_id"].as_str().unwrap().to_string(),
                        q["question_id"].as_str().unwrap().to_string(),
                        answer["choice_id"].as_u64().unwrap(),
                    )
                })
                .collect(),
            "trafficqa" => text
                .lines()
                .skip(1)
                .map(|l| {
                    let row: Vec<Value> = serde_json::from_str(l).unwrap();
                    let file = row[2].as_str().unwrap();
                    (
                        file.trim_end_matches(".mp4").to_string(),
                        row[0].to_string(),
                        row[10].as_u64().unwrap(),
                    )
                })
                .collect(),
            _ => text
                .lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    (
                        v["vid_name"].as_str().unwrap().to_string(),
                        v["example_id"].to_string(),
                        v["answer"].as_u64().unwrap(),
                    )
                })
                .collect(),
        };
        let digits = r["prediction"].as_str().unwrap().as_bytes();
        assert_eq!(digits.len(), questions.len(), "{name}");
        let jsonl: String = questions
            .iter()
            .zip(digits)
            .map(|((video, qid, answer), d)| {
                serde_json::json!({"qid": qid, "video": video, "prediction": (d - b'0') as u64, "answer": answer}).to_string() + "\n"
            })
            .collect();
        let preds = tmp.path().join(format!("{name}.jsonl"));
        std::fs::write(&preds, jsonl).unwrap();
        let json_out = tmp.path().join(format!("{name}.metrics.json"));
        let dataset = r["dataset"].as_str().unwrap();
        let (code, stdout, stderr) = gcg(&[
            "eval",
            "--dataset",
            dataset,
            "--annotations",
            ann.to_str().unwrap(),
            "--predictions",
            preds.to_str().unwrap(),
            "--json",
            json_out.to_str().unwrap(),
            "--strict",
        ]);
        assert_eq!(code, 0, "{name}: {stderr}");
        let m: Value = serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
        assert_eq!(m["dataset"], dataset);
        assert_eq!(m["missing"], 0);
        for (metric, want) in r["expected"].as_object().unwrap() {
            assert_eq!(m[metric], *want, "{name} {metric}");
            let shown = format!("{:.2}", want.as_f64().unwrap());
            assert!(
                stdout
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(metric) && l.contains(&shown)),
                "{name} {metric}:\n{stdout}"
            );
        }
    }
    // The test split of STAR holds no answers: an error that says so, naming file and entry.
    let star: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(fixtures().join("data/star/STAR_val.json")).unwrap()).unwrap();
    let no_answers: Vec<Value> = star
        .into_iter()
        .map(|mut q| {
            q.as_object_mut().unwrap().remove("answer");
            q
        })
        .collect();
    let test = tmp.path().join("STAR_test.json");
    std::fs::write(&test, serde_json::to_string(&no_answers).unwrap()).unwrap();
    let preds = tmp.path().join("star_val_partial.jsonl");
    let (code, _, stderr) = gcg(&[
        "eval",
        "--dataset",
        "star",
        "--annotations",
        test.to_str().unwrap(),
        "--predictions",
        preds.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("STAR_test.json, entry 0 (Sequence_T2_38), column answer: missing answer"),
        "{stderr}"
    );
}
