//! `gcg ask` and `gcg serve` end to end on a quick demo: the CLI's answers against the demo's own
//! predictions, and the real HTTP server on a loopback port — upload, ask, frames, media ranges,
//! bad requests, concurrent clients, a full queue and a clean shutdown.

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

mod common;
use common::{gcg, Server};

/// One quick demo for every test of this file (5 s on 2 cores).
fn demo() -> &'static Path {
    static DEMO: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DEMO
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("demo");
            let o = gcg()
                .args(["demo", "--quick", "--seed", "5", "--quiet", "--out"])
                .arg(&out)
                .output()
                .unwrap();
            assert!(o.status.success(), "gcg demo --quick: {}", String::from_utf8_lossy(&o.stderr));
            (tmp, out)
        })
        .1
}

fn test_questions(demo: &Path) -> Vec<(String, String, String, Vec<String>)> {
    // video, qid, question, options (the NExT-QA CSV columns)
    let mut r = csv::Reader::from_path(demo.join("world/test.csv")).unwrap();
    let h = r.headers().unwrap().clone();
    let col = |name: &str| h.iter().position(|c| c == name).unwrap();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            (
                rec[col("video")].to_string(),
                rec[col("qid")].to_string(),
                rec[col("question")].to_string(),
                (0..5).map(|i| rec[col(&format!("a{i}"))].to_string()).collect(),
            )
        })
        .collect()
}

/// The demo's own test predictions by (video, qid).
fn demo_predictions(demo: &Path, mode: &str) -> std::collections::HashMap<(String, String), Value> {
    let text = std::fs::read_to_string(demo.join("runs").join(mode).join("predictions-test.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                (v["video"].as_str().unwrap().to_string(), v["qid"].as_str().unwrap().to_string()),
                v,
            )
        })
        .collect()
}

/// The answer and moments of an ask object equal the prediction row's.
fn agrees(ask: &Value, pred: &Value, what: &str) {
    assert_eq!(ask["answer_index"], pred["prediction"], "{what}: answer");
    let frames: Vec<u64> = ask["moments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["frame"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = pred["moments"]["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_u64().unwrap())
        .collect();
    assert_eq!(frames, want, "{what}: moments");
    let times: Vec<f64> = ask["moments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["time"].as_f64().unwrap())
        .collect();
    let want: Vec<f64> = pred["moments"]["seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_f64().unwrap())
        .collect();
    assert_eq!(times, want, "{what}: moment times");
    assert_eq!(ask["span"], pred["span"], "{what}: span");
    let p = ask["p"].as_array().unwrap();
    let c = pred["curve"].as_array().unwrap();
    assert_eq!(p.len(), c.len(), "{what}: p(t)");
    for (a, b) in p.iter().zip(c) {
        assert!(
            (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-5,
            "{what}: p(t) {p:?} vs {c:?}"
        );
    }
}

#[test]
fn ask_cli_gives_the_demo_predictions_answers_and_moments() {
    let demo = demo();
    let tmp = tempfile::tempdir().unwrap();
    // `gcg ask` with a demo run and this test's cache.
    let ask = |run: &str, video: &Path| {
        let mut c = gcg();
        c.args(["ask", "--run"])
            .arg(demo.join("runs").join(run))
            .arg("--cache")
            .arg(tmp.path().join("cache"))
            .arg("--video")
            .arg(video);
        c
    };
    let preds = demo_predictions(demo, "grounding");
    let qs = test_questions(demo);
    let video = qs[0].0.clone();
    let mine: Vec<_> = qs.iter().filter(|q| q.0 == video).collect();
    // All the video's questions in one call (one JSON object a line).
    let file = tmp.path().join("questions.jsonl");
    let lines: Vec<String> = mine
        .iter()
        .map(|q| serde_json::json!({"question": format!("{}?", q.2), "options": q.3}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let o = ask("grounding", &demo.join("world/frames").join(&video))
        .arg("--json")
        .arg("--questions-file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "gcg ask: {}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    let answers: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), mine.len());
    for (a, q) in answers.iter().zip(&mine) {
        agrees(a, &preds[&(q.0.clone(), q.1.clone())], &format!("{} {}", q.0, q.1));
        assert_eq!(a["timestamps"].as_array().unwrap().len(), 32);
        assert_eq!(a["options"].as_array().unwrap().len(), 5);
        assert!(a.get("notes").is_none(), "{a}");
    }
    // A video of 2 frames: the 32 the model reads repeat them, and the answer says so; the
    // readable form lists the moments that share a time once.
    let two = tmp.path().join("two");
    std::fs::create_dir(&two).unwrap();
    for i in 0..2 {
        std::fs::copy(
            demo.join("world/frames").join(&video).join(format!("frame_{}.jpg", 10 * i)),
            two.join(format!("frame_{i}.jpg")),
        )
        .unwrap();
    }
    mp4_of(&two, &tmp.path().join("two.mp4"));
    let ask_two = |json: bool| {
        let mut c = ask("grounding", &tmp.path().join("two.mp4"));
        c.args(["--question", &mine[0].2])
            .args(mine[0].3.iter().flat_map(|o| ["--option", o.as_str()]));
        if json {
            c.arg("--json");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "gcg ask: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let a: Value = serde_json::from_str(ask_two(true).trim()).unwrap();
    let times: Vec<f64> = a["moments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["time"].as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 4, "{a}");
    assert!(times.iter().all(|&t| t == 0.0 || t == 0.25), "{a}");
    let notes = a["notes"].as_array().unwrap();
    assert!(
        notes.len() == 1 && notes[0].as_str().unwrap().contains("2 distinct frames for the 32"),
        "{a}"
    );
    let text = ask_two(false);
    let line = text.lines().find(|l| l.starts_with("moments: ")).unwrap();
    let mut distinct = times.clone();
    distinct.dedup();
    assert_eq!(line.matches(" s (").count(), distinct.len(), "{text}");
    assert!(line.contains("frames "), "{text}");
    assert!(text.contains("note: the video gave 2 distinct frames"), "{text}");
    // The readable form, from the cache this time.
    let o = ask("grounding", &demo.join("world/frames").join(&video))
        .args(["--question", &mine[0].2])
        .args(mine[0].3.iter().flat_map(|o| ["--option", o.as_str()]))
        .output()
        .unwrap();
    assert!(o.status.success(), "gcg ask: {}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.contains("moments: ") && text.contains("span: ") && text.contains("from the ask cache"),
        "{text}"
    );
    // Oracle runs cannot answer new questions (their moments come from the answer).
    let o = ask("oracle", &demo.join("world/frames").join(&video))
        .args(["--question", "what happened?"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("oracle mode"));
    // A run answers with the model it trained: --set of its [weights] or [model] is refused.
    let o = ask("grounding", &demo.join("world/frames").join(&video))
        .args(["--question", "what happened?", "--set", "weights.seed=6"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot change its [weights]"));
}

/// `gcg serve` for the demo's grounding run, its cache and data under `data`.
fn start_server(extra: &[&str], data: &Path) -> Server {
    Server::start(&demo().join("runs/grounding"), data, extra)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// (status, body as JSON)
fn get_json(url: &str) -> (u16, Value) {
    let mut r = agent().get(url).call().unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap())
}

fn post_json(url: &str, body: &str) -> (u16, Value) {
    let mut r = agent()
        .post(url)
        .header("content-type", "application/json")
        .send(body.as_bytes())
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A multipart/form-data upload of `bytes` as field `video` named `name`.
fn upload(url: &str, name: &str, bytes: &[u8]) -> (u16, Value) {
    let boundary = "gcgtestboundary7MA4YWxkTrZu0gW";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r = agent()
        .post(url)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .send(&body[..]);
    match r {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
        }
        // The server may close the connection while a too-large body is still being sent.
        Err(e) => (0, Value::String(e.to_string())),
    }
}

/// A multipart upload whose declared and sent body is `bytes` long, over a raw connection that
/// reads the answer as soon as the server gives one: (status, body).
fn oversized_upload(base: &str, bytes: usize) -> (u16, String) {
    use std::io::Write;
    let addr = base.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let boundary = "gcgbig";
    let head = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"big.mp4\"\r\n\r\n");
    let tail = format!("\r\n--{boundary}--\r\n");
    let len = head.len() + bytes + tail.len();
    let req = format!(
        "POST /api/videos HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n{head}"
    );
    c.write_all(req.as_bytes()).unwrap();
    // Send the body in pieces; the server may answer (and stop reading) before the end.
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        if c.write_all(&chunk[..n]).is_err() {
            break;
        }
        sent += n;
    }
    let _ = c.write_all(tail.as_bytes());
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A POST of `body` to `path` over a raw connection that sends what the server reads and then
/// reads its answer (the server may answer a body over its limit before the end): (status,
/// the whole answer as text).
fn raw_post(base: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    use std::io::Write;
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    for piece in body.chunks(64 * 1024) {
        if c.write_all(piece).is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// An mp4 of a demo video's frame folder (4 frames a second), made with ffmpeg.
fn mp4_of(frames: &Path, out: &Path) {
    let o = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-framerate", "4", "-i"])
        .arg(frames.join("frame_%d.jpg"))
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .arg(out)
        .output()
        .expect("ffmpeg (apt install ffmpeg)");
    assert!(o.status.success(), "ffmpeg: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn serve_answers_uploads_and_gallery_videos_and_refuses_bad_requests() {
    let demo = demo();
    let tmp = tempfile::tempdir().unwrap();
    let srv = start_server(&["--max-upload-mb", "1"], tmp.path());

    let (st, h) = get_json(&srv.url("/api/health"));
    assert_eq!(st, 200);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["model"]["mode"], "grounding");
    assert_eq!(h["model"]["moments"], 4);

    // The viewer and its assets.
    for (path, mime) in [("/", "text/html"), ("/app.js", "javascript"), ("/style.css", "text/css")] {
        let r = agent().get(&srv.url(path)).call().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let ct = r.headers().get("content-type").unwrap().to_str().unwrap().to_string();
        assert!(ct.contains(mime), "{path}: {ct}");
    }

    // The demo's gallery, with its questions as examples; an answer equals the demo's prediction.
    let (_, list) = get_json(&srv.url("/api/videos"));
    let gallery: Vec<&Value> = list["videos"].as_array().unwrap().iter().filter(|v| v["gallery"] == true).collect();
    assert!(!gallery.is_empty());
    assert!(
        list.to_string().find(demo.to_str().unwrap()).is_none(),
        "the listing shows server paths: {list}"
    );
    let g = gallery[0];
    let gid = g["id"].as_str().unwrap();
    let q = &g["questions"][0];
    let (st, a) = post_json(&srv.url(&format!("/api/videos/{gid}/ask")), &q.to_string());
    assert_eq!(st, 200, "{a}");
    let preds = demo_predictions(demo, "grounding");
    let qs = test_questions(demo);
    let (_, qid, _, _) = qs
        .iter()
        .find(|x| x.0 == gid && format!("{}?", x.2) == q["question"].as_str().unwrap())
        .unwrap();
    agrees(&a, &preds[&(gid.to_string(), qid.clone())], "gallery question");
    assert_eq!(a["video"], gid);
    // Its frames, as JPEG.
    let mut r = agent().get(&srv.url(&format!("/api/videos/{gid}/frames/3"))).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let jpeg = r.body_mut().read_to_vec().unwrap();
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8], "not a JPEG");
    assert_eq!(get_json(&srv.url(&format!("/api/videos/{gid}/frames/32"))).0, 404);
    assert_eq!(get_json(&srv.url(&format!("/api/videos/{gid}/frames/x"))).0, 400);
    let (st, e) = get_json(&srv.url(&format!("/api/videos/{gid}/frames/-1")));
    assert!(
        st == 400 && e["error"].as_str().unwrap().contains("a whole number from 0 to 31"),
        "{e}"
    );
    // One question a request: an array is refused with a message that says so.
    let (st, e) = post_json(&srv.url(&format!("/api/videos/{gid}/ask")), r#" [{"question": "what?"}]"#);
    assert!(st == 400 && e["error"].as_str().unwrap().contains("not an array"), "{e}");

    // An upload: an mp4 of another test video.
    let vid = &qs.iter().find(|x| x.0 != gid).unwrap().0;
    let mp4 = tmp.path().join("clip.mp4");
    mp4_of(&demo.join("world/frames").join(vid), &mp4);
    let bytes = std::fs::read(&mp4).unwrap();
    let (st, v) = upload(&srv.url("/api/videos"), "clip.mp4", &bytes);
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sha256-") && v["playable"] == true && v["frames"] == 32, "{v}");
    assert!((v["duration"].as_f64().unwrap() - 16.0).abs() < 0.01, "{v}");
    assert!(v.get("path").is_none(), "{v}");
    // The same bytes again: the same video, under this upload's name, nothing computed.
    let again = upload(&srv.url("/api/videos"), "again.mp4", &bytes);
    assert_eq!(again.1["id"], id.as_str(), "{again:?}");
    assert_eq!(again.1["name"], "again.mp4", "{again:?}");
    assert_eq!(again.1["seconds"]["features"], 0.0, "{again:?}");
    assert!(v["seconds"]["features"].as_f64().unwrap() > 0.0, "{v}");
    let (st, a) = post_json(
        &srv.url(&format!("/api/videos/{id}/ask")),
        r#"{"question": "what shape was the thing that appeared?", "options": ["cross", "star", "diamond", "heart", "square"]}"#,
    );
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["moments"].as_array().unwrap().len(), 4);
    assert_eq!(a["option_scores"].as_array().unwrap().len(), 5);
    let t: Vec<f64> = a["moments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["time"].as_f64().unwrap())
        .collect();
    assert!(t.windows(2).all(|w| w[0] <= w[1]) && t[0] >= 0.0 && t[3] <= 16.0, "{t:?}");
    // Open-ended: a generated answer.
    let (st, a) = post_json(&srv.url(&format!("/api/videos/{id}/ask")), r#"{"question": "what appeared?"}"#);
    assert_eq!(st, 200, "{a}");
    assert!(
        a["answer_index"].is_null() && a["answer"].is_string() && a["option_scores"].is_null(),
        "{a}"
    );
    // The player's byte ranges.
    let mut r = agent()
        .get(&srv.url(&format!("/api/videos/{id}/media")))
        .header("range", "bytes=10-19")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(
        r.headers().get("content-range").unwrap().to_str().unwrap(),
        format!("bytes 10-19/{}", bytes.len())
    );
    assert_eq!(r.body_mut().read_to_vec().unwrap(), &bytes[10..20]);
    let r = agent()
        .get(&srv.url(&format!("/api/videos/{id}/media")))
        .header("range", "bytes=99999999-")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 416);
    // Without a range (or with a malformed one): the whole file, 200.
    for range in [None, Some("bytes=19-10")] {
        let mut req = agent().get(&srv.url(&format!("/api/videos/{id}/media")));
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let mut r = req.call().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{range:?}");
        assert_eq!(r.body_mut().read_to_vec().unwrap(), bytes, "{range:?}");
    }

    // Another site's page, or a name that is not this server's address (DNS rebinding): 403.
    let r = agent()
        .post(&srv.url(&format!("/api/videos/{id}/ask")))
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .send(r#"{"question": "what appeared?"}"#.as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = agent()
        .get(&srv.url("/api/videos"))
        .header("host", "evil.example:8080")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // The page's own origin is fine.
    let r = agent()
        .post(&srv.url(&format!("/api/videos/{id}/ask")))
        .header("origin", srv.base.as_str())
        .send(r#"{"question": "what appeared?"}"#.as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Bad requests: clear errors, and the server goes on.
    let (st, e) = oversized_upload(&srv.base, 2 * 1024 * 1024);
    assert_eq!(st, 413, "oversized upload: {e}");
    assert!(e.contains("larger than this server accepts"), "{e}");
    let incoming: Vec<_> = std::fs::read_dir(tmp.path().join("serve/incoming")).unwrap().collect();
    assert!(incoming.is_empty(), "the refused upload left {incoming:?}");
    let (st, e) = upload(&srv.url("/api/videos"), "notes.mp4", b"this is not a video");
    assert_eq!(st, 400, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(msg.contains("notes.mp4") && msg.contains("could not be read as a video"), "{msg}");
    assert!(!msg.contains(tmp.path().to_str().unwrap()), "the error shows server paths: {msg}");
    for (body, says) in [
        (r#"{"question": "  "}"#, "empty"),
        (r#"{"question": "q", "options": ["a", "b", "c", "d", "e", "f"]}"#, "6 options"),
        (r#"{"question": "q", "options": ["only one"]}"#, "one option"),
        // A misspelt key is named, not ignored (which would answer another, open-ended question).
        (r#"{"question": "q", "option": ["a", "b"]}"#, "unknown field `option`"),
        (r#"{"question": "#, "must be JSON"),
        (r#"["not", "an", "object"]"#, "must be one JSON object"),
    ] {
        let (st, e) = post_json(&srv.url(&format!("/api/videos/{id}/ask")), body);
        assert_eq!(st, 400, "{body}: {e}");
        assert!(e["error"].as_str().unwrap().contains(says), "{body}: {e}");
    }
    // An upload that is not multipart: a JSON error saying what an upload is.
    let (st, e) = post_json(&srv.url("/api/videos"), r#"{"video": "x.mp4"}"#);
    assert_eq!(st, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("multipart/form-data POST"), "{e}");
    let (st, e) = post_json(&srv.url("/api/videos/sha256-0000/ask"), r#"{"question": "q"}"#);
    assert_eq!(st, 404, "{e}");
    assert_eq!(get_json(&srv.url("/api/videos/../../etc/frames/0")).0, 404);
    assert_eq!(get_json(&srv.url("/api/nothing")).0, 404);
    // The errors axum makes itself are JSON too: a method a route lacks (405, its Allow kept),
    // an ask body past the limit (413), a path that is not UTF-8 (400).
    let r = agent().delete(&srv.url("/api/videos")).call().unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.headers().get("allow").is_some());
    let mut r = r;
    let e: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert!(e["error"].is_string(), "{e}");
    let big = serde_json::json!({ "question": "x".repeat(3_000_000) }).to_string();
    // Over a raw connection: the server may answer and close before the whole body is sent.
    let (st, text) = raw_post(
        &srv.url(""),
        &format!("/api/videos/{}/ask", gallery[0]["id"].as_str().unwrap()),
        "application/json",
        big.as_bytes(),
    );
    assert_eq!(st, 413, "{text}");
    // The body's JSON object (whether sent with a length or in chunks).
    let json = text.find('{').zip(text.rfind('}')).map_or("", |(a, b)| &text[a..=b]);
    let e: Value = serde_json::from_str(json).unwrap_or_default();
    assert!(e["error"].is_string(), "{text}");
    let (st, e) = post_json(&srv.url("/api/videos/%FF/ask"), r#"{"question": "q"}"#);
    assert_eq!(st, 400, "{e}");
    assert!(e["error"].as_str().is_some_and(|t| t.contains("UTF-8")), "{e}");
    // Still answering.
    assert_eq!(get_json(&srv.url("/api/health")).0, 200);

    // 16 clients at once, asking different questions about different videos: each gets the
    // answer a lone client gets for its own question (batched together, none mixed up).
    let mut asks: Vec<(String, String)> = Vec::new();
    for g in &gallery {
        for q in g["questions"].as_array().unwrap() {
            asks.push((srv.url(&format!("/api/videos/{}/ask", g["id"].as_str().unwrap())), q.to_string()));
        }
    }
    let asks: Vec<(String, String)> = asks.iter().cycle().take(16).cloned().collect();
    let alone: Vec<Value> = asks.iter().map(|(url, body)| post_json(url, body).1).collect();
    let together: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = asks.iter().map(|(url, body)| s.spawn(move || post_json(url, body))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: std::collections::HashSet<&String> = asks.iter().map(|(_, b)| b).collect();
    assert!(distinct.len() >= 4, "too few different questions: {}", distinct.len());
    for ((st, a), one) in together.iter().zip(&alone) {
        assert_eq!(*st, 200, "{a}");
        assert_eq!(a["question"], one["question"]);
        assert_eq!(a["video"], one["video"]);
        assert_eq!(a["answer_index"], one["answer_index"], "{a}\n{one}");
        assert_eq!(a["moments"], one["moments"]);
        let (x, y) = (a["option_scores"].as_array().unwrap(), one["option_scores"].as_array().unwrap());
        for (x, y) in x.iter().zip(y) {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4, "{a}\n{one}");
        }
    }

    // SIGTERM: a clean stop.
    let (status, err) = srv.stop();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("shutting down") && err.contains("stopped"), "{err}");
}

/// A file uploaded without a usable extension is not offered to the player; the same bytes
/// uploaded again as an .mp4 are. Frames over --max-frame-megapixels are refused.
#[test]
fn a_reupload_with_a_playable_name_makes_the_video_playable() {
    let demo = demo();
    let tmp = tempfile::tempdir().unwrap();
    let srv = start_server(&["--max-frame-megapixels", "0.05", "--write-timeout", "2"], tmp.path());
    {
        let (vid, _, question, options) = &test_questions(demo)[2];
        let url = srv.url(&format!("/api/videos/{vid}/ask"));
        let body = serde_json::json!({"question": question, "options": options}).to_string();
        // Questions at once about a video not prepared yet: it is prepared (decoded, encoded) once,
        // the others wait for that and spend nothing on it.
        let first: Vec<(u16, Value)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| post_json(&url, &body))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(first.iter().all(|(st, _)| *st == 200), "{first:?}");
        let prepared = first
            .iter()
            .filter(|(_, a)| a["seconds"]["features"].as_f64().unwrap() > 0.0)
            .count();
        assert_eq!(prepared, 1, "{first:?}");
    }
    let big = tmp.path().join("big.mp4");
    let o = Command::new("ffmpeg")
        .args([
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=2:size=320x240:rate=5",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&big)
        .output()
        .expect("ffmpeg (apt install ffmpeg)");
    assert!(o.status.success(), "ffmpeg: {}", String::from_utf8_lossy(&o.stderr));
    let (st, e) = upload(&srv.url("/api/videos"), "big.mp4", &std::fs::read(&big).unwrap());
    assert_eq!(st, 413, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains("big.mp4: its frames are 320×240 (0.0768 megapixels); this server decodes frames of at most 0.05 megapixels (--max-frame-megapixels)"),
        "{msg}"
    );
    let vid = &test_questions(demo)[1].0;
    let mp4 = tmp.path().join("clip.mp4");
    mp4_of(&demo.join("world/frames").join(vid), &mp4);
    let bytes = std::fs::read(&mp4).unwrap();
    let (st, v) = upload(&srv.url("/api/videos"), "clip", &bytes);
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["playable"], false, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let media = srv.url(&format!("/api/videos/{id}/media"));
    assert_eq!(agent().get(&media).call().unwrap().status().as_u16(), 404);
    let (st, again) = upload(&srv.url("/api/videos"), "clip.mp4", &bytes);
    assert_eq!(st, 201, "{again}");
    assert_eq!(
        (again["id"].as_str(), &again["playable"], &again["name"]),
        (Some(id.as_str()), &Value::Bool(true), &Value::from("clip.mp4"))
    );
    let mut r = agent().get(&media).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.body_mut().read_to_vec().unwrap(), bytes);
    // One file is kept, and a restart finds the entry as it now is.
    let files: Vec<String> = std::fs::read_dir(tmp.path().join("serve/videos").join(&id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("video."))
        .collect();
    assert_eq!(files, ["video.mp4"]);
    let (status, err) = srv.stop();
    assert!(status.success(), "{err}");
    // A record naming another file (edited, or a data folder moved) still serves its folder's.
    let info = tmp.path().join("serve/videos").join(&id).join("info.json");
    let mut record: Value = serde_json::from_str(&std::fs::read_to_string(&info).unwrap()).unwrap();
    record["path"] = Value::from("/etc/hostname");
    std::fs::write(&info, record.to_string()).unwrap();
    let srv = start_server(&["--write-timeout", "2"], tmp.path());
    let (_, list) = get_json(&srv.url("/api/videos"));
    let e = list["videos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!((&e["playable"], &e["name"]), (&Value::Bool(true), &Value::from("clip.mp4")), "{e}");
    let media = srv.url(&format!("/api/videos/{id}/media"));
    assert_eq!(agent().get(&media).call().unwrap().body_mut().read_to_vec().unwrap(), bytes);

    // A client that stops reading a response (a player gone away) has its connection closed
    // after --write-timeout: a lossless video of noise, far more than the sockets' buffers.
    let noise = tmp.path().join("noise.mp4");
    let o = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i"])
        .arg("nullsrc=s=200x150:d=30:r=10,geq=random(1)*255:random(1)*255:random(1)*255")
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", "-pix_fmt", "yuv444p"])
        .arg(&noise)
        .output()
        .expect("ffmpeg (apt install ffmpeg)");
    assert!(o.status.success(), "ffmpeg: {}", String::from_utf8_lossy(&o.stderr));
    let noise = std::fs::read(&noise).unwrap();
    assert!(noise.len() > 16 << 20, "{} bytes", noise.len());
    let (st, v) = upload(&srv.url("/api/videos"), "noise.mp4", &noise);
    assert_eq!(st, 201, "{v}");
    let mut c = connect(&srv.base);
    let head = format!(
        "GET /api/videos/{}/media HTTP/1.1\r\nHost: {}\r\n\r\n",
        v["id"].as_str().unwrap(),
        srv.base.trim_start_matches("http://")
    );
    std::io::Write::write_all(&mut c, head.as_bytes()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(6));
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(
        got.len() < noise.len(),
        "the whole response came ({} bytes of {}): the stalled connection was kept",
        got.len(),
        noise.len()
    );
    assert!(String::from_utf8_lossy(&got[..12]).starts_with("HTTP/1.1 200"));
    // The server goes on.
    assert_eq!(get_json(&srv.url("/api/health")).0, 200);
}

/// A TCP connection to the server.
fn connect(base: &str) -> std::net::TcpStream {
    let c = std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    c
}

/// Seconds until the server closes `c` (reading and dropping whatever it sends first); panics
/// when it is still open after the read timeout.
fn closed_after(mut c: std::net::TcpStream, t0: std::time::Instant) -> f64 {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return t0.elapsed().as_secs_f64(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return t0.elapsed().as_secs_f64(),
            Err(e) => panic!("the connection is still open after {:.1} s: {e}", t0.elapsed().as_secs_f64()),
        }
    }
}

/// A multipart upload whose head and first bytes are sent, the rest never: a request in
/// progress.
fn upload_in_progress(base: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut c = connect(base);
    let addr = base.trim_start_matches("http://");
    let boundary = "gcgtestboundary";
    let part = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"slow.mp4\"\r\n\r\n0123");
    let head = format!(
        "POST /api/videos HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n\r\n"
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(part.as_bytes()).unwrap();
    c
}

#[test]
fn idle_connections_are_closed_open_ones_capped_and_a_stop_waits_a_bounded_time() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    // A connection that sends nothing, and one that sends half a request's head, are closed after
    // --header-timeout; so is a kept-alive connection left idle after its request.
    let srv = start_server(&["--header-timeout", "1"], tmp.path().join("a").as_path());
    let t0 = std::time::Instant::now();
    let silent = connect(&srv.base);
    let mut half = connect(&srv.base);
    half.write_all(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    let mut kept = connect(&srv.base);
    kept.write_all(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    for (what, c) in [("silent", silent), ("half a head", half), ("kept alive", kept)] {
        let s = closed_after(c, t0);
        assert!((0.9..10.0).contains(&s), "{what}: closed after {s:.2} s, --header-timeout 1");
    }
    assert_eq!(get_json(&srv.url("/api/health")).0, 200);
    // A question whose body never comes in full: 408 after the same time.
    let mut slow = connect(&srv.base);
    let head =
        "POST /api/videos/x/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"question\"";
    slow.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("did not arrive within 1 s"),
        "{answer}"
    );
    // A stop waits for a request in progress; a second signal ends the wait.
    let _slow = upload_in_progress(&srv.base);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut srv = srv;
    let pid = srv.child.id().to_string();
    let term = || Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(term().success());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        srv.child.try_wait().unwrap().is_none(),
        "the server stopped before its request in progress ended"
    );
    let t1 = std::time::Instant::now();
    assert!(term().success());
    let status = srv.child.wait().unwrap();
    let mut err = String::new();
    srv.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    // At once: nothing more is waited for (it took ~1.5 s when the model thread was joined).
    assert!(status.success() && t1.elapsed().as_secs_f64() < 1.0, "{:?} {err}", t1.elapsed());
    assert!(err.contains("a second signal"), "{err}");

    // Past --max-connections, a connection gets a 503 in the API's shape and is closed; the
    // server takes connections again once others close. A stop waits --shutdown-grace at most.
    let srv = start_server(&["--max-connections", "2", "--shutdown-grace", "1"], tmp.path().join("b").as_path());
    let held = [connect(&srv.base), connect(&srv.base)];
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (st, text) = raw_post(&srv.base, "/api/health", "application/json", b"");
    assert_eq!(st, 503, "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(body["error"].as_str().unwrap().contains("--max-connections"), "{body}");
    drop(held);
    let t0 = std::time::Instant::now();
    while get_json(&srv.url("/api/health")).0 != 200 {
        assert!(t0.elapsed().as_secs() < 10, "the server never took connections again");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _slow = upload_in_progress(&srv.base);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t1 = std::time::Instant::now();
    let (status, err) = srv.stop();
    assert!(status.success() && t1.elapsed().as_secs_f64() < 10.0, "{:?} {err}", t1.elapsed());
    assert!(err.contains("still in progress after 1 s"), "{err}");
}

#[test]
fn a_full_queue_is_503_and_the_accepted_requests_are_answered() {
    let demo = demo();
    let tmp = tempfile::tempdir().unwrap();
    let srv = start_server(&["--queue", "1", "--max-batch", "1"], tmp.path());
    let qs = test_questions(demo);
    let (vid, _, question, options) = &qs[0];
    let url = srv.url(&format!("/api/videos/{vid}/ask"));
    let body = serde_json::json!({"question": question, "options": options}).to_string();
    // Prepared first, so that every request below only waits for the model.
    assert_eq!(post_json(&url, &body).0, 200);
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..48).map(|_| s.spawn(|| post_json(&url, &body))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let full = answers.iter().filter(|(st, _)| *st == 503).count();
    let ok = answers.iter().filter(|(st, _)| *st == 200).count();
    assert_eq!(full + ok, answers.len(), "{answers:?}");
    assert!(full > 0, "48 requests at once never filled a queue of 1");
    assert!(ok > 0);
    let e = &answers.iter().find(|(st, _)| *st == 503).unwrap().1;
    assert!(e["error"].as_str().unwrap().contains("queue is full"), "{e}");
    // The server still answers afterwards.
    assert_eq!(post_json(&url, &body).0, 200);
}

#[test]
fn uploads_past_the_data_cap_are_evicted_oldest_first_and_the_rest_survive_a_restart() {
    let demo = demo();
    let tmp = tempfile::tempdir().unwrap();
    let qs = test_questions(demo);
    let mut vids: Vec<String> = qs.iter().map(|q| q.0.clone()).collect();
    vids.dedup();
    // Each upload holds ~0.3 MiB (the file, 32 JPEG frames, [32, 65, 48] f16 features): a 1 MiB cap
    // keeps three.
    let srv = start_server(&["--data-cap-mb", "1"], tmp.path());
    let mut ids = Vec::new();
    for v in vids.iter().take(6) {
        let mp4 = tmp.path().join(format!("{v}.mp4"));
        mp4_of(&demo.join("world/frames").join(v), &mp4);
        let (st, up) = upload(&srv.url("/api/videos"), &format!("{v}.mp4"), &std::fs::read(&mp4).unwrap());
        assert_eq!(st, 201, "{up}");
        ids.push(up["id"].as_str().unwrap().to_string());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let listed = |srv: &Server| -> Vec<String> {
        get_json(&srv.url("/api/videos")).1["videos"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["gallery"] == false)
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    };
    let kept = listed(&srv);
    assert!(kept.len() >= 2 && kept.len() < 6, "kept {kept:?} of {ids:?}");
    assert!(kept.contains(ids.last().unwrap()), "the newest upload was evicted");
    assert!(!kept.contains(&ids[0]), "the oldest upload was kept: {kept:?}");
    // An evicted video is gone: its files, its features, its id.
    assert!(!tmp.path().join("serve/videos").join(&ids[0]).exists());
    let index = std::fs::read_to_string(
        std::fs::read_dir(tmp.path().join("cache"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("index.json"),
    )
    .unwrap();
    assert!(!index.contains(&ids[0]), "the evicted video's features are still in the ask cache");
    assert!(index.contains(ids.last().unwrap()));
    let q = r#"{"question": "what appeared?", "options": ["a", "b"]}"#;
    assert_eq!(post_json(&srv.url(&format!("/api/videos/{}/ask", ids[0])), q).0, 404);
    let before = post_json(&srv.url(&format!("/api/videos/{}/ask", ids.last().unwrap())), q);
    assert_eq!(before.0, 200, "{}", before.1);
    let (status, _) = srv.stop();
    assert!(status.success());
    // Writes cut short by a kill leave temporaries: a dead process's are swept at the next start,
    // a live one's (this test's pid) are left alone.
    let dead = 4_194_305u32; // above the kernel's pid_max of 2^22: no process has it
    let live = std::process::id();
    let video_dir = tmp.path().join("serve/videos").join(ids.last().unwrap());
    let planted = [
        video_dir.join(format!(".info.json.tmp-{dead}")),
        tmp.path().join(format!("serve/.notes.json.tmp-{dead}")),
        video_dir.join(format!(".info.json.tmp-{live}")),
    ];
    for p in &planted {
        std::fs::write(p, "half a write").unwrap();
    }
    // A new server on the same data folder lists the kept uploads and answers the same.
    let srv = start_server(&["--data-cap-mb", "1"], tmp.path());
    assert!(
        !planted[0].exists() && !planted[1].exists(),
        "a killed writer's temporaries were kept"
    );
    assert!(planted[2].exists(), "a live process's temporary was removed");
    let mut again = listed(&srv);
    again.sort();
    let mut kept_sorted = kept.clone();
    kept_sorted.sort();
    assert_eq!(again, kept_sorted);
    let after = post_json(&srv.url(&format!("/api/videos/{}/ask", ids.last().unwrap())), q);
    assert_eq!(after.0, 200);
    assert_eq!(after.1["moments"], before.1["moments"]);
    assert_eq!(after.1["option_scores"], before.1["option_scores"]);
}

/// An options file with no options (empty, or blank lines only) is an error naming it, before
/// any model or video is read: it used to turn the question into an open-ended one, answered
/// with generated text. A --run that is not a run directory is named as such.
#[test]
fn an_options_file_without_options_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, text) in [("empty.txt", ""), ("blank.txt", "\n  \n\t\n")] {
        std::fs::write(tmp.path().join(name), text).unwrap();
        let o = gcg()
            .current_dir(tmp.path())
            .args(["ask", "--video", "missing.mp4", "--question", "what?", "--options-file", name])
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("the options file {name} holds no options")), "{err}");
    }
    // A --run that is no run directory is named as such (it was "reading nope/config.json: No
    // such file or directory").
    std::fs::write(tmp.path().join("v.mp4"), b"not looked at").unwrap();
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    for (run, says) in [
        ("nope", "the run directory nope does not exist"),
        ("empty", "empty is not a run directory: it holds no config.json"),
    ] {
        let o = gcg()
            .current_dir(tmp.path())
            .args(["ask", "--run", run, "--video", "v.mp4", "--question", "what?"])
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn without_a_run_serve_and_ask_use_the_demo_or_say_what_to_run_first() {
    let tmp = tempfile::tempdir().unwrap();
    // No demo here: the error says what to run.
    let o = gcg()
        .current_dir(tmp.path())
        .args(["serve", "--addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--run") && err.contains("-- demo"), "{err}");
    std::fs::write(tmp.path().join("v.mp4"), b"not looked at").unwrap();
    let o = gcg()
        .current_dir(tmp.path())
        .args(["ask", "--video", "v.mp4", "--question", "what?"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--run") && err.contains("-- demo"), "{err}");
    // With the demo at its default place (gcg-demo), serve says it uses its grounding run.
    std::os::unix::fs::symlink(demo(), tmp.path().join("gcg-demo")).unwrap();
    let child = gcg()
        .current_dir(tmp.path())
        .args(["serve", "--addr", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed on drop, whatever fails below.
    let srv = Server::listening(child);
    assert!(srv.base.starts_with("http://127.0.0.1:"), "{}", srv.base);
    let (st, h) = get_json(&srv.url("/api/health"));
    assert_eq!(st, 200);
    // Clients see the run by its folder's name, not the server's paths.
    assert_eq!(h["model"]["run"], "grounding (best checkpoint)", "{h}");
    let (status, err) = srv.stop();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("no --run given: using the demo's grounding run gcg-demo/runs/grounding"),
        "{err}"
    );
}
