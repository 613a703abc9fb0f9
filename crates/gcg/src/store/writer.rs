//! Appending to a store: records are buffered, then written as one shard (temp name, fsync,
//! rename) and published by rewriting the index (under the lock, temp name, fsync, rename).

use super::check::{check, drop_broken, dropped_counts, CheckOptions, StoreCheck, RECOMPUTE_HINT};
use super::format::{f16_bytes, f32_bytes, f64_bytes, i64_bytes, write_safetensors, RawTensor};
use super::index::{
    check_times, read_index, Extractor, Index, QuestionEntry, ShardInfo, ShardKind, StoreDType, StoreMeta, VideoEntry, INDEX_FILE,
    LOCK_FILE, SHARD_DIR,
};
use crate::util::{non_finite_f16, non_finite_f32, non_finite_f64};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use half::f16;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One video's features as computed: un-normalised ViT features (f16) and CLIP frame embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoRecord {
    pub id: String,
    /// [T, tokens, width] row-major.
    pub features: Vec<f16>,
    /// (T, tokens, width).
    pub features_shape: [usize; 3],
    /// [T, embed_dim] row-major.
    pub frame_embeds: Vec<f32>,
    pub embed_dim: usize,
    /// Seconds, one per frame (or empty when unknown).
    pub timestamps: Vec<f64>,
    pub duration: Option<f64>,
    pub fps: Option<f64>,
    pub source: Option<String>,
    /// The source's content fingerprint ([`crate::features::provenance::source_fingerprint`]).
    pub source_fingerprint: Option<String>,
    /// What made the features (stored with the entry; None: not known).
    pub extractor: Option<Extractor>,
    /// Store the CLIP frame embeddings and times but not the ViT features (`features` is then
    /// empty; `features_shape` still says what the ViT makes).
    pub embeddings_only: bool,
}

impl VideoRecord {
    /// From tensors: features [T, N, D] (any float dtype, rounded to f16) and frame embeddings
    /// [T, E] (to f32).
    pub fn from_tensors(id: impl Into<String>, features: &Tensor, frame_embeds: &Tensor, timestamps: Vec<f64>) -> Result<Self> {
        let id = id.into();
        let (t, n, d) = features
            .dims3()
            .with_context(|| format!("video {id}: features of shape {:?}, expected [T, N, D]", features.dims()))?;
        let (t2, e) = frame_embeds
            .dims2()
            .with_context(|| format!("video {id}: frame embeddings of shape {:?}, expected [T, E]", frame_embeds.dims()))?;
        ensure!(t == t2, "video {id}: {t} frames of features but {t2} frame embeddings");
        Ok(Self {
            features: features.to_dtype(DType::F16)?.flatten_all()?.to_vec1::<f16>()?,
            features_shape: [t, n, d],
            frame_embeds: frame_embeds.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            embed_dim: e,
            timestamps,
            duration: None,
            fps: None,
            source: None,
            source_fingerprint: None,
            extractor: None,
            embeddings_only: false,
            id,
        })
    }

    /// The record without its ViT features (see [`VideoRecord::embeddings_only`]).
    pub fn without_features(mut self) -> Self {
        self.features = Vec::new();
        self.embeddings_only = true;
        self
    }

    pub fn num_frames(&self) -> usize {
        self.features_shape[0]
    }

    pub fn meta(&self) -> StoreMeta {
        StoreMeta {
            tokens: self.features_shape[1],
            width: self.features_shape[2],
            embed_dim: self.embed_dim,
        }
    }

    /// The checks [`StoreWriter::add_video`] makes: consistent sizes, finite values, sane times
    /// (see [`check_times`]). Callers that must not stop on one bad video run it first.
    pub fn check(&self) -> Result<()> {
        let id = &self.id;
        ensure!(!id.is_empty(), "a video record has an empty id");
        let [t, n, d] = self.features_shape;
        ensure!(
            t > 0 && n > 0 && d > 0,
            "video {id}: features shape {:?} has a zero size",
            self.features_shape
        );
        let want = if self.embeddings_only { 0 } else { t * n * d };
        ensure!(
            self.features.len() == want,
            "video {id}: {} feature values for shape {:?}{}",
            self.features.len(),
            self.features_shape,
            if self.embeddings_only { " (stored without features)" } else { "" }
        );
        ensure!(
            self.embed_dim > 0 && self.frame_embeds.len() == t * self.embed_dim,
            "video {id}: {} frame-embedding values, expected {t} × {}",
            self.frame_embeds.len(),
            self.embed_dim
        );
        ensure!(
            self.timestamps.is_empty() || self.timestamps.len() == t,
            "video {id}: {} timestamps for {t} frames",
            self.timestamps.len()
        );
        if let Some(bad) = non_finite_f16(&self.features) {
            bail!(
                "video {id}: the ViT features [T, N, D] = {:?} hold {} — not stored (are the ViT weights finite?)",
                self.features_shape,
                bad.describe(&self.features_shape)
            );
        }
        if let Some(bad) = non_finite_f32(&self.frame_embeds) {
            bail!(
                "video {id}: the CLIP frame embeddings [T, E] = [{t}, {}] hold {} — not stored",
                self.embed_dim,
                bad.describe(&[t, self.embed_dim])
            );
        }
        if let Some(bad) = non_finite_f64(&self.timestamps) {
            bail!("video {id}: the frame times hold {}", bad.describe(&[t]));
        }
        check_times(&self.timestamps, self.duration, self.fps).with_context(|| format!("video {id}"))?;
        Ok(())
    }

    fn bytes(&self) -> u64 {
        (self.features.len() * 2 + self.frame_embeds.len() * 4 + self.timestamps.len() * 8) as u64
    }
}

/// One question's CLIP text embeddings and pseudo-labels.
#[derive(Debug, Clone, PartialEq)]
pub struct QuestionRecord {
    /// The sample key (`QaSample::key`).
    pub key: String,
    pub video: String,
    /// [E] each; `options` is [num_options, E] row-major.
    pub question: Vec<f32>,
    pub options: Vec<f32>,
    pub num_options: usize,
    pub answer: Vec<f32>,
    pub event: Vec<f32>,
    pub event_mode: String,
    pub event_text: String,
    /// s_t = cos(F_t, text(event)), one per frame of the video.
    pub curve: Vec<f32>,
    /// Top-K frame indices of the curve, sorted by time.
    pub pseudo_labels: Vec<usize>,
    /// Which CLIP text tower and tokenizer embedded the texts (None: not known).
    pub text_encoder: Option<String>,
    /// A fingerprint of the question, option and answer texts embedded
    /// ([`crate::features::labels::texts_hash`]; None: not known).
    pub texts_hash: Option<String>,
    /// The shard of the video entry whose frame embeddings gave `curve` (`VideoEntry::shard`
    /// when they were read). None: the entry the writer sees when the question is added. A
    /// commit refuses the question when the store's entry of the video is another one by then
    /// (the video was stored again while the labels were made).
    pub video_shard: Option<String>,
}

impl QuestionRecord {
    fn validate(&self, e: usize, frames: usize) -> Result<()> {
        let key = &self.key;
        for (what, v) in [("question", &self.question), ("answer", &self.answer), ("event", &self.event)] {
            ensure!(
                v.len() == e,
                "question {key}: {what} embedding has {} values, the store's CLIP width is {e}",
                v.len()
            );
        }
        ensure!(
            self.options.len() == self.num_options * e,
            "question {key}: {} option-embedding values for {} options of width {e}",
            self.options.len(),
            self.num_options
        );
        ensure!(
            self.curve.len() == frames,
            "question {key}: a curve of {} values but video {} has {frames} frames",
            self.curve.len(),
            self.video
        );
        ensure!(
            self.pseudo_labels.iter().all(|&t| t < frames) && self.pseudo_labels.windows(2).all(|w| w[0] < w[1]),
            "question {key}: pseudo-labels {:?} are not increasing frame indices below {frames}",
            self.pseudo_labels
        );
        let rows = [
            ("question embedding", &self.question, vec![e]),
            ("option embeddings", &self.options, vec![self.num_options, e]),
            ("answer embedding", &self.answer, vec![e]),
            ("event-text embedding", &self.event, vec![e]),
            ("similarity curve s_t", &self.curve, vec![frames]),
        ];
        for (what, v, shape) in rows {
            if let Some(bad) = non_finite_f32(v) {
                bail!(
                    "question {key} (video {}): the CLIP {what} holds {} — not stored",
                    self.video,
                    bad.describe(&shape)
                );
            }
        }
        Ok(())
    }

    fn bytes(&self) -> u64 {
        ((self.question.len() + self.options.len() + self.answer.len() + self.event.len() + self.curve.len()) * 4
            + self.pseudo_labels.len() * 8) as u64
    }
}

/// A point in a commit where a crash can be simulated (tests of atomicity and resumption).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// The shard is complete under its temporary name, not yet renamed.
    ShardWritten,
    /// The shard has its final name; the index does not list it yet.
    ShardRenamed,
    /// The new index is complete under its temporary name, not yet renamed.
    IndexWritten,
}

/// What a simulated crash does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// `std::process::abort()`: no destructor runs, as with a kill.
    Abort,
    /// The commit returns an error and leaves the files as they are.
    Error,
}

/// Crash at the `nth` (1-based) time the writer reaches `point`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub point: FaultPoint,
    pub nth: usize,
    pub action: FaultAction,
}

impl Fault {
    /// Parses `point:nth[:abort|error]` with point `shard-written | shard-renamed | index-written`
    /// (the form the `GCG_STORE_FAULT` environment variable of the CLI takes).
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let point = match parts.first().copied() {
            Some("shard-written") => FaultPoint::ShardWritten,
            Some("shard-renamed") => FaultPoint::ShardRenamed,
            Some("index-written") => FaultPoint::IndexWritten,
            _ => bail!("fault {s:?}: expected shard-written|shard-renamed|index-written:N[:abort|error]"),
        };
        let nth = parts
            .get(1)
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| anyhow!("fault {s:?}: expected a count >= 1 after the point"))?;
        let action = match parts.get(2).copied() {
            None | Some("abort") => FaultAction::Abort,
            Some("error") => FaultAction::Error,
            Some(other) => bail!("fault {s:?}: unknown action {other:?} (abort or error)"),
        };
        Ok(Self { point, nth, action })
    }
}

/// How the writer groups records into shards.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// A shard is written once the buffered records reach this many bytes.
    pub shard_bytes: u64,
    /// Also write once the oldest buffered record is this old (bounds the work a kill loses).
    pub max_pending_secs: f64,
    /// Simulated crash, for tests.
    pub fault: Option<Fault>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            shard_bytes: 512 << 20,
            max_pending_secs: 120.0,
            fault: None,
        }
    }
}

/// Appends videos and questions to a store directory.
///
/// Several writers (threads or processes) may append to one store at the same time: each
/// writes its own shards and merges its entries into the current index under the lock. A record
/// whose id is already in the index replaces the old entry (the old bytes stay in their shard).
pub struct StoreWriter {
    dir: PathBuf,
    opts: WriterOptions,
    index: Index,
    lock: std::fs::File,
    pending_videos: Vec<VideoRecord>,
    pending_questions: Vec<QuestionRecord>,
    /// Questions a commit refused (key, why), for the job that added them: see
    /// [`StoreWriter::take_refused_questions`].
    refused_questions: Vec<(String, String)>,
    pending_bytes: u64,
    pending_since: Option<Instant>,
    shards_written: u64,
    fault_hits: HashMap<&'static str, usize>,
    /// What opening the store repaired (a shard missing or cut short), if anything.
    opened_repair: Option<(StoreCheck, Repaired)>,
}

fn fsync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))?;
    }
    Ok(())
}

/// Whether process `pid` still runs (Linux /proc; elsewhere assume it does).
fn pid_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

/// Temporary files end in `.tmp-{pid}`; remove those of processes that no longer run.
fn remove_stale_temps(dir: &Path) -> Result<()> {
    for p in crate::util::clear_stale_temps_in(dir)? {
        tracing::info!("removed {} left by a stopped writer", p.display());
    }
    Ok(())
}

impl StoreWriter {
    /// Opens (creating when needed) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>, opts: WriterOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(dir.join(SHARD_DIR)).with_context(|| format!("creating the store directory {}", dir.display()))?;
        let (lock, lock_path) = open_lock(&dir)?;
        lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
        let mut opened_repair = None;
        let index = (|| -> Result<Index> {
            remove_stale_temps(&dir)?;
            remove_stale_temps(&dir.join(SHARD_DIR))?;
            let (mut index, stamp) = read_index(&dir)?;
            if stamp.is_none() {
                let shards = shard_files(&dir)?.len();
                ensure!(shards == 0, "{}", lost_index_message(&dir, shards));
                write_index(&dir, &index, &mut |_| Ok(()))?;
            }
            // A shard gone or cut short behind the store's back: its records are dropped from
            // the index so that this job recomputes them (instead of calling them stored).
            let found = check(&dir, &index, CheckOptions::quick())?;
            if !found.is_clean() {
                let repaired = publish_repair(&dir, &mut index, &found)?;
                tracing::warn!(
                    "the feature store {} is damaged:\n{}\ndropped {} from its index; {}",
                    dir.display(),
                    found.describe(),
                    dropped_counts(&repaired.videos, &repaired.questions),
                    RECOMPUTE_HINT
                );
                opened_repair = Some((found, repaired));
            }
            Ok(index)
        })();
        lock.unlock().with_context(|| format!("unlocking {}", lock_path.display()))?;
        Ok(Self {
            dir,
            opts,
            index: index?,
            lock,
            pending_videos: Vec::new(),
            pending_questions: Vec::new(),
            refused_questions: Vec::new(),
            pending_bytes: 0,
            pending_since: None,
            shards_written: 0,
            fault_hits: HashMap::new(),
            opened_repair,
        })
    }

    /// What opening the store found broken and dropped (a shard missing or cut short), if anything.
    pub fn opened_repair(&self) -> Option<&(StoreCheck, Repaired)> {
        self.opened_repair.as_ref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index as of this writer's last commit (or opening).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Whether the video is committed or buffered.
    pub fn has_video(&self, id: &str) -> bool {
        self.index.videos.contains_key(id) || self.pending_videos.iter().any(|v| v.id == id)
    }

    /// Whether the question is committed or buffered.
    pub fn has_question(&self, key: &str) -> bool {
        self.index.questions.contains_key(key) || self.pending_questions.iter().any(|q| q.key == key)
    }

    /// Drops from the index what `found` (a [`check`] of this store) says is broken: the broken
    /// shards (moved to `quarantine/` when their file is still there), every record in them, the
    /// records holding non-finite values and the questions of every dropped video; moves the
    /// shard files the index does not list (of stopped writers) to `quarantine/` too. The jobs
    /// that made the dropped records
    /// (`gcg features`, `gcg labels`) then recompute them.
    pub fn repair(&mut self, found: &StoreCheck) -> Result<Repaired> {
        let lock_path = self.dir.join(LOCK_FILE);
        self.lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
        let result = (|| -> Result<(Index, Repaired)> {
            let mut index = read_live_index(&self.dir)?;
            let repaired = publish_repair(&self.dir, &mut index, found)?;
            Ok((index, repaired))
        })();
        self.lock.unlock().with_context(|| format!("unlocking {}", lock_path.display()))?;
        let (index, repaired) = result?;
        self.index = index;
        Ok(repaired)
    }

    /// Removes videos (and their questions) from the store: the index without them is published
    /// first, then the shard files no entry uses any more are deleted (a reader holding the old
    /// snapshot keeps its mapped files). Returns the bytes of the deleted shards. Unknown ids
    /// are ignored.
    pub fn remove_videos(&mut self, ids: &[&str]) -> Result<u64> {
        let lock_path = self.dir.join(LOCK_FILE);
        self.lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
        let result = (|| -> Result<(Index, u64)> {
            let mut index = read_live_index(&self.dir)?;
            let before = index.clone();
            for id in ids {
                index.videos.remove(*id);
            }
            index.questions.retain(|_, q| !ids.contains(&q.video.as_str()));
            let used: std::collections::BTreeSet<&String> = index
                .videos
                .values()
                .map(|v| &v.shard)
                .chain(index.questions.values().map(|q| &q.shard))
                .collect();
            let unused: Vec<String> = index.shards.keys().filter(|s| !used.contains(s)).cloned().collect();
            if index.videos.len() == before.videos.len() && index.questions.len() == before.questions.len() && unused.is_empty() {
                return Ok((index, 0));
            }
            for s in &unused {
                index.shards.remove(s);
            }
            if index.videos.is_empty() {
                index.meta = None;
            }
            index.generation += 1;
            index.validate().context("the index without the removed videos")?;
            write_index(&self.dir, &index, &mut |_| Ok(()))?;
            let shard_dir = self.dir.join(SHARD_DIR);
            let mut freed = 0;
            for s in &unused {
                let path = shard_dir.join(s);
                freed += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
                }
            }
            fsync_dir(&shard_dir)?;
            Ok((index, freed))
        })();
        self.lock.unlock().with_context(|| format!("unlocking {}", lock_path.display()))?;
        let (index, freed) = result?;
        self.index = index;
        Ok(freed)
    }

    /// The questions commits refused since the last call (key, why): their video was stored
    /// again (or with another T) after the question was added. The other questions of their
    /// batch were committed without them; these were not written, and are not in the store.
    pub fn take_refused_questions(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.refused_questions)
    }

    /// Re-reads the index (to see other writers' commits).
    pub fn reload(&mut self) -> Result<()> {
        self.index = read_live_index(&self.dir)?;
        Ok(())
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    pub fn pending_len(&self) -> usize {
        self.pending_videos.len() + self.pending_questions.len()
    }

    fn meta(&self) -> Option<StoreMeta> {
        self.index.meta.or_else(|| self.pending_videos.first().map(VideoRecord::meta))
    }

    /// Buffers a video (replacing a buffered one with the same id); writes a shard when the
    /// buffer is full. Returns whether a shard was written.
    pub fn add_video(&mut self, rec: VideoRecord) -> Result<bool> {
        rec.check()?;
        if let Some(meta) = self.meta() {
            ensure!(
                rec.meta() == meta,
                "video {}: features [T, {}, {}] with CLIP width {}, but the store holds [T, {}, {}] with CLIP width {}",
                rec.id,
                rec.features_shape[1],
                rec.features_shape[2],
                rec.embed_dim,
                meta.tokens,
                meta.width,
                meta.embed_dim
            );
        }
        self.pending_videos.retain(|v| v.id != rec.id);
        self.pending_bytes += rec.bytes();
        self.pending_videos.push(rec);
        self.pending_since.get_or_insert_with(Instant::now);
        self.maybe_flush()
    }

    /// Buffers a question's embeddings and pseudo-labels. Its video must be committed.
    pub fn add_question(&mut self, mut rec: QuestionRecord) -> Result<bool> {
        let video = self.index.videos.get(&rec.video).ok_or_else(|| {
            anyhow!(
                "question {}: video {} has no features in the store {} (run `gcg features` first)",
                rec.key,
                rec.video,
                self.dir.display()
            )
        })?;
        let meta = self
            .index
            .meta
            .ok_or_else(|| anyhow!("the store {} has no videos", self.dir.display()))?;
        rec.validate(meta.embed_dim, video.num_frames)?;
        rec.video_shard.get_or_insert_with(|| video.shard.clone());
        self.pending_questions.retain(|q| q.key != rec.key);
        self.pending_bytes += rec.bytes();
        self.pending_questions.push(rec);
        self.pending_since.get_or_insert_with(Instant::now);
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> Result<bool> {
        let old = self
            .pending_since
            .is_some_and(|t| t.elapsed().as_secs_f64() >= self.opts.max_pending_secs);
        if self.pending_bytes >= self.opts.shard_bytes || old {
            self.flush()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes everything buffered (one shard per kind) and publishes it in the index.
    pub fn flush(&mut self) -> Result<()> {
        if !self.pending_videos.is_empty() {
            let videos = std::mem::take(&mut self.pending_videos);
            self.commit_videos(&videos)?;
        }
        if !self.pending_questions.is_empty() {
            let questions = std::mem::take(&mut self.pending_questions);
            self.commit_questions(&questions)?;
        }
        self.pending_bytes = 0;
        self.pending_since = None;
        Ok(())
    }

    /// Flushes and returns the index as committed.
    pub fn finish(mut self) -> Result<Index> {
        self.flush()?;
        Ok(std::mem::take(&mut self.index))
    }

    fn fault(&mut self, point: FaultPoint) -> Result<()> {
        let Some(f) = self.opts.fault else { return Ok(()) };
        if f.point != point {
            return Ok(());
        }
        let key = match point {
            FaultPoint::ShardWritten => "shard-written",
            FaultPoint::ShardRenamed => "shard-renamed",
            FaultPoint::IndexWritten => "index-written",
        };
        let hits = self.fault_hits.entry(key).or_insert(0);
        *hits += 1;
        if *hits == f.nth {
            match f.action {
                FaultAction::Abort => {
                    tracing::error!("injected fault: aborting at {key} #{hits}");
                    std::process::abort()
                }
                FaultAction::Error => bail!("injected fault at {key} #{hits}"),
            }
        }
        Ok(())
    }

    fn shard_name(&mut self, kind: ShardKind) -> String {
        static SHARDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        self.shards_written += 1;
        let n = SHARDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let prefix = match kind {
            ShardKind::Videos => "videos",
            ShardKind::Questions => "questions",
        };
        format!("{prefix}-{ms:013}-{}-{n:05}.safetensors", std::process::id())
    }

    /// Writes the shard (temp, fsync, rename), then merges `entries` into the current index.
    /// `records`: what the shard says of its records in its `__metadata__` (to rebuild a lost
    /// index from).
    fn commit(
        &mut self,
        kind: ShardKind,
        tensors: &[RawTensor<'_>],
        records: BTreeMap<String, String>,
        entries: impl FnOnce(&str, &[super::index::TensorLoc], &mut Index) -> Result<()>,
    ) -> Result<()> {
        let name = self.shard_name(kind);
        let shard_dir = self.dir.join(SHARD_DIR);
        let final_path = shard_dir.join(&name);
        let tmp = shard_dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let mut meta = records;
        meta.insert("format".to_string(), super::index::FORMAT.to_string());
        meta.insert("kind".to_string(), format!("{kind:?}").to_lowercase());
        let (locs, crc32) = write_safetensors(&tmp, tensors, &meta)?;
        let bytes = std::fs::metadata(&tmp)?.len();
        self.fault(FaultPoint::ShardWritten)?;
        std::fs::rename(&tmp, &final_path).with_context(|| format!("renaming {} to {}", tmp.display(), final_path.display()))?;
        fsync_dir(&shard_dir)?;
        self.fault(FaultPoint::ShardRenamed)?;

        let lock_path = self.dir.join(LOCK_FILE);
        self.lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
        let mut refused = false;
        let mut listed = false;
        let result = (|| -> Result<Index> {
            let mut index = read_live_index(&self.dir)?;
            // An index rebuilt from the shards while this one waited for the lock may list it.
            listed = index.shards.contains_key(&name);
            index.shards.insert(
                name.clone(),
                ShardInfo {
                    kind,
                    bytes,
                    tensors: BTreeMap::new(),
                    crc32: Some(crc32),
                },
            );
            let merged = entries(&name, &locs, &mut index).and_then(|()| {
                index.generation += 1;
                index.validate().context("the merged index")
            });
            if merged.is_err() {
                refused = true;
            }
            merged?;
            let dir = self.dir.clone();
            let fault = &mut |p| self.fault(p);
            write_index(&dir, &index, fault)?;
            Ok(index)
        })();
        // The merge refused the shard's records (no index names it: none was written, and the
        // live one did not list it): the file goes, under the lock, so that rebuilding a lost
        // index from the shards never takes up records the store did not accept.
        if refused && !listed {
            if let Err(e) = std::fs::remove_file(&final_path)
                .map_err(anyhow::Error::from)
                .and_then(|()| fsync_dir(&shard_dir))
            {
                tracing::warn!("removing the refused shard {}: {e:#}", final_path.display());
            }
        }
        self.lock.unlock().with_context(|| format!("unlocking {}", lock_path.display()))?;
        self.index = result?;
        tracing::debug!("committed shard {name} ({bytes} bytes), index generation {}", self.index.generation);
        Ok(())
    }

    fn commit_videos(&mut self, videos: &[VideoRecord]) -> Result<()> {
        let mut tensors = Vec::with_capacity(videos.len() * 3);
        for v in videos {
            let [t, n, d] = v.features_shape;
            if !v.embeddings_only {
                tensors.push(RawTensor {
                    name: format!("{}/features", v.id),
                    dtype: StoreDType::F16,
                    shape: vec![t, n, d],
                    data: f16_bytes(&v.features),
                });
            }
            tensors.push(RawTensor {
                name: format!("{}/frame_embeds", v.id),
                dtype: StoreDType::F32,
                shape: vec![t, v.embed_dim],
                data: f32_bytes(&v.frame_embeds),
            });
            if !v.timestamps.is_empty() {
                tensors.push(RawTensor {
                    name: format!("{}/timestamps", v.id),
                    dtype: StoreDType::F64,
                    shape: vec![t],
                    data: f64_bytes(&v.timestamps),
                });
            }
        }
        let meta = videos[0].meta();
        let described: Vec<super::index::ShardVideo> = videos
            .iter()
            .map(|v| super::index::ShardVideo {
                id: v.id.clone(),
                num_frames: v.num_frames(),
                timestamps: v.timestamps.clone(),
                duration: v.duration,
                fps: v.fps,
                source: v.source.clone(),
                source_fingerprint: v.source_fingerprint.clone(),
                extractor: v.extractor.clone(),
            })
            .collect();
        let records = BTreeMap::from([
            ("videos".to_string(), serde_json::to_string(&described)?),
            ("store_meta".to_string(), serde_json::to_string(&meta)?),
        ]);
        self.commit(ShardKind::Videos, &tensors, records, |shard, locs, index| {
            match index.meta {
                Some(m) if m != meta => bail!(
                    "the store holds features [T, {}, {}] with CLIP width {}, this writer has [T, {}, {}] with width {}",
                    m.tokens,
                    m.width,
                    m.embed_dim,
                    meta.tokens,
                    meta.width,
                    meta.embed_dim
                ),
                _ => index.meta = Some(meta),
            }
            let by_name: HashMap<&str, &super::index::TensorLoc> = locs.iter().map(|l| (l.name.as_str(), l)).collect();
            // The questions of a recomputed video were labelled from its old frame embeddings:
            // they go, and `gcg labels` redoes them.
            let replaced: std::collections::HashSet<&str> = videos
                .iter()
                .map(|v| v.id.as_str())
                .filter(|id| index.videos.contains_key(*id))
                .collect();
            let stale: Vec<String> = index
                .questions
                .iter()
                .filter(|(_, q)| replaced.contains(q.video.as_str()))
                .map(|(k, _)| k.clone())
                .collect();
            if !stale.is_empty() {
                tracing::warn!(
                    "{} recomputed videos had {} labelled questions (e.g. {}); their labels came from the old features and \
                     are dropped: rerun `gcg labels` for them",
                    replaced.len(),
                    stale.len(),
                    stale[0]
                );
            }
            for k in &stale {
                index.questions.remove(k);
            }
            for v in videos {
                let get = |suffix: &str| {
                    by_name
                        .get(format!("{}/{suffix}", v.id).as_str())
                        .map(|l| (*l).clone())
                        .ok_or_else(|| anyhow!("shard {shard}: no {suffix} for video {}", v.id))
                };
                index.videos.insert(
                    v.id.clone(),
                    VideoEntry {
                        shard: shard.to_string(),
                        num_frames: v.num_frames(),
                        timestamps: v.timestamps.clone(),
                        duration: v.duration,
                        fps: v.fps,
                        source: v.source.clone(),
                        source_fingerprint: v.source_fingerprint.clone(),
                        features: if v.embeddings_only { None } else { Some(get("features")?) },
                        frame_embeds: get("frame_embeds")?,
                        extractor: v.extractor.clone(),
                    },
                );
            }
            Ok(())
        })
    }

    fn commit_questions(&mut self, questions: &[QuestionRecord]) -> Result<()> {
        let e = self.index.meta.map(|m| m.embed_dim).unwrap_or(0);
        let rows: usize = questions.iter().map(|q| q.num_options + 3).sum();
        let mut text = Vec::with_capacity(rows * e);
        let mut curves = Vec::new();
        let mut labels = Vec::new();
        let mut entries = Vec::with_capacity(questions.len());
        for q in questions {
            let text_row = text.len() / e.max(1);
            text.extend_from_slice(&q.question);
            text.extend_from_slice(&q.options);
            text.extend_from_slice(&q.answer);
            text.extend_from_slice(&q.event);
            let curve_start = curves.len();
            curves.extend_from_slice(&q.curve);
            labels.extend(q.pseudo_labels.iter().map(|&t| t as i64));
            entries.push((text_row, curve_start));
        }
        let tensors = [
            RawTensor {
                name: "text_embeds".into(),
                dtype: StoreDType::F32,
                shape: vec![rows, e],
                data: f32_bytes(&text),
            },
            RawTensor {
                name: "curves".into(),
                dtype: StoreDType::F32,
                shape: vec![curves.len()],
                data: f32_bytes(&curves),
            },
            RawTensor {
                name: "pseudo_labels".into(),
                dtype: StoreDType::I64,
                shape: vec![labels.len()],
                data: i64_bytes(&labels),
            },
        ];
        let described: Vec<(String, QuestionEntry)> = questions
            .iter()
            .zip(&entries)
            .map(|(q, &(text_row, curve_start))| (q.key.clone(), question_entry(q, "", text_row, curve_start)))
            .collect();
        let records = BTreeMap::from([("questions".to_string(), serde_json::to_string(&described)?)]);
        let mut refused: Vec<(String, String)> = Vec::new();
        let committed = self.commit(ShardKind::Questions, &tensors, records, |shard, locs, index| {
            let info = index
                .shards
                .get_mut(shard)
                .ok_or_else(|| anyhow!("shard {shard} vanished from the merged index"))?;
            for l in locs {
                info.tensors.insert(l.name.clone(), l.clone());
            }
            for q in questions {
                let video = index.videos.get(&q.video);
                if video.map(|v| v.num_frames) != Some(q.curve.len()) {
                    refused.push((
                        q.key.clone(),
                        format!("video {} is no longer in the store with {} frames", q.video, q.curve.len()),
                    ));
                } else if let (Some(v), Some(from)) = (video, q.video_shard.as_deref()) {
                    if v.shard != from {
                        refused.push((
                            q.key.clone(),
                            format!(
                                "its labels were made from video {} as stored in shard {from}, but the video was stored again \
                                 since (shard {}): rerun `gcg labels` for it",
                                q.video, v.shard
                            ),
                        ));
                    }
                }
            }
            // Any refusal refuses the shard (its writer removes it); the others are committed
            // again without them, below.
            ensure!(refused.is_empty(), "{} of the batch's questions were refused", refused.len());
            for (q, (text_row, curve_start)) in questions.iter().zip(entries) {
                index
                    .questions
                    .insert(q.key.clone(), question_entry(q, shard, text_row, curve_start));
            }
            Ok(())
        });
        if refused.is_empty() {
            return committed;
        }
        for (key, why) in &refused {
            tracing::warn!("question {key} was not stored: {why}");
        }
        let rest: Vec<QuestionRecord> = questions
            .iter()
            .filter(|q| !refused.iter().any(|(k, _)| *k == q.key))
            .cloned()
            .collect();
        self.refused_questions.extend(refused);
        // The store changed under this writer: questions added from now on without their entry
        // named take the entry it holds now.
        self.reload()?;
        if rest.is_empty() {
            return Ok(());
        }
        self.commit_questions(&rest)
    }
}

/// A question's index entry in shard `shard`.
fn question_entry(q: &QuestionRecord, shard: &str, text_row: usize, curve_start: usize) -> QuestionEntry {
    QuestionEntry {
        shard: shard.to_string(),
        video: q.video.clone(),
        num_options: q.num_options,
        text_row,
        curve_start,
        num_frames: q.curve.len(),
        pseudo_labels: q.pseudo_labels.clone(),
        event_mode: q.event_mode.clone(),
        event: q.event_text.clone(),
        text_encoder: q.text_encoder.clone(),
        texts_hash: q.texts_hash.clone(),
        video_shard: q.video_shard.clone(),
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if self.pending_len() > 0 {
            tracing::warn!(
                "feature-store writer for {} dropped with {} unwritten records (call flush/finish)",
                self.dir.display(),
                self.pending_len()
            );
        }
    }
}

/// What [`StoreWriter::repair`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Repaired {
    /// Broken shards dropped from the index, and where each file went (None: it was missing).
    pub shards: Vec<(String, Option<PathBuf>)>,
    pub videos: Vec<String>,
    pub questions: Vec<String>,
    /// Unlisted shard files of stopped writers, and where each went (`quarantine/`).
    pub moved_unlisted: Vec<(String, PathBuf)>,
}

/// Sub-directory of a store where repair moves broken shard files (never deleted by gcg).
pub const QUARANTINE_DIR: &str = "quarantine";

/// Moves shard file `name` from the store's `shards/` to its `quarantine/`, under a name no
/// earlier file there has (`NAME`, else `NAME.1`, `NAME.2`, ...). Returns where it went.
fn quarantine(dir: &Path, name: &str) -> Result<PathBuf> {
    let from = dir.join(SHARD_DIR).join(name);
    let q = dir.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&q).with_context(|| format!("creating {}", q.display()))?;
    let mut to = q.join(name);
    let mut n = 0;
    while to.exists() {
        n += 1;
        to = q.join(format!("{name}.{n}"));
    }
    std::fs::rename(&from, &to).with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    Ok(to)
}

/// Under the lock: drops what `found` says is broken from `index`, publishes it, then moves the
/// broken files and the unlisted ones aside (after the new index names none of them).
fn publish_repair(dir: &Path, index: &mut Index, found: &StoreCheck) -> Result<Repaired> {
    let (videos, questions) = drop_broken(index, found);
    index.generation += 1;
    index.validate().context("the repaired index")?;
    write_index(dir, index, &mut |_| Ok(()))?;
    let mut repaired = Repaired {
        videos,
        questions,
        ..Default::default()
    };
    let shard_dir = dir.join(SHARD_DIR);
    for b in &found.broken {
        let path = shard_dir.join(&b.name);
        let moved = if path.exists() { Some(quarantine(dir, &b.name)?) } else { None };
        repaired.shards.push((b.name.clone(), moved));
    }
    for name in &found.unlisted {
        // Only a stopped writer's leftovers: a running one may be about to publish its shard.
        let writer_pid = name.split('-').nth(2).and_then(|p| p.parse::<u32>().ok());
        let stopped = writer_pid.is_some_and(|p| p != std::process::id() && !pid_alive(p));
        // Moved aside, not deleted: the records of a shard no index lists are kept (they can be
        // moved back to shards/ by hand).
        if stopped && !index.shards.contains_key(name) && shard_dir.join(name).exists() {
            let to = quarantine(dir, name)?;
            repaired.moved_unlisted.push((name.clone(), to));
        }
    }
    fsync_dir(&shard_dir)?;
    Ok(repaired)
}

/// What [`rebuild_index`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rebuilt {
    /// Shards whose records the rebuilt index lists.
    pub shards: usize,
    pub videos: usize,
    pub questions: usize,
    /// Records a later shard holds again (a recomputed video, a relabelled question), and
    /// questions labelled from a video's earlier features or another T: left out.
    pub superseded: usize,
    /// Shards whose header does not read, with why, and where each went (`quarantine/`).
    pub quarantined: Vec<(String, String, PathBuf)>,
}

/// The index of a store this writer opened: its `index.json` gone meanwhile (deleted while the
/// job ran) is an error, not a new empty index that would orphan every shard but the next.
fn read_live_index(dir: &Path) -> Result<Index> {
    let (index, stamp) = read_index(dir)?;
    if stamp.is_none() {
        bail!(
            "{} vanished while this job wrote the store; nothing more is written. {}",
            dir.join(INDEX_FILE).display(),
            lost_index_message(dir, shard_files(dir)?.len())
        );
    }
    Ok(index)
}

/// The store's lock file (created when missing), not locked yet.
fn open_lock(dir: &Path) -> Result<(std::fs::File, PathBuf)> {
    let path = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok((f, path))
}

/// Complete shard files in `dir/shards/`, oldest first (by the time and writer in their names).
fn shard_files(dir: &Path) -> Result<Vec<String>> {
    let shard_dir = dir.join(SHARD_DIR);
    let mut names = Vec::new();
    match std::fs::read_dir(&shard_dir) {
        Ok(rd) => {
            for e in rd {
                let name = e?.file_name().to_string_lossy().to_string();
                if name.ends_with(".safetensors") && !name.starts_with('.') {
                    names.push(name);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("listing {}", shard_dir.display())),
    }
    // `{kind}-{ms}-{pid}-{n}.safetensors`: by time, then writer, then the writer's count.
    let key = |n: &String| {
        let parts: Vec<u64> = n
            .trim_end_matches(".safetensors")
            .split('-')
            .skip(1)
            .filter_map(|p| p.parse().ok())
            .collect();
        (parts, n.clone())
    };
    names.sort_by_key(key);
    Ok(names)
}

/// The number of shard files of a store whose `index.json` is missing (0 when it has one, or no
/// shards: a new store).
pub fn lost_index_shards(dir: &Path) -> Result<usize> {
    if dir.join(INDEX_FILE).exists() {
        return Ok(0);
    }
    Ok(shard_files(dir)?.len())
}

/// The message for a store that lost its index.
pub fn lost_index_message(dir: &Path, shards: usize) -> String {
    format!(
        "the feature store {} has {shards} shard files but no {INDEX_FILE} (deleted or lost): starting a new index would \
         leave their records unused; `gcg store verify --store {} --repair` rebuilds the index from the shards",
        dir.display(),
        dir.display()
    )
}

/// Rebuilds the `index.json` of a store that lost it from what its shards say of their records
/// (see [`super::index::ShardVideo`]), oldest shard first so that a recomputed video or
/// relabelled question keeps its latest record, and the questions of a video recomputed after
/// them are left out (as a writer drops them). Shards whose header does not read are moved to
/// `quarantine/` once the new index is published; anything else that stops the rebuild (shards
/// of an older gcg that list no records, shards of other feature sizes, an I/O error) leaves
/// every file as it was. Checksums are those of the files as they are now; records dropped from
/// the lost index after their shard was written (removed videos, non-finite values) come back,
/// so check the rebuilt store's values. Refused when the store has an index.
pub fn rebuild_index(dir: &Path) -> Result<Rebuilt> {
    let (lock, lock_path) = open_lock(dir)?;
    lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
    let result = rebuild_locked(dir);
    lock.unlock().with_context(|| format!("unlocking {}", lock_path.display()))?;
    result
}

fn rebuild_locked(dir: &Path) -> Result<Rebuilt> {
    use super::format::{file_crc32, read_header};
    use super::index::ShardVideo;
    ensure!(
        !dir.join(INDEX_FILE).exists(),
        "{} has an {INDEX_FILE}; only a store that lost it is rebuilt",
        dir.display()
    );
    let mut index = Index::default();
    let mut out = Rebuilt::default();
    // Where each record came from (shard order), to drop questions of later-recomputed videos.
    let mut video_order: HashMap<String, usize> = HashMap::new();
    let mut question_order: HashMap<String, usize> = HashMap::new();
    let mut shard_infos: BTreeMap<String, ShardInfo> = BTreeMap::new();
    // Shards whose header does not read (moved to quarantine/ once the rebuilt index is
    // published), and those that list no records (which stop the rebuild: their records would
    // be lost).
    let mut unreadable: Vec<(String, String)> = Vec::new();
    let mut unlisted_records: Vec<String> = Vec::new();
    for (order, name) in shard_files(dir)?.into_iter().enumerate() {
        let path = dir.join(SHARD_DIR).join(&name);
        let (tensors, meta) = match read_header(&path) {
            Ok(h) => h,
            Err(e) => {
                unreadable.push((name, format!("{e:#}")));
                continue;
            }
        };
        if !meta.contains_key("videos") && !meta.contains_key("questions") {
            unlisted_records.push(name);
            continue;
        }
        let read = (|| -> Result<()> {
            let bytes = std::fs::metadata(&path)?.len();
            let kind = match meta.get("kind").map(String::as_str) {
                Some("videos") => ShardKind::Videos,
                Some("questions") => ShardKind::Questions,
                k => bail!("its __metadata__ names no shard kind ({k:?})"),
            };
            let info = ShardInfo {
                kind,
                bytes,
                tensors: if kind == ShardKind::Questions {
                    tensors.clone()
                } else {
                    BTreeMap::new()
                },
                crc32: Some(file_crc32(&path)?),
            };
            match kind {
                ShardKind::Videos => {
                    let list = meta
                        .get("videos")
                        .context("it lists no videos (written by a gcg before shards kept their records)")?;
                    let videos: Vec<ShardVideo> = serde_json::from_str(list).context("its video list")?;
                    let store_meta: StoreMeta = serde_json::from_str(meta.get("store_meta").context("it records no feature sizes")?)?;
                    if let Some(m) = index.meta.filter(|m| *m != store_meta) {
                        bail!(
                            "its features are {store_meta:?}, those of the store's earlier shards {m:?}: one store holds \
                             one kind; move the odd shards out of {} and rebuild again",
                            dir.join(SHARD_DIR).display()
                        );
                    }
                    let mut entries = Vec::with_capacity(videos.len());
                    for v in videos {
                        let loc = |suffix: &str| tensors.get(&format!("{}/{suffix}", v.id)).cloned();
                        let frame_embeds = loc("frame_embeds").with_context(|| format!("video {} has no frame_embeds tensor", v.id))?;
                        entries.push((
                            v.id.clone(),
                            VideoEntry {
                                shard: name.clone(),
                                num_frames: v.num_frames,
                                timestamps: v.timestamps,
                                duration: v.duration,
                                fps: v.fps,
                                source: v.source,
                                source_fingerprint: v.source_fingerprint,
                                features: loc("features"),
                                frame_embeds,
                                extractor: v.extractor,
                            },
                        ));
                    }
                    index.meta = Some(store_meta);
                    for (id, e) in entries {
                        if index.videos.insert(id.clone(), e).is_some() {
                            out.superseded += 1;
                        }
                        video_order.insert(id, order);
                    }
                }
                ShardKind::Questions => {
                    let list = meta
                        .get("questions")
                        .context("it lists no questions (written by a gcg before shards kept their records)")?;
                    let questions: Vec<(String, QuestionEntry)> = serde_json::from_str(list).context("its question list")?;
                    for (key, mut q) in questions {
                        q.shard = name.clone();
                        if index.questions.insert(key.clone(), q).is_some() {
                            out.superseded += 1;
                        }
                        question_order.insert(key, order);
                    }
                }
            }
            shard_infos.insert(name.clone(), info);
            Ok(())
        })();
        // A shard that lists records but cannot be read back as they say stops the rebuild
        // with nothing moved (an I/O error, other feature sizes, a damaged list).
        read.with_context(|| format!("rebuilding the index of {} from shard {name}", dir.display()))?;
    }
    if !unlisted_records.is_empty() {
        bail!(
            "{} of the shards of {} (e.g. {}) were written by a gcg from before shards listed their records: the index \
             cannot be rebuilt from them, and nothing was changed. Recompute the store (`gcg features`, `gcg labels` \
             into a new --store), or move those shards out of {} to rebuild from the others",
            unlisted_records.len(),
            dir.display(),
            unlisted_records[0],
            dir.join(SHARD_DIR).display()
        );
    }
    // A question stands only on the video it was labelled from: stored with its T, and the
    // very entry it names (or, for questions written before entries were named, not recomputed
    // after it).
    let before = index.questions.len();
    index.questions.retain(|key, q| {
        index.videos.get(&q.video).is_some_and(|v| {
            v.num_frames == q.num_frames
                && match q.video_shard.as_deref() {
                    Some(from) => from == v.shard,
                    None => video_order.get(&q.video).is_some_and(|&o| o < question_order[key]),
                }
        })
    });
    out.superseded += before - index.questions.len();
    let used: std::collections::BTreeSet<&String> = index
        .videos
        .values()
        .map(|v| &v.shard)
        .chain(index.questions.values().map(|q| &q.shard))
        .collect();
    index.shards = shard_infos.into_iter().filter(|(n, _)| used.contains(n)).collect();
    index.generation = 1;
    index
        .validate()
        .context("the index rebuilt from the shards does not hold together; nothing was changed")?;
    write_index(dir, &index, &mut |_| Ok(()))?;
    for (name, why) in unreadable {
        let to = quarantine(dir, &name)?;
        out.quarantined.push((name, why, to));
    }
    out.shards = index.shards.len();
    out.videos = index.videos.len();
    out.questions = index.questions.len();
    Ok(out)
}

/// Writes `index.json` atomically: temp name, fsync, (fault point), rename, fsync the directory.
fn write_index(dir: &Path, index: &Index, fault: &mut dyn FnMut(FaultPoint) -> Result<()>) -> Result<()> {
    let path = dir.join(INDEX_FILE);
    let tmp = dir.join(format!(".{INDEX_FILE}.tmp-{}", std::process::id()));
    let bytes = serde_json::to_vec(index)?;
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&bytes).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    }
    fault(FaultPoint::IndexWritten)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fsync_dir(dir)
}
