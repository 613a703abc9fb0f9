//! Checking a store against its shards, and dropping what is broken so it gets recomputed.
//!
//! The index is the store's promise: every entry it lists can be read. A shard deleted, cut
//! short or altered behind the store's back breaks that promise for every record in it; so do
//! records holding NaN or ±∞ (written before the writer refused them, or imported). [`check`]
//! finds both, at three depths ([`CheckOptions`]): file existence and size (cheap, done by every
//! writer when it opens the store), safetensors headers against the index, and the whole bytes
//! (CRC-32 recorded at write time, and every value finite). [`drop_broken`] removes what a check
//! found from an index, so `gcg features` / `gcg labels` recompute exactly those records.

use super::format::{f16_from_bytes, f32_from_bytes, f64_from_bytes, file_crc32, read_header};
use super::index::{Index, ShardKind, TensorLoc, SHARD_DIR};
use crate::util::{non_finite_f16, non_finite_f32, non_finite_f64, NonFinite};
use anyhow::{Context, Result};
use memmap2::Mmap;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

/// How deep [`check`] looks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// Read each shard's safetensors header and compare it with the index.
    pub headers: bool,
    /// Read every byte: compare each shard's CRC-32 with the one the index recorded.
    pub checksums: bool,
    /// Read every value: features, embeddings, curves and times must be finite.
    pub values: bool,
}

impl CheckOptions {
    /// Existence and size of every listed shard (one `stat` per shard).
    pub fn quick() -> Self {
        Self::default()
    }

    /// Everything: headers, checksums and values.
    pub fn full() -> Self {
        Self {
            headers: true,
            checksums: true,
            values: true,
        }
    }
}

/// What is wrong with a shard file.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardFault {
    Missing,
    Size { actual: u64, expected: u64 },
    Header(String),
    Checksum { actual: u32, expected: u32 },
}

impl fmt::Display for ShardFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => write!(f, "the file is missing"),
            Self::Size { actual, expected } => write!(f, "{actual} bytes, the index says {expected}"),
            Self::Header(e) => write!(f, "its header disagrees with the index: {e}"),
            Self::Checksum { actual, expected } => {
                write!(f, "CRC-32 {actual:08x}, the index recorded {expected:08x} (the bytes changed)")
            }
        }
    }
}

/// A listed shard that cannot be read as the index says.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokenShard {
    pub name: String,
    pub kind: ShardKind,
    pub fault: ShardFault,
}

/// A video or question whose stored values are not all finite.
#[derive(Debug, Clone, PartialEq)]
pub struct NonFiniteRecord {
    /// `video` or `question`.
    pub kind: &'static str,
    pub id: String,
    /// The shard its entry pointed at when checked (a repair drops the entry only if it still
    /// does: a record recomputed meanwhile is kept).
    pub shard: String,
    /// Which tensor, e.g. `features [T, N, D]`.
    pub tensor: String,
    pub detail: String,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreCheck {
    pub options: CheckOptions,
    pub shards: usize,
    pub videos: usize,
    pub questions: usize,
    pub broken: Vec<BrokenShard>,
    /// Records whose shard is broken (they need recomputing).
    pub lost_videos: Vec<String>,
    pub lost_questions: Vec<String>,
    pub non_finite: Vec<NonFiniteRecord>,
    /// Complete shard files the index does not list (left by a writer stopped before publishing;
    /// harmless, their records were or will be redone).
    pub unlisted: Vec<String>,
    /// Shards written before checksums were recorded (not checksum-checked).
    pub without_checksum: usize,
    /// What a repair ([`drop_broken`]) drops: the lost and non-finite videos, and the questions
    /// in broken shards, holding non-finite values or labelled on a dropped video.
    pub drop_videos: Vec<String>,
    pub drop_questions: Vec<String>,
}

impl StoreCheck {
    /// Nothing listed is broken or non-finite (unlisted leftovers do not count).
    pub fn is_clean(&self) -> bool {
        self.broken.is_empty() && self.non_finite.is_empty()
    }

    /// Shards and records to drop from the index so they get recomputed.
    pub fn to_drop(&self) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
        let shards = self.broken.iter().map(|b| b.name.clone()).collect();
        let mut videos: BTreeSet<String> = self.lost_videos.iter().cloned().collect();
        let mut questions: BTreeSet<String> = self.lost_questions.iter().cloned().collect();
        for r in &self.non_finite {
            match r.kind {
                "video" => videos.insert(r.id.clone()),
                _ => questions.insert(r.id.clone()),
            };
        }
        (shards, videos, questions)
    }

    /// A few lines for people: one per broken shard and bad record (the first 20 of each).
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        for b in self.broken.iter().take(20) {
            out.push(format!("shard {} ({:?}): {}", b.name, b.kind, b.fault));
        }
        if self.broken.len() > 20 {
            out.push(format!("… and {} more broken shards", self.broken.len() - 20));
        }
        if !self.lost_videos.is_empty() || !self.lost_questions.is_empty() {
            out.push(format!(
                "records in broken shards: {} videos (e.g. {}), {} questions (e.g. {})",
                self.lost_videos.len(),
                self.lost_videos.first().map_or("-", String::as_str),
                self.lost_questions.len(),
                self.lost_questions.first().map_or("-", String::as_str)
            ));
        }
        for r in self.non_finite.iter().take(20) {
            if r.tensor == "frame times" {
                out.push(format!("{} {}: implausible frame times: {}", r.kind, r.id, r.detail));
            } else if r.tensor == "frame time copies" {
                out.push(format!("{} {}: its frame times disagree: {}", r.kind, r.id, r.detail));
            } else {
                out.push(format!("{} {}: {} holds {}", r.kind, r.id, r.tensor, r.detail));
            }
        }
        if self.non_finite.len() > 20 {
            out.push(format!("… and {} more records with non-finite values", self.non_finite.len() - 20));
        }
        if !self.is_clean() {
            out.push(format!(
                "a repair drops {}; {}",
                dropped_counts(&self.drop_videos, &self.drop_questions),
                RECOMPUTE_HINT
            ));
        }
        out.join("\n")
    }
}

/// Whether the records of a store were made alike: one T, one extractor, one text encoder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Consistency {
    /// One line per way the store mixes records made differently (empty: it does not).
    pub mixed: Vec<String>,
    /// Videos and questions with no recorded provenance (written by an older gcg).
    pub unknown_videos: usize,
    pub unknown_questions: usize,
}

/// Groups `items` (id, value) by value: "N × value (e.g. id)", most frequent first.
fn groups<'a>(items: impl Iterator<Item = (&'a String, String)>) -> Vec<String> {
    let mut by: BTreeMap<String, (usize, &'a String)> = BTreeMap::new();
    for (id, v) in items {
        by.entry(v).or_insert((0, id)).0 += 1;
    }
    let mut g: Vec<(String, (usize, &String))> = by.into_iter().collect();
    g.sort_by(|a, b| b.1 .0.cmp(&a.1 .0));
    g.into_iter().map(|(v, (n, id))| format!("{n} with {v} (e.g. {id})")).collect()
}

/// Finds records of one store made differently: videos with different T or extractors,
/// questions embedded by different text encoders (records of unknown provenance are counted,
/// not compared).
pub fn consistency(index: &Index) -> Consistency {
    let mut c = Consistency::default();
    let t = groups(index.videos.iter().map(|(id, v)| (id, format!("T = {}", v.num_frames))));
    if t.len() > 1 {
        c.mixed.push(format!("videos with different frame counts: {}", t.join("; ")));
    }
    let known = index.videos.iter().filter_map(|(id, v)| v.extractor.as_ref().map(|e| (id, e)));
    let e = groups(known.map(|(id, e)| (id, format!("sampling {}, networks {}", e.sampling, e.models))));
    if e.len() > 1 {
        c.mixed.push(format!("videos extracted differently: {}", e.join("; ")));
    }
    // The arithmetic is compared among the videos that record it (older ones match any).
    let p = groups(index.videos.iter().filter_map(|(id, v)| {
        v.extractor
            .as_ref()
            .and_then(|e| e.precision.as_ref())
            .map(|p| (id, format!("precision {p}")))
    }));
    if p.len() > 1 {
        c.mixed.push(format!("videos computed in different precisions: {}", p.join("; ")));
    }
    let known = index
        .questions
        .iter()
        .filter_map(|(k, q)| q.text_encoder.as_ref().map(|e| (k, e.clone())));
    let q = groups(known.map(|(k, e)| (k, format!("text encoder {e}"))));
    if q.len() > 1 {
        c.mixed
            .push(format!("questions embedded by different text encoders: {}", q.join("; ")));
    }
    c.unknown_videos = index.videos.values().filter(|v| v.extractor.is_none()).count();
    c.unknown_questions = index.questions.values().filter(|q| q.text_encoder.is_none()).count();
    c
}

/// How to get dropped records back (after a repair).
pub const RECOMPUTE_HINT: &str = "rerun `gcg features` for the videos, then `gcg labels` for the questions (the questions of a \
                                  dropped video go with it, their pseudo-labels came from its frames)";

/// "N videos (e.g. V) and M questions (e.g. Q)".
pub fn dropped_counts(videos: &[String], questions: &[String]) -> String {
    format!(
        "{} videos (e.g. {}) and {} questions (e.g. {})",
        videos.len(),
        videos.first().map_or("-", String::as_str),
        questions.len(),
        questions.first().map_or("-", String::as_str)
    )
}

/// Checks the index of the store in `dir` against its shard files.
pub fn check(dir: &Path, index: &Index, opts: CheckOptions) -> Result<StoreCheck> {
    let shard_dir = dir.join(SHARD_DIR);
    let mut report = StoreCheck {
        options: opts,
        shards: index.shards.len(),
        videos: index.videos.len(),
        questions: index.questions.len(),
        ..Default::default()
    };
    let mut maps: BTreeMap<&str, Mmap> = BTreeMap::new();
    let mut headers: BTreeMap<&str, BTreeMap<String, TensorLoc>> = BTreeMap::new();
    for (name, info) in &index.shards {
        let path = shard_dir.join(name);
        let fault = match shard_fault(&path, name, index, opts)? {
            Some(f) => f,
            None => {
                if opts.checksums && info.crc32.is_none() {
                    report.without_checksum += 1;
                }
                if opts.values {
                    let file = std::fs::File::open(&path).with_context(|| format!("opening shard {}", path.display()))?;
                    // SAFETY: published shards are never modified in place (the store's contract).
                    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping shard {}", path.display()))?;
                    maps.insert(name.as_str(), map);
                    if info.kind == ShardKind::Videos {
                        headers.insert(name.as_str(), read_header(&path)?.0);
                    }
                }
                continue;
            }
        };
        report.broken.push(BrokenShard {
            name: name.clone(),
            kind: info.kind,
            fault,
        });
    }
    let broken: BTreeSet<&str> = report.broken.iter().map(|b| b.name.as_str()).collect();
    report.lost_videos = index
        .videos
        .iter()
        .filter(|(_, v)| broken.contains(v.shard.as_str()))
        .map(|(id, _)| id.clone())
        .collect();
    report.lost_questions = index
        .questions
        .iter()
        .filter(|(_, q)| broken.contains(q.shard.as_str()))
        .map(|(k, _)| k.clone())
        .collect();
    if opts.values {
        report.non_finite = non_finite_records(index, &maps);
        report.non_finite.extend(time_copies_differ(index, &maps, &headers));
    }
    // Implausible frame times are read from the index alone: checked at every depth.
    for (id, why) in index.time_faults() {
        report.non_finite.push(NonFiniteRecord {
            kind: "video",
            shard: index.videos[&id].shard.clone(),
            id,
            tensor: "frame times".into(),
            detail: why,
        });
    }
    report.unlisted = unlisted_shards(&shard_dir, index)?;
    if !report.is_clean() {
        let (videos, questions) = drop_broken(&mut index.clone(), &report);
        report.drop_videos = videos;
        report.drop_questions = questions;
    }
    Ok(report)
}

/// What is wrong with one listed shard, at the depth asked.
fn shard_fault(path: &Path, name: &str, index: &Index, opts: CheckOptions) -> Result<Option<ShardFault>> {
    let info = &index.shards[name];
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(ShardFault::Missing)),
        Err(e) => return Err(e).with_context(|| format!("shard {}", path.display())),
    };
    if len != info.bytes {
        return Ok(Some(ShardFault::Size {
            actual: len,
            expected: info.bytes,
        }));
    }
    if opts.headers || opts.values {
        let tensors = match read_header(path) {
            Ok((t, _)) => t,
            Err(e) => return Ok(Some(ShardFault::Header(format!("{e:#}")))),
        };
        let listed = info.tensors.values().chain(
            index
                .videos
                .values()
                .filter(|v| v.shard == name)
                .flat_map(|v| v.features.iter().chain([&v.frame_embeds])),
        );
        for t in listed {
            if tensors.get(&t.name) != Some(t) {
                return Ok(Some(ShardFault::Header(format!("tensor {} is not where the index says", t.name))));
            }
        }
    }
    if opts.checksums {
        if let Some(expected) = info.crc32 {
            let actual = file_crc32(path)?;
            if actual != expected {
                return Ok(Some(ShardFault::Checksum { actual, expected }));
            }
        }
    }
    Ok(None)
}

fn bytes<'a>(map: &'a Mmap, t: &TensorLoc) -> &'a [u8] {
    &map[t.offsets[0] as usize..t.offsets[1] as usize]
}

/// Videos and questions (in readable shards) holding NaN or ±∞.
fn non_finite_records(index: &Index, maps: &BTreeMap<&str, Mmap>) -> Vec<NonFiniteRecord> {
    let mut out = Vec::new();
    let mut push = |kind, id: &str, shard: &str, tensor: String, shape: &[usize], bad: Option<NonFinite>| {
        if let Some(b) = bad {
            out.push(NonFiniteRecord {
                kind,
                id: id.to_string(),
                shard: shard.to_string(),
                tensor,
                detail: b.describe(shape),
            });
        }
    };
    for (id, v) in &index.videos {
        let Some(map) = maps.get(v.shard.as_str()) else { continue };
        if let Some(f) = &v.features {
            push(
                "video",
                id,
                &v.shard,
                format!("features {:?}", f.shape),
                &f.shape,
                non_finite_f16(&f16_from_bytes(bytes(map, f))),
            );
        }
        let e = &v.frame_embeds;
        push(
            "video",
            id,
            &v.shard,
            format!("frame_embeds {:?}", e.shape),
            &e.shape,
            non_finite_f32(&f32_from_bytes(bytes(map, e))),
        );
        push(
            "video",
            id,
            &v.shard,
            "timestamps".into(),
            &[v.timestamps.len()],
            non_finite_f64(&v.timestamps),
        );
    }
    for (key, q) in &index.questions {
        let Some(map) = maps.get(q.shard.as_str()) else { continue };
        let tensors = &index.shards[&q.shard].tensors;
        if let Some(t) = tensors.get("text_embeds") {
            let e = t.shape[1];
            let rows = &bytes(map, t)[q.text_row * e * 4..(q.text_row + q.num_text_rows()) * e * 4];
            let shape = [q.num_text_rows(), e];
            push(
                "question",
                key,
                &q.shard,
                "text_embeds (question, options, answer, event)".into(),
                &shape,
                non_finite_f32(&f32_from_bytes(rows)),
            );
        }
        if let Some(t) = tensors.get("curves") {
            let curve = &bytes(map, t)[q.curve_start * 4..(q.curve_start + q.num_frames) * 4];
            push(
                "question",
                key,
                &q.shard,
                "curve s_t".into(),
                &[q.num_frames],
                non_finite_f32(&f32_from_bytes(curve)),
            );
        }
    }
    out
}

/// Videos whose frame times in the index differ from their shard's copy (`V/timestamps`): one
/// of the two was changed behind the store's back (an edited index.json), and which is right
/// is unknown, so the video is recomputed.
fn time_copies_differ(
    index: &Index,
    maps: &BTreeMap<&str, Mmap>,
    headers: &BTreeMap<&str, BTreeMap<String, TensorLoc>>,
) -> Vec<NonFiniteRecord> {
    let mut out = Vec::new();
    for (id, v) in &index.videos {
        let (Some(map), Some(tensors)) = (maps.get(v.shard.as_str()), headers.get(v.shard.as_str())) else {
            continue;
        };
        let stored = tensors
            .get(&format!("{id}/timestamps"))
            .map(|t| f64_from_bytes(bytes(map, t)))
            .unwrap_or_default();
        let same = stored.len() == v.timestamps.len() && stored.iter().zip(&v.timestamps).all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            let first = (0..stored.len().max(v.timestamps.len()))
                .find(|&i| stored.get(i).map(|x| x.to_bits()) != v.timestamps.get(i).map(|x| x.to_bits()))
                .unwrap_or(0);
            let show = |t: &[f64]| t.get(first).map_or("none".to_string(), |x| format!("{x} s"));
            out.push(NonFiniteRecord {
                kind: "video",
                id: id.clone(),
                shard: v.shard.clone(),
                tensor: "frame time copies".into(),
                detail: format!(
                    "the index's {} times differ from the shard's {} (frame {first}: {} in the index, {} in the shard)",
                    v.timestamps.len(),
                    stored.len(),
                    show(&v.timestamps),
                    show(&stored)
                ),
            });
        }
    }
    out
}

/// Complete shard files in `shard_dir` the index does not list.
pub(crate) fn unlisted_shards(shard_dir: &Path, index: &Index) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(shard_dir).with_context(|| format!("listing {}", shard_dir.display()))? {
        let name = e?.file_name().to_string_lossy().to_string();
        if name.ends_with(".safetensors") && !name.starts_with('.') && !index.shards.contains_key(&name) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Removes from `index` the broken shards, every record in them, the records with non-finite
/// values, and the questions of every removed video (their curves were made from its frames).
/// Returns the removed (videos, questions).
pub fn drop_broken(index: &mut Index, found: &StoreCheck) -> (Vec<String>, Vec<String>) {
    let (shards, _, _) = found.to_drop();
    // From the index as it is now (another writer may have recomputed records since the check):
    // the entries in broken shards, and the bad records whose entry is still the one checked.
    let mut videos: BTreeSet<String> = index
        .videos
        .iter()
        .filter(|(_, v)| shards.contains(&v.shard))
        .map(|(id, _)| id.clone())
        .collect();
    let mut questions: BTreeSet<String> = BTreeSet::new();
    for r in &found.non_finite {
        let current = match r.kind {
            "video" => index.videos.get(&r.id).map(|v| &v.shard),
            _ => index.questions.get(&r.id).map(|q| &q.shard),
        };
        if current == Some(&r.shard) {
            match r.kind {
                "video" => videos.insert(r.id.clone()),
                _ => questions.insert(r.id.clone()),
            };
        }
    }
    for (key, q) in &index.questions {
        if videos.contains(&q.video) || shards.contains(&q.shard) {
            questions.insert(key.clone());
        }
    }
    questions.retain(|k| index.questions.contains_key(k));
    for s in &shards {
        index.shards.remove(s);
    }
    for v in &videos {
        index.videos.remove(v);
    }
    for q in &questions {
        index.questions.remove(q);
    }
    (videos.into_iter().collect(), questions.into_iter().collect())
}
