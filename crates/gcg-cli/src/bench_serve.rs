//! `gcg bench serve`: N concurrent clients asking M questions of `gcg serve` (a running server or
//! one this command starts), as JSON: the latency percentiles, requests/s, errors, whether the
//! answers agree, the server's and the client's peak RSS; and what a new video costs (the upload:
//! decoding + ViT, uncached) against the first question about it (features cached).
//!
//! ```text
//! start `gcg serve --addr 127.0.0.1:0` (or --url) ─▶ GET /api/health, /api/videos
//!   ─▶ POST /api/videos (the video; timed)  ─▶ POST …/ask once (timed)
//!   ─▶ N client threads × M asks in total   ─▶ VmHWM of the server ─▶ SIGTERM
//! ```

use crate::ask_args::{demo_of_run, run_dir_or_demo};
use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Args;
use gcg::ask::Question;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ServeBenchArgs {
    /// A running server to measure (e.g. http://127.0.0.1:8080); default: start `gcg serve` on a
    /// free loopback port for the run of --run and stop it afterwards.
    #[arg(long, conflicts_with_all = ["run", "cache"])]
    url: Option<String>,
    /// The run the started server serves (default: the demo's grounding run,
    /// gcg-demo/runs/grounding).
    #[arg(long)]
    run: Option<PathBuf>,
    /// Concurrent clients (threads, each with its own connection).
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    clients: usize,
    /// Questions asked by all the clients together (after the timed first one).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    requests: usize,
    /// The video uploaded and asked about. Default: an mp4 of the first gallery video's frames
    /// (made with ffmpeg) when the run is a demo's; with --url, the first gallery video itself
    /// (not uploaded).
    #[arg(long)]
    video: Option<PathBuf>,
    /// The question asked (default: the first gallery video's first example question).
    #[arg(long)]
    question: Option<String>,
    /// A candidate answer of --question (repeatable; none: open-ended).
    #[arg(long = "option", requires = "question")]
    options: Vec<String>,
    /// The started server's ask cache (default: a new temporary folder, so that the upload is
    /// uncached; give one that already holds the video to time a cached upload).
    #[arg(long)]
    cache: Option<PathBuf>,
}

/// Stops a started server when dropped (an error path): SIGKILL and wait.
struct ServerChild {
    child: Child,
    base: String,
    /// What the server wrote on stderr (read by a thread, so that the pipe never fills).
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl ServerChild {
    /// This executable as `gcg serve --addr 127.0.0.1:0 …`; returns once it prints its address.
    fn start(run: &Path, cache: &Path, data: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the gcg executable to start the server")?;
        let mut child = Command::new(&exe)
            .args(["serve", "--addr", "127.0.0.1:0", "--run"])
            .arg(run)
            .arg("--cache")
            .arg(cache)
            .arg("--data")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} serve", exe.display()))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().context("the server's stderr")?;
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut out = BufReader::new(child.stdout.take().context("the server's stdout")?);
        let mut server = ServerChild {
            child,
            base: String::new(),
            stderr,
            stderr_reader: Some(stderr_reader),
        };
        let mut line = String::new();
        out.read_line(&mut line).context("reading the server's stdout")?;
        let Some(base) = line.trim().strip_prefix("listening on ") else {
            // It ended (or printed something else): its stderr says why.
            if !line.is_empty() {
                let _ = server.child.kill();
            }
            let _ = server.child.wait();
            if let Some(h) = server.stderr_reader.take() {
                let _ = h.join();
            }
            bail!(
                "the server (gcg serve --run {}) did not start: {}",
                run.display(),
                server.stderr.lock().unwrap().trim()
            );
        };
        server.base = base.trim_end_matches('/').to_string();
        // Whatever else it prints on stdout is read and dropped.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
        });
        Ok(server)
    }

    /// The server's peak resident memory (MB), then SIGTERM; did it stop cleanly (within 60 s)?
    fn stop(mut self) -> Result<(Option<f64>, bool)> {
        let rss = peak_rss_mb(&self.child.id().to_string());
        let pid = libc::pid_t::try_from(self.child.id()).context("the server's process id")?;
        // SAFETY: kill(2) on the id of our own child, which has not been waited for yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((rss, status.success()));
            }
            if Instant::now() > deadline {
                eprintln!("the server did not stop within 60 s of SIGTERM; killing it");
                self.child.kill()?;
                self.child.wait()?;
                return Ok((rss, false));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Peak resident memory (Linux `VmHWM`) of a process (`self` or a pid), in MiB.
fn peak_rss_mb(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn new_agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// One HTTP exchange: the status and the body (an error: no response at all).
fn exchange(r: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>, what: &str) -> Result<(u16, String)> {
    let mut r = r.map_err(|e| anyhow!("{what}: {e}"))?;
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .read_to_string()
        .map_err(|e| anyhow!("{what}: reading the response: {e}"))?;
    Ok((status, body))
}

fn get_json(agent: &ureq::Agent, url: &str) -> Result<Value> {
    let (status, body) = exchange(agent.get(url).call(), &format!("GET {url}"))?;
    ensure!(status == 200, "GET {url}: HTTP {status}: {}", body.trim());
    serde_json::from_str(&body).with_context(|| format!("GET {url}: the response is not JSON: {body}"))
}

fn post_ask(agent: &ureq::Agent, url: &str, body: &str) -> Result<(u16, String)> {
    exchange(
        agent.post(url).header("content-type", "application/json").send(body.as_bytes()),
        &format!("POST {url}"),
    )
}

/// POST /api/videos with the file as the multipart field `video`; the server's id of it.
fn upload(agent: &ureq::Agent, base: &str, path: &Path) -> Result<(String, Value)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading the video {}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\r', '\n'], "_"))
        .unwrap_or_else(|| "video".into());
    let boundary = "gcg-bench-serve-boundary-5f0c1d7e";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let url = format!("{base}/api/videos");
    let (status, text) = exchange(
        agent
            .post(&url)
            .header("content-type", format!("multipart/form-data; boundary={boundary}"))
            .send(&body[..]),
        &format!("uploading {} to {url}", path.display()),
    )?;
    ensure!(
        status == 201 || status == 200,
        "uploading {} to {url}: HTTP {status}: {}",
        path.display(),
        text.trim()
    );
    let v: Value = serde_json::from_str(&text).with_context(|| format!("the upload's response is not JSON: {text}"))?;
    let id = v["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the upload's response has no id: {text}"))?;
    Ok((id, v))
}

/// An mp4 (4 frames a second, H.264) of a frame folder `frame_{i}.jpg`, made with ffmpeg.
fn mp4_of_frames(frames: &Path, out: &Path) -> Result<()> {
    let ff = gcg::video::Ffmpeg::from_env();
    let o = Command::new(&ff.ffmpeg)
        .args(["-nostdin", "-loglevel", "error", "-y", "-framerate", "4", "-i"])
        .arg(frames.join("frame_%d.jpg"))
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .arg(gcg::video::ffmpeg::file_url(out))
        .output()
        .with_context(|| format!("running {} (install ffmpeg: apt-get install ffmpeg)", ff.ffmpeg.display()))?;
    ensure!(
        o.status.success(),
        "ffmpeg could not make an mp4 of {}: {}",
        frames.display(),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(())
}

/// The value at quantile `q` of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One timed request of the concurrent phase.
struct Sample {
    index: usize,
    ms: f64,
    /// The answer (index, text) of a 200; else the error text.
    outcome: std::result::Result<(Option<u64>, String), String>,
}

/// The answer's (answer_index, answer) of a 200 body, or why it is not one.
fn answer_of(status: u16, body: &str) -> std::result::Result<(Option<u64>, String), String> {
    if status != 200 {
        let msg = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        return Err(format!("HTTP {status}: {msg}"));
    }
    let v: Value = serde_json::from_str(body).map_err(|e| format!("HTTP 200 with a body that is not JSON ({e}): {body}"))?;
    let text = v["answer"].as_str().ok_or_else(|| format!("HTTP 200 without an answer: {body}"))?;
    Ok((v["answer_index"].as_u64(), text.to_string()))
}

pub fn run(a: ServeBenchArgs) -> Result<()> {
    if let Some(q) = &a.question {
        Question {
            question: q.clone(),
            options: a.options.clone(),
        }
        .validate()
        .context("--question / --option")?;
    }
    let tmp = tempfile::tempdir().context("creating a temporary folder")?;
    let run_dir = match &a.url {
        Some(_) => None,
        None => Some(
            run_dir_or_demo(a.run.as_deref(), None, &mut |m| eprintln!("{m}"))
                .context("gcg bench serve starts a server for a run (or give --url of a running server)")?
                .context("a run directory")?,
        ),
    };
    let server = match &run_dir {
        Some(run) => {
            let cache = a.cache.clone().unwrap_or_else(|| tmp.path().join("cache"));
            eprintln!("starting gcg serve --run {} (cache {})", run.display(), cache.display());
            Some(ServerChild::start(run, &cache, &tmp.path().join("data"))?)
        }
        None => None,
    };
    let base = match (&server, &a.url) {
        (Some(s), _) => s.base.clone(),
        (None, Some(u)) => u.trim_end_matches('/').to_string(),
        (None, None) => unreachable!("a server is started unless --url is given"),
    };
    let result = measure(&a, &base, run_dir.as_deref(), tmp.path());
    let (server_rss, stopped_cleanly) = match server {
        Some(s) => {
            let (rss, clean) = s.stop()?;
            (rss, Some(clean))
        }
        None => (None, None),
    };
    let mut out = result?;
    out["server_peak_rss_mb"] = json!(server_rss);
    out["server_stopped_cleanly"] = json!(stopped_cleanly);
    out["client_peak_rss_mb"] = json!(peak_rss_mb("self"));
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Everything measured against the server at `base`; the JSON report without the peak RSS.
fn measure(a: &ServeBenchArgs, base: &str, run_dir: Option<&Path>, tmp: &Path) -> Result<Value> {
    let agent = new_agent();
    let health = get_json(&agent, &format!("{base}/api/health")).context("is a gcg server running there?")?;
    let list = get_json(&agent, &format!("{base}/api/videos"))?;
    let gallery = list["videos"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["gallery"] == true))
        .cloned();

    // The question: given, or the gallery video's first example.
    let question = match &a.question {
        Some(q) => Question {
            question: q.clone(),
            options: a.options.clone(),
        },
        None => {
            let g = gallery.as_ref().ok_or_else(|| {
                anyhow!("the server has no gallery video (its run is not a demo's) to take a question from: give --question (and --option)")
            })?;
            serde_json::from_value(g["questions"][0].clone()).map_err(|_| {
                anyhow!(
                    "the gallery video {} has no example question: give --question (and --option)",
                    g["id"]
                )
            })?
        }
    };

    // The video: uploaded (timed), or a gallery video asked about directly.
    let demo_frames = gallery.as_ref().and_then(|g| {
        let id = g["id"].as_str()?;
        let frames = demo_of_run(run_dir?)?.join("world").join("frames").join(id);
        frames.join("frame_0.jpg").is_file().then_some(frames)
    });
    let to_upload = match (&a.video, &demo_frames) {
        (Some(v), _) => Some(v.clone()),
        (None, Some(frames)) => {
            let mp4 = tmp.join(format!(
                "{}.mp4",
                frames.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
            ));
            mp4_of_frames(frames, &mp4)?;
            Some(mp4)
        }
        (None, None) => None,
    };
    let (video_id, video_json, upload_s, upload_seconds) = match &to_upload {
        Some(path) => {
            let t = Instant::now();
            let (id, response) = upload(&agent, base, path)?;
            let secs = t.elapsed().as_secs_f64();
            let bytes = std::fs::metadata(path).map(|m| m.len()).ok();
            // A made mp4 is named by the frame folder it was made of (it is removed at the end).
            let (file, made_of) = match &a.video {
                Some(v) => (Some(v.as_path()), None),
                None => (None, demo_frames.as_deref()),
            };
            (
                id.clone(),
                json!({"source": "upload", "file": file, "mp4_of_frames": made_of, "bytes": bytes, "id": id}),
                Some(secs),
                response["seconds"].clone(),
            )
        }
        None => {
            let g = gallery
                .as_ref()
                .ok_or_else(|| anyhow!("the server has no gallery video (its run is not a demo's): give --video PATH to upload"))?;
            let id = g["id"].as_str().context("a gallery video without an id")?.to_string();
            (id.clone(), json!({"source": "gallery", "id": id}), None, Value::Null)
        }
    };
    let ask_url = format!("{base}/api/videos/{video_id}/ask");
    let body = serde_json::to_string(&question)?;

    // The first question about the video: its features are cached now (by the upload).
    let t = Instant::now();
    let (status, text) = post_ask(&agent, &ask_url, &body)?;
    let first_ask_ms = t.elapsed().as_secs_f64() * 1e3;
    let first = answer_of(status, &text).map_err(|e| anyhow!("the first question about {video_id}: {e}"))?;
    let first_json: Value = serde_json::from_str(&text)?;

    // N clients, M questions in all.
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let mut samples: Vec<Sample> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..a.clients.min(a.requests))
            .map(|_| {
                s.spawn(|| {
                    let agent = new_agent();
                    let mut mine = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= a.requests {
                            return mine;
                        }
                        let t = Instant::now();
                        let outcome = match post_ask(&agent, &ask_url, &body) {
                            Ok((status, text)) => answer_of(status, &text),
                            Err(e) => Err(format!("{e:#}")),
                        };
                        mine.push(Sample {
                            index,
                            ms: t.elapsed().as_secs_f64() * 1e3,
                            outcome,
                        });
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    let wall_s = started.elapsed().as_secs_f64();
    ensure!(
        samples.len() == a.requests,
        "{} of the {} requests were made (a client thread panicked)",
        samples.len(),
        a.requests
    );
    samples.sort_by_key(|s| s.index);
    let errors: Vec<&String> = samples.iter().filter_map(|s| s.outcome.as_ref().err()).collect();
    let consistent = samples
        .iter()
        .filter_map(|s| s.outcome.as_ref().ok())
        .all(|ans| ans.0 == first.0 && ans.1 == first.1);
    let mut ms: Vec<f64> = samples.iter().map(|s| s.ms).collect();
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;

    Ok(json!({
        "bench": "serve",
        // A server this bench started (a child process) or the one at --url.
        "server": if a.url.is_some() { json!(base) } else { json!("started") },
        "run": run_dir,
        "model": health["model"],
        "video": video_json,
        "question": question,
        "clients": a.clients,
        "requests": a.requests,
        // The upload: hashing + decoding + ViT (uncached unless --cache held it) + the frames;
        // the server's own seconds of it (`features`: decoding + ViT, uncached).
        "upload_s": upload_s,
        "upload_server_seconds": upload_seconds,
        // The first answer's seconds: from the cached features (`features` 0).
        "first_ask_server_seconds": first_json["seconds"],
        // The first question after the upload (features cached) against the later ones.
        "first_ask_ms": first_ask_ms,
        "answer_index": first.0,
        "answer": first.1,
        "latency_ms": {
            "p50": quantile(&ms, 0.50),
            "p90": quantile(&ms, 0.90),
            "p99": quantile(&ms, 0.99),
            "max": ms[ms.len() - 1],
            "mean": mean,
        },
        "wall_s": wall_s,
        "requests_per_s": a.requests as f64 / wall_s,
        "errors": errors.len(),
        "first_error": errors.first(),
        "consistent": consistent,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[1.0, 2.0], 0.0), 1.0);
    }

    #[test]
    fn answers_and_errors_are_read_from_the_body() {
        assert_eq!(
            answer_of(200, r#"{"answer": "star", "answer_index": 1}"#),
            Ok((Some(1), "star".into()))
        );
        assert_eq!(
            answer_of(200, r#"{"answer": "a star", "answer_index": null}"#),
            Ok((None, "a star".into()))
        );
        assert_eq!(
            answer_of(503, r#"{"error": "the model's queue is full"}"#),
            Err("HTTP 503: the model's queue is full".into())
        );
        assert!(answer_of(200, "not json").unwrap_err().contains("not JSON"));
    }
}
