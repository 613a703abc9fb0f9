//! The frozen front end of `gcg ask`: the networks that turn a video's frames and a question's
//! texts into what the feature store would hold for them — the ViT and the CLIP branch's image
//! head (`gcg features`), the CLIP text tower and its tokenizer (`gcg labels`).
//!
//! It must be the front end the run was trained on: its fingerprints (the same strings `gcg
//! features` / `gcg labels` record in the store, [`crate::features::provenance`]) are compared
//! with the run's store when [`FrontEnd::check_against_store`] is called.

use crate::demo::clip::{load_encoders, ClipPretrainConfig};
use crate::features::{frozen, provenance};
use crate::models::clip_branch::ClipImageHead;
use crate::models::clip_text::ClipTextModel;
use crate::models::vit::VisionModel;
use crate::models::Preset;
use crate::store::Snapshot;
use crate::text::tokenizers::ClipTokenizer;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Where the frozen networks come from.
#[derive(Debug, Clone, PartialEq)]
pub enum FrontEndSpec {
    /// The encoders a `gcg demo` trained (`encoders.safetensors` and `demo.json` in the demo's
    /// folder).
    Demo { dir: PathBuf },
    /// Seeded random weights of a preset, as `gcg features --random-weights --seed S` (the image
    /// networks) and `gcg labels --random-weights --seed S'` (the text tower) make them (tests,
    /// benchmarks).
    Random {
        preset: Preset,
        seed: u64,
        text_seed: u64,
        clip_tokenizer: PathBuf,
    },
    /// Weight directories, as `gcg features --weights --clip` and `gcg labels --clip` read them.
    Files {
        preset: Preset,
        vit: PathBuf,
        clip: PathBuf,
        /// The CLIP BPE file or tokenizer.json (default: `bpe_simple_vocab_16e6.txt.gz` in `clip`).
        clip_tokenizer: Option<PathBuf>,
    },
}

/// The loaded frozen networks and what identifies them.
pub struct FrontEnd {
    pub vit: VisionModel,
    pub image: ClipImageHead,
    pub text: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    /// The ViT's input size (frames are resized and centre-cropped to it).
    pub image_size: usize,
    /// The image networks' fingerprint (the store's `extractor.models`).
    pub models: String,
    /// The text encoder's fingerprint (the store's `text_encoder`).
    pub text_encoder: String,
    pub device: Device,
}

impl FrontEnd {
    /// Load the networks of `spec` on `dev` in `dtype` (the demo's are f32 on the CPU).
    pub fn load(spec: &FrontEndSpec, dev: &Device, dtype: DType) -> Result<Self> {
        match spec {
            FrontEndSpec::Demo { dir } => {
                let demo_json = dir.join("demo.json");
                let text = std::fs::read_to_string(&demo_json).with_context(|| format!("reading {}", demo_json.display()))?;
                let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", demo_json.display()))?;
                let seed = v
                    .get("seed")
                    .and_then(|s| s.as_u64())
                    .ok_or_else(|| anyhow!("{}: no `seed`", demo_json.display()))?;
                let clip: ClipPretrainConfig = serde_json::from_value(
                    v.get("clip")
                        .cloned()
                        .ok_or_else(|| anyhow!("{}: no `clip` table", demo_json.display()))?,
                )
                .with_context(|| format!("{}: reading its `clip` table", demo_json.display()))?;
                let file = dir.join("encoders.safetensors");
                let enc = load_encoders(&file, &clip)?;
                // The strings the demo records in its store (demo::extract_demo_features and
                // label_demo_questions).
                Ok(Self {
                    image_size: enc.vit_config.image_size,
                    vit: enc.vit,
                    image: enc.image,
                    text: enc.text,
                    tokenizer: enc.tokenizer,
                    models: crate::demo::demo_image_models(seed, &file)?,
                    text_encoder: crate::demo::demo_text_encoder(seed, &file)?,
                    device: Device::Cpu,
                })
            }
            FrontEndSpec::Random {
                preset,
                seed,
                text_seed,
                clip_tokenizer,
            } => {
                let (vit_cfg, mut clip_cfg) = frozen::preset(*preset);
                let tokenizer = read_clip_tokenizer(clip_tokenizer)?;
                clip_cfg.text.vocab_size = tokenizer.vocab_size();
                Ok(Self {
                    image_size: vit_cfg.image_size,
                    vit: frozen::random_vit(&vit_cfg, dev, dtype, *seed)?,
                    image: frozen::random_clip_image(&clip_cfg, dev, dtype, *seed)?,
                    text: frozen::random_clip_text(&clip_cfg, dev, dtype, *text_seed)?,
                    tokenizer,
                    models: provenance::image_models(*preset, Some(*seed), None, None)?,
                    text_encoder: provenance::text_encoder(*preset, Some(*text_seed), None, clip_tokenizer)?,
                    device: dev.clone(),
                })
            }
            FrontEndSpec::Files {
                preset,
                vit,
                clip,
                clip_tokenizer,
            } => {
                let (vit_cfg, clip_cfg) = frozen::preset(*preset);
                let tok_path = clip_tokenizer.clone().unwrap_or_else(|| clip.join("bpe_simple_vocab_16e6.txt.gz"));
                let tokenizer = read_clip_tokenizer(&tok_path)?;
                let vit_model = frozen::load_vit(vit, &vit_cfg, dev, dtype)?;
                Ok(Self {
                    image_size: vit_model.config.image_size,
                    vit: vit_model,
                    image: frozen::load_clip_image(clip, &clip_cfg, dev, dtype)?,
                    text: frozen::load_clip_text(clip, &clip_cfg, dev, dtype)?,
                    tokenizer,
                    models: provenance::image_models(*preset, None, Some(vit), Some(clip))?,
                    text_encoder: provenance::text_encoder(*preset, None, Some(clip), &tok_path)?,
                    device: dev.clone(),
                })
            }
        }
    }

    /// An error unless the run's store was made by these networks: every video of `snap` that
    /// records its extractor names these image networks, and every question that records its
    /// text encoder names this one. Records of unknown provenance (older gcg) are not compared.
    pub fn check_against_store(&self, snap: &Snapshot) -> Result<()> {
        let index = snap.index();
        if let Some((id, v)) = index
            .videos
            .iter()
            .find(|(_, v)| v.extractor.as_ref().is_some_and(|e| e.models != self.models))
        {
            bail!(
                "the run's feature store {} was made by the image networks {:?} (video {id}), but this front end is {:?}: \
                 give the ViT and CLIP weights the store was made with (the answers would be meaningless otherwise)",
                snap.dir().display(),
                v.extractor.as_ref().map(|e| e.models.as_str()).unwrap_or(""),
                self.models
            );
        }
        if let Some((key, q)) = index
            .questions
            .iter()
            .find(|(_, q)| q.text_encoder.as_ref().is_some_and(|t| *t != self.text_encoder))
        {
            bail!(
                "the run's feature store {} embedded its questions with the text encoder {:?} (question {key}), but this \
                 front end is {:?}: give the CLIP weights and tokenizer the store was labelled with",
                snap.dir().display(),
                q.text_encoder.as_deref().unwrap_or(""),
                self.text_encoder
            );
        }
        Ok(())
    }
}

/// A CLIP tokenizer from a BPE merges file (`.txt.gz`) or a `tokenizer.json`.
fn read_clip_tokenizer(path: &Path) -> Result<ClipTokenizer> {
    if path.extension().is_some_and(|e| e == "json") {
        ClipTokenizer::from_file(path)
    } else {
        ClipTokenizer::from_bpe_file(path)
    }
    .with_context(|| format!("reading the CLIP tokenizer {}", path.display()))
}
