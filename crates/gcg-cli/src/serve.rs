//! `gcg serve`: the HTTP API and the web viewer of grounded answers.
//!
//! ```text
//! clients ─▶ axum (tokio) ─▶ bounded queue (--queue; full: 503) ─▶ one worker thread with the
//!                                                                  model: prepares videos, answers
//!                                                                  queued questions in batches
//! ```
//!
//! API: `GET /api/health`; `GET /api/videos`; `POST /api/videos` (multipart, field `video`) → 201
//! with the video; `POST /api/videos/{id}/ask` `{"question", "options"?}` → the object of `gcg ask
//! --json`; `GET /api/videos/{id}/frames/{i}` → JPEG; `GET /api/videos/{id}/media` → the uploaded
//! file (HTTP ranges, for the player). The viewer (`assets/viewer/`) is served at `/`.
//!
//! Uploads are streamed to disk (never held in memory) under `--data`, refused past
//! `--max-upload-mb` (413); the data folder is kept under `--data-cap-mb` by evicting the least
//! recently used uploads. Errors are JSON `{"error": "..."}` with 400 (bad input), 404 (unknown
//! video), 413, 503 (queue full) or 500. SIGINT/SIGTERM stop accepting, finish what was accepted
//! (for at most `--shutdown-grace`; a second signal stops at once) and exit. Connections are
//! served by hyper with a timer: a request's head within `--header-timeout`, at most
//! `--max-connections` open.

use crate::ask_args::{demo_of_run, AskModelArgs};
use anyhow::{anyhow, ensure, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use gcg::ask::{Asker, FrameReader, GroundedAnswer, PreparedVideo, Question};
use gcg::features::extract::VideoFrames;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: AskModelArgs,
    /// Address to listen on (loopback unless told otherwise; port 0: any free port, printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Largest accepted upload, MiB (larger: 413).
    #[arg(long, default_value_t = 512)]
    pub max_upload_mb: u64,
    /// Requests waiting for the model at most (more: 503).
    #[arg(long, default_value_t = 32)]
    pub queue: usize,
    /// Questions answered together at most.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Where uploaded videos, their frames and (unless --cache says otherwise) their features
    /// live (default: ~/.cache/gcg/serve, or serve/ beside $GCG_CACHE).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Size cap of the data folder, MiB (the least recently used uploads are evicted).
    #[arg(long, default_value_t = 4096)]
    pub data_cap_mb: u64,
    /// Gallery videos offered from the demo's test split (a demo run only).
    #[arg(long, default_value_t = 12)]
    pub gallery: usize,
    /// Seconds a client has to send a request's line and headers, and that a kept-alive
    /// connection may wait idle for its next request; then the connection is closed.
    #[arg(long, default_value_t = 30)]
    pub header_timeout: u64,
    /// Largest video frame decoded, megapixels (width × height / 10⁶; larger: 413). The T
    /// sampled frames are held while decoded: 32 frames of 9 MP take 0.9 GB.
    #[arg(long, default_value_t = 9.0)]
    pub max_frame_megapixels: f64,
    /// Open connections at most (more: 503 and closed at once).
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a response may wait for a client that stopped reading it (a video streamed to a
    /// player that went away); then the connection is closed.
    #[arg(long, default_value_t = 60)]
    pub write_timeout: u64,
    /// Seconds a stop (SIGINT/SIGTERM) waits for the requests in progress; a second signal stops
    /// at once.
    #[arg(long, default_value_t = 120)]
    pub shutdown_grace: u64,
}

/// Uploads received at the same time at most (more: 503).
const UPLOADS_AT_ONCE: usize = 2;
/// Longest wait for the next piece of an upload.
const UPLOAD_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The average rate (bytes/s) an upload must keep after its first UPLOAD_READ_TIMEOUT.
const UPLOAD_MIN_RATE: f64 = 16.0 * 1024.0;

/// An upload's file name as the server keeps and lists it: the last part of what the client
/// sent (a path's separators of either kind), at most 255 bytes (cut at a character), "video"
/// when empty.
fn upload_name(sent: Option<&str>) -> String {
    let last = sent.unwrap_or("").rsplit(['/', '\\']).next().unwrap_or("").trim();
    let mut end = last.len().min(255);
    while !last.is_char_boundary(end) {
        end -= 1;
    }
    match &last[..end] {
        "" | "." | ".." => "video".into(),
        name => name.into(),
    }
}

/// One video the server knows: an upload or a gallery video of the demo.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VideoInfo {
    id: String,
    name: String,
    /// The file or frame folder the model reads.
    path: PathBuf,
    duration: Option<f64>,
    frames: usize,
    /// The T sampled frames' times (when prepared).
    #[serde(default)]
    timestamps: Vec<f64>,
    /// A file a browser may play (`/media`).
    playable: bool,
    gallery: bool,
    /// Example questions (gallery videos).
    #[serde(default)]
    questions: Vec<Question>,
    /// Has the model computed its features in this server's life (or the cache)?
    #[serde(skip)]
    prepared: Option<PreparedVideo>,
    /// Bytes under the data folder.
    #[serde(default)]
    bytes: u64,
    #[serde(skip)]
    last_used: Option<SystemTime>,
}

impl VideoInfo {
    /// What clients see: no server paths, no sizes.
    fn public(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("path");
            o.remove("bytes");
            // What preparing it took (`features`: decoding + ViT; 0 when cached).
            if let Some(p) = &self.prepared {
                o.insert("seconds".into(), serde_json::json!(p.seconds));
            }
        }
        v
    }
}

/// Work for the model's thread.
enum Job {
    /// Encode a video's frames (decoded beside the model's thread, with the seconds that took),
    /// or take its cached features (no frames).
    Prepare {
        path: PathBuf,
        id: String,
        hash_seconds: f64,
        frames: Option<(VideoFrames, f64)>,
        reply: oneshot::Sender<Result<PreparedVideo>>,
    },
    Ask {
        video: PreparedVideo,
        question: Question,
        reply: oneshot::Sender<Result<GroundedAnswer>>,
    },
}

struct AppState {
    jobs: mpsc::Sender<Job>,
    /// The model thread is alive (a panic there is caught per job; this turns false only if the
    /// loop itself ends early).
    worker_alive: Arc<std::sync::atomic::AtomicBool>,
    /// Uploads register one at a time (two uploads of the same bytes must not race on their
    /// folder); at most `UPLOADS_AT_ONCE` are received at once.
    register: tokio::sync::Mutex<()>,
    uploads: tokio::sync::Semaphore,
    /// Decodes videos beside the model's thread, one at a time (a long video keeps no question
    /// waiting; its frames are held while decoded).
    reader: FrameReader,
    decoding: Arc<tokio::sync::Semaphore>,
    /// One preparation per registered video at a time (a second request for a video being
    /// prepared waits for it, then finds it prepared).
    preparing: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Longest wait for a question's body.
    body_timeout: std::time::Duration,
    /// The name of the frame folders of this model's frames (`frames-<ask cache key>`): another
    /// model (another T, sampling or demo) never shows this one's pictures.
    frames_name: String,
    videos: Mutex<BTreeMap<String, VideoInfo>>,
    data: PathBuf,
    /// The ask cache the model's features go to.
    cache: PathBuf,
    max_upload: u64,
    data_cap: u64,
    queue: usize,
    health: serde_json::Value,
}

type Shared = Arc<AppState>;

/// An error response: status and message, as `{"error": message}`.
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
    fn internal(e: anyhow::Error) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

pub fn run(a: ServeArgs) -> Result<()> {
    ensure!(a.queue >= 1, "--queue must be at least 1");
    ensure!(a.max_batch >= 1, "--max-batch must be at least 1");
    ensure!(a.max_upload_mb >= 1, "--max-upload-mb must be at least 1");
    ensure!(a.header_timeout >= 1, "--header-timeout must be at least 1 (seconds)");
    ensure!(a.write_timeout >= 1, "--write-timeout must be at least 1 (seconds)");
    ensure!(a.max_connections >= 1, "--max-connections must be at least 1");
    ensure!(
        a.max_frame_megapixels.is_finite() && a.max_frame_megapixels > 0.0,
        "--max-frame-megapixels must be a positive number"
    );
    let (cfg_run, _, _, about) = a.model.resolve(&mut |m| eprintln!("{m}"))?;
    let data = match &a.data {
        Some(d) => d.clone(),
        None => {
            let root = gcg::ask::AskOptions::default_cache_root();
            root.parent().map(|p| p.join("serve")).unwrap_or_else(|| root.join("serve"))
        }
    };
    std::fs::create_dir_all(data.join("videos")).with_context(|| format!("creating the data folder {}", data.display()))?;
    let run_dir = cfg_run.run_dir.clone();
    // The videos' features live with them, under the data folder's cap.
    let mut model_args = a.model.clone();
    if model_args.cache.is_none() {
        model_args.cache = Some(data.join("features"));
    }

    // The model lives on its own thread; it reports once loaded (or why it could not be).
    let (tx, rx) = mpsc::channel::<Job>(a.queue);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(serde_json::Value, PathBuf, FrameReader)>>();
    let max_batch = a.max_batch;
    let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let alive_worker = alive.clone();
    // Set when a stop is forced (its grace spent, or a second signal): the model thread takes no
    // further job from its queue while the process exits.
    let stop_now = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_worker = stop_now.clone();
    // Clients see the run by its folder's name, not where it lies on the server.
    let public_run = run_dir
        .as_ref()
        .or(a.model.config.as_ref())
        .map(|d| (d.display().to_string(), d.file_name().map(|n| n.to_string_lossy().to_string())));
    let worker = std::thread::Builder::new().name("gcg-model".into()).spawn(move || {
        let asker = match model_args.open(&mut |_| {}) {
            Ok((asker, about)) => {
                let about = match &public_run {
                    Some((full, Some(name))) => about.replacen(full, name, 1),
                    _ => about,
                };
                let health = serde_json::json!({
                    "run": about,
                    "mode": asker.cfg.model.mode.name(),
                    "frames": asker.num_frames(),
                    "moments": asker.num_moments(),
                    "checkpoint": model_args.checkpoint.name(),
                    "device": asker.cfg.device.name(),
                });
                let _ = ready_tx.send(Ok((health, asker.cache.clone(), asker.frame_reader())));
                asker
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        model_loop(&asker, rx, max_batch, &stop_worker);
        alive_worker.store(false, std::sync::atomic::Ordering::Relaxed);
    })?;
    let (health, cache, mut reader) = ready_rx.recv().map_err(|_| anyhow!("the model thread stopped while loading"))??;
    reader.max_pixels = Some((a.max_frame_megapixels * 1e6) as u64);

    let mut videos = restore_uploads(&data);
    if let Some(demo) = run_dir.as_deref().and_then(demo_of_run) {
        let t = health["frames"].as_u64().unwrap_or(0) as usize;
        for v in demo_gallery(&demo, a.gallery, t)? {
            videos.insert(v.id.clone(), v);
        }
    }
    let frames_name = format!(
        "frames-{}",
        cache.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
    );
    let state = Arc::new(AppState {
        jobs: tx,
        worker_alive: alive,
        register: tokio::sync::Mutex::new(()),
        uploads: tokio::sync::Semaphore::new(UPLOADS_AT_ONCE),
        reader,
        decoding: Arc::new(tokio::sync::Semaphore::new(1)),
        preparing: Mutex::new(BTreeMap::new()),
        body_timeout: std::time::Duration::from_secs(a.header_timeout),
        frames_name,
        videos: Mutex::new(videos),
        data: data.clone(),
        cache,
        max_upload: a.max_upload_mb * 1024 * 1024,
        data_cap: a.data_cap_mb * 1024 * 1024,
        queue: a.queue,
        health,
    });
    sweep_leftovers(&state);
    evict(&state, "");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let forced = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.addr)
            .await
            .with_context(|| format!("listening on {}", a.addr))?;
        let local = listener.local_addr()?;
        let signals = Signals::install()?;
        eprintln!("gcg serve: {about}");
        eprintln!("data: {}", data.display());
        if !local.ip().is_loopback() {
            eprintln!(
                "warning: listening on {local}, not only on this machine's loopback: anyone who can reach it can upload videos \
                 and ask questions (there is no authentication)"
            );
        }
        // The line tests and scripts wait for.
        println!("listening on http://{local}/");
        let limits = ConnLimits {
            header_timeout: std::time::Duration::from_secs(a.header_timeout),
            write_timeout: std::time::Duration::from_secs(a.write_timeout),
            max_connections: a.max_connections,
            shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
        };
        Ok::<_, anyhow::Error>(serve_connections(listener, router(state), limits, signals).await)
    })?;
    if forced {
        // Nothing more is waited for: decodings and hashing in progress are dropped, and so is
        // the model's job in progress when the process exits (every write to the cache and the
        // data folder is atomic, so none is left half-written).
        stop_now.store(true, std::sync::atomic::Ordering::Relaxed);
        rt.shutdown_background();
    } else {
        // The router (and with it the job sender) is gone: the model thread finishes its queue
        // and ends.
        drop(rt);
        let _ = worker.join();
    }
    eprintln!("gcg serve: stopped");
    Ok(())
}

fn router(state: Shared) -> Router {
    let max_body = state.max_upload as usize + 64 * 1024;
    Router::new()
        .route("/", get(|| asset("index.html")))
        .route("/index.html", get(|| asset("index.html")))
        .route("/app.js", get(|| asset("app.js")))
        .route("/style.css", get(|| asset("style.css")))
        .route("/api/health", get(health))
        .route("/api/videos", get(list_videos).post(upload).layer(DefaultBodyLimit::max(max_body)))
        .route("/api/videos/{id}/ask", post(ask))
        .route("/api/videos/{id}/frames/{i}", get(frame))
        .route("/api/videos/{id}/media", get(media))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such page or API route".into()) })
        .layer(axum::middleware::from_fn(same_origin_only))
        .layer(axum::middleware::from_fn(errors_as_json))
        .with_state(state)
}

/// Every error response in the API's shape, `{"error": "..."}`: the ones axum makes itself (405
/// with an empty body, 413 and 400 rejections of a body or a path in plain text) get their text,
/// or the status's reason, as the message; their other headers (`Allow`, `Content-Range`,
/// `Retry-After`) stay.
async fn errors_as_json(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let r = next.run(req).await;
    let json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if !(r.status().is_client_error() || r.status().is_server_error()) || json {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let text = if text.is_empty() {
        parts.status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let body = serde_json::to_vec(&serde_json::json!({ "error": text })).unwrap_or_default();
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Only this server's own pages and local tools may use it: a request naming another host (DNS
/// rebinding) or posting from another site's page is refused (403), so a web page the user
/// visits cannot upload to, ask or read a server on their loopback.
async fn same_origin_only(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let hostname = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h).trim_matches(['[', ']']);
    let local_name = hostname.parse::<std::net::IpAddr>().is_ok() || hostname == "localhost" || hostname.is_empty();
    if !local_name {
        return ApiError(
            StatusCode::FORBIDDEN,
            format!("host {host:?} is not this server's address (use its IP address or localhost)"),
        )
        .into_response();
    }
    if req.method() != axum::http::Method::GET {
        if let Some(origin) = req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            let same = origin.split_once("://").is_some_and(|(_, rest)| rest.trim_end_matches('/') == host);
            if !same {
                return ApiError(StatusCode::FORBIDDEN, format!("requests from another site ({origin}) are refused")).into_response();
            }
        }
    }
    next.run(req).await
}

/// SIGINT and SIGTERM. The handlers are installed before the server says it listens: a signal
/// sent as soon as it does stops it cleanly instead of killing it.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {},
            _ = self.term.recv() => {},
        }
    }
}

/// What one client may hold: see `ServeArgs`.
struct ConnLimits {
    header_timeout: std::time::Duration,
    write_timeout: std::time::Duration,
    max_connections: usize,
    shutdown_grace: std::time::Duration,
}

/// The accept loop: each connection served by hyper's HTTP/1 with a timer, so a request's head
/// must arrive within `header_timeout` and an idle kept-alive connection is closed after it (axum's
/// `serve` sets no timer: a client that connected and sent nothing, or half a header, held its
/// connection and a file descriptor forever). Past `max_connections` open ones, a new connection
/// gets a 503 and is closed; a connection whose response waits `write_timeout` for a client
/// that stopped reading is closed. On the first signal: stop accepting, let the requests in
/// progress finish (idle connections close) for at most `shutdown_grace`; a second signal stops
/// at once. True when the stop was forced (grace spent, second signal).
async fn serve_connections(listener: tokio::net::TcpListener, app: Router, limits: ConnLimits, mut signals: Signals) -> bool {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // neither ends the server.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = signals.next() => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(stream, limits.max_connections));
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let io = WatchedIo::new(stream);
        let stalled = io.write_stalled(limits.write_timeout);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            tokio::select! {
                // A client that goes away mid-request is no error of the server's.
                _ = conn => {},
                _ = stalled => tracing::info!("closed a connection whose client stopped reading its response"),
            }
            drop(permit);
        });
    }
    drop(listener);
    eprintln!("gcg serve: shutting down (finishing the requests in progress)");
    let busy = limits.max_connections - open.available_permits();
    tokio::select! {
        _ = graceful.shutdown() => false,
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            eprintln!(
                "gcg serve: requests still in progress after {} s (--shutdown-grace); stopping",
                limits.shutdown_grace.as_secs()
            );
            true
        }
        _ = signals.next() => {
            eprintln!("gcg serve: a second signal; stopping ({busy} connections were open)");
            true
        }
    }
}

/// A connection's socket that notes since when a write has waited for the client to read.
struct WatchedIo {
    io: tokio::net::TcpStream,
    /// Milliseconds after `t0` (+ 1) when the pending write began; 0: none pending.
    blocked: Arc<std::sync::atomic::AtomicU64>,
    t0: std::time::Instant,
}

impl WatchedIo {
    fn new(io: tokio::net::TcpStream) -> Self {
        Self {
            io,
            blocked: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            t0: std::time::Instant::now(),
        }
    }

    /// Resolves once a write has waited longer than `limit`.
    fn write_stalled(&self, limit: std::time::Duration) -> impl std::future::Future<Output = ()> {
        let (blocked, t0) = (self.blocked.clone(), self.t0);
        async move {
            let tick = (limit / 4).clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(5));
            loop {
                tokio::time::sleep(tick).await;
                let since = blocked.load(std::sync::atomic::Ordering::Relaxed);
                if since != 0 && t0.elapsed().as_millis() as u64 + 1 - since > limit.as_millis() as u64 {
                    return;
                }
            }
        }
    }

    fn note<T>(&self, r: &std::task::Poll<T>) {
        use std::sync::atomic::Ordering::Relaxed;
        if r.is_pending() {
            if self.blocked.load(Relaxed) == 0 {
                self.blocked.store(self.t0.elapsed().as_millis() as u64 + 1, Relaxed);
            }
        } else {
            self.blocked.store(0, Relaxed);
        }
    }
}

impl tokio::io::AsyncRead for WatchedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(&r);
        r
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.note(&r);
        r
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A 503 for a connection past `--max-connections`, then closed.
async fn refuse_connection(mut stream: tokio::net::TcpStream, max: usize) {
    let body =
        serde_json::json!({ "error": format!("the server has {max} connections open (--max-connections); retry shortly") }).to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes (or the deadline): closing with unread
        // input would reset the connection, and the client could lose the 503 before reading it.
        let mut sink = [0u8; 4096];
        while tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The model's loop: prepare videos one at a time; answer the questions waiting for one video
/// together (up to `max_batch`).
fn model_loop(asker: &Asker, mut rx: mpsc::Receiver<Job>, max_batch: usize, stop_now: &std::sync::atomic::AtomicBool) {
    // Nothing trains in a server: one no-grad scope for its life, so a bf16 model casts its f32
    // Q-Former weights to bf16 once, not per request (gcg::nn::cast::cast_weight).
    let _casts_kept = gcg::nn::no_grad();
    let mut pending: Option<Job> = None;
    loop {
        if stop_now.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let job = match pending.take() {
            Some(j) => j,
            None => match rx.blocking_recv() {
                Some(j) => j,
                None => return,
            },
        };
        match job {
            // Nobody waits for it any more (the client went away): skipped.
            Job::Prepare { reply, .. } if reply.is_closed() => {}
            Job::Ask { reply, .. } if reply.is_closed() => {}
            Job::Prepare {
                path,
                id,
                hash_seconds,
                frames,
                reply,
            } => {
                let r = guarded(|| match frames {
                    Some((frames, decode_s)) => asker.prepare_frames(&path, id, hash_seconds, frames, decode_s),
                    // Cached (or, had it left the cache since, decoded here).
                    None => asker.prepare_with_id(&path, id, hash_seconds),
                });
                let _ = reply.send(r);
            }
            Job::Ask { video, question, reply } => {
                // Each request keeps what preparing its video cost it (`hash`, `features`: 0 for
                // one that found it prepared), whichever request's video the batch reads.
                let mut batch = vec![(question, reply, video.seconds.clone())];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(Job::Ask { reply, .. }) if reply.is_closed() => {}
                        Ok(Job::Ask { video: v, question, reply }) if v.id == video.id => batch.push((question, reply, v.seconds)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let questions: Vec<Question> = batch.iter().map(|(q, _, _)| q.clone()).collect();
                let own = |mut a: GroundedAnswer, seconds: BTreeMap<String, f64>| {
                    a.seconds.extend(seconds);
                    a
                };
                match guarded(|| asker.ask(&video, &questions)) {
                    Ok(answers) => {
                        for ((_, reply, seconds), a) in batch.into_iter().zip(answers) {
                            let _ = reply.send(Ok(own(a, seconds)));
                        }
                    }
                    // One question's failure is not the others': each alone.
                    Err(_) if batch.len() > 1 => {
                        for (q, reply, seconds) in batch {
                            let r = guarded(|| asker.ask(&video, std::slice::from_ref(&q))).map(|mut a| own(a.remove(0), seconds));
                            let _ = reply.send(r);
                        }
                    }
                    Err(e) => {
                        for (_, reply, _) in batch {
                            let _ = reply.send(Err(anyhow!("{e:#}")));
                        }
                    }
                }
            }
        }
    }
}

/// `f`, with a panic turned into an error (the model thread goes on).
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(anyhow!("the model failed on this request (a bug: please report it): {msg}"))
    })
}

/// Queue a job; a full queue is 503.
fn submit(state: &AppState, job: Job) -> ApiResult<()> {
    state.jobs.try_send(job).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the model's queue is full ({} requests waiting); retry shortly", state.queue),
        ),
        mpsc::error::TrySendError::Closed(_) => ApiError(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down".into()),
    })
}

async fn asset(name: &str) -> Response {
    let (body, mime): (&'static str, &str) = match name {
        "index.html" => (include_str!("../assets/viewer/index.html"), "text/html; charset=utf-8"),
        "app.js" => (include_str!("../assets/viewer/app.js"), "application/javascript; charset=utf-8"),
        _ => (include_str!("../assets/viewer/style.css"), "text/css; charset=utf-8"),
    };
    ([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn health(State(s): State<Shared>) -> Response {
    if !s.worker_alive.load(std::sync::atomic::Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "down", "error": "the model thread stopped", "model": s.health })),
        )
            .into_response();
    }
    Json(serde_json::json!({ "status": "ok", "model": s.health })).into_response()
}

async fn list_videos(State(s): State<Shared>) -> Json<serde_json::Value> {
    let videos = s.videos.lock().unwrap();
    let mut list: Vec<&VideoInfo> = videos.values().collect();
    // Uploads first (newest first), then the gallery in its order.
    list.sort_by_key(|v| (v.gallery, std::cmp::Reverse(v.last_used), v.name.clone()));
    let list: Vec<serde_json::Value> = list.iter().map(|v| v.public()).collect();
    Json(serde_json::json!({ "videos": list }))
}

/// The folder of an upload under the data folder.
fn video_dir(data: &Path, id: &str) -> PathBuf {
    data.join("videos").join(id)
}

fn frames_dir(s: &AppState, id: &str) -> PathBuf {
    video_dir(&s.data, id).join(&s.frames_name)
}

/// Video ids are content ids or demo video ids: letters, digits, `-`, `_`.
fn check_id(id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > 100 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no video {id:?}")));
    }
    Ok(())
}

/// A file removed when dropped, unless kept: an upload's temporary file on every early return.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("a kept temporary file is not used again")
    }
    fn keep(mut self) -> PathBuf {
        self.0.take().expect("kept once")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn upload(State(s): State<Shared>, mp: Result<Multipart, axum::extract::multipart::MultipartRejection>) -> ApiResult<Response> {
    let mp = mp.map_err(|e| {
        ApiError::bad(format!(
            "an upload is a multipart/form-data POST with the video in the field `video` ({})",
            e.body_text()
        ))
    })?;
    let Ok(_permit) = s.uploads.try_acquire() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{UPLOADS_AT_ONCE} uploads are already being received; retry shortly"),
        ));
    };
    // The rest runs to its end even if the client goes away (nothing is left half done).
    let state = s.clone();
    tokio::spawn(async move { receive_upload(&state, mp).await })
        .await
        .map_err(|e| ApiError::internal(e.into()))?
}

async fn receive_upload(s: &Shared, mut mp: Multipart) -> ApiResult<Response> {
    let tmp_dir = s.data.join("incoming");
    tokio::fs::create_dir_all(&tmp_dir)
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    let mut saved: Option<(TempFile, String, u64)> = None;
    while let Some(mut field) = mp
        .next_field()
        .await
        .map_err(|e| upload_error(e.status(), e.body_text(), s.max_upload))?
    {
        if field.name() != Some("video") {
            continue;
        }
        // The client's file name as shown to clients: its last part (browsers send only that,
        // curl may send a path), at most 255 bytes (a name is stored and listed to everyone).
        let name = upload_name(field.file_name());
        let ext = Path::new(&name)
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .filter(|e| e.len() <= 8 && e.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or_else(|| "bin".into());
        let tmp = TempFile(Some(tmp_dir.join(format!("{}-{}.{ext}", std::process::id(), unique()))));
        let mut f = tokio::fs::File::create(tmp.path())
            .await
            .map_err(|e| ApiError::internal(e.into()))?;
        let mut n: u64 = 0;
        let started = std::time::Instant::now();
        loop {
            // A trickle (a byte now and then, each within the stall timeout) would hold one of
            // the few upload slots as long as it likes: past the timeout an upload must keep up
            // an average of UPLOAD_MIN_RATE.
            let secs = started.elapsed().as_secs_f64();
            if secs > UPLOAD_READ_TIMEOUT.as_secs_f64() && (n as f64) < secs * UPLOAD_MIN_RATE {
                return Err(ApiError(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the upload is too slow: {n} bytes in {secs:.0} s (at least {} KiB/s after the first {} s)",
                        UPLOAD_MIN_RATE as u64 / 1024,
                        UPLOAD_READ_TIMEOUT.as_secs()
                    ),
                ));
            }
            let chunk = match tokio::time::timeout(UPLOAD_READ_TIMEOUT, field.chunk()).await {
                Err(_) => {
                    return Err(ApiError(
                        StatusCode::REQUEST_TIMEOUT,
                        format!("the upload stalled for {} s", UPLOAD_READ_TIMEOUT.as_secs()),
                    ))
                }
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => return Err(upload_error(e.status(), e.body_text(), s.max_upload)),
            };
            n += chunk.len() as u64;
            if n > s.max_upload {
                return Err(too_large(s.max_upload));
            }
            f.write_all(&chunk).await.map_err(|e| ApiError::internal(e.into()))?;
        }
        f.sync_all().await.map_err(|e| ApiError::internal(e.into()))?;
        saved = Some((tmp, name, n));
        break;
    }
    let Some((tmp, name, bytes)) = saved else {
        return Err(ApiError::bad("no file in the form field `video` (multipart/form-data)"));
    };
    if bytes == 0 {
        return Err(ApiError::bad(format!("{name}: the file is empty")));
    }
    let v = register_upload(s, tmp, &name, bytes).await?;
    Ok((StatusCode::CREATED, Json(v.public())).into_response())
}

fn too_large(max: u64) -> ApiError {
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the video is larger than this server accepts ({} MiB; --max-upload-mb)",
            max / (1024 * 1024)
        ),
    )
}

fn upload_error(status: StatusCode, text: String, max: u64) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(max)
    } else {
        ApiError(status, format!("reading the upload: {text}"))
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Moves an uploaded file to its content id's folder, has the model prepare it (a file that
/// cannot be decoded is 400) and registers it. One registration at a time: two uploads of the
/// same bytes never race on their folder.
async fn register_upload(s: &Shared, tmp: TempFile, name: &str, bytes: u64) -> ApiResult<VideoInfo> {
    let tmp_path = tmp.path().to_path_buf();
    let t0 = std::time::Instant::now();
    let id = tokio::task::spawn_blocking(move || gcg::ask::content_id(&tmp_path))
        .await
        .map_err(|e| ApiError::internal(e.into()))?
        .map_err(ApiError::internal)?;
    let hash_s = t0.elapsed().as_secs_f64();
    let _one_at_a_time = s.register.lock().await;
    if touch(s, &id).is_some() {
        return reupload(s, &id, tmp, name, hash_s).await;
    }
    let dir = video_dir(&s.data, &id);
    // A folder of this id that is not registered is a failed earlier attempt: replaced.
    let _ = tokio::fs::remove_dir_all(&dir).await;
    tokio::fs::create_dir_all(&dir).await.map_err(|e| ApiError::internal(e.into()))?;
    let ext = tmp.path().extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_default();
    let path = dir.join(format!("video.{ext}"));
    tokio::fs::rename(tmp.path(), &path)
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    let _ = tmp.keep();
    let registered = async {
        let prepared = prepare(s, &path, Some((id.clone(), hash_s)), &frames_dir(s, &id))
            .await
            .map_err(|e| match e {
                // The client knows its file by its name, not by where the server put it.
                ApiError(StatusCode::BAD_REQUEST, msg) => {
                    let msg = msg.replace(&path.display().to_string(), name);
                    ApiError::bad(format!("{name} could not be read as a video: {msg}"))
                }
                ApiError(StatusCode::PAYLOAD_TOO_LARGE, msg) => ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{} (--max-frame-megapixels)", msg.replace(&path.display().to_string(), name)),
                ),
                other => other,
            })?;
        let playable = playable_extension(&ext);
        let v = VideoInfo {
            id: id.clone(),
            name: name.to_string(),
            path: path.clone(),
            duration: prepared.duration,
            frames: prepared.num_frames,
            timestamps: prepared.timestamps.clone(),
            playable,
            gallery: false,
            questions: vec![],
            prepared: Some(prepared),
            bytes: bytes + dir_size(&frames_dir(s, &id)) + gcg::ask::cached_bytes(&s.cache, &id).unwrap_or(0),
            last_used: Some(SystemTime::now()),
        };
        let info = serde_json::to_vec_pretty(&v).map_err(|e| ApiError::internal(e.into()))?;
        let info_path = dir.join("info.json");
        tokio::task::spawn_blocking(move || gcg::util::write_atomic(&info_path, &info))
            .await
            .map_err(|e| ApiError::internal(e.into()))?
            .map_err(ApiError::internal)?;
        Ok::<_, ApiError>(v)
    }
    .await;
    let v = match registered {
        Ok(v) => v,
        Err(e) => {
            // Nothing of a failed upload stays: its folder, and features the model may have cached.
            let _ = tokio::fs::remove_dir_all(&dir).await;
            let cache = s.cache.clone();
            let gone = id.clone();
            let _ = tokio::task::spawn_blocking(move || gcg::ask::forget(&cache, &[gone.as_str()])).await;
            return Err(e);
        }
    };
    s.videos.lock().unwrap().insert(id.clone(), v.clone());
    let state = s.clone();
    let keep = id.clone();
    tokio::task::spawn_blocking(move || evict(&state, &keep))
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    Ok(v)
}

/// A known video uploaded again (the same bytes): its entry takes this upload's name, and a file
/// stored unplayable (no usable extension) takes this one's when that one plays in a browser;
/// the answer says that nothing was computed (`features` 0, this upload's hashing time).
async fn reupload(s: &Shared, id: &str, tmp: TempFile, name: &str, hash_s: f64) -> ApiResult<VideoInfo> {
    let ext = tmp.path().extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_default();
    // Its file may be replaced below: not while a request prepares the video from it.
    let gate = s.preparing.lock().unwrap().entry(id.to_string()).or_default().clone();
    let _not_while_prepared = gate.lock().await;
    let old = s.videos.lock().unwrap().get(id).cloned();
    let Some(mut v) = old else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("video {id} was evicted while it was uploaded again"),
        ));
    };
    if v.gallery {
        return Ok(v); // a gallery video keeps its name (the temporary file goes with `tmp`)
    }
    v.name = name.to_string();
    if !v.playable && playable_extension(&ext) {
        let path = video_dir(&s.data, id).join(format!("video.{ext}"));
        tokio::fs::rename(tmp.path(), &path)
            .await
            .map_err(|e| ApiError::internal(e.into()))?;
        let _ = tmp.keep();
        if v.path != path {
            let _ = tokio::fs::remove_file(&v.path).await;
        }
        v.path = path.clone();
        v.playable = true;
        if let Some(p) = &mut v.prepared {
            p.path = path;
        }
    }
    let info = serde_json::to_vec_pretty(&v).map_err(|e| ApiError::internal(e.into()))?;
    let info_path = video_dir(&s.data, id).join("info.json");
    tokio::task::spawn_blocking(move || gcg::util::write_atomic(&info_path, &info))
        .await
        .map_err(|e| ApiError::internal(e.into()))?
        .map_err(ApiError::internal)?;
    if let Some(e) = s.videos.lock().unwrap().get_mut(id) {
        e.name = v.name.clone();
        e.path = v.path.clone();
        e.playable = v.playable;
        e.prepared = v.prepared.clone();
    }
    if let Some(p) = &mut v.prepared {
        p.cached = true;
        p.seconds.insert("hash".into(), hash_s);
        p.seconds.insert("features".into(), 0.0);
    }
    Ok(v)
}

/// A file extension browsers play (`/media`).
fn playable_extension(ext: &str) -> bool {
    matches!(ext, "mp4" | "m4v" | "webm" | "ogv" | "ogg" | "mov")
}

/// The known video `id`, marked as just used.
fn touch(s: &AppState, id: &str) -> Option<VideoInfo> {
    let mut videos = s.videos.lock().unwrap();
    let v = videos.get_mut(id)?;
    if !v.gallery {
        // The gallery keeps its order; uploads are evicted least recently used first.
        v.last_used = Some(SystemTime::now());
    }
    Some(v.clone())
}

/// Keep the uploads (files, frames, features) under the data cap: remove the least recently used
/// ones (never `keep`), and their features from the ask cache unless another video shares them.
fn evict(s: &AppState, keep: &str) {
    let evicted: Vec<String> = {
        let mut videos = s.videos.lock().unwrap();
        let mut evicted = Vec::new();
        loop {
            let total: u64 = videos.values().filter(|v| !v.gallery).map(|v| v.bytes).sum();
            if total <= s.data_cap {
                break;
            }
            let Some(oldest) = videos
                .values()
                .filter(|v| !v.gallery && v.id != keep)
                .min_by_key(|v| v.last_used)
                .map(|v| v.id.clone())
            else {
                break;
            };
            videos.remove(&oldest);
            evicted.push(oldest);
        }
        // Features still used by a remaining video (the same content) stay.
        evicted.retain(|id| !videos.values().any(|v| v.prepared.as_ref().is_some_and(|p| &p.id == id)));
        evicted
    };
    if evicted.is_empty() {
        return;
    }
    for id in &evicted {
        let _ = std::fs::remove_dir_all(video_dir(&s.data, id));
    }
    let ids: Vec<&str> = evicted.iter().map(String::as_str).collect();
    match gcg::ask::forget(&s.cache, &ids) {
        Ok(freed) => tracing::info!(
            "evicted {} uploads ({} MiB of features; data cap {} MiB)",
            ids.len(),
            freed / (1024 * 1024),
            s.data_cap / (1024 * 1024)
        ),
        Err(e) => tracing::warn!("evicting {ids:?} from the ask cache: {e:#}"),
    }
}

/// Prepares a registered video not prepared in this server's life (a gallery video, a restored
/// upload) and records what the model found — T, frame times, duration — in its entry.
async fn prepare_registered(s: &AppState, id: &str) -> ApiResult<PreparedVideo> {
    let gate = s.preparing.lock().unwrap().entry(id.to_string()).or_default().clone();
    let _one_at_a_time = gate.lock().await;
    // The entry as it is now (prepared by the request this one waited for, its file replaced by
    // a re-upload, or evicted).
    let now = s.videos.lock().unwrap().get(id).map(|e| (e.prepared.clone(), e.path.clone()));
    let path = match now {
        None => return Err(ApiError(StatusCode::NOT_FOUND, format!("video {id} was evicted (--data-cap-mb)"))),
        Some((Some(mut p), _)) if frames_dir(s, id).join("frame_0.jpg").exists() => {
            // Nothing spent on it here.
            p.cached = true;
            p.seconds.insert("hash".into(), 0.0);
            p.seconds.insert("features".into(), 0.0);
            return Ok(p);
        }
        Some((_, path)) => path,
    };
    let p = prepare(s, &path, None, &frames_dir(s, id)).await?;
    if let Some(e) = s.videos.lock().unwrap().get_mut(id) {
        e.frames = p.num_frames;
        e.timestamps = p.timestamps.clone();
        e.duration = p.duration;
        e.prepared = Some(p.clone());
    }
    Ok(p)
}

/// Decodes a video (here, one at a time, beside the model's thread) unless its features are
/// cached, writing its sampled frames' pictures to `frames_dir` if they are not there, and has
/// the model encode it. `known`: its content id and the seconds hashing it took (an upload).
async fn prepare(s: &AppState, path: &Path, known: Option<(String, f64)>, frames_dir: &Path) -> ApiResult<PreparedVideo> {
    let decoded = {
        // The permit goes with the decoding (which runs on even if this request's client goes
        // away and its handler is dropped).
        let permit = s.decoding.clone().acquire_owned().await.map_err(|e| ApiError::internal(e.into()))?;
        let (reader, cache, path, frames_dir) = (s.reader.clone(), s.cache.clone(), path.to_path_buf(), frames_dir.to_path_buf());
        tokio::task::spawn_blocking(move || -> Result<(String, f64, Option<(VideoFrames, f64)>)> {
            let _one_at_a_time = permit;
            let (id, hash_s) = match known {
                Some(k) => k,
                None => {
                    let t0 = std::time::Instant::now();
                    let id = gcg::ask::content_id(&path)?;
                    (id, t0.elapsed().as_secs_f64())
                }
            };
            let pictures = (!frames_dir.join("frame_0.jpg").exists()).then_some(frames_dir.as_path());
            let cached = gcg::ask::in_cache(&cache, &id)?;
            if cached && pictures.is_none() {
                return Ok((id, hash_s, None));
            }
            let t0 = std::time::Instant::now();
            let frames = reader.read(&path, pictures)?;
            Ok((id, hash_s, (!cached).then(|| (frames, t0.elapsed().as_secs_f64()))))
        })
        .await
        .map_err(|e| ApiError::internal(e.into()))?
        .map_err(prepare_error)?
    };
    let (id, hash_seconds, frames) = decoded;
    let (reply, rx) = oneshot::channel();
    submit(
        s,
        Job::Prepare {
            path: path.to_path_buf(),
            id,
            hash_seconds,
            frames,
            reply,
        },
    )?;
    rx.await
        .map_err(|_| ApiError::internal(anyhow!("the model thread stopped")))?
        .map_err(prepare_error)
}

/// A video that cannot be decoded is the request's fault (400); anything else the server's.
fn prepare_error(e: anyhow::Error) -> ApiError {
    if e.chain().any(|c| c.downcast_ref::<gcg::ask::FramesTooLarge>().is_some()) {
        ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("{e:#}"))
    } else if e.chain().any(|c| c.downcast_ref::<gcg::ask::UnreadableVideo>().is_some()) {
        ApiError::bad(format!("{e:#}"))
    } else {
        ApiError::internal(e)
    }
}

/// Largest question body (JSON).
const ASK_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// A request's body, read within `timeout` (408 past it) and up to `limit` bytes (413 past it).
async fn read_body(body: axum::body::Body, limit: usize, timeout: std::time::Duration) -> ApiResult<Bytes> {
    use http_body_util::BodyExt;
    match tokio::time::timeout(timeout, http_body_util::Limited::new(body, limit).collect()).await {
        Err(_) => Err(ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request's body did not arrive within {} s", timeout.as_secs()),
        )),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request's body is larger than {} MiB", limit / (1024 * 1024)),
        )),
        Ok(Err(e)) => Err(ApiError::bad(format!("reading the request's body: {e}"))),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
}

async fn ask(State(s): State<Shared>, UrlPath(id): UrlPath<String>, body: axum::body::Body) -> ApiResult<Json<GroundedAnswer>> {
    check_id(&id)?;
    let body = read_body(body, ASK_BODY_LIMIT, s.body_timeout).await?;
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::bad(
            "the body must be one JSON object {\"question\": \"...\", \"options\": [...]}, not an array (one question a request)",
        ));
    }
    let q: Question = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(format!(
            "the body must be JSON {{\"question\": \"...\", \"options\": [\"...\", ...]}}: {e}"
        ))
    })?;
    q.validate().map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let v = touch(&s, &id).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no video {id:?} (upload it first)")))?;
    let prepared = match v.prepared {
        // Prepared before: its features are cached, this answer spends nothing on them.
        Some(mut p) => {
            p.cached = true;
            p.seconds.insert("hash".into(), 0.0);
            p.seconds.insert("features".into(), 0.0);
            p
        }
        None => prepare_registered(&s, &id).await?,
    };
    let (reply, rx) = oneshot::channel();
    submit(
        &s,
        Job::Ask {
            video: prepared,
            question: q,
            reply,
        },
    )?;
    let mut a = rx
        .await
        .map_err(|_| ApiError::internal(anyhow!("the model thread stopped")))?
        .map_err(|e| {
            // Evicted (the data cap) while its question waited: gone, not a server fault.
            if !s.videos.lock().unwrap().contains_key(&id) {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("video {id} was evicted (--data-cap-mb) while this question waited"),
                )
            } else {
                ApiError::internal(e)
            }
        })?;
    // The viewer knows the video by the server's id (the content id for uploads).
    a.video = id;
    Ok(Json(a))
}

async fn frame(State(s): State<Shared>, UrlPath((id, i)): UrlPath<(String, String)>) -> ApiResult<Response> {
    check_id(&id)?;
    let v = touch(&s, &id).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no video {id:?}")))?;
    let i: usize = i.parse().map_err(|_| {
        ApiError::bad(format!(
            "frame index {i:?}: a whole number from 0 to {} (the video's sampled frames)",
            v.frames.saturating_sub(1)
        ))
    })?;
    if i >= v.frames {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("video {id} has {} sampled frames; there is no frame {i}", v.frames),
        ));
    }
    let dir = frames_dir(&s, &id);
    if !dir.join("frame_0.jpg").exists() {
        let p = prepare_registered(&s, &id).await?;
        if i >= p.num_frames {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("video {id} has {} sampled frames; there is no frame {i}", p.num_frames),
            ));
        }
    }
    let bytes = tokio::fs::read(dir.join(format!("frame_{i}.jpg")))
        .await
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, format!("frame {i} of {id}: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "max-age=3600")],
        bytes,
    )
        .into_response())
}

/// The largest range answered at once (a player asks for more as it plays).
const RANGE_CHUNK: u64 = 8 * 1024 * 1024;

/// What a `Range` header asks of a file.
#[derive(Debug, PartialEq)]
enum Range {
    /// No usable range (absent or malformed): the whole file, 200.
    Whole,
    /// Bytes [start, end], inclusive: 206.
    Part(u64, u64),
    /// Past the end: 416.
    Unsatisfiable,
}

async fn media(State(s): State<Shared>, UrlPath(id): UrlPath<String>, headers: HeaderMap) -> ApiResult<Response> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    check_id(&id)?;
    let v = touch(&s, &id).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no video {id:?}")))?;
    if !v.playable {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("video {id} is a frame folder or a format a browser does not play; see its frames"),
        ));
    }
    let mime = match v.path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "webm" => "video/webm",
        "ogv" | "ogg" => "video/ogg",
        "mov" => "video/quicktime",
        _ => "video/mp4",
    };
    let mut f = tokio::fs::File::open(&v.path).await.map_err(|e| ApiError::internal(e.into()))?;
    let len = f.metadata().await.map_err(|e| ApiError::internal(e.into()))?.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|h| h.to_str().ok())
        .map_or(Range::Whole, |h| parse_range(h, len));
    let (status, start, n) = match range {
        Range::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response())
        }
        Range::Whole => (StatusCode::OK, 0, len),
        Range::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, (b - a + 1).min(RANGE_CHUNK)),
    };
    f.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    // Streamed: the file is never held in memory.
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(f.take(n)));
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(l) = HeaderValue::from_str(&n.to_string()) {
        h.insert(header::CONTENT_LENGTH, l);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + n - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(r)
}

/// A `Range` header (`bytes=a-b`, `bytes=a-`, `bytes=-n`, or a list of them) against a
/// `len`-byte file. A list is answered as the one range that covers its satisfiable ranges (RFC
/// 9110 lets a server coalesce them; one part, no multipart body); a malformed header is ignored.
fn parse_range(h: &str, len: u64) -> Range {
    let Some(list) = h.strip_prefix("bytes=") else {
        return Range::Whole;
    };
    let mut covered: Option<(u64, u64)> = None;
    for spec in list.split(',') {
        match parse_one_range(spec, len) {
            Range::Whole => return Range::Whole,
            Range::Unsatisfiable => {}
            Range::Part(a, b) => covered = Some(covered.map_or((a, b), |(a0, b0)| (a0.min(a), b0.max(b)))),
        }
    }
    covered.map_or(Range::Unsatisfiable, |(a, b)| Range::Part(a, b))
}

/// One range of a `Range` header's list.
fn parse_one_range(spec: &str, len: u64) -> Range {
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // The last n bytes.
        return match b.parse::<u64>() {
            Ok(0) | Err(_) => Range::Whole,
            Ok(_) if len == 0 => Range::Unsatisfiable,
            Ok(n) => Range::Part(len.saturating_sub(n), len - 1),
        };
    }
    let Ok(start) = a.parse::<u64>() else { return Range::Whole };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e,
            _ => return Range::Whole,
        }
    };
    if start >= len {
        return Range::Unsatisfiable;
    }
    Range::Part(start, end.min(len - 1))
}

/// What a killed or failed server left: partial uploads in `incoming/`, upload folders that
/// were never registered (no `info.json`) with their features, and the temporary files of
/// writes cut short (`.{name}.tmp-{pid}` of a process that is gone) in the data folder and in
/// each upload's folder.
fn sweep_leftovers(s: &AppState) {
    if let Ok(d) = std::fs::read_dir(s.data.join("incoming")) {
        for e in d.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut temps = gcg::util::clear_stale_temps_in(&s.data).unwrap_or_default();
    let Ok(d) = std::fs::read_dir(s.data.join("videos")) else { return };
    let known: std::collections::HashSet<String> = s.videos.lock().unwrap().keys().cloned().collect();
    let mut orphans = Vec::new();
    for e in d.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("sha256-") && !known.contains(&name) && !e.path().join("info.json").exists() {
            let _ = std::fs::remove_dir_all(e.path());
            orphans.push(name);
        } else if e.path().is_dir() {
            temps.extend(gcg::util::clear_stale_temps_in(&e.path()).unwrap_or_default());
        }
    }
    if !temps.is_empty() {
        tracing::info!("removed {} temporary files left by writes cut short", temps.len());
    }
    if !orphans.is_empty() {
        let ids: Vec<&str> = orphans.iter().map(String::as_str).collect();
        let _ = gcg::ask::forget(&s.cache, &ids);
        tracing::info!("removed {} unfinished uploads left by an earlier server", ids.len());
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_range, upload_name, Range};

    #[test]
    fn an_upload_name_is_its_last_part_and_at_most_255_bytes() {
        assert_eq!(upload_name(Some("../../../../tmp/x/pwned.mp4")), "pwned.mp4");
        assert_eq!(upload_name(Some("C:\\videos\\cat.MOV")), "cat.MOV");
        assert_eq!(upload_name(Some("clip.mp4")), "clip.mp4");
        for empty in [None, Some(""), Some("dir/"), Some(".."), Some("  ")] {
            assert_eq!(upload_name(empty), "video", "{empty:?}");
        }
        let long = format!("{}.mp4", "é".repeat(200));
        let name = upload_name(Some(&long));
        assert!(name.len() <= 255 && long.starts_with(&name), "{} bytes", name.len());
        assert_eq!(upload_name(Some(&"a".repeat(100_000_000))).len(), 255);
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        let len = 1000;
        assert_eq!(parse_range("bytes=0-99", len), Range::Part(0, 99));
        assert_eq!(parse_range("bytes=10-", len), Range::Part(10, 999));
        assert_eq!(parse_range("bytes=990-5000", len), Range::Part(990, 999));
        assert_eq!(parse_range("bytes=-100", len), Range::Part(900, 999));
        assert_eq!(parse_range("bytes=-5000", len), Range::Part(0, 999));
        // A list: the one range covering its satisfiable ranges.
        assert_eq!(parse_range("bytes=0-0,5-9", len), Range::Part(0, 9));
        assert_eq!(parse_range("bytes=500-599, 0-99", len), Range::Part(0, 599));
        assert_eq!(parse_range("bytes=0-99,-100", len), Range::Part(0, 999));
        assert_eq!(parse_range("bytes=2000-,10-19", len), Range::Part(10, 19));
        assert_eq!(parse_range("bytes=2000-,3000-", len), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-9,x-", len), Range::Whole);
        // Past the end: 416.
        assert_eq!(parse_range("bytes=1000-", len), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Range::Unsatisfiable);
        // Malformed or reversed: ignored, the whole file.
        for h in ["bytes=5-3", "bytes=x-", "items=0-5", "bytes=", "bytes=-0", "bytes=-"] {
            assert_eq!(parse_range(h, len), Range::Whole, "{h}");
        }
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Uploads of an earlier server life (their `info.json`); their features are in the ask cache.
fn restore_uploads(data: &Path) -> BTreeMap<String, VideoInfo> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(data.join("videos")) else {
        return out;
    };
    for e in entries.flatten() {
        let info = e.path().join("info.json");
        let Ok(text) = std::fs::read_to_string(&info) else { continue };
        // The record's id is its folder's, and its file is the folder's `video.<ext>`, found
        // there (not the path the record names: a data folder moved, or an edited record, must
        // not make `/media` serve another file).
        let file = std::fs::read_dir(e.path()).ok().and_then(|d| {
            d.flatten()
                .map(|f| f.path())
                .find(|p| p.is_file() && p.file_stem().is_some_and(|s| s == "video") && p.extension().is_some_and(|x| x != "json"))
        });
        match (serde_json::from_str::<VideoInfo>(&text), file) {
            (Ok(mut v), Some(file)) if e.file_name().to_str() == Some(v.id.as_str()) && check_id(&v.id).is_ok() && !v.gallery => {
                let ext = file.extension().map(|x| x.to_string_lossy().to_string()).unwrap_or_default();
                v.playable = playable_extension(&ext);
                v.path = file;
                v.last_used = std::fs::metadata(&info).and_then(|m| m.modified()).ok();
                out.insert(v.id.clone(), v);
            }
            _ => tracing::warn!("{}: not a readable upload record; ignored", info.display()),
        }
    }
    out
}

/// The first `n` test videos of a demo, with their questions as examples.
fn demo_gallery(demo: &Path, n: usize, t: usize) -> Result<Vec<VideoInfo>> {
    let world = demo.join("world");
    let ann = gcg::data::read_annotations(
        gcg::data::Dataset::NextQa,
        &world.join("test.csv"),
        &gcg::data::ReadOptions::default(),
    )?;
    let mut by_video: BTreeMap<String, Vec<Question>> = BTreeMap::new();
    let mut order = Vec::new();
    for s in &ann.samples {
        if !by_video.contains_key(&s.video) {
            order.push(s.video.clone());
        }
        by_video.entry(s.video.clone()).or_default().push(Question {
            question: format!("{}?", s.question),
            options: s.options.clone(),
        });
    }
    let mut out = Vec::new();
    for id in order.into_iter().take(n) {
        let path = world.join("frames").join(&id);
        if !path.is_dir() {
            continue;
        }
        out.push(VideoInfo {
            name: format!("demo {id}"),
            path,
            duration: None,
            frames: t,
            timestamps: vec![],
            playable: false,
            gallery: true,
            questions: by_video.remove(&id).unwrap_or_default(),
            prepared: None,
            bytes: 0,
            last_used: None,
            id,
        });
    }
    Ok(out)
}
