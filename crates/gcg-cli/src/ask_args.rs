//! The model options of `gcg ask` and `gcg serve`: which run (or config), which checkpoint,
//! which frozen front end, and the ask cache; and how they become a loaded [`Asker`].

use anyhow::{bail, Context, Result};
use clap::Args;
use gcg::ask::{AskOptions, Asker, FrontEndSpec};
use gcg::models::Preset;
use gcg::run::{self, Checkpoint, DeviceKind, Precision, RunConfig};
use gcg::video::Sampling;
use gcg::weights::hub::{self, Need};
use std::path::{Path, PathBuf};

/// Where `gcg demo` writes by default, and its grounding run.
pub const DEMO_DIR: &str = "gcg-demo";
const DEMO_RUN: &str = "runs/grounding";

#[derive(Args, Debug, Clone)]
pub struct AskModelArgs {
    /// A run directory (its config and checkpoint). Default: the demo's grounding run
    /// (gcg-demo/runs/grounding) when there is one.
    #[arg(long, conflicts_with = "config")]
    pub run: Option<PathBuf>,
    /// Or a run config without a run (e.g. a pretrained InstructBLIP in uniform mode).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Which checkpoint of the run: best | last (best falls back to last in a run without
    /// validation).
    #[arg(long, default_value = "best")]
    pub checkpoint: Checkpoint,
    /// The ViT weights the run's store was made with (an HF InstructBLIP snapshot, a GCG release
    /// directory or a model id). Default: the demo's encoders for a demo run, else the run's
    /// `[weights] pretrained`.
    #[arg(long)]
    pub vit: Option<PathBuf>,
    /// The GCG CLIP branch files (eva_clip_*.pth; a directory or a model id). Default: --vit.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// The CLIP tokenizer (BPE .txt.gz or tokenizer.json). Default: the one in --clip (with
    /// --random-weights: the official BPE this binary carries).
    #[arg(long)]
    pub clip_tokenizer: Option<PathBuf>,
    /// Sizes of the front end: tiny | instructblip-flan-t5-xl (default: the run's preset).
    #[arg(long)]
    pub preset: Option<Preset>,
    /// Seeded random front-end weights (as `gcg features/labels --random-weights`).
    #[arg(long)]
    pub random_weights: bool,
    /// Seed of --random-weights (the ViT and CLIP image head, as `gcg features --seed`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the random CLIP text tower (as `gcg labels --seed`; default: --seed).
    #[arg(long)]
    pub text_seed: Option<u64>,
    /// Frame sampling: uniform | official (default: the run store's).
    #[arg(long)]
    pub sampling: Option<Sampling>,
    /// Use the decodable part of a damaged video instead of refusing it.
    #[arg(long)]
    pub lenient: bool,
    /// The ask cache: videos' features by content (default: $GCG_CACHE, else
    /// $XDG_CACHE_HOME/gcg/ask or ~/.cache/gcg/ask).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Where to run: cpu | cuda (default: the run's device).
    #[arg(long)]
    pub device: Option<DeviceKind>,
    /// Compute dtype: f32 | bf16 | f16 (default: the run's).
    #[arg(long)]
    pub dtype: Option<Precision>,
    /// Override a config field (repeatable), e.g. `--set dtype="bf16"` (a run's `[model]` and
    /// `[weights]` are what it was trained with and cannot change).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// The run directory asked for, or the demo's grounding run; an error saying what to run first
/// when there is neither.
pub fn run_dir_or_demo(run: Option<&Path>, config: Option<&Path>, announce: &mut dyn FnMut(String)) -> Result<Option<PathBuf>> {
    if let Some(r) = run {
        return Ok(Some(r.to_path_buf()));
    }
    if config.is_some() {
        return Ok(None);
    }
    let demo = Path::new(DEMO_DIR).join(DEMO_RUN);
    if demo.join("config.json").is_file() {
        announce(format!("no --run given: using the demo's grounding run {}", demo.display()));
        return Ok(Some(demo));
    }
    bail!(
        "no model: give --run RUN_DIR (a `gcg train` run) or --config run.toml; or first run the demo, \
         `cargo run --release -p gcg-cli -- demo` (about 3 minutes), whose grounding run ({}) is then the default",
        demo.display()
    )
}

/// The demo folder a run belongs to (`<demo>/runs/<mode>` with `<demo>/demo.json` and
/// `<demo>/encoders.safetensors`).
pub fn demo_of_run(run_dir: &Path) -> Option<PathBuf> {
    let demo = run_dir.parent()?.parent()?;
    (demo.join("demo.json").is_file() && demo.join("encoders.safetensors").is_file()).then(|| demo.to_path_buf())
}

impl AskModelArgs {
    /// The run config with its checkpoint's weights, the front end and the cache options; and a
    /// description of the model for messages (run + checkpoint).
    pub fn resolve(&self, announce: &mut dyn FnMut(String)) -> Result<(RunConfig, FrontEndSpec, AskOptions, String)> {
        let run_dir = run_dir_or_demo(self.run.as_deref(), self.config.as_deref(), announce)?;
        let (mut cfg, about) = match (&run_dir, &self.config) {
            (Some(dir), _) => {
                let mut c = RunConfig::from_run_dir(dir)?;
                let which = match self.checkpoint {
                    Checkpoint::Best => Checkpoint::best_or_last(dir),
                    Checkpoint::Last => Checkpoint::Last,
                };
                c.weights.init = Some(run::checkpoint_weights(dir, which)?);
                (c, format!("{} ({which} checkpoint)", dir.display()))
            }
            (None, Some(p)) => (RunConfig::load(Some(p), &[])?, format!("{} (config, no run)", p.display())),
            (None, None) => unreachable!("run_dir_or_demo gives a run unless there is a config"),
        };
        let stored = cfg.clone();
        cfg = cfg.with_overrides(&self.overrides)?;
        if let Some(dir) = &run_dir {
            crate::train::check_same_model(dir, &stored, &cfg, "--run")?;
        } else if cfg.weights.pretrained.is_none() && cfg.weights.init.is_none() {
            announce("the model has random weights ([weights] sets neither pretrained nor init): its answers mean nothing".to_string());
        }
        if let Some(d) = self.device {
            cfg.device = d;
        }
        if self.dtype.is_some() {
            cfg.dtype = self.dtype;
        }
        let preset = self.preset.unwrap_or(cfg.weights.preset);
        let spec = if self.random_weights {
            let tok = match &self.clip_tokenizer {
                Some(p) => p.clone(),
                None => gcg::demo::clip::embedded_clip_bpe()?,
            };
            FrontEndSpec::Random {
                preset,
                seed: self.seed,
                text_seed: self.text_seed.unwrap_or(self.seed),
                clip_tokenizer: tok,
            }
        } else if let Some(demo) = run_dir
            .as_deref()
            .and_then(demo_of_run)
            .filter(|_| self.vit.is_none() && self.clip.is_none())
        {
            FrontEndSpec::Demo { dir: demo }
        } else {
            let vit_spec = self.vit.clone().or_else(|| cfg.weights.pretrained.clone()).context(
                "which ViT and CLIP made the run's features? give --vit (and --clip), or --random-weights; \
                 the run has no [weights] pretrained to default to",
            )?;
            let clip_spec = self.clip.clone().unwrap_or_else(|| vit_spec.clone());
            FrontEndSpec::Files {
                preset,
                vit: hub::locate(&vit_spec, Need::Vit)?,
                clip: hub::locate(&clip_spec, Need::ClipBranch)?,
                clip_tokenizer: self.clip_tokenizer.clone(),
            }
        };
        let opts = AskOptions {
            sampling: self.sampling,
            lenient: self.lenient,
            cache_root: self.cache.clone().unwrap_or_else(AskOptions::default_cache_root),
            ..AskOptions::default()
        };
        Ok((cfg, spec, opts, about))
    }

    /// Resolve and load the model.
    pub fn open(&self, announce: &mut dyn FnMut(String)) -> Result<(Asker, String)> {
        let (cfg, spec, opts, about) = self.resolve(announce)?;
        let asker = Asker::open(&cfg, &spec, &opts).with_context(|| format!("loading the model of {about}"))?;
        Ok((asker, about))
    }
}
