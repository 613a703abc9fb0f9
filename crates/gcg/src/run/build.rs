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
use anyhow::{anyhow, bail, Context, Result};
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
    let model = GcgModel::load(&lb, &lmm, &gcg, tokenizers, false)?;
    if w.pretrained.is_some() {
        lb.finish()?;
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
        if samples.is_empty() {
            bail!("{} holds no questions", annotations.display());
        }
        let loader = BatchLoader::new(store.snapshot(), samples.clone(), opts)
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
pub(crate) fn batch_options(cfg: &RunConfig, built: &BuiltModel, shuffle: bool) -> BatchOptions {
    BatchOptions {
        batch_size: cfg.train.batch_size,
        shuffle,
        seed: cfg.train.seed,
        drop_last: false,
        workers: cfg.data.workers,
        prefetch: 2,
        features: Some(built.feature_dtype()),
        device: built.device.clone(),
        prompts: Some(built.model.prompt_encoder()),
    }
}

/// The store of a run and its CLIP width.
pub fn open_store(cfg: &RunConfig) -> Result<(Store, usize)> {
    let store = Store::open(&cfg.data.store).with_context(|| format!("[data] store = {}", cfg.data.store.display()))?;
    let meta = store
        .snapshot()
        .meta()
        .ok_or_else(|| anyhow!("the store {} holds no features yet (run gcg features)", cfg.data.store.display()))?;
    Ok((store, meta.embed_dim))
}
