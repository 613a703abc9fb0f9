//! The feature store: everything frozen that training and evaluation read instead of videos.
//!
//! Per video: the un-normalised ViT features E ∈ R^{T×257×1408} (f16, as the official code
//! caches them), the CLIP frame embeddings F ∈ R^{T×1024} (f32), the frame times and the video's
//! duration and fps. Per question: the CLIP text embeddings of the question, the options, the
//! answer and the event text, the similarity curve s_t = cos(F_t, text(event)) and the
//! pseudo-labels (the K frames with the highest s_t, sorted by time).
//!
//! # On-disk format (version 1)
//!
//! ```text
//! STORE/
//!   index.json        the index (below); replaced atomically on every commit
//!   index.lock        locked (flock) by a writer while it rewrites the index
//!   shards/
//!     videos-<ms>-<pid>-<n>.safetensors      per-video tensors
//!     questions-<ms>-<pid>-<n>.safetensors   packed per-question tensors
//! ```
//!
//! Shards are ordinary safetensors files (readable by `safetensors.safe_open` in Python); their
//! `__metadata__` says `{"format": "gcg-feature-store", "kind": "videos"|"questions"}` and lists
//! the shard's records as JSON strings (`videos` + `store_meta`: [`ShardVideo`] per video and
//! the feature sizes; `questions`: `[key, QuestionEntry]` pairs), from which
//! [`rebuild_index`] rebuilds a lost index. Tensors
//! are laid out by descending element size after an 8-byte-aligned header, so every tensor is
//! aligned to its element size in the file (and in a memory map of it).
//!
//! * A **video shard** holds, for each video `V` in it, `V/features` F16 [T, 257, 1408],
//!   `V/frame_embeds` F32 [T, 1024] and (when known) `V/timestamps` F64 [T].
//! * A **question shard** holds three packed tensors: `text_embeds` F32 [rows, 1024] (per
//!   question, consecutive rows: question, each option, answer, event text), `curves` F32 [Σ T]
//!   (each question's s_t) and `pseudo_labels` I64 [Σ K].
//!
//! `index.json` (see [`Index`]):
//!
//! ```json
//! { "format": "gcg-feature-store", "version": 1, "generation": 7,
//!   "meta": { "tokens": 257, "width": 1408, "embed_dim": 1024 },
//!   "shards": { "videos-…": { "kind": "videos", "bytes": 185000000 },
//!               "questions-…": { "kind": "questions", "bytes": 9000000,
//!                                "tensors": { "text_embeds": { "name": "text_embeds", "dtype": "F32",
//!                                                              "shape": [2400, 1024], "offsets": [136, 9830536] }, … } } },
//!   "videos": { "4010069381": { "shard": "videos-…", "num_frames": 32, "timestamps": [0.5, …],
//!                               "duration": 12.3, "fps": 29.97, "source": "…/4010069381.mp4",
//!                               "features": { "name": "4010069381/features", "dtype": "F16",
//!                                             "shape": [32, 257, 1408], "offsets": [4096, 23162880] },
//!                               "frame_embeds": { … },
//!                               "extractor": { "sampling": "uniform",
//!                                              "models": "vit fnv1a64:… + clip image fnv1a64:…",
//!                                              "precision": "f32" } } },
//!   "questions": { "4010069381_6": { "shard": "questions-…", "video": "4010069381",
//!                                    "num_options": 5, "text_row": 0, "curve_start": 0, "num_frames": 32,
//!                                    "pseudo_labels": [3, 4, 17, 30], "event_mode": "answer",
//!                                    "event": "roll the handle",
//!                                    "text_encoder": "clip text fnv1a64:…, tokenizer fnv1a64:…" } } }
//! ```
//!
//! # What the index promises (checked by [`Index::validate`] on every open and commit)
//!
//! Beyond byte ranges inside listed shards of the right kind: every video's `features` is F16
//! `[num_frames, meta.tokens, meta.width]` and its `frame_embeds` F32 `[num_frames,
//! meta.embed_dim]`; its `timestamps` (empty or one per frame) are finite, ≥ 0, non-decreasing
//! and at most `duration` + max(0.5 s, 2 / fps); `duration` and `fps`, when present, are finite
//! and > 0 ([`check_times`]). Every question's `video` is in the store with the question's
//! `num_frames`, its pseudo-labels are increasing frame indices below it, and its shard's
//! `text_embeds` is F32 of width `meta.embed_dim` (`num_options` may be 0: open-ended
//! questions; the batch reader checks it against the annotations). The writer refuses records
//! that would break these, naming the record and field.
//!
//! # Provenance
//!
//! `extractor` (per video: how the frames were sampled, which ViT + CLIP image weights made
//! the features and in what arithmetic, see [`crate::features::provenance`]) and `text_encoder`
//! (per question: the CLIP
//! text weights and tokenizer) are optional: stores written before they were recorded still
//! open, and their records are of *unknown provenance*, taken as made with a run's settings (a
//! warning says how many). `gcg features` / `gcg labels` skip only records made the same way (T
//! included): stored records made otherwise are an error up front naming how many and what
//! differs (`--overwrite` recomputes them), and a run that would leave videos of different T in
//! one store is refused. Recomputing a video drops its questions (their pseudo-labels came from
//! its old frame embeddings), and each question names the video entry (its shard) its labels
//! were read from, so labels of an entry stored again since are refused. `gcg store verify`
//! reports a store that mixes T, extractors, precisions or text encoders ([`consistency`]).
//!
//! `offsets` are absolute byte ranges in the shard file, so a read is a map lookup and a slice
//! of a memory map: no JSON is parsed after the index, no header is read per access.
//!
//! # Writing, atomically
//!
//! A [`StoreWriter`] buffers records and commits them as one shard: write it to
//! `shards/.<name>.tmp-<pid>`, fsync, rename to `<name>`, fsync the directory; then, holding
//! `index.lock`, re-read `index.json` (other writers may have committed), add the entries,
//! write `.index.json.tmp-<pid>`, fsync, rename over `index.json`, fsync the directory. So the
//! index only ever names complete shards; a crash leaves at worst a temporary file (removed by
//! the next writer once its process is gone) or a complete shard the index does not name
//! ([`Snapshot::unlisted_shards`]); the records in it are simply redone. Shards are never
//! modified or deleted once named, so a reader's snapshot stays valid while writers append.
//!
//! For tests, [`WriterOptions::fault`] simulates a crash at each of these points ([`Fault`];
//! the CLI reads it from `GCG_STORE_FAULT=shard-written|shard-renamed|index-written:N[:abort]`).
//!
//! # Reading
//!
//! [`Store::open`] parses the index once into a [`Snapshot`]; [`Store::refresh`] swaps in a new
//! one when `index.json` changed. Shards are memory-mapped once and shared by all snapshots. F16
//! features are borrowed straight from the map ([`MappedTensor::as_f16`]) and copied once into
//! a tensor (converted to f32 / bf16 on the way when asked). [`crate::data::batch`] collates
//! training batches from it with prefetching workers.

mod check;
mod format;
mod index;
mod reader;
mod writer;

pub use check::{
    check, consistency, drop_broken, dropped_counts, BrokenShard, CheckOptions, Consistency, NonFiniteRecord, ShardFault, StoreCheck,
    RECOMPUTE_HINT,
};
pub(crate) use format::f16_to_f32;
pub use format::read_header;
pub use index::{
    check_times, time_tolerance, Extractor, Index, QuestionEntry, ShardInfo, ShardKind, ShardVideo, StoreDType, StoreMeta, TensorLoc,
    VideoEntry, FORMAT, INDEX_FILE, LOCK_FILE, SHARD_DIR, VERSION,
};
pub(crate) use reader::f16_to_bf16;
pub use reader::{MappedTensor, QuestionTexts, Snapshot, Store};
pub use writer::{
    lost_index_message, lost_index_shards, rebuild_index, Fault, FaultAction, FaultPoint, QuestionRecord, Rebuilt, Repaired, StoreWriter,
    VideoRecord, WriterOptions, QUARANTINE_DIR,
};
