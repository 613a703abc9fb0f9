//! `gcg bench store`: how fast the feature store writes and reads (MB/s, samples/s), as JSON.

use anyhow::{ensure, Result};
use candle_core::{DType, Device};
use clap::Args;
use gcg::data::{Answer, Dataset, QaSample};
use gcg::data::{BatchLoader, BatchOptions};
use gcg::models::Preset;
use gcg::run::Precision;
use gcg::store::{QuestionRecord, Store, StoreWriter, VideoRecord, WriterOptions};
use gcg::SeededRng;
use half::f16;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct StoreArgs {
    /// Read this store (its questions make the batches); default: a synthetic store written to a
    /// temporary directory (and removed afterwards).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Synthetic store: videos (one question each).
    #[arg(long, default_value_t = 16)]
    videos: usize,
    /// Synthetic store: frames per video.
    #[arg(long, default_value_t = 32)]
    frames: usize,
    /// Network sizes: tiny | instructblip-flan-t5-xl, whose feature sizes the synthetic store has
    /// (instructblip-flan-t5-xl: [T, 257, 1408], CLIP 1024).
    #[arg(long, default_value = "instructblip-flan-t5-xl")]
    preset: Preset,
    /// Synthetic store: shard size in MiB.
    #[arg(long, default_value_t = 512.0)]
    shard_mb: f64,
    /// Questions per batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Batch workers.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    workers: usize,
    /// Feature dtype of the batches: f32 | bf16 | f16.
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// Epochs read through the batch loader.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    epochs: u64,
    #[command(flatten)]
    seed: crate::args::BenchSeedArg,
}

/// Feature sizes of a preset: ViT tokens N, ViT width D, CLIP width E.
fn sizes(preset: Preset) -> (usize, usize, usize) {
    let (vit, clip) = preset.frozen();
    (vit.num_positions(), vit.hidden_size, clip.image.embed_dim)
}

/// Writes a synthetic store; returns (seconds, bytes of features written).
fn write_synthetic(dir: &Path, a: &StoreArgs) -> Result<(f64, u64)> {
    let (n, d, e) = sizes(a.preset);
    let t = a.frames;
    let mut rng = SeededRng::new(a.seed.seed);
    let opts = WriterOptions {
        shard_bytes: (a.shard_mb * (1 << 20) as f64) as u64,
        ..Default::default()
    };
    let start = Instant::now();
    let mut w = StoreWriter::open(dir, opts.clone())?;
    let mut bytes = 0u64;
    for v in 0..a.videos {
        // Cheap, varied, finite values (generating normals for 10^8 values would dominate).
        let mut x = rng.next_u64() | 1;
        let features: Vec<f16> = (0..t * n * d)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0)
            })
            .collect();
        bytes += (features.len() * 2) as u64;
        w.add_video(VideoRecord {
            id: format!("v{v:05}"),
            features,
            features_shape: [t, n, d],
            frame_embeds: rng.normal_vec(t * e, 0.0, 1.0),
            embed_dim: e,
            timestamps: (0..t).map(|i| i as f64 * 0.5).collect(),
            duration: Some(t as f64 * 0.5),
            fps: Some(30.0),
            source: None,
            source_fingerprint: None,
            extractor: None,
            embeddings_only: false,
        })?;
    }
    w.flush()?;
    let k = 4.min(t);
    for v in 0..a.videos {
        let mut vecs = |m: usize| -> Vec<f32> { rng.normal_vec(m * e, 0.0, 1.0) };
        w.add_question(QuestionRecord {
            key: format!("v{v:05}_0"),
            video: format!("v{v:05}"),
            question: vecs(1),
            options: vecs(5),
            num_options: 5,
            answer: vecs(1),
            event: vecs(1),
            event_mode: "answer".into(),
            event_text: "synthetic".into(),
            curve: vecs(1).into_iter().take(t).chain(std::iter::repeat(0.0)).take(t).collect(),
            pseudo_labels: (0..k).collect(),
            text_encoder: None,
            texts_hash: None,
            video_shard: None,
        })?;
    }
    w.finish()?;
    Ok((start.elapsed().as_secs_f64(), bytes))
}

fn samples_of(store: &Store) -> Vec<QaSample> {
    let snap = store.snapshot();
    snap.index()
        .questions
        .iter()
        .filter(|(_, q)| snap.contains_video(&q.video))
        .map(|(key, q)| QaSample {
            dataset: Dataset::OpenEnded,
            key: key.clone(),
            qid: key.clone(),
            video: q.video.clone(),
            question: String::new(),
            options: vec![String::new(); q.num_options],
            answer: Answer::Choice(0),
            qtype: String::new(),
            extra: Default::default(),
        })
        .collect()
}

pub fn run(a: StoreArgs) -> Result<()> {
    let dtype = a.dtype.dtype();
    ensure!(a.batch > 0 && a.frames > 0, "--batch and --frames must be positive");
    let temp = match &a.store {
        Some(_) => None,
        None => {
            ensure!(a.videos > 0, "--videos must be positive");
            let dir = std::env::temp_dir().join(format!("gcg-bench-store-{}", std::process::id()));
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            Some(dir)
        }
    };
    let result = (|| -> Result<serde_json::Value> {
        let (dir, write) = match (&a.store, &temp) {
            (Some(s), _) => (s.clone(), serde_json::Value::Null),
            (None, Some(t)) => {
                let (secs, bytes) = write_synthetic(t, &a)?;
                (
                    t.clone(),
                    json!({ "seconds": secs, "feature_bytes": bytes, "mb_per_s": bytes as f64 / 1e6 / secs }),
                )
            }
            (None, None) => unreachable!("a temporary store is made when none is given"),
        };
        let store = Store::open(&dir)?;
        let snap = store.snapshot();
        let ids: Vec<String> = snap.index().videos.keys().cloned().collect();
        ensure!(!ids.is_empty(), "the store {} has no videos", dir.display());

        // Raw reads: every video's features once as a tensor of the batch dtype.
        let mut raw = serde_json::Map::new();
        for (name, dt) in [("f16", DType::F16), ("f32", DType::F32), ("bf16", DType::BF16)] {
            let start = Instant::now();
            let mut bytes = 0u64;
            for id in &ids {
                let m = snap.features(id)?;
                bytes += m.loc.byte_len();
                let t = m.to_tensor(dt, &Device::Cpu)?;
                std::hint::black_box(&t);
            }
            let secs = start.elapsed().as_secs_f64();
            raw.insert(
                name.into(),
                json!({ "seconds": secs, "videos_per_s": ids.len() as f64 / secs, "mb_per_s": bytes as f64 / 1e6 / secs }),
            );
        }

        // Batches through the loader.
        let samples = samples_of(&store);
        let batches = if samples.is_empty() {
            serde_json::Value::Null
        } else {
            let loader = BatchLoader::new(
                snap.clone(),
                samples.clone(),
                BatchOptions {
                    batch_size: a.batch,
                    shuffle: true,
                    seed: a.seed.seed,
                    workers: a.workers,
                    features: Some(dtype),
                    ..Default::default()
                },
            )?;
            let start = Instant::now();
            let (mut n, mut bytes) = (0usize, 0u64);
            for epoch in 0..a.epochs.max(1) {
                for b in loader.epoch(epoch) {
                    let b = b?;
                    n += b.samples.len();
                    for s in &b.samples {
                        bytes += snap.video(&s.video)?.features.as_ref().map_or(0, |f| f.byte_len());
                    }
                }
            }
            let secs = start.elapsed().as_secs_f64();
            json!({
                "samples": n, "seconds": secs, "samples_per_s": n as f64 / secs,
                "mb_per_s_f16": bytes as f64 / 1e6 / secs, "batch": a.batch, "workers": a.workers,
                "dtype": a.dtype.to_string(), "epochs": a.epochs.max(1),
            })
        };
        let meta = snap.meta();
        Ok(json!({
            "bench": "store",
            "store": if a.store.is_some() { json!(dir) } else { json!("synthetic") },
            "videos": ids.len(),
            "questions": snap.index().questions.len(),
            "meta": meta,
            "write": write,
            "read_features": raw,
            "batches": batches,
        }))
    })();
    if let Some(t) = &temp {
        let _ = std::fs::remove_dir_all(t);
    }
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}
