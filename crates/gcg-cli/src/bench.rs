//! `gcg bench ...`: speed measurements printed as JSON (never timed tests).

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use gcg::models::lmm::{is_trainable, is_vit_trunk, LmmConfig, VideoLmm};
use gcg::models::t5::GenerateConfig;
use gcg::nn::Ctx;
use gcg::weights::checkpoints::{is_buffer, open_any};
use gcg::weights::Loader;
use gcg::SeededRng;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The frozen backbone's speed on random weights of the preset's real shapes: ViT frames/s and
    /// one grounded answer's latency (K frames through the Q-Former + the spatial pass + T5 greedy).
    Forward(ForwardArgs),
    /// Video decoding (ffmpeg, T sampled frames) and CLIP pre-processing throughput.
    Decode(crate::frames::DecodeBenchArgs),
}

#[derive(Args)]
pub struct ForwardArgs {
    /// Model sizes: tiny | instructblip-flan-t5-xl.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Questions answered together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// cpu | cuda (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype of the frozen networks: f32 | bf16 | f16 (default: f32 on cpu, bf16 on cuda).
    #[arg(long)]
    dtype: Option<String>,
    /// Frames sampled per video (T).
    #[arg(long, default_value_t = 32)]
    frames: usize,
    /// Frames selected for the LLM (K).
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Frames pushed through the ViT for the throughput figure (default: batch × T, capped at 4 on
    /// the real preset on cpu).
    #[arg(long)]
    vit_frames: Option<usize>,
    /// Prompt length in T5 tokens.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens decoded greedily.
    #[arg(long, default_value_t = 5)]
    new_tokens: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            anyhow!("cannot open CUDA device 0 ({e}); gcg must be built with `--features cuda` on a machine with the CUDA toolkit")
        }),
        other => bail!("unknown device {other:?} (expected cpu or cuda)"),
    }
}

pub fn parse_dtype(name: Option<&str>, dev: &Device) -> Result<DType> {
    Ok(match name {
        None if dev.is_cuda() => DType::BF16,
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => bail!("unknown dtype {other:?} (expected f32, bf16 or f16)"),
    })
}

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

fn random_ids(rng: &mut SeededRng, b: usize, l: usize, lo: usize, hi: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * l).map(|_| (lo + rng.below(hi - lo)) as u32).collect();
    Ok(Tensor::from_vec(v, (b, l), dev)?)
}

fn forward(a: ForwardArgs) -> Result<()> {
    let dev = parse_device(&a.device)?;
    let dtype = parse_dtype(a.dtype.as_deref(), &dev)?;
    let mut cfg = LmmConfig::preset(&a.preset)?;
    cfg.max_frames = cfg.max_frames.max(a.frames);
    if a.k > a.frames {
        bail!("--k {} exceeds --frames {}", a.k, a.frames);
    }
    let t0 = Instant::now();
    let lb = Loader::random(&dev, dtype, a.seed).with_trainable(is_trainable);
    let model = VideoLmm::load(&lb, &cfg, true)?;
    sync(&dev)?;
    let build_s = t0.elapsed().as_secs_f64();
    let mut rng = SeededRng::new(a.seed + 1);
    let s = cfg.vision.image_size;
    let n = cfg.vision.num_positions();
    let dv = cfg.vision.hidden_size;

    // ViT throughput.
    let big_cpu = !dev.is_cuda() && a.preset != "tiny";
    let vit_frames = a.vit_frames.unwrap_or(if big_cpu { 4 } else { a.batch * a.frames });
    let pix = Tensor::from_vec(rng.normal_vec(vit_frames * 3 * s * s, 0.0, 1.0), (vit_frames, 3, s, s), &dev)?.to_dtype(dtype)?;
    let _ = model.encode_pixels(&pix.narrow(0, 0, 1)?)?; // warm-up
    sync(&dev)?;
    let t = Instant::now();
    let feats = model.encode_pixels(&pix)?;
    sync(&dev)?;
    let vit_s = t.elapsed().as_secs_f64();
    drop(feats);

    // One grounded answer: K selected frames + the spatial pass over T frames + greedy decoding.
    let feats = Tensor::from_vec(
        rng.normal_vec(a.batch * a.frames * n * dv, 0.0, 1.0),
        (a.batch, a.frames, n, dv),
        &dev,
    )?
    .to_dtype(dtype)?;
    let qids = random_ids(
        &mut rng,
        a.batch,
        a.prompt_tokens.min(cfg.qformer.max_position_embeddings),
        1,
        cfg.qformer.vocab_size,
        &dev,
    )?;
    let qmask = qids.ones_like()?;
    let ids = random_ids(&mut rng, a.batch, a.prompt_tokens, 2, cfg.t5.vocab_size, &dev)?;
    let mask = ids.ones_like()?;
    let sel: Vec<u32> = (0..a.k)
        .map(|i| ((i * (a.frames - 1)) as f64 / (a.k.max(2) - 1) as f64).round() as u32)
        .collect();
    let sel = Tensor::new(sel.as_slice(), &dev)?;
    let gen = GenerateConfig {
        max_new_tokens: a.new_tokens,
        min_new_tokens: a.new_tokens,
        ..Default::default()
    };
    let answer = || -> Result<Vec<Vec<u32>>> {
        let normed = model.normalize_features(&feats)?;
        let chosen = normed.index_select(&sel, 1)?;
        let visual = model.visual_tokens(&chosen, Some(&normed), &qids, &qmask, Ctx::eval())?;
        let inputs = model.llm_inputs(&visual, &ids, &mask)?;
        model.generate(&inputs, &gen)
    };
    answer()?; // warm-up
    sync(&dev)?;
    let mut times = Vec::new();
    for _ in 0..a.iters.max(1) {
        let t = Instant::now();
        answer()?;
        sync(&dev)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let median = times[times.len() / 2];
    let out = json!({
        "bench": "forward",
        "preset": a.preset,
        "device": a.device,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "batch": a.batch,
        "build_seconds": build_s,
        "params": {
            "trainable": lb.vars().num_params(),
        },
        "vit": { "frames": vit_frames, "seconds": vit_s, "frames_per_s": vit_frames as f64 / vit_s },
        "answer": {
            "frames": a.frames, "k": a.k, "spatial": cfg.spatial, "visual_tokens": cfg.num_visual_tokens(a.k),
            "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
            "seconds_per_batch_median": median, "seconds_per_batch_all": times,
            "latency_s_per_answer": median / a.batch as f64,
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Forward(a) => forward(a),
        BenchCommand::Decode(a) => crate::frames::run_bench_decode(a),
    }
}

#[derive(Args)]
pub struct CheckWeightsArgs {
    /// An HF InstructBLIP snapshot directory, or a GCG release directory.
    #[arg(long)]
    weights: PathBuf,
    /// The Flan-T5 snapshot for a GCG release directory (default: `<weights>/flan-t5`).
    #[arg(long)]
    t5: Option<PathBuf>,
    /// Skip the ViT trunk (when working from cached features).
    #[arg(long)]
    no_vit: bool,
    /// Model sizes for a GCG release directory, which carries no config of its own
    /// (an HF snapshot's config.json always wins).
    #[arg(long, default_value = "instructblip-flan-t5-xl")]
    preset: String,
}

pub fn check_weights(a: CheckWeightsArgs) -> Result<()> {
    let (src, cfg) = open_any(&a.weights, a.t5.as_deref(), &a.preset)?;
    let no_vit = a.no_vit;
    let lb = Loader::from_source(src.clone(), &Device::Cpu, DType::F32)
        .with_trainable(is_trainable)
        .with_ignored(move |n| is_buffer(n) || (no_vit && is_vit_trunk(n)));
    let _model = VideoLmm::load(&lb, &cfg, !a.no_vit)?;
    lb.finish()?;
    let out = json!({
        "weights": a.weights,
        "source": src.describe(),
        "tensors": src.names().len(),
        "trainable_params": lb.vars().num_params(),
        "config": cfg,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
