//! `gcg bench serve` on a quick demo: the JSON report is complete and sane (never its times:
//! benchmarks are commands, not timed tests); and the errors when there is no model or no server.

use serde_json::Value;
use std::process::{Command, Output};

fn gcg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gcg"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn number(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number: {v}"))
}

#[test]
fn bench_serve_reports_latency_throughput_and_consistent_answers_on_a_quick_demo() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let o = gcg()
        .args(["demo", "--quick", "--seed", "5", "--quiet", "--out"])
        .arg(&demo)
        .output()
        .unwrap();
    assert!(o.status.success(), "gcg demo --quick: {}", stderr(&o));

    let o = gcg()
        .args(["bench", "serve", "--clients", "4", "--requests", "16", "--run"])
        .arg(demo.join("runs/grounding"))
        .output()
        .unwrap();
    assert!(o.status.success(), "gcg bench serve: {}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)));

    assert_eq!(r["bench"], "serve");
    assert_eq!(r["server"], "started");
    assert_eq!(r["clients"], 4);
    assert_eq!(r["requests"], 16);
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["first_error"].is_null(), "{r}");
    assert_eq!(r["consistent"], true, "{r}");
    assert_eq!(r["model"]["mode"], "grounding");
    // The default video: an upload of an mp4 made of the first gallery video's frames, asked the
    // gallery video's first example question (five options: a chosen one).
    assert_eq!(r["video"]["source"], "upload", "{r}");
    assert!(r["video"]["id"].as_str().unwrap().starts_with("sha256-"), "{r}");
    assert!(r["video"]["mp4_of_frames"].as_str().unwrap().contains("world/frames"), "{r}");
    assert_eq!(r["question"]["options"].as_array().unwrap().len(), 5, "{r}");
    let i = r["answer_index"].as_u64().expect("a chosen option") as usize;
    assert_eq!(r["answer"], r["question"]["options"][i]);
    // A fresh cache: the upload computed the features.
    assert!(number(&r, "upload_s") > 0.0);
    assert!(number(&r["upload_server_seconds"], "features") > 0.0, "{r}");
    // ... and every answer after it used them (uncached vs cached).
    assert_eq!(number(&r["first_ask_server_seconds"], "features"), 0.0, "{r}");
    assert!(number(&r, "first_ask_ms") > 0.0);

    let lat = &r["latency_ms"];
    let (p50, p90, p99, max, mean) = (
        number(lat, "p50"),
        number(lat, "p90"),
        number(lat, "p99"),
        number(lat, "max"),
        number(lat, "mean"),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max, "{lat}");
    assert!(mean > 0.0 && mean <= max, "{lat}");
    assert!(number(&r, "requests_per_s") > 0.0);
    assert!(number(&r, "wall_s") > 0.0);
    assert!(number(&r, "server_peak_rss_mb") > 0.0, "{r}");
    assert!(number(&r, "client_peak_rss_mb") > 0.0, "{r}");
    assert_eq!(r["server_stopped_cleanly"], true, "{r}");
}

#[test]
fn bench_serve_says_what_is_missing_without_a_model_or_a_server() {
    let tmp = tempfile::tempdir().unwrap();
    // No --run and no demo in the working folder: run the demo first.
    let o = gcg().args(["bench", "serve"]).current_dir(tmp.path()).output().unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--run") && e.contains("demo"), "{e}");

    // A run folder that is not a run: the server's own reason.
    let o = gcg().args(["bench", "serve", "--run"]).arg(tmp.path()).output().unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("did not start"), "{e}");

    // Nothing listening at --url.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let o = gcg().args(["bench", "serve", "--url", &url]).output().unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(&url) && e.contains("is a gcg server running there?"), "{e}");
}
