//! The web viewer in a real browser: headless Chromium (Debian's `chromium`) driven over the
//! DevTools protocol against a real `gcg serve` on a loopback port. It loads the page, uploads a
//! demo video, asks a multiple-choice question, waits for the answer and checks the answer text,
//! the K moment markers and the frames, that clicking a marker seeks the player there, and that
//! the question stays listed; it saves a screenshot (`$CARGO_TARGET_TMPDIR/viewer.png`, and
//! `$GCG_SCREENSHOT` when set; `GCG_VIEWER_DEMO=DIR` uses that demo instead of a quick one).
//!
//! Without a Chromium that starts it skips with a message — except when `GCG_REQUIRE_BROWSER`
//! or `CI` is set (`.ci/run` sets it), where it must run.

use base64::Engine;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

mod common;
use common::{gcg, Server};

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROME") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn browser_required() -> bool {
    ["GCG_REQUIRE_BROWSER", "CI"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty() && s != "0" && s != "false"))
}

/// A child process killed when dropped (unless taken).
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A headless Chromium and a DevTools connection to its page.
struct Browser {
    child: Child,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Start Chromium on about:blank with a DevTools port and attach to its page.
    fn launch() -> Result<Self, String> {
        let path = chromium().ok_or("no chromium found (apt install chromium, or set CHROME)")?;
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let child = Command::new(&path)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                "--autoplay-policy=no-user-gesture-required",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // Killed on every early return below.
        let mut guard = ChildGuard(Some(child));
        let child = guard.0.as_mut().unwrap();
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut port = None;
        let mut seen = String::new();
        let t0 = Instant::now();
        while port.is_none() && t0.elapsed() < Duration::from_secs(30) {
            let mut line = String::new();
            if err.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                break;
            }
            seen.push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("DevTools listening on ws://127.0.0.1:") {
                port = rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
            }
        }
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in err.lines() {});
        let Some(port) = port else {
            return Err(format!("{} printed no DevTools address: {seen}", path.display()));
        };
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut targets = Value::Null;
        for _ in 0..50 {
            if let Ok(mut r) = agent.get(&format!("http://127.0.0.1:{port}/json/list")).call() {
                targets = serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default()).unwrap_or(Value::Null);
                if targets.as_array().is_some_and(|a| a.iter().any(|t| t["type"] == "page")) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let page = targets
            .as_array()
            .and_then(|a| a.iter().find(|t| t["type"] == "page"))
            .ok_or_else(|| format!("no page target: {targets}"))?;
        let url = page["webSocketDebuggerUrl"].as_str().ok_or("no webSocketDebuggerUrl")?.to_string();
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        let (ws, _) = tungstenite::client(url.as_str(), stream).map_err(|e| e.to_string())?;
        Ok(Self {
            child: guard.0.take().unwrap(),
            ws,
            next_id: 0,
            _profile: profile,
        })
    }

    /// One DevTools command; its result (events on the way are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).unwrap();
        loop {
            let m = self
                .ws
                .read()
                .unwrap_or_else(|e| panic!("{method}: the DevTools connection failed: {e}"));
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Evaluate JS in the page (promises awaited), by value.
    fn js(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Wait until `expr` is true in the page.
    fn wait_for(&mut self, expr: &str, what: &str, secs: u64) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if self.js(&format!("!!({expr})")) == Value::Bool(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let err = self.js("document.getElementById('error') && document.getElementById('error').textContent");
        panic!("timed out waiting for {what} ({expr}); the page's error: {err}");
    }

    /// A mouse click at the centre of the element `selector` (its `index`-th match).
    fn click(&mut self, selector: &str, index: usize) {
        let sel = serde_json::to_string(selector).unwrap();
        let r = self.js(&format!(
            "(() => {{ const e = document.querySelectorAll({sel})[{index}]; e.scrollIntoView({{block: 'center'}}); \
             const b = e.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; }})()"
        ));
        let (x, y) = (r[0].as_f64().unwrap(), r[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }

    /// Focus the element and type `text` into it (real input events).
    fn type_into(&mut self, selector: &str, index: usize, text: &str) {
        self.click(selector, index);
        self.call("Input.insertText", json!({"text": text}));
    }

    /// Give the file input `selector` a file (as if chosen in the dialog).
    fn set_file(&mut self, selector: &str, file: &Path) {
        let doc = self.call("DOM.getDocument", json!({}));
        let node = self.call("DOM.querySelector", json!({"nodeId": doc["root"]["nodeId"], "selector": selector}));
        self.call(
            "DOM.setFileInputFiles",
            json!({"nodeId": node["nodeId"], "files": [file.display().to_string()]}),
        );
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }
}

/// A browser, or `None` (the test skips) when none can start and none is required.
fn launch() -> Option<Browser> {
    match Browser::launch() {
        Ok(b) => Some(b),
        Err(e) if !browser_required() => {
            eprintln!("SKIPPED viewer_browser: Chromium could not be started: {e}");
            None
        }
        Err(e) => panic!("Chromium is required here (GCG_REQUIRE_BROWSER / CI) but could not be started: {e}"),
    }
}

/// A WebM (VP9, 4 fps) of a frame folder, with extra ffmpeg output options.
fn webm_of(frames: &Path, out: &Path, extra: &[&str]) {
    let o = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-framerate", "4", "-i"])
        .arg(frames.join("frame_%d.jpg"))
        .args(extra)
        .args(["-c:v", "libvpx-vp9", "-b:v", "200k", "-g", "4", "-pix_fmt", "yuv420p"])
        .arg(out)
        .output()
        .expect("ffmpeg");
    assert!(o.status.success(), "ffmpeg: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_viewer_uploads_asks_shows_the_moments_and_seeks() {
    let Some(mut b) = launch() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // GCG_VIEWER_DEMO: an existing demo instead of a quick one (the README's screenshot).
    let demo = match std::env::var_os("GCG_VIEWER_DEMO") {
        Some(d) => PathBuf::from(d),
        None => {
            let demo = tmp.path().join("demo");
            let o = gcg()
                .args(["demo", "--quick", "--seed", "6", "--quiet", "--out"])
                .arg(&demo)
                .output()
                .unwrap();
            assert!(o.status.success(), "gcg demo --quick: {}", String::from_utf8_lossy(&o.stderr));
            demo
        }
    };
    // A WebM (VP9) of a test video: a format every Chromium build plays.
    let test = std::fs::read_to_string(demo.join("world/test.csv")).unwrap();
    let video = test.lines().nth(1).unwrap().split(',').next().unwrap().to_string();
    let webm = tmp.path().join("clip.webm");
    webm_of(&demo.join("world/frames").join(&video), &webm, &[]);

    let srv = Server::start(&demo.join("runs/grounding"), tmp.path(), &[]);
    b.call("Page.enable", json!({}));
    b.call("Page.navigate", json!({"url": srv.url("/")}));
    b.wait_for("document.readyState === 'complete'", "the page", 30);
    b.wait_for("document.querySelectorAll('#videos .video-item').length > 0", "the video list", 30);
    b.wait_for(
        "document.getElementById('model').textContent.includes('grounding')",
        "the model line",
        30,
    );

    // Upload.
    let before = b.js("document.querySelectorAll('#videos .video-item').length").as_u64().unwrap();
    b.set_file("#upload", &webm);
    b.wait_for(
        &format!("document.querySelectorAll('#videos .video-item').length > {before}"),
        "the uploaded video in the list",
        60,
    );
    let current = "document.querySelector('#videos .video-item[aria-current=\"true\"]')";
    b.wait_for(
        &format!("{current} && {current}.dataset.id.startsWith('sha256-')"),
        "the upload selected",
        30,
    );

    // Ask a multiple-choice question, typed.
    let question = "what shape was the thing that appeared?";
    let options = ["cross", "star", "diamond", "heart", "square"];
    b.type_into("#question", 0, question);
    for (i, o) in options.iter().enumerate() {
        let n = b.js("document.querySelectorAll('#options input.option').length").as_u64().unwrap() as usize;
        if n <= i {
            b.click("#add-option", 0);
        }
        b.type_into("#options input.option", i, o);
    }
    b.click("#ask", 0);
    b.wait_for(
        "document.getElementById('answer-text').textContent.trim().length > 0",
        "the answer",
        60,
    );
    let answer = b.js("document.getElementById('answer-text').textContent.trim()");
    let answer = answer.as_str().unwrap().to_string();
    assert!(options.iter().any(|o| answer.contains(o)), "the answer {answer:?} names no option");
    // The page shows what the API answers for the same question.
    let id = b.js(&format!("{current}.dataset.id"));
    let api: Value = {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let body = json!({"question": question, "options": options}).to_string();
        let mut r = agent
            .post(&srv.url(&format!("/api/videos/{}/ask", id.as_str().unwrap())))
            .header("content-type", "application/json")
            .send(body.as_bytes())
            .unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    };
    assert!(
        answer.contains(api["answer"].as_str().unwrap()),
        "page {answer:?}, API {}",
        api["answer"]
    );
    let markers = b.js("[...document.querySelectorAll('#timeline button.moment')].map(b => parseFloat(b.dataset.time))");
    let want: Vec<f64> = api["moments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["time"].as_f64().unwrap())
        .collect();
    let got: Vec<f64> = markers.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(got.len(), 4, "K = 4 moment markers: {got:?}");
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-3, "markers {got:?}, API moments {want:?}");
    }
    assert_eq!(b.js("document.querySelectorAll('#thumbs img.thumb').length"), 4);
    assert_eq!(b.js("document.querySelectorAll('#timeline .span').length"), 1);
    assert_eq!(b.js("!document.getElementById('curve').hasAttribute('hidden')"), true);
    assert_eq!(b.js("document.querySelectorAll('#scores li.score').length"), 5);
    assert_eq!(b.js("document.getElementById('answer-notes').hidden"), true);
    b.wait_for(
        "[...document.querySelectorAll('#thumbs img.thumb')].every(i => i.complete && i.naturalWidth > 0)",
        "the moment thumbnails to load",
        30,
    );

    // Clicking a moment seeks the player there (the last one: away from the start).
    let last = *got.last().unwrap();
    b.click("#timeline button.moment", 3);
    b.wait_for(
        &format!("Math.abs(window.gcgViewer.currentTime() - {last}) < 0.05"),
        "the player at the clicked moment",
        20,
    );
    // The real <video> element (not the frame player it falls back to) is there.
    b.wait_for(
        &format!(
            "(() => {{ const p = document.getElementById('player'); return p && !p.hidden && p.readyState >= 1 \
             && !p.seeking && Math.abs(p.currentTime - {last}) < 0.1; }})()"
        ),
        "the <video> element at the clicked moment",
        20,
    );
    let player = b.js("document.getElementById('player').currentTime");
    eprintln!("<video> currentTime after the click: {player} (moment {last} s)");

    // The question is listed in the history.
    b.wait_for(
        &format!(
            "document.getElementById('history').textContent.includes({})",
            serde_json::to_string(question).unwrap()
        ),
        "the question in the history",
        10,
    );

    // The whole page in one picture: the player, the timeline, p(t), the frames and the answer.
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 1160, "deviceScaleFactor": 1, "mobile": false}),
    );
    b.js("window.scrollTo(0, 0)");
    b.wait_for(
        "(() => { const p = document.getElementById('player'); return !p || p.hidden || !p.seeking; })()",
        "the player to finish seeking",
        20,
    );
    std::thread::sleep(Duration::from_millis(300));
    let png = b.screenshot();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("viewer.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot: {}", out.display());
    if let Some(copy) = std::env::var_os("GCG_SCREENSHOT") {
        std::fs::write(&copy, &png).unwrap();
    }
    assert!(png.len() > 10_000, "a blank screenshot? {} bytes", png.len());

    // A video shorter than the model's T: the answer's note is shown under it.
    let short = tmp.path().join("short.webm");
    webm_of(&demo.join("world/frames").join(&video), &short, &["-frames:v", "2"]);
    let before = b.js("document.querySelectorAll('#videos .video-item').length").as_u64().unwrap();
    b.set_file("#upload", &short);
    b.wait_for(
        &format!("document.querySelectorAll('#videos .video-item').length > {before}"),
        "the short upload in the list",
        60,
    );
    b.wait_for(
        &format!("{current} && {current}.dataset.id !== {}", id),
        "the short upload selected",
        30,
    );
    b.click("#ask", 0);
    b.wait_for("!document.getElementById('answer-notes').hidden", "the answer's note", 60);
    let note = b.js("document.getElementById('answer-notes').textContent");
    assert!(note.as_str().unwrap().contains("2 distinct frames"), "{note}");
}
