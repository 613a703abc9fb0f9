//! Contrastive pre-training of the demo's tiny frozen encoders — a ViT, the CLIP branch's image
//! head on top of its un-normalised features, and a CLIP text tower — on the frame/caption pairs
//! of a synthetic world's training split (`captions.jsonl`).
//!
//! The loss is CLIP's symmetric InfoNCE with several positives: a frame's captions overlap with
//! other frames' (every frame of an event shares its captions; every empty frame says "nothing
//! appeared"), so a text counts as a positive of every frame in the batch that it truly describes
//! (`-log Σ_pos softmax`), in both directions. The temperature is CLIP's learned `logit_scale`.
//! After training the encoders are frozen: pseudo-labels then come from their similarities, as
//! in GCG, and nothing reads the world's ground truth.

use crate::models::clip_branch::{ClipConfig, ClipImageConfig, ClipImageHead};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::vit::{VisionModel, VitConfig};
use crate::rng::SeededRng;
use crate::text::tokenizers::ClipTokenizer;
use crate::train::optim::{AdamW, AdamWConfig, Grads, GroupConfig};
use crate::video::preprocess::{normalize_chw, resize_and_crop, CLIP_MEAN, CLIP_STD};
use crate::weights::{Loader, VarStore};
use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// CLIP's merges file (from OpenAI CLIP / open_clip, MIT licence), so that the demo needs no
/// download.
pub const CLIP_BPE_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

/// The CLIP BPE merges this binary carries ([`CLIP_BPE_GZ`], the official
/// `bpe_simple_vocab_16e6.txt.gz`) as a file, for commands that take a tokenizer path and were
/// given none with random weights: written once (atomically) into the gcg cache (`$GCG_CACHE`,
/// else `$XDG_CACHE_HOME/gcg/ask`, else `~/.cache/gcg/ask`) and read from there; its
/// bytes, hence the text encoder's fingerprint, are those of the official file.
pub fn embedded_clip_bpe() -> Result<std::path::PathBuf> {
    let path = crate::util::ask_cache_root().join("bpe_simple_vocab_16e6.txt.gz");
    if std::fs::read(&path).ok().as_deref() != Some(CLIP_BPE_GZ) {
        crate::util::write_atomic(&path, CLIP_BPE_GZ).with_context(|| format!("writing the CLIP BPE to {}", path.display()))?;
    }
    Ok(path)
}

/// Sizes and budget of the pre-training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipPretrainConfig {
    /// ViT input size and patch size (frames are resized and centre-cropped to it).
    pub image_size: usize,
    pub patch_size: usize,
    /// CLIP embedding width (the grounding module's d).
    pub embed_dim: usize,
    pub text_width: usize,
    /// Tokens per caption (the tokenizer's context).
    pub context_length: usize,
    pub steps: usize,
    /// Frames per step; half of them (when there are enough) show an event.
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for ClipPretrainConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            patch_size: 8,
            embed_dim: 64,
            text_width: 64,
            context_length: 32,
            steps: 120,
            batch_size: 64,
            lr: 2e-3,
            seed: 0,
        }
    }
}

impl ClipPretrainConfig {
    /// The ViT: the tiny preset's width (so the tiny LMM reads its features) at this input size.
    pub fn vit(&self) -> VitConfig {
        VitConfig {
            image_size: self.image_size,
            patch_size: self.patch_size,
            ..VitConfig::tiny()
        }
    }

    pub fn clip(&self, vocab_size: usize) -> ClipConfig {
        let vit = self.vit();
        ClipConfig {
            text: ClipTextConfig {
                vocab_size,
                width: self.text_width,
                heads: 4,
                layers: 2,
                context_length: self.context_length,
                embed_dim: self.embed_dim,
                mlp_width: 4 * self.text_width,
                layer_norm_eps: 1e-5,
            },
            image: ClipImageConfig {
                width: vit.hidden_size,
                heads: vit.num_attention_heads,
                mlp_hidden: vit.intermediate_size,
                embed_dim: self.embed_dim,
                layer_norm_eps: 1e-5,
            },
        }
    }
}

/// The trained, frozen encoders.
pub struct Encoders {
    pub vit: VisionModel,
    pub image: ClipImageHead,
    pub text: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    pub vit_config: VitConfig,
    pub clip_config: ClipConfig,
    /// Every trained tensor under its checkpoint name (`vision_model.*`, the image head's
    /// names, `text.*`).
    pub vars: VarStore,
    /// (step, loss) every step.
    pub losses: Vec<(usize, f64)>,
    /// Retrieval accuracy on held-out frames after training (percent): how often a frame's
    /// most similar caption among all captions of the split is one of its true captions.
    pub heldout_top1: f64,
}

/// One captioned frame of `captions.jsonl`.
#[derive(Debug, Clone, Deserialize)]
struct CaptionRow {
    video: String,
    split: String,
    path: String,
    event: Option<usize>,
    captions: Vec<String>,
}

struct Frame {
    pixels: Vec<f32>,
    captions: Vec<usize>,
    event: bool,
}

/// Read the captioned frames of `split` (pre-processed at `size`) and intern their captions.
fn read_frames(world: &Path, split: &str, size: usize, texts: &mut Vec<String>, ids: &mut BTreeMap<String, usize>) -> Result<Vec<Frame>> {
    let path = world.join("captions.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: CaptionRow = serde_json::from_str(line).with_context(|| format!("{} line {}", path.display(), i + 1))?;
        if row.split != split {
            continue;
        }
        let img: RgbImage = crate::video::read_image(&world.join(&row.path))
            .with_context(|| format!("{} line {} (video {})", path.display(), i + 1, row.video))?;
        let pixels = normalize_chw(&resize_and_crop(&img, size as u32)?, CLIP_MEAN, CLIP_STD);
        let captions = row
            .captions
            .iter()
            .map(|c| {
                *ids.entry(c.clone()).or_insert_with(|| {
                    texts.push(c.clone());
                    texts.len() - 1
                })
            })
            .collect();
        out.push(Frame {
            pixels,
            captions,
            event: row.event.is_some(),
        });
    }
    ensure!(!out.is_empty(), "{} has no captioned frames of the {split} split", path.display());
    Ok(out)
}

/// log Σ exp(x) over the last dimension, with a gradient.
fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    Ok((x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?.squeeze(D::Minus1)?)
}

/// Multi-positive InfoNCE of logits [B, B'] with positives `mask` [B, B'] (1/0), averaged over
/// the rows that have a positive.
fn multi_positive_nce(logits: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let masked = (logits + ((mask - 1.0)? * 1e4)?)?;
    let per_row = (logsumexp(logits)? - logsumexp(&masked)?)?;
    Ok(per_row.mean_all()?)
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}

/// Pre-train the encoders on the `train` split of the world in `world`; `progress(step, loss)`
/// after every step.
pub fn pretrain(world: &Path, cfg: &ClipPretrainConfig, progress: &mut dyn FnMut(usize, f64)) -> Result<Encoders> {
    let dev = Device::Cpu;
    let tokenizer = embedded_tokenizer(cfg)?;
    let mut texts = Vec::new();
    let mut ids = BTreeMap::new();
    let frames = read_frames(world, "train", cfg.image_size, &mut texts, &mut ids)?;
    let heldout = read_frames(world, "val", cfg.image_size, &mut texts, &mut ids)?;
    let tokens: Vec<Vec<u32>> = tokenizer.tokenize(&texts)?.input_ids;

    let vit_cfg = cfg.vit();
    let clip_cfg = cfg.clip(tokenizer.vocab_size());
    let Towers { vit, image, text, vars } = Towers::random(cfg, &vit_cfg, &clip_cfg, &dev)?;
    let mut opt = clip_optimizer(&vars, cfg.lr)?;

    let events: Vec<usize> = (0..frames.len()).filter(|&i| frames[i].event).collect();
    let empty: Vec<usize> = (0..frames.len()).filter(|&i| !frames[i].event).collect();
    let mut rng = SeededRng::new(cfg.seed.wrapping_add(3));
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let (batch, caps) = sample_batch(&frames, &events, &empty, &mut rng, cfg.batch_size);
        let (mask, px, tok) = batch_tensors(&frames, &tokens, &batch, &caps, cfg, &dev)?;
        let (value, mut grads, scale) = sharded_step(&vit, &image, &text, &vars, &px, &tok, &mask, SHARDS)?;
        ensure!(value.is_finite(), "CLIP pre-training: the loss is not finite at step {step}");
        let gn = grads.clip_global_norm(1.0)?;
        if std::env::var("GCG_DEBUG").is_ok() && step % 20 == 0 {
            eprintln!(
                "step {step} loss {value:.4} grad norm {gn:.4} grads {} vars {} scale {scale}",
                grads.len(),
                vars.len(),
            );
        }
        // Cosine decay to 10%.
        let frac = step as f64 / cfg.steps.max(1) as f64;
        opt.step(&grads, 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()))?;
        losses.push((step, value));
        progress(step + 1, value);
    }

    let heldout_top1 = retrieval_top1(&vit, &image, &text, &heldout, &texts, &tokens, cfg)?;
    Ok(Encoders {
        vit,
        image,
        text,
        tokenizer,
        vit_config: vit_cfg,
        clip_config: clip_cfg,
        vars,
        losses,
        heldout_top1,
    })
}

/// CLIP's tokenizer from the embedded merges file, at the config's context length.
fn embedded_tokenizer(cfg: &ClipPretrainConfig) -> Result<ClipTokenizer> {
    let bpe = std::env::temp_dir().join(format!("gcg-clip-bpe-{}.txt.gz", std::process::id()));
    std::fs::write(&bpe, CLIP_BPE_GZ).with_context(|| format!("writing {}", bpe.display()))?;
    let tokenizer = ClipTokenizer::from_bpe_file(&bpe);
    let _ = std::fs::remove_file(&bpe);
    tokenizer?.with_context_length(cfg.context_length)
}

/// The three towers being pre-trained (ViT, image head, text tower) and their trainable variables.
struct Towers {
    vit: VisionModel,
    image: ClipImageHead,
    text: ClipTextModel,
    vars: VarStore,
}

impl Towers {
    /// Randomly initialised towers (seeds `seed`, `seed + 1`, `seed + 2`), every weight trainable,
    /// then re-initialised by fan-in (seed `seed + 4`).
    fn random(cfg: &ClipPretrainConfig, vit_cfg: &VitConfig, clip_cfg: &ClipConfig, dev: &Device) -> Result<Self> {
        let all = |_: &str| true;
        let lv = Loader::random(dev, DType::F32, cfg.seed).with_trainable(all);
        let vit = VisionModel::load(&lv.pp("vision_model"), vit_cfg)?;
        let li = Loader::random(dev, DType::F32, cfg.seed.wrapping_add(1)).with_trainable(all);
        let image = ClipImageHead::load(&li, &clip_cfg.image)?;
        let lt = Loader::random(dev, DType::F32, cfg.seed.wrapping_add(2)).with_trainable(all);
        let text = ClipTextModel::load(&lt.pp("text"), &clip_cfg.text)?;
        let mut vars = VarStore::default();
        vars.extend(lv.vars());
        vars.extend(li.vars());
        vars.extend(lt.vars());
        // Fan-in initialisation: the checkpoints' std 0.02 is far too small for layers this narrow
        // to learn from scratch.
        crate::nn::init::fan_in_reinit(&vars, cfg.seed.wrapping_add(4), |n| n.contains("embedding"))?;
        Ok(Self { vit, image, text, vars })
    }
}

/// AdamW over every pre-trained variable, one group (weight decay 0.02).
fn clip_optimizer(vars: &VarStore, lr: f64) -> Result<AdamW> {
    AdamW::new(
        vars,
        vec![GroupConfig {
            name: "clip".into(),
            lr,
            weight_decay: 0.02,
        }],
        AdamWConfig::default(),
        |_| 0,
    )
}

/// A training batch of `b` frames, half event frames and half the rest (or whatever there is),
/// and one random true caption per frame: (frame indices, caption indices).
fn sample_batch(frames: &[Frame], events: &[usize], empty: &[usize], rng: &mut SeededRng, b: usize) -> (Vec<usize>, Vec<usize>) {
    let mut batch = Vec::with_capacity(b);
    for j in 0..b {
        let pool = if (j % 2 == 0 && !events.is_empty()) || empty.is_empty() {
            events
        } else {
            empty
        };
        batch.push(pool[rng.below(pool.len())]);
    }
    let caps: Vec<usize> = batch
        .iter()
        .map(|&f| frames[f].captions[rng.below(frames[f].captions.len())])
        .collect();
    (batch, caps)
}

/// The batch's tensors: the positives mask [B, B] (frame i, caption j: 1 when j is one of i's
/// captions), the pixels [B, 3, S, S] and the caption tokens [B, context].
fn batch_tensors(
    frames: &[Frame],
    tokens: &[Vec<u32>],
    batch: &[usize],
    caps: &[usize],
    cfg: &ClipPretrainConfig,
    dev: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, s) = (batch.len(), cfg.image_size);
    let mut mask = Vec::with_capacity(b * b);
    for &f in batch {
        let set: HashSet<usize> = frames[f].captions.iter().copied().collect();
        mask.extend(caps.iter().map(|c| if set.contains(c) { 1f32 } else { 0f32 }));
    }
    let mask = Tensor::from_vec(mask, (b, b), dev)?;
    let mut px = Vec::with_capacity(b * 3 * s * s);
    for &f in batch {
        px.extend_from_slice(&frames[f].pixels);
    }
    let px = Tensor::from_vec(px, (b, 3, s, s), dev)?;
    let tok: Vec<u32> = caps.iter().flat_map(|&c| tokens[c].iter().copied()).collect();
    let tok = Tensor::from_vec(tok, (b, cfg.context_length), dev)?;
    Ok((mask, px, tok))
}

/// Shards of a pre-training batch: the towers run on each shard's frames and captions on its own
/// thread (the demo's ops run on one thread each, so this is what keeps both cores busy).
const SHARDS: usize = 2;

/// The normalised image and text embeddings of a batch, [B, E] each, with their graphs.
fn embed(vit: &VisionModel, image: &ClipImageHead, text: &ClipTextModel, px: &Tensor, tok: &Tensor) -> Result<(Tensor, Tensor)> {
    let img = l2_normalize(&image.forward(&vit.forward_wo_norm(px)?)?)?;
    let txt = l2_normalize(&text.forward(tok)?)?;
    Ok((img, txt))
}

/// `f(0..n)` side by side ([`crate::util::side_by_side`]); an error names the shard and `what` it
/// was doing.
fn side_by_side<T: Send>(n: usize, what: &str, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    crate::util::side_by_side((0..n).collect(), |i, _| f(i))
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("CLIP pre-training, shard {i} of {n}: {what}")))
        .collect()
}

/// One step's loss, gradients (of every variable in `vars` that has one) and logit scale, the
/// batch cut into `shards` row blocks.
///
/// The loss needs every embedding of the batch (each frame's negatives are all the batch's
/// captions), so the step runs in three phases: each shard's embeddings with their graphs, side
/// by side; the loss on the gathered embeddings (detached), back-propagated to them and to the
/// logit scale; then each shard back-propagates its share of that gradient through its towers,
/// side by side (the gradient of Σ e·g with respect to e is g). The sum of the parts is the
/// full batch's gradient, computed in a fixed order whatever the core count.
#[allow(clippy::too_many_arguments)]
fn sharded_step(
    vit: &VisionModel,
    image: &ClipImageHead,
    text: &ClipTextModel,
    vars: &VarStore,
    px: &Tensor,
    tok: &Tensor,
    mask: &Tensor,
    shards: usize,
) -> Result<(f64, Grads, f32)> {
    let b = px.dim(0)?;
    let shards = shards.clamp(1, b.max(1));
    let rows: Vec<(usize, usize)> = (0..shards).map(|i| (i * b / shards, (i + 1) * b / shards)).collect();
    let parts = side_by_side(shards, "forward", |i| {
        let (lo, hi) = rows[i];
        embed(vit, image, text, &px.narrow(0, lo, hi - lo)?, &tok.narrow(0, lo, hi - lo)?)
    })?;
    let gather = |pick: fn(&(Tensor, Tensor)) -> &Tensor| -> Result<candle_core::Var> {
        let detached: Vec<Tensor> = parts.iter().map(|p| pick(p).detach()).collect();
        Ok(candle_core::Var::from_tensor(&Tensor::cat(&detached, 0)?)?)
    };
    let (img, txt) = (gather(|p| &p.0)?, gather(|p| &p.1)?);
    let (loss, scale) = contrastive_loss(img.as_tensor(), txt.as_tensor(), text, mask)?;
    let value = loss.to_scalar::<f32>()? as f64;
    let head = loss.backward()?;
    let grad_of = |v: &candle_core::Var, what: &str| {
        // Detached: each shard's backward pass must stop at its own embeddings.
        head.get(v.as_tensor())
            .map(|g| g.detach())
            .ok_or_else(|| anyhow!("the contrastive loss has no gradient for the {what} embeddings"))
    };
    let (g_img, g_txt) = (grad_of(&img, "image")?, grad_of(&txt, "text")?);
    let stores = side_by_side(shards, "backward", |i| {
        let (lo, hi) = rows[i];
        let (e_img, e_txt) = &parts[i];
        let surrogate = ((e_img * g_img.narrow(0, lo, hi - lo)?)?.sum_all()? + (e_txt * g_txt.narrow(0, lo, hi - lo)?)?.sum_all()?)?;
        Ok(surrogate.backward()?)
    })?;
    let mut grads = Grads::new();
    grads.accumulate(&head, vars, 1.0)?;
    for store in &stores {
        grads.accumulate(store, vars, 1.0)?;
    }
    Ok((value, grads, scale.to_scalar::<f32>()?))
}

/// The symmetric multi-positive contrastive loss of a batch's normalised embeddings [B, E], and
/// the logit scale it used.
fn contrastive_loss(img: &Tensor, txt: &Tensor, text: &ClipTextModel, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let scale = text
        .logit_scale
        .as_ref()
        .ok_or_else(|| anyhow!("the CLIP text tower has no logit_scale"))?
        .clamp(0.0, 100f64.ln())?
        .exp()?;
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(&scale)?; // [B, B]
    let loss = ((multi_positive_nce(&logits, mask)? + multi_positive_nce(&logits.t()?, &mask.t()?)?)? * 0.5)?;
    Ok((loss, scale))
}

/// Top-1 caption retrieval of held-out frames among every caption seen (percent).
fn retrieval_top1(
    vit: &VisionModel,
    image: &ClipImageHead,
    text: &ClipTextModel,
    frames: &[Frame],
    texts: &[String],
    tokens: &[Vec<u32>],
    cfg: &ClipPretrainConfig,
) -> Result<f64> {
    let dev = Device::Cpu;
    let s = cfg.image_size;
    let mut txt = Vec::new();
    for chunk in tokens.chunks(256) {
        let t = Tensor::from_vec(chunk.concat(), (chunk.len(), cfg.context_length), &dev)?;
        txt.push(l2_normalize(&text.forward(&t)?)?);
    }
    let txt = Tensor::cat(&txt, 0)?; // [C, E]
    debug_assert_eq!(txt.dim(0)?, texts.len());
    let mut right = 0usize;
    for chunk in frames.chunks(128) {
        let px: Vec<f32> = chunk.iter().flat_map(|f| f.pixels.iter().copied()).collect();
        let px = Tensor::from_vec(px, (chunk.len(), 3, s, s), &dev)?;
        let img = l2_normalize(&image.forward(&vit.forward_wo_norm(&px)?)?)?;
        let best = img.matmul(&txt.t()?)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (f, b) in chunk.iter().zip(best) {
            right += usize::from(f.captions.contains(&(b as usize)));
        }
    }
    Ok(100.0 * right as f64 / frames.len().max(1) as f64)
}

impl Encoders {
    /// Write every trained tensor to one safetensors file (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.vars.save_safetensors(path)
    }
}

/// The frozen encoders a demo saved (`encoders.safetensors`), read back for `gcg ask`.
pub struct FrozenEncoders {
    pub vit: VisionModel,
    pub image: ClipImageHead,
    pub text: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    pub vit_config: VitConfig,
}

/// Load the encoders [`Encoders::save`] wrote to `file`, pre-trained with `cfg` (the demo's
/// `demo.json`), in f32 on the CPU; every tensor of the file must be used.
///
/// They are loaded as the demo ran them when it filled its store: as variables, whose forward
/// passes take the differentiable kernels (frozen weights take fused ones that round differently
/// in the last bit), so that a demo video's features computed again are the store's bit for bit.
pub fn load_encoders(file: &Path, cfg: &ClipPretrainConfig) -> Result<FrozenEncoders> {
    let tokenizer = embedded_tokenizer(cfg)?;
    let vit_config = cfg.vit();
    let clip_cfg = cfg.clip(tokenizer.vocab_size());
    let src = crate::weights::SafetensorsSource::open(file)?;
    let lb = Loader::from_source(std::sync::Arc::new(src), &Device::Cpu, DType::F32).with_trainable(|_| true);
    let load = || -> Result<_> {
        let vit = VisionModel::load(&lb.pp("vision_model"), &vit_config)?;
        let image = ClipImageHead::load(&lb, &clip_cfg.image)?;
        let text = ClipTextModel::load(&lb.pp("text"), &clip_cfg.text)?;
        lb.finish()?;
        Ok((vit, image, text))
    };
    let (vit, image, text) = load().with_context(|| format!("loading the demo's encoders from {}", file.display()))?;
    Ok(FrozenEncoders {
        vit,
        image,
        text,
        tokenizer,
        vit_config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sharded step's loss and gradients are those of the whole batch's loss back-propagated
    /// through one graph (the plain ops), for any shard count.
    #[test]
    fn sharded_step_equals_the_whole_batch_graph() -> Result<()> {
        let cfg = ClipPretrainConfig {
            image_size: 16,
            patch_size: 8,
            embed_dim: 8,
            text_width: 16,
            context_length: 8,
            ..Default::default()
        };
        let dev = Device::Cpu;
        let tokenizer = embedded_tokenizer(&cfg)?;
        let (vit_cfg, clip_cfg) = (cfg.vit(), cfg.clip(tokenizer.vocab_size()));
        let Towers { vit, image, text, vars } = Towers::random(&cfg, &vit_cfg, &clip_cfg, &dev)?;
        let b = 7;
        let captions: Vec<String> = (0..b).map(|i| format!("a red ball {i} rolls past")).collect();
        let ids = tokenizer.tokenize(&captions)?.input_ids;
        let tok = Tensor::from_vec(ids.concat(), (b, cfg.context_length), &dev)?;
        let mut rng = SeededRng::new(11);
        let px: Vec<f32> = (0..b * 3 * 16 * 16).map(|_| rng.normal() as f32).collect();
        let px = Tensor::from_vec(px, (b, 3, 16, 16), &dev)?;
        // Frame i's positives: its own caption and, for even i, the next frame's.
        let mask: Vec<f32> = (0..b * b)
            .map(|k| {
                let (i, j) = (k / b, k % b);
                f32::from(i == j || (i % 2 == 0 && j == i + 1))
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, b), &dev)?;

        let (img, txt) = embed(&vit, &image, &text, &px, &tok)?;
        let (loss, _) = contrastive_loss(&img, &txt, &text, &mask)?;
        let mut want = Grads::new();
        want.accumulate(&loss.backward()?, &vars, 1.0)?;
        let want_loss = loss.to_scalar::<f32>()? as f64;
        assert!(
            want.len() > vars.len() / 2,
            "{} of {} variables have a gradient",
            want.len(),
            vars.len()
        );

        // 9 > b: clamped to one row a shard.
        for shards in [1, 2, 3, 7, 9] {
            let (value, got, _) = sharded_step(&vit, &image, &text, &vars, &px, &tok, &mask, shards)?;
            assert!(
                (value - want_loss).abs() <= 1e-6 * want_loss.abs(),
                "{shards} shards: loss {value} vs {want_loss}"
            );
            assert_eq!(got.len(), want.len(), "{shards} shards: gradient count");
            for (name, _) in vars.iter() {
                let Some(w) = want.get(name) else {
                    assert!(got.get(name).is_none(), "{shards} shards: {name} has a gradient it should not");
                    continue;
                };
                let g = got.get(name).unwrap_or_else(|| panic!("{shards} shards: no gradient for {name}"));
                let diff = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = w.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(scale > 0.0, "{name}: a zero gradient proves nothing");
                assert!(
                    diff <= 1e-5 * scale,
                    "{shards} shards, {name}: max |diff| {diff} vs max |g| {scale}"
                );
            }
        }
        Ok(())
    }
}
