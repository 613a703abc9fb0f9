//! `gcg bench ...`: speed measurements printed as JSON (never timed tests).

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use gcg::models::lmm::{is_trainable, LmmConfig, VideoLmm};
use gcg::models::t5::GenerateConfig;
use gcg::models::Preset;
use gcg::nn::Ctx;
use gcg::weights::Loader;
use gcg::SeededRng;
use serde_json::json;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The frozen backbone's speed on random weights of the preset's real shapes: ViT frames/s and
    /// one grounded answer's latency (K frames through the Q-Former + the spatial pass + T5 greedy).
    Forward(ForwardArgs),
    /// The feature store's write and read speed (MB/s, samples/s) on a synthetic store or a given one.
    Store(crate::bench_store::StoreArgs),
    /// One GCG training step (grounding mode: generator + perturbed top-k + Q-Former + T5 loss,
    /// backward, AdamW) on random weights of the preset's shapes and random cached features.
    TrainStep(TrainStepArgs),
    /// Video decoding (ffmpeg, T sampled frames) and CLIP pre-processing throughput.
    Decode(crate::bench_decode::DecodeArgs),
    /// `gcg serve` under load: N concurrent clients for M questions against a running server
    /// (--url) or one started for a run (default: the demo's): latency percentiles, requests/s,
    /// errors, peak RSS; and a new video's upload (uncached) against its first question (cached).
    Serve(crate::bench_serve::ServeBenchArgs),
    /// This CPU's arithmetic ceiling: GFLOP/s of its f32 FMA, AVX512-BF16 dot-product and AMX
    /// units kept busy on one thread and on `--threads` threads at once (what a benchmark's
    /// GFLOP/s is read against).
    Peak(PeakArgs),
}

#[derive(Args)]
pub struct PeakArgs {
    /// Seconds each probe runs (each unit is probed twice: on one thread, then on all).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

#[derive(Args)]
pub struct TrainStepArgs {
    /// Network sizes: tiny | instructblip-flan-t5-xl (random weights of its shapes).
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    /// Questions per step.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    batch: usize,
    #[command(flatten)]
    device: crate::args::DeviceArgs,
    /// The model's mode: uniform | oracle | grounding.
    #[arg(long, default_value = "grounding")]
    mode: gcg::model::Mode,
    /// Frames sampled per video (T).
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=4096))]
    frames: usize,
    /// Timed steps (after one warm-up).
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    iters: usize,
    #[command(flatten)]
    seed: crate::args::BenchSeedArg,
}

#[derive(Args)]
pub struct ForwardArgs {
    /// Network sizes: tiny | instructblip-flan-t5-xl (random weights of its shapes).
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    /// Questions answered together.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    batch: usize,
    #[command(flatten)]
    device: crate::args::DeviceArgs,
    /// Frames sampled per video (T).
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    frames: usize,
    /// Frames selected for the LLM (K).
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    k: usize,
    /// Frames pushed through the ViT for the throughput figure (default: batch × T, capped at 4 on
    /// the real preset on cpu).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    vit_frames: Option<usize>,
    /// Prompt length in T5 tokens.
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    prompt_tokens: usize,
    /// Tokens decoded greedily.
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    new_tokens: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    iters: usize,
    #[command(flatten)]
    seed: crate::args::BenchSeedArg,
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
    let (dev, dtype) = a.device.open()?;
    let mut cfg = LmmConfig::preset(a.preset);
    cfg.max_frames = cfg.max_frames.max(a.frames);
    if a.k > a.frames {
        bail!("--k {} exceeds --frames {}", a.k, a.frames);
    }
    let t0 = Instant::now();
    let lb = Loader::random(&dev, dtype, a.seed.seed).with_trainable(is_trainable);
    let model = VideoLmm::load(&lb, &cfg, true)?;
    sync(&dev)?;
    let build_s = t0.elapsed().as_secs_f64();
    let mut rng = SeededRng::new(a.seed.seed + 1);
    let s = cfg.vision.image_size;
    let n = cfg.vision.num_positions();
    let dv = cfg.vision.hidden_size;

    // ViT throughput.
    let big_cpu = !dev.is_cuda() && a.preset != Preset::Tiny;
    let vit_frames = a.vit_frames.unwrap_or(if big_cpu { 4 } else { a.batch * a.frames });
    let pix = Tensor::from_vec(rng.normal_vec(vit_frames * 3 * s * s, 0.0, 1.0), (vit_frames, 3, s, s), &dev)?.to_dtype(dtype)?;
    // As torch_anchor.py times it: passes of the same size to warm up (the allocator's heap
    // then holds the pass's buffers), then the median of max(1, iters / 2) passes. Two warm-up
    // passes where frozen weights are packed (on their second product: nn::linear::PackSlot).
    let warm = warm_ups();
    let mut vit_runs = Vec::new();
    let mut vit_warm = Vec::new();
    for i in 0..warm + (a.iters / 2).max(1) {
        let t = Instant::now();
        drop(model.encode_pixels(&pix)?);
        sync(&dev)?;
        let s = t.elapsed().as_secs_f64();
        if i < warm {
            vit_warm.push(s)
        } else {
            vit_runs.push(s)
        }
    }
    vit_runs.sort_by(|x, y| x.total_cmp(y));
    let vit_s = vit_runs[vit_runs.len() / 2];

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
    // One answer, timed per phase: [visual tokens (Q-Former), T5 encoder, greedy decoding].
    let answer = || -> Result<[f64; 3]> {
        let _inference = gcg::nn::inference(dtype);
        let t = Instant::now();
        let normed = model.normalize_features(&feats)?;
        let chosen = normed.index_select(&sel, 1)?;
        let visual = model.visual_tokens(&chosen, Some(&normed), &qids, &qmask, Ctx::eval())?;
        let inputs = model.llm_inputs(&visual, &ids, &mask)?;
        sync(&dev)?;
        let visual_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let enc = model.t5.encode(&inputs.embeds, &inputs.mask, Ctx::eval())?;
        sync(&dev)?;
        let encode_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let tokens = model.t5.generate(&enc, &inputs.mask, &gen)?;
        sync(&dev)?;
        ensure!(
            tokens.len() == a.batch,
            "generate answered {} of {} questions",
            tokens.len(),
            a.batch
        );
        Ok([visual_s, encode_s, t.elapsed().as_secs_f64()])
    };
    for _ in 0..warm {
        answer()?;
    }
    let mut runs = Vec::new();
    for _ in 0..a.iters.max(1) {
        runs.push(answer()?);
    }
    // The same answers inside one outer scope, as `gcg serve`, `gcg predict` and `gcg ask` with
    // several questions hold: the casts of the Q-Former's f32 weights to bf16 are made by the
    // first answer and kept.
    let kept = {
        let _scope = gcg::nn::inference(dtype);
        answer()?;
        (0..a.iters.max(1)).map(|_| answer()).collect::<Result<Vec<_>>>()?
    };
    let median_in = |runs: &[[f64; 3]], f: &dyn Fn(&[f64; 3]) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let median_of = |f: &dyn Fn(&[f64; 3]) -> f64| median_in(&runs, f);
    let kept = median_in(&kept, &|r| r.iter().sum());
    let times: Vec<f64> = runs.iter().map(|r| r.iter().sum()).collect();
    let median = median_of(&|r| r.iter().sum());
    let phases = json!({
        "visual_tokens_s": median_of(&|r| r[0]),
        "t5_encoder_s": median_of(&|r| r[1]),
        "decoding_s": median_of(&|r| r[2]),
    });
    // The ViT's GFLOP/s, and its share of the ceiling of the unit its products run on, probed
    // now (after the timed work, on as many threads): see `vit_ceiling`.
    let vit_flops = cfg.vision.flops_per_frame() as f64 * vit_frames as f64;
    let mut vit_json = json!({
        "frames": vit_frames, "seconds": vit_s, "seconds_all": vit_runs, "warm_up_seconds": vit_warm, "frames_per_s": vit_frames as f64 / vit_s,
        "gflop_per_frame": cfg.vision.flops_per_frame() as f64 / 1e9,
        "gflops": vit_flops / vit_s / 1e9,
        "peak_unit": null, "peak_share": null, "peak_gflops": null, "fraction_of_peak": null,
    });
    if let (false, Some((unit, share))) = (dev.is_cuda(), vit_ceiling(dtype)) {
        let threads = candle_core::utils::get_num_threads();
        match gcg::nn::peak::measure(unit, threads, std::time::Duration::from_millis(500)) {
            Ok(Some(p)) => {
                let ceiling = p.gflops * share;
                vit_json["peak_unit"] = json!(unit.as_str());
                vit_json["peak_share"] = json!(share);
                vit_json["peak_gflops"] = json!(ceiling);
                vit_json["fraction_of_peak"] = json!(vit_flops / vit_s / 1e9 / ceiling);
            }
            Ok(None) => {}
            Err(e) => vit_json["peak_error"] = json!(format!("{e:#}")),
        }
    }
    let out = json!({
        "bench": "forward",
        "preset": a.preset.name(),
        "device": a.device.device.to_string(),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "batch": a.batch,
        "build_seconds": build_s,
        "kernels": kernels(),
        "params": {
            "trainable": lb.vars().num_params(),
        },
        "vit": vit_json,
        "answer": {
            "frames": a.frames, "k": a.k, "spatial": cfg.spatial, "visual_tokens": cfg.num_visual_tokens(a.k),
            "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
            "seconds_per_batch_median": median, "seconds_per_batch_all": times,
            "latency_s_per_answer": median / a.batch as f64,
            "phases_s_per_batch_median": phases,
            // One scope over all answers (serve, predict): weight casts kept.
            "kept_scope_seconds_per_batch_median": kept,
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Untimed passes before a timed one: one (the allocator's heap then holds the pass's buffers),
/// two when frozen weights are packed, as that happens on their second product.
fn warm_ups() -> usize {
    if gcg::nn::linear::ONEDNN && gcg::nn::linear::pack_weights_enabled() {
        2
    } else {
        1
    }
}

/// Which attention kernels run in inference (the ViT's attention has no bias; T5's and the
/// Q-Former's have one).
fn attention_kernels() -> String {
    use gcg::nn::linear::{amx_active, avx512_attention_active, ONEDNN};
    if !ONEDNN {
        return "candle".into();
    }
    let own = |dt: DType, name: &str| -> Option<String> {
        if dt == DType::BF16 && amx_active() {
            let soft = gcg::nn::linear::amx_tiles() == Some(gcg::nn::linear::AmxTiles::Software);
            Some(format!(
                "{name}: gcg's AMX attention{}",
                if soft { " on software tiles (GCG_SOFT_AMX)" } else { "" }
            ))
        } else if avx512_attention_active(dt) {
            Some(format!("{name}: gcg's AVX-512 attention"))
        } else {
            None
        }
    };
    let mine: Vec<String> = [own(DType::F32, "f32"), own(DType::BF16, "bf16")].into_iter().flatten().collect();
    let rest = "oneDNN batched products + softmax (inference, >= 16 queries and keys, width >= 256) + candle (the rest)";
    if mine.is_empty() {
        rest.into()
    } else {
        format!("without a bias (the ViT's) {}; {rest}", mine.join(", "))
    }
}

/// Which kernels ran and on how many threads (for the JSON of every bench).
pub fn kernels() -> serde_json::Value {
    json!({
        "matmul": if gcg::nn::linear::onednn_bf16() {
            "oneDNN (frozen products >= 256 wide, fused epilogues; bf16 in mixed precision) + candle (the rest)"
        } else if gcg::nn::linear::ONEDNN {
            "oneDNN (frozen products >= 256 wide, fused epilogues; bf16 operands widened to f32: no bf16 products below AVX-512) + candle (the rest)"
        } else {
            "candle"
        },
        "attention": attention_kernels(),
        // The vector instructions gcg's kernels and oneDNN may use: the highest level this CPU
        // has within GCG_MAX_CPU_ISA's cap, and the cap ("amx": none).
        "cpu_isa": {
            "used": gcg::nn::isa::best().name(),
            "cap": gcg::nn::isa::cap().name(),
            "onednn_bf16": gcg::nn::linear::onednn_bf16(),
        },
        "matmul_precision": gcg::nn::linear::matmul_precision().as_str(),
        // oneDNN's kernel for large f32 products (GCG_ONEDNN_F32=gemm|brgemm).
        "onednn_f32": match gcg::nn::linear::onednn_f32_gemm() {
            Some((true, rows, cols)) => format!("gemm:jit for calls of >= {rows} rows and >= {cols} outputs, oneDNN's first choice (brgemm on AVX-512) for the rest"),
            Some((false, ..)) => "oneDNN's first choice (brgemm on AVX-512)".to_string(),
            None => "none (no oneDNN)".to_string(),
        },
        "amx": if gcg::nn::linear::amx_tiles() == Some(gcg::nn::linear::AmxTiles::Software) {
            "gcg's AMX kernels with the tile unit in software (GCG_SOFT_AMX: for tests, slower than oneDNN)"
        } else if gcg::nn::linear::amx_active() {
            if gcg::nn::linear::matmul_precision() == gcg::nn::linear::MatmulPrecision::High {
                "gcg's AMX kernel for bf16 products and (as bf16 pairs) f32 products of >= 32 rows (reduction a multiple of 32)"
            } else {
                "gcg's AMX kernel for bf16 products of >= 32 rows (reduction a multiple of 32)"
            }
        } else if gcg::nn::linear::AMX_BUILT {
            "built in, not used: no AMX-BF16 on this CPU, Linux refused its tile state, GCG_NO_AMX is set or GCG_MAX_CPU_ISA caps it"
        } else {
            "not built (needs x86-64, oneDNN, a C compiler with AMX intrinsics, glibc >= 2.35)"
        },
        // Frozen weights kept in oneDNN's blocked layout (nn::linear::PackSlot): whether on (off
        // in training commands and with GCG_PACK_WEIGHTS=0) and the bytes held now.
        "packed_weights": {
            "enabled": gcg::nn::linear::ONEDNN && gcg::nn::linear::pack_weights_enabled(),
            "bytes": gcg::nn::linear::packed_weight_bytes(),
        },
        "threads": candle_core::utils::get_num_threads(),
        "omp_wait_policy": crate::omp_wait_policy(),
        "omp_spin_count": crate::omp_spin_count(),
        "omp_settings_by_binary": crate::omp_settings_by_binary(),
        "glibc_tunables": crate::glibc_tunables(),
        "huge_pages_by_binary": crate::huge_pages_by_binary(),
        "anon_huge_page_bytes": crate::anon_huge_page_bytes(),
    })
}

fn train_step(a: TrainStepArgs) -> Result<()> {
    use gcg::data::Batch;
    use gcg::data::{Answer, Dataset, QaSample};
    use gcg::grounding::GroundingConfig;
    use gcg::model::{GcgConfig, GcgModel, TextTokenizers};
    use gcg::train::Grads;
    let (dev, dtype) = a.device.open()?;
    let lmm = LmmConfig::preset(a.preset);
    let mut grounding = if a.preset == Preset::Tiny {
        GroundingConfig::tiny()
    } else {
        GroundingConfig::gcg()
    };
    grounding.frames = a.frames;
    let clip_dim = grounding.dim;
    // A closed-vocabulary tokenizer pair for the NExT-QA prompt (real tokenizers are downloads).
    let tmp = std::env::temp_dir().join(format!("gcg-bench-tok-{}", std::process::id()));
    let prompt = "Question: why did the boy pick up one present from the group of them and move to the sofa?\nOptions: \nA: share with the girl \nB: approach lady sitting there \nC: unwrap it \nD: playing with toy train \nE: gesture something\nAnswer: ";
    let (qformer, t5) = gcg::text::vocab::closed_vocab_tokenizers(&[prompt, "A B C D E"], &tmp)?;
    std::fs::remove_dir_all(&tmp).ok();
    let cfg = GcgConfig {
        grounding,
        mode: a.mode,
        ..GcgConfig::default()
    };
    let t0 = Instant::now();
    let lb = Loader::random(&dev, dtype, a.seed.seed).with_trainable(gcg::model::is_trainable);
    let model = GcgModel::load(&lb, &lmm, &cfg, TextTokenizers { qformer, t5 }, false)?;
    let vars = lb.vars();
    let tc = gcg::train::trainer::TrainConfig::default();
    let mut opt = tc.optimizer(&vars)?;
    let build_s = t0.elapsed().as_secs_f64();
    let mut rng = SeededRng::new(a.seed.seed + 1);
    let (b, t) = (a.batch, a.frames);
    let n = lmm.vision.num_positions();
    let dv = lmm.vision.hidden_size;
    let randn = |rng: &mut SeededRng, shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::from_vec(rng.normal_vec(shape.iter().product(), 0.0, 1.0), shape, &dev)?)
    };
    let sample = QaSample {
        dataset: Dataset::NextQa,
        key: "bench".into(),
        qid: "0".into(),
        video: "bench".into(),
        question: "why did the boy pick up one present from the group of them and move to the sofa".into(),
        options: [
            "share with the girl",
            "approach lady sitting there",
            "unwrap it",
            "playing with toy train",
            "gesture something",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        answer: Answer::Choice(2),
        qtype: "CW".into(),
        extra: Default::default(),
    };
    let scores = randn(&mut rng, &[b, t])?;
    // The prompts are tokenized once, as the batch workers do, outside the timed step.
    let batch = Batch {
        index: 0,
        samples: vec![sample; b],
        frame_features: Some(randn(&mut rng, &[b, t, n, dv])?.to_dtype(dtype)?),
        pixel_values: None,
        clip_frames: randn(&mut rng, &[b, t, clip_dim])?,
        clip_question: randn(&mut rng, &[b, clip_dim])?,
        clip_options: Some(randn(&mut rng, &[b, 5, clip_dim])?),
        clip_answer: randn(&mut rng, &[b, clip_dim])?,
        clip_event: randn(&mut rng, &[b, clip_dim])?,
        pseudo_labels: gcg::grounding::hard_topk(&scores, cfg.grounding.moments)?,
        pseudo_label_scores: scores,
        answer_indices: Some(vec![2; b]),
        timestamps: vec![(0..t).map(|i| i as f64).collect(); b],
        prompts: None,
    }
    .with_prompts(&model.prompt_encoder())?;
    let step_rng = std::cell::RefCell::new(SeededRng::new(a.seed.seed + 2));
    let mut step = || -> Result<f64> {
        let losses = model.forward_train(&batch, &step_rng)?;
        let mut grads = Grads::new();
        grads.accumulate(&losses.total.backward()?, &vars, 1.0)?;
        opt.step(&grads, 1.0)?;
        sync(&dev)?;
        Ok(losses.total.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
    };
    step()?; // warm-up
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..a.iters.max(1) {
        let t = Instant::now();
        losses.push(step()?);
        times.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let median = sorted[sorted.len() / 2];
    let out = json!({
        "bench": "train-step",
        "preset": a.preset.name(),
        "mode": a.mode,
        "device": a.device.device.to_string(),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "batch": b,
        "frames": t,
        "moments": cfg.grounding.moments,
        "trainable_params": vars.num_params(),
        "build_seconds": build_s,
        "kernels": kernels(),
        "seconds_per_step_median": median,
        "seconds_per_step_all": times,
        "samples_per_s": b as f64 / median,
        "peak_rss_bytes": crate::peak_rss_bytes(),
        "losses": losses,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Forward(a) => forward(a),
        BenchCommand::Store(a) => crate::bench_store::run(a),
        BenchCommand::TrainStep(a) => train_step(a),
        BenchCommand::Decode(a) => crate::bench_decode::run(a),
        BenchCommand::Serve(a) => crate::bench_serve::run(a),
        BenchCommand::Peak(a) => peak(a),
    }
}

/// The unit the ViT's products run on in `dtype` on the CPU, and the share of its rate an
/// operation of the ViT's may take (None: no measured ceiling applies).
/// * f32: the FMA units; at `--matmul-precision high` with gcg's AMX kernel, the tile unit at a
///   third of its rate (three bf16 products per f32 one; the attention's f32 products stay on
///   the FMA units, so this ceiling is approximate there).
/// * bf16 with oneDNN: the tile unit on a CPU with AMX-BF16 that `GCG_MAX_CPU_ISA` does not cap
///   (gcg's kernel or oneDNN's runs there, whatever `GCG_NO_AMX` says), none when this binary
///   cannot probe it; else
///   AVX512-BF16's dot products, else the FMA units (oneDNN widens bf16 to f32).
/// * bf16 without oneDNN (candle's products widen to f32): the FMA units. f16: none.
fn vit_ceiling(dtype: DType) -> Option<(gcg::nn::peak::Unit, f64)> {
    use gcg::nn::linear::{amx_tiles, matmul_precision, AmxTiles, MatmulPrecision, ONEDNN};
    use gcg::nn::peak::{cpu_has_amx_bf16, Unit};
    let has = |u: Unit| u.instruction().is_some();
    match dtype {
        DType::F32 if amx_tiles() == Some(AmxTiles::Unit) && matmul_precision() == MatmulPrecision::High => {
            Some((Unit::AmxBf16, 1.0 / 3.0))
        }
        DType::F32 => Some((Unit::F32Fma, 1.0)),
        DType::BF16 if ONEDNN && cpu_has_amx_bf16() && gcg::nn::isa::allows(gcg::nn::isa::Isa::Amx) => {
            has(Unit::AmxBf16).then_some((Unit::AmxBf16, 1.0))
        }
        DType::BF16 if ONEDNN && has(Unit::Bf16Dot) => Some((Unit::Bf16Dot, 1.0)),
        DType::BF16 => Some((Unit::F32Fma, 1.0)),
        _ => None,
    }
}

/// The CPU's model name (`/proc/cpuinfo`), or null.
fn cpu_model() -> serde_json::Value {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .map_or(serde_json::Value::Null, serde_json::Value::from)
}

fn peak(a: PeakArgs) -> Result<()> {
    ensure!(
        a.seconds.is_finite() && (0.05..=60.0).contains(&a.seconds),
        "--seconds {} must be in [0.05, 60]",
        a.seconds
    );
    let time = std::time::Duration::from_secs_f64(a.seconds);
    let threads = candle_core::utils::get_num_threads();
    let mut units = serde_json::Map::new();
    for unit in gcg::nn::peak::Unit::ALL {
        let v = match (gcg::nn::peak::measure(unit, 1, time)?, gcg::nn::peak::measure(unit, threads, time)?) {
            (Some(one), Some(all)) => json!({
                "instruction": one.instruction,
                "gflops_one_thread": one.gflops,
                "gflops_all_threads": all.gflops,
                "gflops_per_thread": all.per_thread,
            }),
            _ => serde_json::Value::Null,
        };
        units.insert(unit.as_str().into(), v);
    }
    let out = json!({
        "bench": "peak",
        "cpu": cpu_model(),
        "threads": threads,
        "seconds_per_probe": a.seconds,
        "units": units,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
