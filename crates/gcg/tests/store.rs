//! The feature store: round trips, atomic commits, concurrent readers and writers, feature
//! extraction, pseudo-labels and batches.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gcg::data::batch::{Batch, BatchLoader, BatchOptions};
use gcg::data::{Answer, Dataset, QaSample};
use gcg::features::extract::{extract_features, ExtractOptions, FeatureModels, VideoFrames, VideoJob};
use gcg::features::frozen;
use gcg::features::labels::{label_questions, pseudo_labels, top_k_sorted, ClipTextEncoder, EventSource, LabelOptions};
use gcg::store::{read_header, Fault, FaultAction, FaultPoint, QuestionRecord, Store, StoreWriter, VideoRecord, WriterOptions, SHARD_DIR};
use gcg::text::tokenizers::ClipTokenizer;
use gcg::SeededRng;
use half::{bf16, f16};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

fn seed_of(id: &str) -> u64 {
    id.bytes()
        .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// A random f16 bit pattern that is finite (subnormals, zeros of both signs and the extremes
/// included; NaN and ±∞, which the writer refuses, mapped to the largest finite magnitude).
fn finite_f16(rng: &mut SeededRng) -> f16 {
    let b = rng.next_u64() as u16;
    f16::from_bits(if b & 0x7c00 == 0x7c00 { (b & 0x8000) | 0x7bff } else { b })
}

/// A video whose f16 features are arbitrary finite bit patterns (subnormals, signed zeros,
/// extremes): a round trip must keep every bit.
fn video(id: &str, t: usize, n: usize, d: usize, e: usize) -> VideoRecord {
    let mut rng = SeededRng::new(seed_of(id));
    VideoRecord {
        id: id.to_string(),
        features: (0..t * n * d).map(|_| finite_f16(&mut rng)).collect(),
        features_shape: [t, n, d],
        frame_embeds: rng.normal_vec(t * e, 0.0, 1.0),
        embed_dim: e,
        timestamps: (0..t).map(|i| 0.25 + i as f64 * 1.5).collect(),
        duration: Some(t as f64 * 1.5),
        fps: Some(29.97),
        source: Some(format!("/videos/{id}.mp4")),
        source_fingerprint: None,
        extractor: None,
        embeddings_only: false,
    }
}

fn question(key: &str, video: &str, t: usize, e: usize, o: usize, k: usize) -> QuestionRecord {
    let mut rng = SeededRng::new(seed_of(key));
    let curve = rng.normal_vec(t, 0.0, 1.0);
    let labels = top_k_sorted(&curve, k).unwrap();
    QuestionRecord {
        key: key.to_string(),
        video: video.to_string(),
        question: rng.normal_vec(e, 0.0, 1.0),
        options: rng.normal_vec(o * e, 0.0, 1.0),
        num_options: o,
        answer: rng.normal_vec(e, 0.0, 1.0),
        event: rng.normal_vec(e, 0.0, 1.0),
        event_mode: "answer".into(),
        event_text: format!("event of {key}"),
        curve,
        pseudo_labels: labels,
        text_encoder: None,
        texts_hash: None,
        video_shard: None,
    }
}

fn bits(xs: &[f16]) -> Vec<u16> {
    xs.iter().map(|x| x.to_bits()).collect()
}

fn small_shards() -> WriterOptions {
    WriterOptions {
        shard_bytes: 0,
        ..Default::default()
    }
}

#[test]
fn round_trip_is_bit_exact() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let recs: Vec<VideoRecord> = (0..5).map(|i| video(&format!("vid{i}"), 3 + i % 2, 5, 6, 4)).collect();
    let mut w = StoreWriter::open(
        dir.path(),
        WriterOptions {
            shard_bytes: 400, // two or three videos per shard
            ..Default::default()
        },
    )?;
    for r in &recs {
        w.add_video(r.clone())?;
    }
    let index = w.finish()?;
    assert!(index.shards.len() >= 2, "expected several shards, got {}", index.shards.len());

    let store = Store::open(dir.path())?;
    let snap = store.snapshot();
    snap.verify()?;
    assert!(snap.unlisted_shards()?.is_empty());
    for r in &recs {
        let v = snap.video(&r.id)?;
        assert_eq!(v.num_frames, r.num_frames());
        assert_eq!(v.timestamps, r.timestamps);
        assert_eq!((v.duration, v.fps, v.source.clone()), (r.duration, r.fps, r.source.clone()));
        let f = snap.features(&r.id)?;
        assert_eq!(f.shape(), &r.features_shape[..]);
        assert_eq!(bits(&f.as_f16()?), bits(&r.features), "features of {}", r.id);
        let t = snap.features_tensor(&r.id, DType::F16, &Device::Cpu)?;
        assert_eq!(t.dims(), &r.features_shape[..]);
        assert_eq!(bits(&t.flatten_all()?.to_vec1::<f16>()?), bits(&r.features));
        // f32: each value converted exactly (NaN stays NaN).
        let t32 = snap
            .features_tensor(&r.id, DType::F32, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in t32.iter().zip(&r.features) {
            let want = b.to_f32();
            assert!(a.to_bits() == want.to_bits() || (a.is_nan() && want.is_nan()), "{a} vs {want}");
        }
        let e = snap.frame_embeds(&r.id)?;
        assert_eq!(e.shape(), &[r.num_frames(), 4]);
        let got: Vec<u32> = e.to_f32()?.iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> = r.frame_embeds.iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want);
    }

    // The shards are standard safetensors: an independent parser finds the same bytes.
    for name in snap.index().shards.keys() {
        let bytes = std::fs::read(dir.path().join(SHARD_DIR).join(name))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let (_, meta) = read_header(&dir.path().join(SHARD_DIR).join(name))?;
        assert_eq!(meta.get("kind").map(String::as_str), Some("videos"));
        for (tname, view) in st.tensors() {
            let (id, what) = tname.split_once('/').unwrap();
            let r = recs.iter().find(|r| r.id == id).unwrap();
            match what {
                "features" => {
                    assert_eq!(view.dtype(), safetensors::Dtype::F16);
                    let want: Vec<u8> = r.features.iter().flat_map(|x| x.to_le_bytes()).collect();
                    assert_eq!(view.data(), &want[..]);
                }
                "frame_embeds" => {
                    let want: Vec<u8> = r.frame_embeds.iter().flat_map(|x| x.to_le_bytes()).collect();
                    assert_eq!(view.data(), &want[..]);
                }
                "timestamps" => {
                    let want: Vec<u8> = r.timestamps.iter().flat_map(|x| x.to_le_bytes()).collect();
                    assert_eq!(view.data(), &want[..]);
                }
                other => panic!("unexpected tensor {other}"),
            }
        }
    }
    Ok(())
}

#[test]
fn questions_round_trip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    w.add_video(video("a", 6, 2, 3, 8))?;
    w.add_video(video("b", 6, 2, 3, 8))?;
    w.flush()?;
    let qs = vec![
        question("a_1", "a", 6, 8, 5, 4),
        question("a_2", "a", 6, 8, 5, 2),
        question("b_1", "b", 6, 8, 0, 3),
    ];
    for q in &qs {
        w.add_question(q.clone())?;
    }
    w.flush()?;
    // A second question shard, replacing one entry.
    let mut replaced = question("a_2", "a", 6, 8, 5, 2);
    replaced.event_text = "replaced".into();
    replaced.event[0] = 42.0;
    w.add_question(replaced.clone())?;
    w.finish()?;

    let snap = Store::open(dir.path())?.snapshot();
    snap.verify()?;
    for q in [&qs[0], &qs[2], &replaced] {
        let entry = snap.question(&q.key)?;
        assert_eq!(entry.video, q.video);
        assert_eq!(entry.pseudo_labels, q.pseudo_labels);
        assert_eq!(entry.event, q.event_text);
        let t = snap.question_texts(&q.key)?;
        assert_eq!((t.dim, t.num_options), (8, q.num_options));
        assert_eq!(t.question, q.question);
        assert_eq!(t.options, q.options);
        assert_eq!(t.answer, q.answer);
        assert_eq!(t.event, q.event);
        assert_eq!(snap.curve(&q.key)?, q.curve);
    }
    assert_eq!(snap.index().questions.len(), 3);
    Ok(())
}

/// Labels made from one entry of a video are not attached to the next: a question whose video
/// was stored again (same T) while its job ran is refused at commit, naming both shards, whether
/// its record names the entry it was read from or leaves it to the writer's view, and the rest of
/// its batch is committed without it (the refused shard removed); the labels of the entry the
/// store holds are written, name it, and survive a rebuild of the index.
#[test]
fn labels_made_from_a_video_stored_again_since_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    w.add_video(video("a", 4, 2, 3, 8))?;
    w.add_video(video("b", 4, 2, 3, 8))?;
    w.finish()?;
    let shard_of = |id: &str| -> Result<String> { Ok(Store::open(dir.path())?.snapshot().video(id)?.shard.clone()) };
    let first = shard_of("a")?;
    // Labels of the first entry, committed while it is the store's: they name it.
    let mut early = StoreWriter::open(dir.path(), WriterOptions::default())?;
    early.add_question(question("a_0", "a", 4, 8, 5, 2))?;
    early.finish()?;
    assert_eq!(
        Store::open(dir.path())?.snapshot().question("a_0")?.video_shard.as_deref(),
        Some(first.as_str())
    );
    // Two labels jobs' writers open now, seeing the first entry of a...
    let mut named = StoreWriter::open(dir.path(), WriterOptions::default())?;
    let mut unnamed = StoreWriter::open(dir.path(), WriterOptions::default())?;
    // ...while `gcg features --overwrite` stores a again, with the same T (dropping a_0).
    let mut again = StoreWriter::open(dir.path(), WriterOptions::default())?;
    again.add_video(video("a", 4, 2, 3, 8))?;
    again.finish()?;
    let second = shard_of("a")?;
    assert_ne!(first, second);
    assert!(!Store::open(dir.path())?.snapshot().contains_question("a_0"));

    let mut q = question("a_1", "a", 4, 8, 5, 2);
    q.video_shard = Some(first.clone());
    named.add_question(q)?;
    named.add_question(question("b_1", "b", 4, 8, 5, 2))?;
    named.flush()?;
    let refused = named.take_refused_questions();
    assert!(
        refused.len() == 1
            && refused[0].0 == "a_1"
            && refused[0].1.contains(&first)
            && refused[0].1.contains(&second)
            && refused[0].1.contains("gcg labels"),
        "{refused:?}"
    );
    assert!(named.take_refused_questions().is_empty());
    unnamed.add_question(question("a_2", "a", 4, 8, 5, 2))?;
    unnamed.flush()?;
    let refused = unnamed.take_refused_questions();
    assert!(
        refused.len() == 1 && refused[0].0 == "a_2" && refused[0].1.contains(&first),
        "{refused:?}"
    );
    // The refusal showed the writer the store as it is: a question added now, its entry left
    // to the writer's view, is labelled on the entry the store holds and stored.
    unnamed.add_question(question("a_3", "a", 4, 8, 5, 2))?;
    unnamed.flush()?;
    assert!(unnamed.take_refused_questions().is_empty());
    drop((named, unnamed));
    // b_1, of the refused batch, was committed without a_1, and a_3; the refused shards are gone: every
    // shard file is one the index lists.
    let snap = Store::open(dir.path())?.snapshot();
    assert_eq!(snap.index().questions.keys().collect::<Vec<_>>(), ["a_3", "b_1"]);
    assert_eq!(snap.question("a_3")?.video_shard.as_deref(), Some(second.as_str()));
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join(SHARD_DIR))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    assert_eq!(files, snap.index().shards.keys().cloned().collect::<Vec<_>>());

    // Labels of the entry the store holds are written and name it; the index rebuilt from the
    // shards keeps them and leaves out a_0, made from the first entry.
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    w.add_question(question("a_1", "a", 4, 8, 5, 2))?;
    w.finish()?;
    let held = Store::open(dir.path())?.snapshot().question("a_1")?.video_shard.clone();
    assert_eq!(held.as_deref(), Some(second.as_str()));
    std::fs::remove_file(dir.path().join("index.json"))?;
    gcg::store::rebuild_index(dir.path())?;
    let snap = Store::open(dir.path())?.snapshot();
    snap.verify()?;
    assert_eq!(snap.index().questions.keys().collect::<Vec<_>>(), ["a_1", "a_3", "b_1"]);
    assert_eq!(snap.question("a_1")?.video_shard, held);
    Ok(())
}

#[test]
fn writer_rejects_inconsistent_records() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    w.add_video(video("a", 4, 2, 3, 8))?;
    let err = w.add_video(video("b", 4, 3, 3, 8)).unwrap_err().to_string();
    assert!(
        err.contains("video b") && err.contains("[T, 3, 3]") && err.contains("[T, 2, 3]"),
        "{err}"
    );
    let mut bad = video("c", 4, 2, 3, 8);
    bad.timestamps.pop();
    assert!(w.add_video(bad).unwrap_err().to_string().contains("3 timestamps for 4 frames"));
    // Questions need their video committed.
    let err = w.add_question(question("a_1", "a", 4, 8, 5, 2)).unwrap_err().to_string();
    assert!(err.contains("video a has no features"), "{err}");
    w.flush()?;
    let err = w.add_question(question("a_1", "a", 5, 8, 5, 2)).unwrap_err().to_string();
    assert!(err.contains("curve of 5 values") && err.contains("4 frames"), "{err}");
    let mut q = question("a_1", "a", 4, 8, 5, 2);
    q.pseudo_labels = vec![3, 1];
    assert!(w.add_question(q).unwrap_err().to_string().contains("not increasing"));
    let err = w.add_question(question("a_1", "a", 4, 7, 5, 2)).unwrap_err().to_string();
    assert!(err.contains("CLIP width is 8"), "{err}");
    w.finish()?;
    // A store of another feature size refuses the video at commit time too (second writer).
    let mut w2 = StoreWriter::open(dir.path(), WriterOptions::default())?;
    w2.reload()?;
    assert!(w2.add_video(video("z", 4, 9, 9, 8)).is_err());
    Ok(())
}

#[test]
fn writer_refuses_non_finite_values_naming_the_record_and_tensor() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    let mut v = video("nanvid", 4, 2, 3, 8);
    v.features[2 * 6 + 1 * 3 + 2] = f16::NAN; // frame 2, token 1, channel 2
    v.features[3 * 6] = f16::INFINITY;
    let err = w.add_video(v).unwrap_err().to_string();
    assert!(
        err.contains("video nanvid") && err.contains("ViT features") && err.contains("2 non-finite values (the first at [2, 1, 2])"),
        "{err}"
    );
    let mut v = video("infemb", 4, 2, 3, 8);
    v.frame_embeds[8 + 5] = f32::NEG_INFINITY;
    let err = w.add_video(v).unwrap_err().to_string();
    assert!(
        err.contains("video infemb") && err.contains("CLIP frame embeddings") && err.contains("[1, 5]"),
        "{err}"
    );
    w.add_video(video("ok", 4, 2, 3, 8))?;
    w.flush()?;
    let mut q = question("ok_1", "ok", 4, 8, 5, 2);
    q.options[3 * 8 + 7] = f32::NAN;
    let err = w.add_question(q).unwrap_err().to_string();
    assert!(
        err.contains("question ok_1 (video ok)") && err.contains("option embeddings") && err.contains("[3, 7]"),
        "{err}"
    );
    let mut q = question("ok_2", "ok", 4, 8, 5, 2);
    q.curve[1] = f32::NAN;
    let err = w.add_question(q).unwrap_err().to_string();
    assert!(
        err.contains("question ok_2") && err.contains("similarity curve") && err.contains("[1]"),
        "{err}"
    );
    let index = w.finish()?;
    assert_eq!(index.videos.keys().collect::<Vec<_>>(), ["ok"]);
    assert!(index.questions.is_empty());
    Ok(())
}

/// A store of three one-video shards and three one-question shards, as an older gcg or another tool
/// could have left it; returns the shard of each video.
fn damaged_store_fixture(dir: &Path) -> Result<HashMap<String, String>> {
    let mut w = StoreWriter::open(dir, small_shards())?;
    for id in ["d0", "d1", "d2"] {
        w.add_video(video(id, 4, 2, 3, 8))?;
    }
    w.flush()?;
    for id in ["d0", "d1", "d2"] {
        w.add_question(question(&format!("{id}_1"), id, 4, 8, 5, 2))?;
    }
    let index = w.finish()?;
    Ok(index.videos.iter().map(|(id, v)| (id.clone(), v.shard.clone())).collect())
}

/// Rewrites a value inside a published shard (what a disk error or another program could do)
/// and, like a store written before checksums, removes the shard's recorded CRC.
fn poke_f16(dir: &Path, shard: &str, offset: u64, value: f16) -> Result<()> {
    let path = dir.join(SHARD_DIR).join(shard);
    let mut bytes = std::fs::read(&path)?;
    bytes[offset as usize..offset as usize + 2].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, bytes)?;
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    index["shards"][shard].as_object_mut().unwrap().remove("crc32");
    std::fs::write(index_path, serde_json::to_vec(&index)?)?;
    Ok(())
}

#[test]
fn a_check_finds_missing_cut_altered_and_non_finite_shards_and_repair_drops_exactly_their_records() -> Result<()> {
    use gcg::store::{check, CheckOptions, ShardFault, QUARANTINE_DIR};
    let dir = tempfile::tempdir()?;
    let shards = damaged_store_fixture(dir.path())?;
    let snap = Store::open(dir.path())?.snapshot();
    let full = snap.check(CheckOptions::full())?;
    assert!(full.is_clean() && full.without_checksum == 0, "{full:?}");
    assert_eq!((full.shards, full.videos, full.questions), (6, 3, 3));

    // d0's shard deleted, d1's cut short, one byte of d2's changed (same size).
    let shard_path = |id: &str| dir.path().join(SHARD_DIR).join(&shards[id]);
    std::fs::remove_file(shard_path("d0"))?;
    let f = std::fs::OpenOptions::new().write(true).open(shard_path("d1"))?;
    let len = f.metadata()?.len();
    f.set_len(len - 10)?;
    drop(f);
    let mut bytes = std::fs::read(shard_path("d2"))?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(shard_path("d2"), bytes)?;

    let quick = snap.check(CheckOptions::quick())?;
    let faults: Vec<(&str, &ShardFault)> = quick.broken.iter().map(|b| (b.name.as_str(), &b.fault)).collect();
    assert_eq!(
        faults,
        [
            (shards["d0"].as_str(), &ShardFault::Missing),
            (
                shards["d1"].as_str(),
                &ShardFault::Size {
                    actual: len - 10,
                    expected: len
                }
            ),
        ],
        "{quick:?}"
    );
    assert_eq!(quick.lost_videos, ["d0", "d1"]);
    assert!(quick.lost_questions.is_empty());
    let err = snap.verify().unwrap_err().to_string();
    assert!(
        err.contains(&shards["d0"]) && err.contains("missing") && err.contains("--repair"),
        "{err}"
    );
    let deep = snap.check(CheckOptions::full())?;
    assert_eq!(deep.broken.len(), 3, "{deep:?}");
    assert!(matches!(deep.broken[2].fault, ShardFault::Checksum { .. }) && deep.broken[2].name == shards["d2"]);

    // Repair: all three shards leave the index (the two present ones go to quarantine/), with
    // their videos and those videos' questions; the (unbroken) question shards stay listed.
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?; // drops d0, d1 already (quick check)
    assert_eq!(w.index().videos.keys().collect::<Vec<_>>(), ["d2"]);
    assert_eq!(w.index().questions.keys().collect::<Vec<_>>(), ["d2_1"]);
    let found = check(dir.path(), w.index(), CheckOptions::full())?;
    let repaired = w.repair(&found)?;
    assert_eq!(repaired.videos, ["d2"]);
    assert_eq!(repaired.questions, ["d2_1"]);
    assert!(dir.path().join(QUARANTINE_DIR).join(&shards["d1"]).exists());
    assert!(dir.path().join(QUARANTINE_DIR).join(&shards["d2"]).exists());
    let snap = Store::open(dir.path())?.snapshot();
    assert!(snap.check(CheckOptions::full())?.is_clean());
    assert!(snap.index().videos.is_empty() && snap.index().questions.is_empty());
    assert_eq!(snap.index().shards.len(), 3, "the question shards stay listed");
    Ok(())
}

#[test]
fn non_finite_values_in_an_old_store_are_found_by_the_check_and_named_by_the_batch_reader() -> Result<()> {
    use gcg::store::CheckOptions;
    let dir = tempfile::tempdir()?;
    let shards = damaged_store_fixture(dir.path())?;
    let snap = Store::open(dir.path())?.snapshot();
    // A NaN at frame 3, token 0, channel 1 of d1's features.
    let loc = snap.video("d1")?.features.clone();
    poke_f16(
        dir.path(),
        &shards["d1"],
        loc.expect("d1 has features").offsets[0] + 2 * (3 * 6 + 1),
        f16::NAN,
    )?;
    let snap = Store::open(dir.path())?.snapshot();
    let found = snap.check(CheckOptions::full())?;
    assert!(found.broken.is_empty() && found.without_checksum == 1, "{found:?}");
    assert_eq!(found.non_finite.len(), 1, "{found:?}");
    let r = &found.non_finite[0];
    assert_eq!((r.kind, r.id.as_str()), ("video", "d1"));
    assert!(r.detail.contains("1 non-finite value (the first at [3, 0, 1])"), "{r:?}");

    // Reading it into a batch names the question, the video and the tensor.
    let samples = vec![sample("d1", "1", "q", &["a", "b", "c", "d", "e"], 0)];
    let opts = BatchOptions {
        batch_size: 1,
        shuffle: false,
        ..Default::default()
    };
    let loader = BatchLoader::new(snap, samples, opts)?;
    let err = loader.collate(0, &[0]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("video d1") && msg.contains("question d1_1") && msg.contains("ViT features") && msg.contains("[3, 0, 1]"),
        "{msg}"
    );
    Ok(())
}

fn listed(dir: &Path) -> Vec<String> {
    let snap = Store::open(dir).unwrap().snapshot();
    snap.index().videos.keys().cloned().collect()
}

#[test]
fn a_crash_at_any_commit_point_never_publishes_a_partial_shard() -> Result<()> {
    for point in [FaultPoint::ShardWritten, FaultPoint::ShardRenamed, FaultPoint::IndexWritten] {
        let dir = tempfile::tempdir()?;
        let mut w = StoreWriter::open(
            dir.path(),
            WriterOptions {
                fault: Some(Fault {
                    point,
                    nth: 2,
                    action: FaultAction::Error,
                }),
                ..Default::default()
            },
        )?;
        w.add_video(video("first", 3, 2, 4, 4))?;
        w.flush()?;
        w.add_video(video("second", 3, 2, 4, 4))?;
        let err = w.flush().unwrap_err().to_string();
        assert!(err.contains("injected fault"), "{point:?}: {err}");
        drop(w);

        // The index still names only the first video, and every listed shard is complete.
        assert_eq!(listed(dir.path()), vec!["first".to_string()], "{point:?}");
        let snap = Store::open(dir.path())?.snapshot();
        snap.verify()?;
        let files: Vec<String> = std::fs::read_dir(dir.path().join(SHARD_DIR))?
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        match point {
            FaultPoint::ShardWritten => {
                assert!(files.iter().any(|f| f.starts_with('.') && f.contains(".tmp-")), "{files:?}");
                assert!(snap.unlisted_shards()?.is_empty());
            }
            FaultPoint::ShardRenamed => assert_eq!(snap.unlisted_shards()?.len(), 1),
            FaultPoint::IndexWritten => {
                assert_eq!(snap.unlisted_shards()?.len(), 1);
                let tmp_index = std::fs::read_dir(dir.path())?
                    .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".index.json.tmp-"))
                    .count();
                assert_eq!(tmp_index, 1);
            }
        }
        // A new writer redoes the lost record; the store is whole again.
        let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
        assert!(!w.has_video("second"));
        w.add_video(video("second", 3, 2, 4, 4))?;
        w.finish()?;
        assert_eq!(listed(dir.path()), vec!["first".to_string(), "second".to_string()]);
        let snap = Store::open(dir.path())?.snapshot();
        snap.verify()?;
        assert_eq!(
            bits(&snap.features("second")?.as_f16()?),
            bits(&video("second", 3, 2, 4, 4).features)
        );
    }
    Ok(())
}

#[test]
fn concurrent_readers_see_consistent_snapshots_while_a_writer_appends() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let n_videos = 24;
    // The store exists (empty) before the readers start.
    drop(StoreWriter::open(dir.path(), WriterOptions::default())?);
    let store = Store::open(dir.path())?;
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (store, done, reads) = (store.clone(), done.clone(), reads.clone());
        readers.push(std::thread::spawn(move || -> Result<usize> {
            let mut last_gen = 0;
            let mut last_count = 0;
            let mut max_seen = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                store.refresh()?;
                let snap = store.snapshot();
                assert!(snap.generation() >= last_gen, "generation went back");
                assert!(snap.index().videos.len() >= last_count, "videos disappeared");
                last_gen = snap.generation();
                last_count = snap.index().videos.len();
                for (id, _) in snap.index().videos.iter() {
                    let want = video(id, 2, 3, 4, 4);
                    assert_eq!(bits(&snap.features(id)?.as_f16()?), bits(&want.features), "video {id}");
                    assert_eq!(snap.frame_embeds(id)?.to_f32()?, want.frame_embeds);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                max_seen = max_seen.max(last_count);
                if finished {
                    return Ok(max_seen);
                }
            }
        }));
    }
    let writer_dir = dir.path().to_path_buf();
    let writer = std::thread::spawn(move || -> Result<()> {
        let mut w = StoreWriter::open(&writer_dir, small_shards())?;
        for i in 0..n_videos {
            w.add_video(video(&format!("v{i:02}"), 2, 3, 4, 4))?; // a shard and an index commit each
        }
        w.finish()?;
        Ok(())
    });
    writer.join().expect("writer thread")?;
    done.store(true, Ordering::SeqCst);
    for r in readers {
        // The last pass of each reader started after the writer finished: it sees everything.
        assert_eq!(r.join().expect("reader thread")?, n_videos);
    }
    assert!(reads.load(Ordering::Relaxed) >= n_videos * 3);
    Store::open(dir.path())?.snapshot().verify()?;
    Ok(())
}

#[test]
fn concurrent_writers_merge_their_entries() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let handles: Vec<_> = (0..3)
        .map(|w| {
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || -> Result<()> {
                let mut wr = StoreWriter::open(&dir, small_shards())?;
                for i in 0..8 {
                    wr.add_video(video(&format!("w{w}-{i}"), 2, 3, 4, 4))?;
                }
                wr.finish()?;
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread")?;
    }
    let snap = Store::open(dir.path())?.snapshot();
    snap.verify()?;
    assert_eq!(snap.index().videos.len(), 24);
    assert_eq!(snap.index().shards.len(), 24);
    assert_eq!(snap.generation(), 24);
    for (id, _) in snap.index().videos.iter() {
        assert_eq!(bits(&snap.features(id)?.as_f16()?), bits(&video(id, 2, 3, 4, 4).features));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Extraction with the tiny frozen networks
// ------------------------------------------------------------------------------------------

const T: usize = 4;

/// Deterministic pre-processed frames of a video id (tiny preset: 42×42 pixels).
fn pixels(id: &str) -> Tensor {
    let mut rng = SeededRng::new(seed_of(id) ^ 7);
    Tensor::from_vec(rng.normal_vec(T * 3 * 42 * 42, 0.0, 1.0), (T, 3, 42, 42), &Device::Cpu).unwrap()
}

fn source(job: &VideoJob, num_frames: usize) -> Result<VideoFrames> {
    anyhow::ensure!(num_frames == T, "asked for {num_frames} frames");
    if job.id == "broken" {
        anyhow::bail!("cannot decode {}", job.path.display());
    }
    Ok(VideoFrames {
        pixel_values: pixels(&job.id),
        timestamps: (0..T).map(|i| i as f64 * 2.0 + 1.0).collect(),
        duration: Some(8.0),
        fps: Some(25.0),
    })
}

fn jobs() -> Vec<VideoJob> {
    ["v1", "v2", "broken", "v3", "v4", "v5"]
        .iter()
        .map(|id| VideoJob {
            id: id.to_string(),
            path: format!("/videos/{id}.mp4").into(),
        })
        .collect()
}

#[test]
fn extraction_matches_the_models_skips_stored_videos_and_resumes_after_a_crash() -> Result<()> {
    let (vit_cfg, clip_cfg) = frozen::preset(gcg::models::Preset::Tiny);
    let vit = frozen::random_vit(&vit_cfg, &Device::Cpu, DType::F32, 11)?;
    let clip = frozen::random_clip_image(&clip_cfg, &Device::Cpu, DType::F32, 11)?;
    let models = FeatureModels {
        vit: &vit,
        clip: &clip,
        frame_batch: T,
    };
    let opts = ExtractOptions {
        num_frames: T,
        jobs: 2,
        overwrite: false,
        writer: WriterOptions {
            shard_bytes: 20_000, // a few videos per shard
            ..Default::default()
        },
        extractor: None,
        embeddings_only: false,
        interrupted: None,
    };
    let dir = tempfile::tempdir()?;
    let mut failed_events = Vec::new();
    let report = extract_features(dir.path(), &jobs(), &source, &models, &opts, &mut |ev| {
        if let gcg::features::extract::ExtractProgress::Failed { video, .. } = ev {
            failed_events.push(video.to_string())
        }
    })?;
    assert_eq!(report.done, 5);
    assert_eq!(failed_events, vec!["broken".to_string()]);
    assert_eq!(report.failed.len(), 1);
    assert!(
        report.failed[0].1.contains("cannot decode /videos/broken.mp4"),
        "{:?}",
        report.failed
    );

    let snap = Store::open(dir.path())?.snapshot();
    for id in ["v1", "v2", "v3", "v4", "v5"] {
        // The direct computation: ViT on all frames, rounded to f16; the CLIP head on those.
        let direct = vit.forward_wo_norm(&pixels(id))?.to_dtype(DType::F16)?;
        let got = snap.features_tensor(id, DType::F16, &Device::Cpu)?;
        assert_eq!(
            bits(&got.flatten_all()?.to_vec1::<f16>()?),
            bits(&direct.flatten_all()?.to_vec1::<f16>()?),
            "features of {id}"
        );
        let emb = clip.forward(&direct.to_dtype(DType::F32)?)?;
        let stored = snap.frame_embeds(id)?;
        assert_eq!(stored.shape(), &[T, 24]);
        let stored = Tensor::from_vec(stored.to_f32()?, (T, 24), &Device::Cpu)?;
        assert!(common::rel_err(&stored, &emb)? <= 1e-6, "frame embeddings of {id}");
        let v = snap.video(id)?;
        assert_eq!(v.timestamps, vec![1.0, 3.0, 5.0, 7.0]);
        assert_eq!((v.duration, v.fps), (Some(8.0), Some(25.0)));
        assert_eq!(v.source.as_deref(), Some(format!("/videos/{id}.mp4").as_str()));
    }

    // Run again: stored videos are skipped, only the failed one is tried.
    let calls = AtomicUsize::new(0);
    let counting = |job: &VideoJob, t: usize| {
        calls.fetch_add(1, Ordering::SeqCst);
        source(job, t)
    };
    let again = extract_features(dir.path(), &jobs(), &counting, &models, &opts, &mut |_| {})?;
    assert_eq!((again.done, again.skipped, again.failed.len()), (0, 5, 1));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Frames in chunks of 3 give the same features up to f16 rounding.
    let chunked = FeatureModels { frame_batch: 3, ..models };
    let (f3, _) = chunked.encode(&pixels("v1"))?;
    let direct = vit.forward_wo_norm(&pixels("v1"))?;
    assert!(common::rel_err(&f3.to_dtype(DType::F32)?, &direct)? <= 1e-3);

    // A crash in the middle (the third shard renamed but not published), then a rerun: the
    // result equals the uninterrupted store.
    let dir2 = tempfile::tempdir()?;
    let crashing = ExtractOptions {
        writer: WriterOptions {
            shard_bytes: 0,
            fault: Some(Fault {
                point: FaultPoint::ShardRenamed,
                nth: 3,
                action: FaultAction::Error,
            }),
            ..Default::default()
        },
        ..opts.clone()
    };
    let err = extract_features(dir2.path(), &jobs(), &source, &models, &crashing, &mut |_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("injected fault"), "{err:#}");
    let partial = listed(dir2.path());
    assert_eq!(partial.len(), 2, "{partial:?}");
    let resumed = extract_features(dir2.path(), &jobs(), &source, &models, &opts, &mut |_| {})?;
    assert_eq!((resumed.done, resumed.skipped, resumed.failed.len()), (3, 2, 1));
    let snap2 = Store::open(dir2.path())?.snapshot();
    snap2.verify()?;
    assert_eq!(snap2.unlisted_shards()?.len(), 1);
    for id in ["v1", "v2", "v3", "v4", "v5"] {
        assert_eq!(bits(&snap2.features(id)?.as_f16()?), bits(&snap.features(id)?.as_f16()?), "{id}");
        assert_eq!(snap2.frame_embeds(id)?.to_f32()?, snap.frame_embeds(id)?.to_f32()?);
    }

    // Interrupted (the flag a SIGINT/SIGTERM sets, here raised once two videos are done) with
    // nothing flushed yet: the videos done are written, the call says it was interrupted, and
    // the rerun completes the same store.
    let dir3 = tempfile::tempdir()?;
    let flag: &'static std::sync::atomic::AtomicBool = Box::leak(Box::new(std::sync::atomic::AtomicBool::new(false)));
    let stopping = ExtractOptions {
        jobs: 1,
        writer: WriterOptions {
            shard_bytes: 1 << 30,
            max_pending_secs: 1e9,
            ..Default::default()
        },
        interrupted: Some(flag),
        ..opts.clone()
    };
    let mut done = 0;
    let err = extract_features(dir3.path(), &jobs(), &source, &models, &stopping, &mut |ev| {
        if let gcg::features::extract::ExtractProgress::Done { .. } = ev {
            done += 1;
            if done == 2 {
                flag.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("interrupted"), "{err:#}");
    assert_eq!(Store::open(dir3.path())?.snapshot().index().videos.len(), 2);
    let rest = extract_features(dir3.path(), &jobs(), &source, &models, &opts, &mut |_| {})?;
    assert_eq!((rest.done, rest.skipped, rest.failed.len()), (3, 2, 1));
    let snap3 = Store::open(dir3.path())?.snapshot();
    for id in ["v1", "v2", "v3", "v4", "v5"] {
        assert_eq!(bits(&snap3.features(id)?.as_f16()?), bits(&snap.features(id)?.as_f16()?), "{id}");
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Pseudo-labels
// ------------------------------------------------------------------------------------------

#[test]
fn top_k_is_sorted_by_time_and_ties_go_to_the_earlier_frame() -> Result<()> {
    assert_eq!(top_k_sorted(&[0.1, 0.9, 0.3, 0.9, 0.5], 2)?, vec![1, 3]);
    assert_eq!(top_k_sorted(&[0.7, 0.2, 0.7, 0.7], 2)?, vec![0, 2]);
    assert_eq!(top_k_sorted(&[0.5, 0.4, 0.3, 0.2, 0.6], 3)?, vec![0, 1, 4]);
    assert!(top_k_sorted(&[0.1, 0.2], 3).is_err());
    assert!(top_k_sorted(&[0.1, f32::NAN], 1).is_err());
    // cos: frames [1,0], [1,1], [0,1], [-1,0] against [1,0] → 1, 1/√2, 0, -1.
    let (curve, top) = pseudo_labels(&[1.0, 0.0, 1.0, 1.0, 0.0, 2.0, -3.0, 0.0], &[2.0, 0.0], 2)?;
    let want = [1.0, std::f32::consts::FRAC_1_SQRT_2, 0.0, -1.0];
    for (a, b) in curve.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{curve:?}");
    }
    assert_eq!(top, vec![0, 1]);
    Ok(())
}

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_bpe_file(common::fixtures_dir().join("tokenizers/clip/bpe_first3000.txt.gz")).unwrap()
}

/// The tiny preset's CLIP text tower (seed 5) over `tok`'s vocabulary, and its embedding width.
fn tiny_clip_text(tok: &ClipTokenizer) -> Result<(gcg::models::clip_text::ClipTextModel, usize)> {
    let (_, mut cfg) = frozen::preset(gcg::models::Preset::Tiny);
    cfg.text.vocab_size = tok.vocab_size();
    Ok((frozen::random_clip_text(&cfg, &Device::Cpu, DType::F32, 5)?, cfg.text.embed_dim))
}

fn sample(video: &str, qid: &str, question: &str, options: &[&str], answer: usize) -> QaSample {
    QaSample {
        dataset: Dataset::NextQa,
        key: format!("{video}_{qid}"),
        qid: qid.into(),
        video: video.into(),
        question: question.into(),
        options: options.iter().map(|s| s.to_string()).collect(),
        answer: Answer::Choice(answer),
        qtype: "CW".into(),
        extra: Default::default(),
    }
}

fn samples() -> Vec<QaSample> {
    let opts = [
        "roll the handle",
        "tap their feet",
        "strum the string",
        "hit with sticks",
        "pat with hand",
    ];
    vec![
        sample("v1", "0", "how do the two man play the instrument", &opts, 2),
        sample("v1", "1", "what does the man do after sitting down", &opts, 0),
        sample("v2", "0", "why did the boy pick up one present", &opts, 4),
        sample("v3", "4", "where are the people", &opts, 1),
    ]
}

/// A store with three videos whose frame embeddings are given directly.
fn label_store(dir: &Path, t: usize, e: usize) -> Result<()> {
    let mut w = StoreWriter::open(dir, WriterOptions::default())?;
    for id in ["v1", "v2", "v3"] {
        w.add_video(video(id, t, 2, 3, e))?;
    }
    w.finish()?;
    Ok(())
}

/// The reference: an independent cosine (f64, normalise first) and top-K by repeated arg-max.
fn reference_labels(frames: &[f32], event: &[f32], k: usize) -> (Vec<f64>, Vec<usize>) {
    let unit = |v: &[f32]| {
        let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        v.iter().map(|x| *x as f64 / n).collect::<Vec<f64>>()
    };
    let ev = unit(event);
    let s: Vec<f64> = frames
        .chunks(event.len())
        .map(|f| unit(f).iter().zip(&ev).map(|(a, b)| a * b).sum())
        .collect();
    let mut taken = vec![false; s.len()];
    let mut top = Vec::new();
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for t in 0..s.len() {
            if !taken[t] && best.is_none_or(|b| s[t] > s[b]) {
                best = Some(t);
            }
        }
        taken[best.unwrap()] = true;
        top.push(best.unwrap());
    }
    top.sort();
    (s, top)
}

/// A video stored again (same T, as `gcg features --overwrite` does) while `gcg labels` runs:
/// its questions, labelled from the entry the job read, are reported failed with the store's
/// reason (they were counted as labelled, and their whole batch was lost with them); the other
/// questions are stored.
#[test]
fn a_video_stored_again_while_labels_run_fails_its_questions_alone() -> Result<()> {
    let tok = tokenizer();
    let (model, e) = tiny_clip_text(&tok)?;
    let t = 7;
    let dir = tempfile::tempdir()?;
    label_store(dir.path(), t, e)?;
    let enc = ClipTextEncoder {
        model: &model,
        tokenizer: &tok,
        device: Device::Cpu,
        batch_size: 3,
    };
    let opts = LabelOptions {
        chunk: 1,
        skip_existing: false,
        ..Default::default()
    };
    let mut stored_again = false;
    let mut failed_events = Vec::new();
    let report = label_questions(dir.path(), &samples(), &enc, &opts, &mut |p| match p {
        gcg::features::labels::LabelProgress::Done { key } if key == "v1_0" && !stored_again => {
            let mut w = StoreWriter::open(dir.path(), WriterOptions::default()).unwrap();
            w.add_video(video("v1", t, 2, 3, e)).unwrap();
            w.finish().unwrap();
            stored_again = true;
        }
        gcg::features::labels::LabelProgress::Failed { key, error } => failed_events.push((key.to_string(), error.to_string())),
        _ => {}
    })?;
    assert!(stored_again);
    assert_eq!((report.labelled, report.skipped), (2, 0));
    let mut failed: Vec<&str> = report.failed.iter().map(|(k, _)| k.as_str()).collect();
    failed.sort();
    assert_eq!(failed, ["v1_0", "v1_1"]);
    assert!(
        report.failed.iter().all(|(_, why)| why.contains("stored again")),
        "{:?}",
        report.failed
    );
    assert_eq!(failed_events.len(), 2, "{failed_events:?}");
    let snap = Store::open(dir.path())?.snapshot();
    assert_eq!(snap.index().questions.keys().collect::<Vec<_>>(), ["v2_0", "v3_4"]);
    // Run again, the job labels them from the entry the store holds now.
    let report = label_questions(dir.path(), &samples(), &enc, &opts, &mut |_| {})?;
    assert_eq!((report.labelled, report.failed.len()), (4, 0));
    let snap = Store::open(dir.path())?.snapshot();
    assert_eq!(
        snap.question("v1_0")?.video_shard.as_deref(),
        Some(snap.video("v1")?.shard.as_str())
    );
    Ok(())
}

#[test]
fn pseudo_labels_equal_a_direct_computation_with_the_tiny_clip() -> Result<()> {
    let tok = tokenizer();
    let (model, e) = tiny_clip_text(&tok)?;
    let t = 7;
    let dir = tempfile::tempdir()?;
    label_store(dir.path(), t, e)?;
    let enc = ClipTextEncoder {
        model: &model,
        tokenizer: &tok,
        device: Device::Cpu,
        batch_size: 3,
    };
    let embed = |text: &str| -> Vec<f32> {
        let ids = tok.tokenize(&[text]).unwrap().ids_tensor(&Device::Cpu).unwrap();
        model.forward(&ids).unwrap().to_vec2::<f32>().unwrap().remove(0)
    };
    let close = |a: &[f32], b: &[f32], what: &str| {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(a.len() == b.len() && diff / scale <= 1e-5, "{what}: rel err {}", diff / scale);
    };

    for (mode, k) in [
        (EventSource::Answer, 3),
        (EventSource::QuestionAnswer, 2),
        (
            EventSource::Statements(
                [
                    ("v1_0", "the two men strum the string"),
                    ("v1_1", "the man rolls the handle"),
                    ("v2_0", "the boy picks up a present to pat it"),
                    ("v3_4", "the people are in a park"),
                ]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ),
            4,
        ),
    ] {
        // Each setting relabels the questions of the one before: --overwrite (without it another
        // K or event mode is refused, as `features_and_labels_refuse_to_reuse_records_made_otherwise`
        // checks through the CLI).
        let opts = LabelOptions {
            event: mode.clone(),
            top_k: k,
            chunk: 3,
            skip_existing: false,
            ..Default::default()
        };
        let report = label_questions(dir.path(), &samples(), &enc, &opts, &mut |_| {})?;
        assert_eq!((report.labelled, report.skipped, report.failed.len()), (4, 0, 0), "{mode:?}");
        let snap = Store::open(dir.path())?.snapshot();
        for s in samples() {
            let event = match &mode {
                EventSource::Answer => s.options[match s.answer {
                    Answer::Choice(i) => i,
                    _ => unreachable!(),
                }]
                .clone(),
                EventSource::QuestionAnswer => format!("{}? {}", s.question, s.answer_text()),
                EventSource::Statements(m) => m[&s.key].clone(),
            };
            let q = snap.question(&s.key)?;
            assert_eq!(q.event, event);
            assert_eq!(q.event_mode, mode.mode());
            let frames = video(&s.video, t, 2, 3, e).frame_embeds;
            let (want_curve, want_top) = reference_labels(&frames, &embed(&event), k);
            assert_eq!(q.pseudo_labels, want_top, "{}: {mode:?}", s.key);
            let curve = snap.curve(&s.key)?;
            for (a, b) in curve.iter().zip(&want_curve) {
                assert!((*a as f64 - b).abs() < 1e-5, "{}: curve {curve:?} vs {want_curve:?}", s.key);
            }
            let texts = snap.question_texts(&s.key)?;
            close(&texts.question, &embed(&format!("{}?", s.question)), "question");
            for (i, o) in s.options.iter().enumerate() {
                close(&texts.options[i * e..(i + 1) * e], &embed(o), "option");
            }
            close(&texts.answer, &embed(s.answer_text()), "answer");
            close(&texts.event, &embed(&event), "event");
        }
        // Labelled the same way again: nothing to do.
        let keep = LabelOptions {
            skip_existing: true,
            ..opts.clone()
        };
        let again = label_questions(dir.path(), &samples(), &enc, &keep, &mut |_| {})?;
        assert_eq!((again.labelled, again.skipped), (0, 4));
    }

    // Failures are per question: a missing statement, a video without features, K > T.
    let mut bad = samples();
    bad.push(sample("nope", "1", "what happens", &["a", "b"], 0));
    let only_two = EventSource::Statements(
        [("v1_0", "x"), ("v2_0", "y"), ("nope_1", "z"), ("v3_4", "w")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    );
    let opts = LabelOptions {
        event: only_two,
        top_k: 2,
        skip_existing: false,
        ..Default::default()
    };
    let report = label_questions(dir.path(), &bad, &enc, &opts, &mut |_| {})?;
    let failed: HashMap<String, String> = report.failed.into_iter().collect();
    assert_eq!(report.labelled, 3);
    assert!(failed["v1_1"].contains("no sentence"), "{failed:?}");
    assert!(failed["nope_1"].contains("nope"), "{failed:?}");
    let opts = LabelOptions {
        top_k: t + 1,
        skip_existing: false,
        ..Default::default()
    };
    let report = label_questions(dir.path(), &samples(), &enc, &opts, &mut |_| {})?;
    assert_eq!(report.failed.len(), 4);
    let nowhere = dir.path().join("no-such-store");
    let err = label_questions(&nowhere, &samples(), &enc, &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not exist") && err.contains("no-such-store") && !nowhere.exists(),
        "{err}"
    );
    assert!(
        report.failed[0].1.contains(&format!("top-{} of a curve of {t} frames", t + 1)),
        "{:?}",
        report.failed
    );
    // A store of frame embeddings of another width (videos made with another preset): one error
    // naming both widths before any question, not a failure per question.
    let other = tempfile::tempdir()?;
    label_store(other.path(), t, e + 8)?;
    let err = format!(
        "{:#}",
        label_questions(other.path(), &samples(), &enc, &opts, &mut |_| {}).unwrap_err()
    );
    assert!(
        err.contains(&format!("width {}", e + 8)) && err.contains(&format!("{e} wide")),
        "{err}"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Batches
// ------------------------------------------------------------------------------------------

/// A store with 7 videos (T = 5, tokens 3, width 4, E = 6) and 11 labelled questions.
fn batch_store(dir: &Path) -> Result<Vec<QaSample>> {
    let mut w = StoreWriter::open(
        dir,
        WriterOptions {
            shard_bytes: 1000,
            ..Default::default()
        },
    )?;
    for v in 0..7 {
        w.add_video(video(&format!("bv{v}"), 5, 3, 4, 6))?;
    }
    w.flush()?;
    let mut samples = Vec::new();
    for i in 0..11 {
        let vid = format!("bv{}", i % 7);
        let s = sample(&vid, &i.to_string(), "q", &["a", "b", "c"], i % 3);
        w.add_question(question(&s.key, &vid, 5, 6, 3, 2))?;
        samples.push(s);
    }
    w.finish()?;
    Ok(samples)
}

/// The keys of a batch and the bits of its tensors.
type Signature = (Vec<String>, Vec<Vec<u32>>);

fn batch_signature(b: &Batch) -> Result<Signature> {
    let f32_bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect())
    };
    let mut parts = vec![
        f32_bits(&b.clip_frames)?,
        f32_bits(&b.clip_question)?,
        f32_bits(b.clip_options.as_ref().unwrap())?,
        f32_bits(&b.clip_answer)?,
        f32_bits(&b.clip_event)?,
        f32_bits(&b.pseudo_label_scores)?,
        b.pseudo_labels.iter().flatten().map(|&x| x as u32).collect(),
        b.answer_indices.as_ref().unwrap().iter().map(|&x| x as u32).collect(),
    ];
    if let Some(f) = &b.frame_features {
        parts.push(f32_bits(f)?);
    }
    Ok((b.samples.iter().map(|s| s.key.clone()).collect(), parts))
}

#[test]
fn batches_are_deterministic_for_a_seed_whatever_the_number_of_workers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let samples = batch_store(dir.path())?;
    let snap = Store::open(dir.path())?.snapshot();
    let run = |workers: usize, seed: u64, epoch: u64| -> Result<Vec<Signature>> {
        let loader = BatchLoader::new(
            snap.clone(),
            samples.clone(),
            BatchOptions {
                batch_size: 3,
                seed,
                workers,
                prefetch: 1,
                features: Some(DType::F32),
                ..Default::default()
            },
        )?;
        loader.epoch(epoch).map(|b| batch_signature(&b?)).collect()
    };
    let reference = run(0, 3407, 0)?;
    assert_eq!(reference.len(), 4);
    assert_eq!(reference.iter().map(|b| b.0.len()).collect::<Vec<_>>(), vec![3, 3, 3, 2]);
    for workers in [1, 2, 3, 5] {
        assert_eq!(run(workers, 3407, 0)?, reference, "{workers} workers");
    }
    let keys = |r: &[Signature]| r.iter().flat_map(|b| b.0.clone()).collect::<Vec<_>>();
    // Every sample once per epoch; other epochs and seeds give other orders.
    let mut all = keys(&reference);
    all.sort();
    let mut want: Vec<String> = samples.iter().map(|s| s.key.clone()).collect();
    want.sort();
    assert_eq!(all, want);
    assert_ne!(keys(&run(2, 3407, 1)?), keys(&reference));
    assert_ne!(keys(&run(2, 1, 0)?), keys(&reference));
    assert_eq!(keys(&run(3, 3407, 1)?), keys(&run(0, 3407, 1)?));
    Ok(())
}

#[test]
fn batches_hold_the_stored_values() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let samples = batch_store(dir.path())?;
    let snap = Store::open(dir.path())?.snapshot();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let loader = BatchLoader::new(
            snap.clone(),
            samples.clone(),
            BatchOptions {
                batch_size: 4,
                shuffle: false,
                drop_last: true,
                workers: 2,
                features: Some(dtype),
                ..Default::default()
            },
        )?;
        let batches: Vec<Batch> = loader.epoch(0).collect::<Result<_>>()?;
        assert_eq!(batches.len(), 2); // 11 samples, the last 3 dropped
        for (bi, b) in batches.iter().enumerate() {
            assert_eq!(b.index, bi);
            let f = b.frame_features.as_ref().unwrap();
            assert_eq!(f.dims(), &[4, 5, 3, 4]);
            assert_eq!(f.dtype(), dtype);
            assert_eq!(b.clip_frames.dims(), &[4, 5, 6]);
            assert_eq!(b.clip_question.dims(), &[4, 6]);
            assert_eq!(b.clip_options.as_ref().unwrap().dims(), &[4, 3, 6]);
            assert_eq!(b.pseudo_labels.len(), 4);
            let questions = b.clip_question.to_vec2::<f32>()?;
            let options = b.clip_options.as_ref().unwrap().to_vec3::<f32>()?;
            let answer = b.clip_answer.to_vec2::<f32>()?;
            let event = b.clip_event.to_vec2::<f32>()?;
            let labels = &b.pseudo_labels;
            let curves = b.pseudo_label_scores.to_vec2::<f32>()?;
            let frames = b.clip_frames.to_vec3::<f32>()?;
            let answers = b.answer_indices.as_ref().unwrap();
            assert!(b.prompts.is_none(), "no prompt encoder, no prompts");
            for (j, s) in b.samples.iter().enumerate() {
                assert_eq!(s, &samples[bi * 4 + j]);
                let v = video(&s.video, 5, 3, 4, 6);
                let q = question(&s.key, &s.video, 5, 6, 3, 2);
                let got = f.get(j)?.flatten_all()?;
                match dtype {
                    DType::F16 => assert_eq!(bits(&got.to_vec1::<f16>()?), bits(&v.features)),
                    DType::F32 => {
                        for (a, b) in got.to_vec1::<f32>()?.iter().zip(&v.features) {
                            assert!(a.to_bits() == b.to_f32().to_bits() || (a.is_nan() && b.is_nan()));
                        }
                    }
                    _ => {
                        for (a, b) in got.to_vec1::<bf16>()?.iter().zip(&v.features) {
                            let want = bf16::from_f32(b.to_f32());
                            assert!(a.to_bits() == want.to_bits() || (a.is_nan() && want.is_nan()));
                        }
                    }
                }
                assert_eq!(frames[j].concat(), v.frame_embeds);
                assert_eq!(questions[j], q.question);
                assert_eq!(options[j].concat(), q.options);
                assert_eq!(answer[j], q.answer);
                assert_eq!(event[j], q.event);
                assert_eq!(curves[j], q.curve);
                assert_eq!(labels[j], q.pseudo_labels);
                assert_eq!(Answer::Choice(answers[j]), s.answer);
                assert_eq!(b.timestamps[j], v.timestamps);
            }
        }
    }
    // Without features; stopping early does not hang.
    let loader = BatchLoader::new(
        snap.clone(),
        samples.clone(),
        BatchOptions {
            batch_size: 2,
            workers: 3,
            features: None,
            ..Default::default()
        },
    )?;
    let mut it = loader.epoch(0);
    assert_eq!(it.len(), 6);
    assert!(it.next().unwrap()?.frame_features.is_none());
    drop(it);

    // Samples the store does not have are named up front.
    let mut missing = samples.clone();
    missing.push(sample("bv1", "99", "q", &["a", "b", "c"], 0));
    let err = BatchLoader::new(snap.clone(), missing, BatchOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("1 of 12 samples") && err.contains("bv1_99"), "{err}");
    let mut wrong = samples.clone();
    wrong[0].options.pop();
    let err = BatchLoader::new(snap, wrong, BatchOptions::default()).err().unwrap().to_string();
    assert!(err.contains("2 options in the annotations, 3 in the store"), "{err}");
    Ok(())
}

#[test]
fn official_feature_names_group_by_video() -> Result<()> {
    use gcg::features::h5import::{group_frame_datasets, select_frames};
    let names = ["7_frame_10", "7_frame_2", "a_b_frame_0", "7_frame_0", "a_b_frame_1"].map(String::from);
    let g = group_frame_datasets(names)?;
    assert_eq!(g.keys().cloned().collect::<Vec<_>>(), vec!["7".to_string(), "a_b".to_string()]);
    assert_eq!(g["7"].iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 2, 10]);
    assert_eq!(select_frames("7", &g["7"], 2)?, vec![0, 2]);
    assert!(select_frames("7", &g["7"], 4).unwrap_err().to_string().contains("3 frames"));
    assert!(group_frame_datasets(["7_frame_x".to_string()]).is_err());
    assert!(group_frame_datasets(["7_frame_1".to_string(), "7_frame_01".to_string()]).is_err());
    Ok(())
}

/// The store's loaders on the committed PyTorch fixtures (both checkpoint layouts): features
/// equal HF's `hidden_wo_norm` up to the f16 rounding, CLIP embeddings and pseudo-labels equal
/// those of the reference embeddings.
#[test]
fn frozen_networks_from_checkpoints_match_pytorch() -> Result<()> {
    use gcg::models::vit::VitConfig;
    for dir in common::parity_dirs() {
        let vision = common::load_io(&dir.join("io/vision.safetensors"))?;
        let clip_io = common::load_io(&dir.join("io/clip.safetensors"))?;
        let hf_cfg = gcg::weights::checkpoints::read_json(&dir.join("hf/config.json"))?;
        let vit_cfg = VitConfig::from_hf_config(&hf_cfg["vision_config"])?;
        let clip_cfg: gcg::models::clip_branch::ClipConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("io/clip.json"))?)?;
        let cpu = Device::Cpu;
        let vit_hf = frozen::load_vit(&dir.join("hf"), &vit_cfg, &cpu, DType::F32)?;
        let vit_gcg = frozen::load_vit(&dir.join("gcg"), &vit_cfg, &cpu, DType::F32)?;
        let clip = frozen::load_clip_image(&dir.join("gcg"), &clip_cfg, &cpu, DType::F32)?;
        let text = frozen::load_clip_text(&dir.join("gcg"), &clip_cfg, &cpu, DType::F32)?;

        let px = common::get(&vision, "pixel_values")?;
        let want = common::get(&vision, "hidden_wo_norm")?;
        for (name, vit) in [("hf", &vit_hf), ("gcg", &vit_gcg)] {
            common::assert_close(&format!("{}: {name} ViT", dir.display()), &vit.forward_wo_norm(px)?, want, 1e-4);
            let models = FeatureModels {
                vit,
                clip: &clip,
                frame_batch: 1,
            };
            let (features, embeds) = models.encode(px)?;
            assert_eq!(features.dtype(), DType::F16);
            // f16 keeps 11 significant bits: relative rounding error <= 2^-11.
            common::assert_close(&format!("{}: {name} f16 features", dir.display()), &features, want, 5e-4);
            let from_f16 = clip.forward(&features.to_dtype(DType::F32)?)?;
            assert!(common::rel_err(&embeds, &from_f16)? <= 1e-6);
        }
        let frame_features = common::get(&clip_io, "frame_features")?;
        let image = clip.forward(frame_features)?;
        common::assert_close(
            &format!("{}: CLIP image", dir.display()),
            &image,
            common::get(&clip_io, "image_embeds")?,
            1e-4,
        );
        let txt = text.forward(common::get(&clip_io, "text_ids")?)?;
        common::assert_close(
            &format!("{}: CLIP text", dir.display()),
            &txt,
            common::get(&clip_io, "text_embeds")?,
            1e-4,
        );

        // Pseudo-labels from our embeddings equal those of PyTorch's.
        let ref_frames = common::get(&clip_io, "image_embeds")?.flatten_all()?.to_vec1::<f32>()?;
        let ref_text = common::get(&clip_io, "text_embeds")?.to_vec2::<f32>()?;
        let frames = image.flatten_all()?.to_vec1::<f32>()?;
        for (r, ev) in txt.to_vec2::<f32>()?.iter().enumerate() {
            let (curve, top) = pseudo_labels(&frames, ev, 2)?;
            let (want_curve, want_top) = reference_labels(&ref_frames, &ref_text[r], 2);
            assert_eq!(top, want_top, "{}: text {r}", dir.display());
            for (a, b) in curve.iter().zip(&want_curve) {
                assert!(
                    (*a as f64 - b).abs() < 1e-4,
                    "{}: text {r}: {curve:?} vs {want_curve:?}",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Provenance and semantic checks (#12)
// ------------------------------------------------------------------------------------------

/// Edits `index.json` of `dir` in place.
fn edit_index(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) -> Result<()> {
    let path = dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    f(&mut index);
    std::fs::write(&path, serde_json::to_vec(&index)?)?;
    Ok(())
}

#[test]
fn the_index_check_names_the_record_and_field_of_semantic_faults() -> Result<()> {
    type Edit = fn(&mut serde_json::Value);
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "negative time",
            |i| i["videos"]["d1"]["timestamps"][2] = (-5.0).into(),
            &["video d1", "frame time 2 is -5"],
        ),
        (
            "decreasing",
            |i| i["videos"]["d1"]["timestamps"][3] = 0.5.into(),
            &["video d1", "frame times decrease"],
        ),
        (
            "past duration",
            |i| i["videos"]["d1"]["timestamps"][3] = 1e9.into(),
            &["video d1", "past the duration"],
        ),
        (
            "duration",
            |i| i["videos"]["d1"]["duration"] = (-1.0).into(),
            &["video d1", "duration -1"],
        ),
        ("fps", |i| i["videos"]["d1"]["fps"] = 0.0.into(), &["video d1", "fps 0"]),
        (
            "num_frames",
            |i| i["videos"]["d1"]["num_frames"] = 16.into(),
            &["video d1", "timestamps for 16 frames"],
        ),
        (
            "meta",
            |i| i["meta"]["embed_dim"] = 64.into(),
            &["video d0", "frame_embeds", "embed_dim 64"],
        ),
        (
            "question video",
            |i| i["questions"]["d1_1"]["video"] = "nope".into(),
            &["question d1_1", "video nope is not in the store"],
        ),
        (
            "question frames",
            |i| i["questions"]["d1_1"]["num_frames"] = 2.into(),
            &["question d1_1", "num_frames 2", "video d1 has 4 frames"],
        ),
        (
            "labels",
            |i| i["questions"]["d1_1"]["pseudo_labels"] = serde_json::json!([3, 1]),
            &["question d1_1", "pseudo-labels [3, 1]"],
        ),
    ];
    for (name, edit, want) in cases {
        let dir = tempfile::tempdir()?;
        damaged_store_fixture(dir.path())?;
        Store::open(dir.path())?;
        edit_index(dir.path(), edit)?;
        // Structural faults stop the store from opening; implausible times (which an older gcg
        // could write) let it open and are reported by the check, for a repair to drop.
        let err = format!("{:#}", Store::open(dir.path()).and_then(|s| s.snapshot().verify()).unwrap_err());
        for w in want {
            assert!(err.contains(w), "{name}: {err}");
        }
    }
    // An index of an older gcg (no provenance fields) still opens.
    let dir = tempfile::tempdir()?;
    damaged_store_fixture(dir.path())?;
    edit_index(dir.path(), |i| {
        for v in i["videos"].as_object_mut().unwrap().values_mut() {
            v.as_object_mut().unwrap().remove("extractor");
        }
        for q in i["questions"].as_object_mut().unwrap().values_mut() {
            q.as_object_mut().unwrap().remove("text_encoder");
        }
    })?;
    assert_eq!(Store::open(dir.path())?.snapshot().index().videos.len(), 3);
    Ok(())
}

#[test]
fn the_writer_refuses_bad_times_naming_the_video() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    let cases: Vec<(fn(&mut VideoRecord), &str)> = vec![
        (|v| v.timestamps[1] = -1.0, "frame time 1 is -1"),
        (|v| v.timestamps.reverse(), "frame times decrease"),
        (|v| v.duration = Some(1.0), "past the duration 1s"),
        (|v| v.fps = Some(f64::INFINITY), "fps inf is not a finite positive number"),
        (|v| v.duration = Some(f64::NAN), "duration NaN is not a finite positive number"),
    ];
    for (edit, want) in cases {
        let mut v = video("bad", 4, 2, 3, 8);
        edit(&mut v);
        let err = format!("{:#}", w.add_video(v).unwrap_err());
        assert!(err.contains("video bad") && err.contains(want), "{err}");
    }
    w.add_video(video("good", 4, 2, 3, 8))?;
    assert_eq!(w.finish()?.videos.keys().collect::<Vec<_>>(), ["good"]);
    Ok(())
}

#[test]
fn a_check_reports_every_record_a_repair_drops() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let shards = damaged_store_fixture(dir.path())?;
    std::fs::remove_file(dir.path().join(SHARD_DIR).join(&shards["d1"]))?;
    let snap = Store::open(dir.path())?.snapshot();
    let found = snap.check(gcg::store::CheckOptions::quick())?;
    // The video's shard holds no question, yet its question goes with it: the report says so.
    assert_eq!((found.lost_videos.len(), found.lost_questions.len()), (1, 0));
    assert_eq!(
        (found.drop_videos.clone(), found.drop_questions.clone()),
        (vec!["d1".to_string()], vec!["d1_1".to_string()])
    );
    let text = found.describe();
    assert!(
        text.contains("a repair drops 1 videos (e.g. d1) and 1 questions (e.g. d1_1)"),
        "{text}"
    );
    assert!(text.contains("`gcg labels` for the questions"), "{text}");
    // A writer repairs on opening: it drops exactly those.
    let w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    assert_eq!(w.index().videos.keys().collect::<Vec<_>>(), ["d0", "d2"]);
    assert_eq!(w.index().questions.keys().collect::<Vec<_>>(), ["d0_1", "d2_1"]);
    Ok(())
}

#[test]
fn extraction_reuses_only_videos_made_the_same_way() -> Result<()> {
    let (vit_cfg, clip_cfg) = frozen::preset(gcg::models::Preset::Tiny);
    let vit = frozen::random_vit(&vit_cfg, &Device::Cpu, DType::F32, 11)?;
    let clip = frozen::random_clip_image(&clip_cfg, &Device::Cpu, DType::F32, 11)?;
    let models = FeatureModels {
        vit: &vit,
        clip: &clip,
        frame_batch: T,
    };
    let ex = |models: &str| gcg::features::provenance::extractor("uniform", models).with_precision("f32");
    let opts = ExtractOptions {
        num_frames: T,
        extractor: Some(ex("random tiny seed 11")),
        ..Default::default()
    };
    let two: Vec<VideoJob> = jobs().into_iter().filter(|j| ["v1", "v2"].contains(&j.id.as_str())).collect();
    let dir = tempfile::tempdir()?;
    let r = extract_features(dir.path(), &two, &source, &models, &opts, &mut |_| {})?;
    assert_eq!((r.done, r.skipped), (2, 0));
    assert_eq!(Store::open(dir.path())?.snapshot().video("v1")?.extractor, opts.extractor);

    // Other weights: refused up front, naming the count and both.
    let other = ExtractOptions {
        extractor: Some(ex("random tiny seed 12")),
        ..opts.clone()
    };
    let err = format!(
        "{:#}",
        extract_features(dir.path(), &two, &source, &models, &other, &mut |_| {}).unwrap_err()
    );
    assert!(
        err.contains("2 videos in")
            && err.contains("random tiny seed 11, this run uses random tiny seed 12")
            && err.contains("--overwrite"),
        "{err}"
    );
    // Another arithmetic (`--dtype bf16` beside f32 features): refused up front too (was "0
    // done, 2 already stored", then a store mixing the two).
    let bf16 = ExtractOptions {
        extractor: Some(ex("random tiny seed 11").with_precision("bf16")),
        ..opts.clone()
    };
    let err = format!(
        "{:#}",
        extract_features(dir.path(), &two, &source, &models, &bf16, &mut |_| {}).unwrap_err()
    );
    assert!(
        err.contains("2 videos in") && err.contains("precision f32, this run computes in bf16"),
        "{err}"
    );
    let new_one: Vec<VideoJob> = jobs().into_iter().filter(|j| j.id == "v3").collect();
    let err = format!(
        "{:#}",
        extract_features(dir.path(), &new_one, &source, &models, &bf16, &mut |_| {}).unwrap_err()
    );
    assert!(err.contains("would mix") && err.contains("precision f32"), "{err}");
    // A record without its arithmetic (an older gcg) matches any.
    edit_index(dir.path(), |i| {
        i["videos"]["v2"]["extractor"].as_object_mut().unwrap().remove("precision");
    })?;
    let r = extract_features(dir.path(), &two[1..], &source, &models, &bf16, &mut |_| {})?;
    assert_eq!((r.done, r.skipped), (0, 1));
    assert!(gcg::store::consistency(Store::open(dir.path())?.snapshot().index())
        .mixed
        .is_empty());
    // `gcg store verify` names a store whose videos record two.
    edit_index(dir.path(), |i| {
        i["videos"]["v2"]["extractor"]["precision"] = "bf16".into();
    })?;
    let mixed = gcg::store::consistency(Store::open(dir.path())?.snapshot().index()).mixed;
    assert!(
        mixed.len() == 1 && mixed[0].contains("different precisions") && mixed[0].contains("precision bf16"),
        "{mixed:?}"
    );
    edit_index(dir.path(), |i| {
        i["videos"]["v2"]["extractor"]["precision"] = "f32".into();
    })?;
    // Another T: refused up front too (was "0 done, 2 already stored").
    let t2 = ExtractOptions {
        num_frames: 2,
        ..opts.clone()
    };
    let err = format!(
        "{:#}",
        extract_features(dir.path(), &two, &source, &models, &t2, &mut |_| {}).unwrap_err()
    );
    assert!(err.contains("T = 4, this run asks T = 2"), "{err}");
    // A new video with another T next to the stored ones: a mixed store is refused.
    let three: Vec<VideoJob> = jobs().into_iter().filter(|j| j.id == "v3").collect();
    let err = format!(
        "{:#}",
        extract_features(dir.path(), &three, &source, &models, &t2, &mut |_| {}).unwrap_err()
    );
    assert!(
        err.contains("2 videos in") && err.contains("have T = 4") && err.contains("asks T = 2"),
        "{err}"
    );
    assert_eq!(Store::open(dir.path())?.snapshot().index().videos.len(), 2);

    // Unknown provenance (an older store) is taken as matching.
    edit_index(dir.path(), |i| {
        i["videos"]["v1"].as_object_mut().unwrap().remove("extractor");
    })?;
    let r = extract_features(dir.path(), &two, &source, &models, &opts, &mut |_| {})?;
    assert_eq!((r.done, r.skipped), (0, 2));

    // --overwrite recomputes with the new settings, and drops the labels made from the old ones.
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    w.add_question(question("v1_0", "v1", T, 24, 5, 2))?;
    w.add_question(question("v2_0", "v2", T, 24, 5, 2))?;
    w.finish()?;
    let over = ExtractOptions {
        overwrite: true,
        ..other.clone()
    };
    // Only v1 with the new weights: v2, kept, was made by the old ones; a store mixing the two is
    // refused (no video recomputed).
    let redo: Vec<VideoJob> = two.iter().filter(|j| j.id == "v1").cloned().collect();
    let err = format!(
        "{:#}",
        extract_features(dir.path(), &redo, &source, &models, &over, &mut |_| {}).unwrap_err()
    );
    assert!(
        err.contains("1 videos in") && err.contains("(e.g. v2)") && err.contains("would mix"),
        "{err}"
    );
    assert!(Store::open(dir.path())?.snapshot().contains_question("v1_0"));
    let r = extract_features(dir.path(), &two, &source, &models, &over, &mut |_| {})?;
    assert_eq!(r.done, 2);
    let snap = Store::open(dir.path())?.snapshot();
    assert_eq!(snap.video("v1")?.extractor, other.extractor);
    assert_eq!(snap.video("v2")?.extractor, other.extractor);
    assert!(!snap.contains_question("v1_0") && !snap.contains_question("v2_0"));
    assert!(gcg::store::consistency(snap.index()).mixed.is_empty());
    // A store left mixed (by hand, as an older gcg could) is refused by the runs' reader.
    edit_index(dir.path(), |i| {
        i["videos"]["v2"]["extractor"]["models"] = "random tiny seed 77".into();
    })?;
    let mut cfg = gcg::run::RunConfig::default();
    cfg.data.store = dir.path().to_path_buf();
    let err = format!("{:#}", gcg::run::open_store(&cfg).err().expect("a mixed store was opened"));
    assert!(err.contains("mixes records made differently") && err.contains("seed 77"), "{err}");
    Ok(())
}

#[test]
fn one_bad_input_video_fails_alone() -> Result<()> {
    let (vit_cfg, clip_cfg) = frozen::preset(gcg::models::Preset::Tiny);
    let vit = frozen::random_vit(&vit_cfg, &Device::Cpu, DType::F32, 11)?;
    let clip = frozen::random_clip_image(&clip_cfg, &Device::Cpu, DType::F32, 11)?;
    let models = FeatureModels {
        vit: &vit,
        clip: &clip,
        frame_batch: T,
    };
    let bad_source = |job: &VideoJob, t: usize| -> Result<VideoFrames> {
        let mut f = source(job, t)?;
        match job.id.as_str() {
            "v2" => {
                let mut px = f.pixel_values.flatten_all()?.to_vec1::<f32>()?;
                px[100] = f32::NAN;
                f.pixel_values = Tensor::from_vec(px, f.pixel_values.shape(), &Device::Cpu)?;
            }
            "v3" => f.timestamps[2] = f64::NAN,
            "v4" => f.timestamps[3] = 100.0,
            _ => {}
        }
        Ok(f)
    };
    let dir = tempfile::tempdir()?;
    let opts = ExtractOptions {
        num_frames: T,
        ..Default::default()
    };
    let r = extract_features(dir.path(), &jobs(), &bad_source, &models, &opts, &mut |_| {})?;
    assert_eq!(r.done, 2, "{:?}", r.failed);
    let failed: HashMap<String, String> = r.failed.into_iter().collect();
    assert!(
        failed["v2"].contains("input frames") && failed["v2"].contains("non-finite") && failed["v2"].contains("/videos/v2.mp4"),
        "{failed:?}"
    );
    assert!(failed["v3"].contains("frame time 2 is NaN"), "{failed:?}");
    assert!(failed["v4"].contains("past the duration"), "{failed:?}");
    assert_eq!(Store::open(dir.path())?.snapshot().index().videos.len(), 2);
    Ok(())
}

#[test]
fn the_batch_loader_says_what_is_missing_for_each_example() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut samples = batch_store(dir.path())?;
    samples.push(sample("bv1", "99", "q", &["a", "b", "c"], 0));
    samples.push(sample("nowhere", "1", "q", &["a", "b", "c"], 0));
    let snap = Store::open(dir.path())?.snapshot();
    let err = format!("{:#}", BatchLoader::new(snap, samples, BatchOptions::default()).err().unwrap());
    assert!(err.contains("2 of 13 samples are missing"), "{err}");
    assert!(
        err.contains("1 whose video has no features") && err.contains("1 without labels"),
        "{err}"
    );
    assert!(err.contains("bv1_99 (no labels: run `gcg labels`)"), "{err}");
    assert!(err.contains("nowhere_1 (video nowhere has no features"), "{err}");
    Ok(())
}

/// A prediction file's inputs hash follows the split's questions and their store records, not
/// the rest of the store: a store that grows keeps it (a partial file stays resumable), one
/// relabelled in place, or an edited question, changes it.
#[test]
fn the_inputs_hash_follows_the_split_and_its_records_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (t, e) = (4, 8);
    let add = |v: Option<VideoRecord>, q: QuestionRecord| -> Result<()> {
        if let Some(v) = v {
            let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
            w.add_video(v)?;
            w.finish()?;
        }
        let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
        w.add_question(q)?;
        w.finish()?;
        Ok(())
    };
    add(Some(video("v1", t, 3, 6, e)), question("v1_0", "v1", t, e, 5, 2))?;
    let header = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n";
    let csv = dir.path().join("test.csv");
    std::fs::write(&csv, format!("{header}v1,64,64,64,what happened,1,0,DO,a,b,c,d,e\n"))?;
    let mut cfg = gcg::run::RunConfig::default();
    cfg.data.dataset = Dataset::NextQa;
    cfg.data.store = dir.path().to_path_buf();
    let files = gcg::data::SplitFiles::annotations(&csv);
    let hash = || gcg::run::predict::inputs_hash(&cfg, &files).unwrap();
    let first = hash();
    // Another video and question (another split's) join the store: the same hash.
    add(Some(video("v2", t, 3, 6, e)), question("v2_0", "v2", t, e, 5, 2))?;
    assert_eq!(hash(), first);
    // The split's question relabelled in place (other pseudo-labels): another hash.
    add(None, question("v1_0", "v1", t, e, 5, 3))?;
    let relabelled = hash();
    assert_ne!(relabelled, first);
    // The question edited in the annotations: another hash again; the file's bytes around the
    // questions (CRLF line ends) do not count.
    std::fs::write(
        &csv,
        format!("{header}v1,64,64,64,what happened,1,0,DO,a,b,c,d,e\n").replace('\n', "\r\n"),
    )?;
    assert_eq!(hash(), relabelled);
    std::fs::write(&csv, format!("{header}v1,64,64,64,what happened next,1,0,DO,a,b,c,d,e\n"))?;
    assert_ne!(hash(), relabelled);
    Ok(())
}

/// The index's frame times and the shard's `V/timestamps` copy must agree: `--values` reports a
/// video whose index was edited (it compared nothing), and a repair drops it for recomputing.
#[test]
fn frame_times_that_differ_from_the_shards_copy_are_reported() -> Result<()> {
    use gcg::store::CheckOptions;
    let dir = tempfile::tempdir()?;
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    w.add_video(video("t0", 4, 3, 8, 6))?;
    w.add_video(video("t1", 4, 3, 8, 6))?;
    w.finish()?;
    assert!(Store::open(dir.path())?.snapshot().check(CheckOptions::full())?.is_clean());
    // Still plausible (increasing, within the duration): only the copy tells.
    edit_index(dir.path(), |i| i["videos"]["t1"]["timestamps"][2] = 3.5.into())?;
    let snap = Store::open(dir.path())?.snapshot();
    assert!(snap.check(CheckOptions::quick())?.is_clean(), "the index alone looks fine");
    let found = snap.check(CheckOptions::full())?;
    assert_eq!(found.non_finite.len(), 1, "{found:?}");
    let text = found.describe();
    assert!(
        text.contains("video t1: its frame times disagree") && text.contains("frame 2: 3.5 s in the index, 3.25 s in the shard"),
        "{text}"
    );
    assert_eq!(found.drop_videos, ["t1"]);
    // Times missing from the index while the shard has them: reported too.
    edit_index(dir.path(), |i| i["videos"]["t0"]["timestamps"] = serde_json::json!([]))?;
    let found = Store::open(dir.path())?.snapshot().check(CheckOptions::full())?;
    assert_eq!(found.drop_videos, ["t0", "t1"], "{}", found.describe());
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    let repaired = w.repair(&found)?;
    assert_eq!(repaired.videos, ["t0", "t1"]);
    Ok(())
}

/// A writer whose store's index.json is deleted while it runs stops, naming the fix, instead of
/// publishing a new index that lists only its next shard (which orphaned every earlier one).
#[test]
fn a_writer_stops_when_the_index_vanishes_under_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default())?;
    w.add_video(video("a", 2, 3, 4, 4))?;
    w.flush()?;
    std::fs::remove_file(dir.path().join("index.json"))?;
    w.add_video(video("b", 2, 3, 4, 4))?;
    let e = format!("{:#}", w.flush().unwrap_err());
    assert!(
        e.contains("vanished while this job wrote the store") && e.contains("--repair"),
        "{e}"
    );
    assert!(!dir.path().join("index.json").exists());
    drop(w);
    let rebuilt = gcg::store::rebuild_index(dir.path())?;
    assert_eq!((rebuilt.videos, rebuilt.shards), (2, 2), "both shards' videos come back");
    Ok(())
}
