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
//! and exit.

use crate::ask_args::{demo_of_run, AskModelArgs};
use anyhow::{anyhow, ensure, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use gcg::ask::{Asker, GroundedAnswer, PreparedVideo, Question};
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
        }
        v
    }
}

/// Work for the model's thread.
enum Job {
    Prepare {
        path: PathBuf,
        frames_dir: PathBuf,
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
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(serde_json::Value, PathBuf)>>();
    let max_batch = a.max_batch;
    let worker = std::thread::Builder::new().name("gcg-model".into()).spawn(move || {
        let asker = match model_args.open(&mut |_| {}) {
            Ok((asker, about)) => {
                let health = serde_json::json!({
                    "run": about,
                    "mode": asker.cfg.model.mode.name(),
                    "frames": asker.num_frames(),
                    "moments": asker.num_moments(),
                    "checkpoint": model_args.checkpoint.name(),
                    "device": asker.cfg.device.name(),
                });
                let _ = ready_tx.send(Ok((health, asker.cache.clone())));
                asker
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        model_loop(&asker, rx, max_batch);
    })?;
    let (health, cache) = ready_rx.recv().map_err(|_| anyhow!("the model thread stopped while loading"))??;

    let mut videos = restore_uploads(&data);
    if let Some(demo) = run_dir.as_deref().and_then(demo_of_run) {
        let t = health["frames"].as_u64().unwrap_or(0) as usize;
        for v in demo_gallery(&demo, a.gallery, t)? {
            videos.insert(v.id.clone(), v);
        }
    }
    let state = Arc::new(AppState {
        jobs: tx,
        videos: Mutex::new(videos),
        data: data.clone(),
        cache,
        max_upload: a.max_upload_mb * 1024 * 1024,
        data_cap: a.data_cap_mb * 1024 * 1024,
        queue: a.queue,
        health,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.addr)
            .await
            .with_context(|| format!("listening on {}", a.addr))?;
        let local = listener.local_addr()?;
        eprintln!("gcg serve: {about}");
        eprintln!("data: {}", data.display());
        // The line tests and scripts wait for.
        println!("listening on http://{local}/");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving")
    });
    // The router (and with it the job sender) is gone: the model thread finishes its queue and ends.
    drop(rt);
    let _ = worker.join();
    eprintln!("gcg serve: stopped");
    served
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
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("gcg serve: shutting down (finishing accepted requests)");
}

/// The model's loop: prepare videos one at a time; answer the questions waiting for one video
/// together (up to `max_batch`).
fn model_loop(asker: &Asker, mut rx: mpsc::Receiver<Job>, max_batch: usize) {
    let mut pending: Option<Job> = None;
    loop {
        let job = match pending.take() {
            Some(j) => j,
            None => match rx.blocking_recv() {
                Some(j) => j,
                None => return,
            },
        };
        match job {
            Job::Prepare { path, frames_dir, reply } => {
                let r = asker.prepare(&path).and_then(|v| {
                    if !frames_dir.join("frame_0.jpg").exists() {
                        asker.write_sampled_frames(&path, &frames_dir)?;
                    }
                    Ok(v)
                });
                let _ = reply.send(r);
            }
            Job::Ask { video, question, reply } => {
                let mut batch = vec![(question, reply)];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(Job::Ask { video: v, question, reply }) if v.id == video.id => batch.push((question, reply)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let questions: Vec<Question> = batch.iter().map(|(q, _)| q.clone()).collect();
                match asker.ask(&video, &questions) {
                    Ok(answers) => {
                        for ((_, reply), a) in batch.into_iter().zip(answers) {
                            let _ = reply.send(Ok(a));
                        }
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        for (_, reply) in batch {
                            let _ = reply.send(Err(anyhow!("{msg}")));
                        }
                    }
                }
            }
        }
    }
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

async fn health(State(s): State<Shared>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "model": s.health }))
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

fn frames_dir(data: &Path, id: &str) -> PathBuf {
    video_dir(data, id).join("frames")
}

/// Video ids are content ids or demo video ids: letters, digits, `-`, `_`.
fn check_id(id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > 100 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no video {id:?}")));
    }
    Ok(())
}

async fn upload(State(s): State<Shared>, mut mp: Multipart) -> ApiResult<Response> {
    let tmp_dir = s.data.join("incoming");
    tokio::fs::create_dir_all(&tmp_dir)
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    let mut saved: Option<(PathBuf, String, u64)> = None;
    while let Some(mut field) = mp
        .next_field()
        .await
        .map_err(|e| upload_error(e.status(), e.body_text(), s.max_upload))?
    {
        if field.name() != Some("video") {
            continue;
        }
        let name = field.file_name().unwrap_or("video").to_string();
        let ext = Path::new(&name)
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .filter(|e| e.len() <= 8 && e.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or_else(|| "bin".into());
        let tmp = tmp_dir.join(format!("{}-{}.{ext}", std::process::id(), unique()));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(|e| ApiError::internal(e.into()))?;
        let mut n: u64 = 0;
        loop {
            let chunk = match field.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(upload_error(e.status(), e.body_text(), s.max_upload));
                }
            };
            n += chunk.len() as u64;
            if n > s.max_upload {
                drop(f);
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(too_large(s.max_upload));
            }
            if let Err(e) = f.write_all(&chunk).await {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(ApiError::internal(e.into()));
            }
        }
        f.sync_all().await.map_err(|e| ApiError::internal(e.into()))?;
        saved = Some((tmp, name, n));
        break;
    }
    let Some((tmp, name, bytes)) = saved else {
        return Err(ApiError::bad("no file in the form field `video` (multipart/form-data)"));
    };
    if bytes == 0 {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(ApiError::bad(format!("{name}: the file is empty")));
    }
    match register_upload(&s, &tmp, &name, bytes).await {
        Ok(v) => Ok((StatusCode::CREATED, Json(v.public())).into_response()),
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
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

/// Moves an uploaded file to its content id's folder, has the model prepare it (a file ffmpeg
/// cannot read is 400) and registers it.
async fn register_upload(s: &Shared, tmp: &Path, name: &str, bytes: u64) -> ApiResult<VideoInfo> {
    let tmp_owned = tmp.to_path_buf();
    let id = tokio::task::spawn_blocking(move || gcg::ask::content_id(&tmp_owned))
        .await
        .map_err(|e| ApiError::internal(e.into()))?
        .map_err(ApiError::internal)?;
    if let Some(v) = touch(s, &id) {
        let _ = tokio::fs::remove_file(tmp).await;
        return Ok(v);
    }
    let dir = video_dir(&s.data, &id);
    tokio::fs::create_dir_all(&dir).await.map_err(|e| ApiError::internal(e.into()))?;
    let ext = tmp.extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_default();
    let path = dir.join(format!("video.{ext}"));
    tokio::fs::rename(tmp, &path).await.map_err(|e| ApiError::internal(e.into()))?;
    let prepared = match prepare(s, &path, &frames_dir(&s.data, &id)).await {
        Ok(p) => p,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(match e {
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, msg) => {
                    // The client knows its file by its name, not by where the server put it.
                    let msg = msg.replace(&path.display().to_string(), name);
                    ApiError::bad(format!("{name} could not be read as a video: {msg}"))
                }
                other => other,
            });
        }
    };
    let playable = matches!(ext.as_str(), "mp4" | "m4v" | "webm" | "ogv" | "ogg" | "mov");
    let v = VideoInfo {
        id: id.clone(),
        name: name.to_string(),
        path,
        duration: prepared.duration,
        frames: prepared.num_frames,
        timestamps: prepared.timestamps.clone(),
        playable,
        gallery: false,
        questions: vec![],
        prepared: Some(prepared),
        bytes: bytes + dir_size(&frames_dir(&s.data, &id)) + gcg::ask::cached_bytes(&s.cache, &id).unwrap_or(0),
        last_used: Some(SystemTime::now()),
    };
    let info = serde_json::to_vec_pretty(&v).map_err(|e| ApiError::internal(e.into()))?;
    let info_path = dir.join("info.json");
    tokio::task::spawn_blocking(move || gcg::util::write_atomic(&info_path, &info))
        .await
        .map_err(|e| ApiError::internal(e.into()))?
        .map_err(ApiError::internal)?;
    s.videos.lock().unwrap().insert(id.clone(), v.clone());
    let state = s.clone();
    let keep = id.clone();
    tokio::task::spawn_blocking(move || evict(&state, &keep))
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    Ok(v)
}

/// The known video `id`, marked as just used.
fn touch(s: &AppState, id: &str) -> Option<VideoInfo> {
    let mut videos = s.videos.lock().unwrap();
    let v = videos.get_mut(id)?;
    v.last_used = Some(SystemTime::now());
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

async fn prepare(s: &AppState, path: &Path, frames_dir: &Path) -> ApiResult<PreparedVideo> {
    let (reply, rx) = oneshot::channel();
    submit(
        s,
        Job::Prepare {
            path: path.to_path_buf(),
            frames_dir: frames_dir.to_path_buf(),
            reply,
        },
    )?;
    rx.await
        .map_err(|_| ApiError::internal(anyhow!("the model thread stopped")))?
        .map_err(ApiError::internal)
}

async fn ask(State(s): State<Shared>, UrlPath(id): UrlPath<String>, body: Bytes) -> ApiResult<Json<GroundedAnswer>> {
    check_id(&id)?;
    let q: Question = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(format!(
            "the body must be JSON {{\"question\": \"...\", \"options\": [\"...\", ...]}}: {e}"
        ))
    })?;
    q.validate().map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let v = touch(&s, &id).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no video {id:?} (upload it first)")))?;
    let prepared = match v.prepared {
        Some(p) => p,
        None => {
            let p = prepare(&s, &v.path, &frames_dir(&s.data, &id)).await?;
            if let Some(e) = s.videos.lock().unwrap().get_mut(&id) {
                e.prepared = Some(p.clone());
                e.timestamps = p.timestamps.clone();
                e.duration = p.duration;
            }
            p
        }
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
        .map_err(ApiError::internal)?;
    // The viewer knows the video by the server's id (the content id for uploads).
    a.video = id;
    Ok(Json(a))
}

async fn frame(State(s): State<Shared>, UrlPath((id, i)): UrlPath<(String, String)>) -> ApiResult<Response> {
    check_id(&id)?;
    let v = touch(&s, &id).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no video {id:?}")))?;
    let i: usize = i.parse().map_err(|_| ApiError::bad(format!("frame index {i:?} is not a number")))?;
    if i >= v.frames {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("video {id} has {} sampled frames; there is no frame {i}", v.frames),
        ));
    }
    let dir = frames_dir(&s.data, &id);
    if !dir.join("frame_0.jpg").exists() {
        prepare(&s, &v.path, &dir).await?;
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
const RANGE_CHUNK: u64 = 4 * 1024 * 1024;

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
        .and_then(|h| parse_range(h, len));
    let (start, end, status) = match range {
        Some((a, b)) => (a, b.min(a + RANGE_CHUNK - 1), StatusCode::PARTIAL_CONTENT),
        None if headers.contains_key(header::RANGE) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response())
        }
        None => (0, len.saturating_sub(1).min(RANGE_CHUNK - 1), StatusCode::OK),
    };
    let n = if len == 0 { 0 } else { end - start + 1 };
    f.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).await.map_err(|e| ApiError::internal(e.into()))?;
    let status = if status == StatusCode::OK && n < len {
        StatusCode::PARTIAL_CONTENT
    } else {
        status
    };
    let mut r = (status, buf).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(r)
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` of a `len`-byte file → [start, end] (inclusive).
fn parse_range(h: &str, len: u64) -> Option<(u64, u64)> {
    let spec = h.strip_prefix("bytes=")?.split(',').next()?.trim();
    let (a, b) = spec.split_once('-')?;
    if len == 0 {
        return None;
    }
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len - 1
        } else {
            b.parse::<u64>().ok()?.min(len - 1)
        };
        (start, end)
    };
    (start <= end && start < len).then_some((start, end))
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
        match serde_json::from_str::<VideoInfo>(&text) {
            Ok(mut v) if v.path.exists() => {
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
