//! Building a run's parts: the model (pretrained checkpoint or random weights), the store and
//! the splits it serves.

use super::config::{DataConfig, Precision, RunConfig};
use crate::data::{Batch, BatchLoader, BatchOptions};
use crate::data::{Dataset, QaSample, ReadOptions, SplitFiles};
use crate::model::{GcgModel, TextTokenizers};
use crate::models::checkpoint::open_checkpoint;
use crate::models::lmm::{is_vit_trunk, LmmConfig};
use crate::store::Store;
use crate::text::{QFormerTokenizer, T5Tokenizer};
use crate::train::trainer::BatchSource;
use crate::weights::checkpoints::is_buffer;
use crate::weights::hub::{self, Need};
use crate::weights::{Loader, SafetensorsSource, VarStore};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device};
use std::path::Path;

/// The model of a run, its trainable variables, and the device it lives on.
pub struct BuiltModel {
    pub model: GcgModel,
    pub vars: VarStore,
    pub device: Device,
}

impl BuiltModel {
    /// The dtype the model reads the frame features in (its frozen networks').
    pub fn feature_dtype(&self) -> DType {
        self.model.lmm.post_layernorm.weight.dtype()
    }
}

/// Is `name` trained in this run?
pub fn trainable(cfg: &RunConfig) -> impl Fn(&str) -> bool + 'static {
    let t5 = cfg.train.train_t5;
    move |n: &str| crate::model::is_trainable(n) || (t5 && n.starts_with("language_model."))
}

/// Build the model of a run for a CLIP space of `embed_dim` (the store's).
pub fn build_model(cfg: &RunConfig, embed_dim: usize) -> Result<BuiltModel> {
    let w = &cfg.weights;
    let dev = cfg.device.open()?;
    let dt = Precision::resolve(cfg.dtype, &dev);
    let (lb, lmm) = match &w.pretrained {
        Some(p) => {
            let (src, lmm) = open_checkpoint(p, w.t5.as_deref(), w.preset, false)?;
            (Loader::from_source(src, &dev, dt).with_seed(w.seed), lmm)
        }
        None => (Loader::random(&dev, dt, w.seed), LmmConfig::preset(w.preset)),
    };
    let lb = lb.with_trainable(trainable(cfg)).with_ignored(|n| is_buffer(n) || is_vit_trunk(n));
    let mut gcg = cfg.model.clone();
    gcg.grounding.dim = embed_dim;
    let tok_spec = w.tokenizers.clone().or_else(|| w.pretrained.clone()).ok_or_else(|| {
        anyhow!("[weights] needs `tokenizers` (a directory with tokenizer.json and qformer_tokenizer/) when it has no `pretrained`")
    })?;
    let tok_dir = hub::locate(&tok_spec, Need::Tokenizers)?;
    let tokenizers = TextTokenizers {
        qformer: QFormerTokenizer::from_snapshot(&tok_dir)?,
        t5: T5Tokenizer::from_snapshot(&tok_dir)?,
    };
    // Every token id must have an embedding row: a preset's tables grow to the tokenizers'
    // vocabularies; a checkpoint's must already hold them.
    let mut lmm = lmm;
    for (what, table, vocab) in [
        ("Q-Former", &mut lmm.qformer.vocab_size, tokenizers.qformer.vocab_size()),
        ("T5", &mut lmm.t5.vocab_size, tokenizers.t5.vocab_size()),
    ] {
        if vocab > *table {
            if w.pretrained.is_some() {
                bail!(
                    "the {what} tokenizer in {} has {vocab} tokens but the checkpoint's embedding table only {} rows \
                     ([weights] tokenizers belong to another model?)",
                    tok_dir.display(),
                    *table
                );
            }
            *table = vocab;
        }
    }
    let mut model = GcgModel::load(&lb, &lmm, &gcg, tokenizers, false)?;
    if w.pretrained.is_some() {
        lb.finish()?;
    }
    if cfg.data.online_vit {
        let vit = online_vit(cfg, &lmm, &dev, dt)?;
        model.lmm.vision = Some(vit);
        model.vit_frame_batch = cfg.data.vit_frame_batch;
    }
    let vars = lb.vars();
    if w.fan_in_init && w.pretrained.is_none() {
        // LoRA adapters keep PEFT's initialisation (B = 0: the adapted T5 starts as the T5).
        crate::nn::init::fan_in_reinit(&vars, w.seed.wrapping_add(17), |n| {
            n.contains("embed") || n.contains("shared") || crate::nn::lora::is_lora_name(n)
        })?;
    }
    if let Some(init) = &w.init {
        load_trained(&vars, init, w.init_partial).with_context(|| {
            format!(
                "loading the trained weights {} into a model sized for the feature store {} (CLIP width {embed_dim}, T = {}): \
                 a store made with other networks or another T does not fit weights trained on another",
                init.display(),
                cfg.data.store.display(),
                cfg.model.grounding.frames
            )
        })?;
    }
    Ok(BuiltModel { model, vars, device: dev })
}

/// The frozen ViT of `[data] online_vit`: the one `gcg features` ran — `[weights] vit` (default
/// `pretrained`) read as it reads `--weights`, or a seeded random one (`vit_random_seed`, as
/// `--random-weights --seed`) — checked to be as wide as the language model's input.
fn online_vit(cfg: &RunConfig, lmm: &LmmConfig, dev: &Device, dt: DType) -> Result<crate::models::vit::VisionModel> {
    let w = &cfg.weights;
    let (vit_cfg, _) = crate::features::frozen::preset(w.preset);
    let vit = match (w.vit_random_seed, w.vit.as_ref().or(w.pretrained.as_ref())) {
        (Some(seed), _) => crate::features::frozen::random_vit(&vit_cfg, dev, dt, seed)?,
        (None, Some(spec)) => {
            let dir = hub::locate(spec, Need::Vit)?;
            crate::features::frozen::load_vit(&dir, &vit_cfg, dev, dt)?
        }
        (None, None) => bail!("data.online_vit needs [weights] vit (or pretrained), or vit_random_seed"),
    };
    ensure!(
        vit.config.hidden_size == lmm.vision.hidden_size,
        "the online ViT is {} wide but the language model reads features {} wide",
        vit.config.hidden_size,
        lmm.vision.hidden_size
    );
    Ok(vit)
}

/// Where a stored video's frames are now: its recorded source, or that file name under
/// `[data] video_dir`.
fn video_path(data: &DataConfig, id: &str, v: &crate::store::VideoEntry) -> Result<std::path::PathBuf> {
    let source = v
        .source
        .as_deref()
        .ok_or_else(|| anyhow!("video {id}: the store recorded no source path to decode its frames from"))?;
    let recorded = std::path::PathBuf::from(source);
    if let Some(dir) = &data.video_dir {
        let name = recorded
            .file_name()
            .ok_or_else(|| anyhow!("video {id}: its recorded source {source:?} has no file name"))?;
        let p = dir.join(name);
        ensure!(
            p.exists(),
            "video {id}: {} does not exist (data.video_dir = {}; the store recorded {source})",
            p.display(),
            dir.display()
        );
        return same_source(id, v, p);
    }
    ensure!(
        recorded.exists(),
        "video {id}: its frames' source {source} does not exist (moved? set data.video_dir to where the videos are now)"
    );
    same_source(id, v, recorded)
}

/// `path` when it is the file the video's features were made from (where the store recorded
/// its fingerprint): the online ViT's features must not come from another video than the
/// stored CLIP embeddings and pseudo-labels.
fn same_source(id: &str, v: &crate::store::VideoEntry, path: std::path::PathBuf) -> Result<std::path::PathBuf> {
    if let Some(stored) = &v.source_fingerprint {
        let now = crate::features::provenance::source_fingerprint(&path)
            .with_context(|| format!("video {id}: fingerprinting {}", path.display()))?;
        ensure!(
            now == *stored,
            "video {id}: {} is not the file its stored features were made from (its size or content differ: {now}, \
             the store recorded {stored}); run gcg features on it again, or point data.video_dir at the original",
            path.display()
        );
    }
    Ok(path)
}

/// The online ViT's frames: each video decoded again from its source, sampled as the store
/// recorded (its extractor's sampling), at the ViT's input size.
fn pixel_source(cfg: &RunConfig, image_size: usize) -> Result<crate::data::PixelSource> {
    let data = cfg.data.clone();
    let vit = vit_fingerprint(cfg)?;
    let ffmpeg = crate::video::Ffmpeg::from_env();
    Ok(std::sync::Arc::new(move |id: &str, v: &crate::store::VideoEntry| {
        if let Some(e) = &v.extractor {
            ensure!(
                e.models.starts_with(&vit),
                "video {id} was stored with the image networks {:?}, but the online ViT is {vit:?} \
                 ([weights] vit / vit_random_seed must be the ViT gcg features ran)",
                e.models
            );
        }
        let path = video_path(&data, id, v)?;
        let sampling = match &v.extractor {
            Some(e) => e
                .sampling
                .parse::<crate::video::Sampling>()
                .map_err(|e| anyhow!("video {id}: its recorded sampling: {e}"))?,
            None => crate::video::Sampling::Uniform,
        };
        let job = crate::features::extract::VideoJob {
            id: id.to_string(),
            path: path.clone(),
        };
        let frames = if path.extension().is_some_and(|e| e == "safetensors") {
            crate::features::extract::safetensors_frames(&job, v.num_frames)?
        } else {
            crate::features::extract::decoded_frames(&job, v.num_frames, sampling, &ffmpeg, image_size)?
        };
        if !v.timestamps.is_empty() && !frames.timestamps.is_empty() {
            let off = v.timestamps.iter().zip(&frames.timestamps).any(|(a, b)| (a - b).abs() > 1e-3);
            ensure!(
                !off,
                "video {id}: the frames decoded from {} are not the ones the store was made from (times {:?} vs {:?})",
                path.display(),
                &frames.timestamps[..frames.timestamps.len().min(4)],
                &v.timestamps[..v.timestamps.len().min(4)]
            );
        }
        Ok(frames.pixel_values)
    }))
}

/// How `gcg features` names the online ViT in a store's `extractor.models` (its leading part).
fn vit_fingerprint(cfg: &RunConfig) -> Result<String> {
    use crate::features::provenance;
    let w = &cfg.weights;
    match (w.vit_random_seed, w.vit.as_ref().or(w.pretrained.as_ref())) {
        (Some(seed), _) => provenance::image_models(w.preset, Some(seed), None, None),
        (None, Some(spec)) => {
            let dir = hub::locate(spec, Need::Vit)?;
            Ok(format!("vit {}", provenance::files_fingerprint(&provenance::vit_files(&dir)?)?))
        }
        (None, None) => bail!("data.online_vit needs [weights] vit (or pretrained), or vit_random_seed"),
    }
}

/// Load trained weights into the trainable variables (`partial`: a warm start that may lack
/// some of them).
fn load_trained(vars: &VarStore, init: &Path, partial: bool) -> Result<()> {
    let src = SafetensorsSource::open(init)?;
    if partial {
        let missing = vars
            .load_matching(&src)
            .with_context(|| format!("loading trained weights from {}", init.display()))?;
        if !missing.is_empty() {
            tracing::info!(
                "{} trainable tensors not in {} keep their initialisation",
                missing.len(),
                init.display()
            );
        }
    } else {
        vars.load_from(&src)
            .with_context(|| format!("loading trained weights from {}", init.display()))?;
    }
    Ok(())
}

/// A split read from its annotations and served from the store.
pub struct Split {
    pub samples: Vec<QaSample>,
    pub(crate) loader: BatchLoader,
}

impl Split {
    pub fn open(
        store: &Store,
        dataset: Dataset,
        files: &SplitFiles,
        opts: BatchOptions,
        data: &DataConfig,
        limit: Option<usize>,
    ) -> Result<Self> {
        Self::open_only(store, dataset, files, opts, data, limit, &|_| true)
    }

    /// [`Split::open`] with the questions `keep` keeps of the first `limit` (as `gcg eval` scores
    /// those of the first `max_eval` that `gcg predict` answers).
    #[allow(clippy::too_many_arguments)]
    pub fn open_only(
        store: &Store,
        dataset: Dataset,
        files: &SplitFiles,
        opts: BatchOptions,
        data: &DataConfig,
        limit: Option<usize>,
        keep: &dyn Fn(&QaSample) -> bool,
    ) -> Result<Self> {
        let annotations = &files.annotations;
        let ann = files.read(
            dataset,
            &ReadOptions {
                skip_bad_rows: data.skip_bad_rows,
            },
        )?;
        if !ann.bad_rows.is_empty() {
            tracing::warn!("{}: skipped {} malformed rows", annotations.display(), ann.bad_rows.len());
        }
        let mut samples = ann.samples;
        if let Some(n) = limit {
            samples.truncate(n);
        }
        samples.retain(|s| keep(s));
        if samples.is_empty() {
            bail!("{} holds no questions", annotations.display());
        }
        // Labels made from other texts (the annotations edited since `gcg labels`) would be used
        // silently: their pseudo-labels and text embeddings describe another question.
        let snap = store.snapshot();
        for s in &samples {
            let Some(q) = snap.index().questions.get(&s.key) else { continue };
            if let Some(why) = crate::features::labels::stale_texts(q, s) {
                bail!(
                    "{}: question {}: the store {} labelled it from other texts ({why}); run `gcg labels` on {} again",
                    annotations.display(),
                    s.key,
                    store.dir().display(),
                    annotations.display()
                );
            }
        }
        let loader = BatchLoader::new(snap, samples.clone(), opts)
            .with_context(|| format!("serving {} from the store {}", annotations.display(), store.dir().display()))?;
        Ok(Self { samples, loader })
    }
}

impl BatchSource for Split {
    fn num_batches(&self) -> usize {
        self.loader.num_batches()
    }
    fn batches(&self, epoch: u64, skip: usize) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        Ok(Box::new(self.loader.epoch(epoch).skip(skip)))
    }
}

/// How a run's batches are made for `model` (its prompts tokenized by the workers).
pub(crate) fn batch_options(cfg: &RunConfig, built: &BuiltModel, shuffle: bool) -> Result<BatchOptions> {
    Ok(BatchOptions {
        batch_size: cfg.train.batch_size,
        shuffle,
        seed: cfg.train.seed,
        drop_last: false,
        workers: cfg.data.workers,
        prefetch: 2,
        features: Some(built.feature_dtype()),
        pixels: match &built.model.lmm.vision {
            Some(v) if cfg.data.online_vit => Some(pixel_source(cfg, v.config.image_size)?),
            _ => None,
        },
        device: built.device.clone(),
        prompts: Some(built.model.prompt_encoder()),
    })
}

/// The store of a run and its CLIP width.
pub fn open_store(cfg: &RunConfig) -> Result<(Store, usize)> {
    let store = Store::open(&cfg.data.store).with_context(|| format!("[data] store = {}", cfg.data.store.display()))?;
    let meta = store
        .snapshot()
        .meta()
        .ok_or_else(|| anyhow!("the store {} holds no features yet (run gcg features)", cfg.data.store.display()))?;
    // A store of records made differently (other networks, T or text encoder) would feed the
    // model data of two kinds: refused here, where `gcg store verify` would call it mixed.
    let c = crate::store::consistency(store.snapshot().index());
    if !c.mixed.is_empty() {
        bail!(
            "the feature store {} mixes records made differently:\n  {}\nrecompute one kind (`gcg features --overwrite`, \
             `gcg labels --overwrite`) or use another --store; `gcg store verify` lists them",
            cfg.data.store.display(),
            c.mixed.join("\n  ")
        );
    }
    // The model takes T frames a video: a store of another T fails here, before a run
    // directory is made, not at the first training step.
    let t = cfg.model.frames();
    let other = store
        .snapshot()
        .index()
        .videos
        .iter()
        .find(|(_, v)| v.num_frames != t)
        .map(|(id, v)| (id.clone(), v.num_frames));
    if let Some((id, n)) = other {
        bail!(
            "the feature store {} holds videos of T = {n} frames (e.g. {id}), the model takes T = {t} \
             ([model.grounding] frames): set frames = {n}, or extract the videos again with `gcg features --num-frames {t}` into another store",
            cfg.data.store.display()
        );
    }
    Ok((store, meta.embed_dim))
}
