//! The store's index: what is where (parsed once per snapshot, never per read).

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// File name of the index inside a store directory.
pub const INDEX_FILE: &str = "index.json";
/// Lock file taken (exclusively) while the index is rewritten.
pub const LOCK_FILE: &str = "index.lock";
/// Sub-directory holding the shards.
pub const SHARD_DIR: &str = "shards";
/// `format` field of the index.
pub const FORMAT: &str = "gcg-feature-store";
/// On-disk format version.
pub const VERSION: u32 = 1;

/// Element types a shard holds (safetensors names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StoreDType {
    F16,
    F32,
    F64,
    I64,
}

impl StoreDType {
    pub fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
            Self::F64 | Self::I64 => 8,
        }
    }

    pub fn candle(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
            Self::I64 => DType::I64,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "F16",
            Self::F32 => "F32",
            Self::F64 => "F64",
            Self::I64 => "I64",
        }
    }
}

/// Where one tensor lives in a shard: its name in the safetensors header, type, shape and the
/// absolute byte range `[start, end)` in the shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorLoc {
    pub name: String,
    pub dtype: StoreDType,
    pub shape: Vec<usize>,
    pub offsets: [u64; 2],
}

impl TensorLoc {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> u64 {
        self.offsets[1] - self.offsets[0]
    }

    /// Checks that the byte range matches dtype × shape.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.offsets[1] >= self.offsets[0] && self.byte_len() == (self.numel() * self.dtype.size()) as u64,
            "tensor {}: byte range {:?} does not hold {:?} {:?}",
            self.name,
            self.offsets,
            self.dtype,
            self.shape
        );
        Ok(())
    }
}

/// Sizes shared by every video of a store (fixed by the first video written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMeta {
    /// ViT tokens per frame (257 for EVA ViT-g/14 at 224 px).
    pub tokens: usize,
    /// ViT width (1408).
    pub width: usize,
    /// CLIP embedding width (1024).
    pub embed_dim: usize,
}

/// What a video shard says of each of its videos (`__metadata__["videos"]`, a JSON list), so that
/// a lost index can be rebuilt from the shards (see [`super::writer::rebuild_index`]): the index
/// entry less the tensors' places, which the shard's header gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardVideo {
    pub id: String,
    pub num_frames: usize,
    pub timestamps: Vec<f64>,
    pub duration: Option<f64>,
    pub fps: Option<f64>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub source_fingerprint: Option<String>,
    #[serde(default)]
    pub extractor: Option<Extractor>,
}

/// What a shard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardKind {
    /// Per-video features, frame embeddings and timestamps.
    Videos,
    /// Packed per-question text embeddings, similarity curves and pseudo-labels.
    Questions,
}

/// One shard file under `shards/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub kind: ShardKind,
    /// File size in bytes.
    pub bytes: u64,
    /// The packed tensors of a question shard (`text_embeds`, `curves`, `pseudo_labels`); empty
    /// for video shards, whose tensors are listed per video.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tensors: BTreeMap<String, TensorLoc>,
    /// CRC-32 of the whole file, checked by `gcg store verify --checksums` (absent in stores
    /// written before checksums were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
}

/// One video: T frames of features and CLIP embeddings, with their times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoEntry {
    pub shard: String,
    /// T, the sampled frames.
    pub num_frames: usize,
    /// Time of each frame in seconds (empty when unknown, e.g. imported features).
    pub timestamps: Vec<f64>,
    pub duration: Option<f64>,
    pub fps: Option<f64>,
    /// Where the frames came from (a path), for information.
    #[serde(default)]
    pub source: Option<String>,
    /// The source's content when its features were made
    /// ([`crate::features::provenance::source_fingerprint`]): `gcg features` recomputes a video
    /// whose file no longer matches it, and the online ViT refuses to decode such a file.
    /// Absent for imported features and in stores written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_fingerprint: Option<String>,
    /// Un-normalised ViT features, F16 [T, tokens, width]; absent for a video stored without
    /// them (`gcg features --embeddings-only`: the ViT then runs on its decoded frames in the
    /// training loop, `[data] online_vit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<TensorLoc>,
    /// CLIP frame embeddings, F32 [T, embed_dim].
    pub frame_embeds: TensorLoc,
    /// What made the features (frame sampling, networks); absent in stores written before it
    /// was recorded ("unknown provenance").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extractor: Option<Extractor>,
}

/// What made a video's features, besides T (the entry's `num_frames`): `gcg features` stores
/// only records made the same way into one store, and refuses to mix them silently.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extractor {
    /// How the T frames were chosen: `uniform` or `official` (GCG's rule) for decoded videos and
    /// frame folders, `h5:<file fingerprint>` for features imported from an HDF5 file.
    pub sampling: String,
    /// Which ViT and CLIP image head computed them: `random <preset> seed <n>` for seeded
    /// random weights, otherwise fingerprints of the weight files
    /// (see `gcg::features::provenance`).
    pub models: String,
    /// The networks' arithmetic: `f32`, `f32, matmul precision high`, `bf16` or `f16` (one video's
    /// features computed in two of them differ by more than their f16 storage rounds). Absent
    /// for imported features and in stores written before it was recorded: taken as matching
    /// any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
}

impl Extractor {
    /// What differs between `self` (stored) and `other` (asked), for messages; None when equal.
    pub fn difference(&self, other: &Extractor) -> Option<String> {
        let mut d = Vec::new();
        if self.sampling != other.sampling {
            d.push(format!("sampling {}, this run asks sampling {}", self.sampling, other.sampling));
        }
        if self.models != other.models {
            d.push(format!("networks {}, this run uses {}", self.models, other.models));
        }
        if let (Some(a), Some(b)) = (&self.precision, &other.precision) {
            if a != b {
                d.push(format!("precision {a}, this run computes in {b}"));
            }
        }
        (!d.is_empty()).then(|| d.join("; "))
    }

    /// The same, recording the networks' arithmetic (see `precision`).
    pub fn with_precision(mut self, precision: impl Into<String>) -> Self {
        self.precision = Some(precision.into());
        self
    }
}

pub use crate::util::time_tolerance;

/// Checks a video's times: duration and fps finite and > 0 when known; frame times finite,
/// ≥ 0, non-decreasing and (with a duration) at most duration + [`time_tolerance`].
pub fn check_times(timestamps: &[f64], duration: Option<f64>, fps: Option<f64>) -> Result<()> {
    for (name, v) in [("duration", duration), ("fps", fps)] {
        if let Some(v) = v {
            ensure!(v.is_finite() && v > 0.0, "{name} {v} is not a finite positive number");
        }
    }
    for (i, &t) in timestamps.iter().enumerate() {
        ensure!(t.is_finite() && t >= 0.0, "frame time {i} is {t} (times must be finite and ≥ 0)");
        if i > 0 {
            ensure!(
                t >= timestamps[i - 1],
                "frame times decrease: frame {} at {}s, frame {i} at {t}s",
                i - 1,
                timestamps[i - 1]
            );
        }
        if let Some(d) = duration {
            ensure!(
                t <= d + time_tolerance(fps),
                "frame time {i} is {t}s, past the duration {d}s (+ {}s tolerance)",
                time_tolerance(fps)
            );
        }
    }
    Ok(())
}

/// One question's CLIP text embeddings and pseudo-labels.
///
/// Its text embeddings are the rows `text_row ..` of its shard's `text_embeds` [rows, E]:
/// the question, the `num_options` options, the answer, the event text, in that order
/// ([`QuestionEntry::num_text_rows`] rows). Its similarity curve s_t is `curves[curve_start ..
/// curve_start + num_frames]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuestionEntry {
    pub shard: String,
    pub video: String,
    pub num_options: usize,
    pub text_row: usize,
    pub curve_start: usize,
    pub num_frames: usize,
    /// The K frames with the highest s_t, sorted by time.
    pub pseudo_labels: Vec<usize>,
    /// How the event text was made: `answer`, `question-answer` or `statements`.
    pub event_mode: String,
    /// The event text whose similarity to the frames gave the pseudo-labels.
    pub event: String,
    /// Which CLIP text tower and tokenizer embedded the texts; absent in stores written before
    /// it was recorded ("unknown provenance").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<String>,
    /// A fingerprint of the question, option and answer texts that were embedded
    /// ([`crate::features::labels::texts_hash`]): a reader compares it with its annotations, so
    /// labels of edited questions are not used silently. Absent in stores written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub texts_hash: Option<String>,
    /// The shard of the video entry whose CLIP frame embeddings gave the curve and
    /// pseudo-labels: the labels stand only on that entry (a video stored again, with the same T
    /// or not, is another entry in another shard). Absent in stores written before it was
    /// recorded (only T and the order of the shards are checked for those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_shard: Option<String>,
}

impl QuestionEntry {
    pub fn num_text_rows(&self) -> usize {
        self.num_options + 3
    }
    pub fn question_row(&self) -> usize {
        self.text_row
    }
    pub fn option_row(&self, i: usize) -> usize {
        self.text_row + 1 + i
    }
    pub fn answer_row(&self) -> usize {
        self.text_row + 1 + self.num_options
    }
    pub fn event_row(&self) -> usize {
        self.text_row + 2 + self.num_options
    }
}

/// The whole index (`index.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    pub version: u32,
    /// Incremented by every commit.
    pub generation: u64,
    pub meta: Option<StoreMeta>,
    pub shards: BTreeMap<String, ShardInfo>,
    pub videos: BTreeMap<String, VideoEntry>,
    pub questions: BTreeMap<String, QuestionEntry>,
}

impl Default for Index {
    fn default() -> Self {
        Self {
            format: FORMAT.to_string(),
            version: VERSION,
            generation: 0,
            meta: None,
            shards: BTreeMap::new(),
            videos: BTreeMap::new(),
            questions: BTreeMap::new(),
        }
    }
}

impl Index {
    /// Parses and checks an index read from `path` (for messages).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let index: Index =
            serde_json::from_slice(bytes).with_context(|| format!("{} is not a valid feature-store index", path.display()))?;
        if index.format != FORMAT {
            bail!("{}: format {:?}, expected {:?}", path.display(), index.format, FORMAT);
        }
        if index.version != VERSION {
            bail!(
                "{}: feature-store version {}, this build reads version {}",
                path.display(),
                index.version,
                VERSION
            );
        }
        index.validate().with_context(|| format!("checking the index {}", path.display()))?;
        // Implausible frame times (e.g. an older gcg's variable-frame-rate videos) do not stop the
        // store from opening: `gcg store verify` lists them and `--repair` drops them.
        let bad = index.time_faults();
        if let Some((id, why)) = bad.first() {
            tracing::warn!(
                "{}: {} videos have implausible frame times (e.g. video {id}: {why}); `gcg store verify` lists them, \
                 `--repair` drops them for `gcg features` to recompute",
                path.display(),
                bad.len()
            );
        }
        Ok(index)
    }

    /// Videos whose duration, fps or frame times fail [`check_times`], with the reason.
    pub fn time_faults(&self) -> Vec<(String, String)> {
        self.videos
            .iter()
            .filter_map(|(id, v)| {
                check_times(&v.timestamps, v.duration, v.fps)
                    .err()
                    .map(|e| (id.clone(), format!("{e:#}")))
            })
            .collect()
    }

    /// Every entry points at a listed shard of the right kind, with consistent byte ranges.
    pub fn validate(&self) -> Result<()> {
        for (id, v) in &self.videos {
            let shard = self
                .shards
                .get(&v.shard)
                .with_context(|| format!("video {id}: shard {} is not listed", v.shard))?;
            ensure!(
                shard.kind == ShardKind::Videos,
                "video {id}: shard {} is not a video shard",
                v.shard
            );
            for t in v.features.iter().chain([&v.frame_embeds]) {
                t.validate().with_context(|| format!("video {id}"))?;
                ensure!(
                    t.offsets[1] <= shard.bytes,
                    "video {id}: tensor {} ends at byte {} past the end of shard {} ({} bytes)",
                    t.name,
                    t.offsets[1],
                    v.shard,
                    shard.bytes
                );
            }
            ensure!(
                v.timestamps.is_empty() || v.timestamps.len() == v.num_frames,
                "video {id}: {} timestamps for {} frames",
                v.timestamps.len(),
                v.num_frames
            );
            let meta = self
                .meta
                .with_context(|| format!("video {id}: the index has no meta (tokens, width, embed_dim)"))?;
            let features = v
                .features
                .as_ref()
                .map(|f| ("features", f, StoreDType::F16, vec![v.num_frames, meta.tokens, meta.width]));
            let want = features
                .into_iter()
                .chain([("frame_embeds", &v.frame_embeds, StoreDType::F32, vec![v.num_frames, meta.embed_dim])]);
            for (field, t, dtype, shape) in want {
                ensure!(
                    t.dtype == dtype && t.shape == shape,
                    "video {id}: {field} is {:?} {:?}, expected {:?} {:?} (num_frames {}, meta tokens {}, width {}, embed_dim {})",
                    t.dtype,
                    t.shape,
                    dtype,
                    shape,
                    v.num_frames,
                    meta.tokens,
                    meta.width,
                    meta.embed_dim
                );
            }
        }
        for (name, s) in &self.shards {
            for t in s.tensors.values() {
                t.validate().with_context(|| format!("shard {name}"))?;
                ensure!(t.offsets[1] <= s.bytes, "shard {name}: tensor {} ends past the file end", t.name);
            }
        }
        for (key, q) in &self.questions {
            let shard = self
                .shards
                .get(&q.shard)
                .with_context(|| format!("question {key}: shard {} is not listed", q.shard))?;
            ensure!(
                shard.kind == ShardKind::Questions,
                "question {key}: shard {} is not a question shard",
                q.shard
            );
            let text = shard
                .tensors
                .get("text_embeds")
                .with_context(|| format!("question shard {} has no text_embeds", q.shard))?;
            ensure!(
                text.shape.len() == 2 && q.text_row + q.num_text_rows() <= text.shape[0],
                "question {key}: text rows {}..{} outside text_embeds {:?} of shard {}",
                q.text_row,
                q.text_row + q.num_text_rows(),
                text.shape,
                q.shard
            );
            let curves = shard
                .tensors
                .get("curves")
                .with_context(|| format!("question shard {} has no curves", q.shard))?;
            ensure!(
                q.curve_start + q.num_frames <= curves.numel(),
                "question {key}: curve {}..{} outside curves {:?} of shard {}",
                q.curve_start,
                q.curve_start + q.num_frames,
                curves.shape,
                q.shard
            );
            ensure!(
                text.dtype == StoreDType::F32 && self.meta.is_some_and(|m| text.shape[1] == m.embed_dim),
                "question {key}: text_embeds of shard {} is {:?} {:?}, the store's CLIP width is {:?}",
                q.shard,
                text.dtype,
                text.shape,
                self.meta.map(|m| m.embed_dim)
            );
            ensure!(
                curves.dtype == StoreDType::F32,
                "question shard {}: curves are {:?}, expected F32",
                q.shard,
                curves.dtype
            );
            let video = self
                .videos
                .get(&q.video)
                .with_context(|| format!("question {key}: its video {} is not in the store", q.video))?;
            ensure!(
                q.num_frames == video.num_frames,
                "question {key}: num_frames {}, but its video {} has {} frames",
                q.num_frames,
                q.video,
                video.num_frames
            );
            if let Some(from) = q.video_shard.as_deref() {
                ensure!(
                    from == video.shard,
                    "question {key}: labelled from video {} in shard {from}, but the store's {} is the one in shard {}",
                    q.video,
                    q.video,
                    video.shard
                );
            }
            // num_options may be 0 (open-ended questions); that it matches the annotations is
            // checked by the batch reader, which has them.
            ensure!(
                q.pseudo_labels.iter().all(|&t| t < q.num_frames) && q.pseudo_labels.windows(2).all(|w| w[0] < w[1]),
                "question {key}: pseudo-labels {:?} are not increasing frame indices below its {} frames",
                q.pseudo_labels,
                q.num_frames
            );
        }
        Ok(())
    }
}

/// Identity of one version of `index.json` (a rename gives a new inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

impl Stamp {
    pub(crate) fn of(m: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(m);
        #[cfg(not(unix))]
        let inode = 0;
        Self {
            len: m.len(),
            modified: m.modified().ok(),
            inode,
        }
    }
}

/// Reads `index.json` of `dir` (an empty index when there is none).
pub(crate) fn read_index(dir: &Path) -> Result<(Index, Option<Stamp>)> {
    let path = dir.join(INDEX_FILE);
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Index::default(), None)),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let stamp = Stamp::of(&f.metadata()?);
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    Ok((Index::from_bytes(&bytes, &path)?, Some(stamp)))
}
