//! `gcg demo`: the whole GCG pipeline on a synthetic grounded VideoQA world, on a CPU, with no
//! downloads.
//!
//! 1. **World** — [`crate::synth`] writes videos (frame folders, mp4 when ffmpeg is there),
//!    NExT-QA-style CSVs and NExT-GQA-style `gsub` files with the true event spans.
//! 2. **Frozen encoders** — a tiny ViT, CLIP image head and CLIP text tower are pre-trained
//!    contrastively on the training videos' frame/caption pairs ([`clip`]) and frozen.
//! 3. **Features and pseudo-labels** — through the store's real paths
//!    ([`crate::features::extract::extract_features`] over the frame folders, [`crate::features::labels::label_questions`]
//!    with the question+answer sentence as the event text).
//! 4. **Training** — a tiny GCG (random Q-Former and T5: no pretrained tiny language model exists
//!    offline, so the T5 is trained too) in `uniform`, `grounding` and `oracle` modes with the same
//!    budget, through [`crate::run::train_run`]. The spatial pass is off so the modes differ
//!    only in which K frames the language model sees. The grounding mode's generator first trains
//!    alone on its weak losses for `train.grounding_warmup_epochs` (cheap: no language model
//!    runs); without that it stays on an L_reg plateau within the language model's budget.
//! 5. **Prediction and evaluation** — the test split with the best-on-validation checkpoint,
//!    scored with the NExT-QA accuracy and the NExT-GQA grounding metrics.
//! 6. **Report** — `report.md`, `report.json` and SVG pictures ([`report`]).

pub mod clip;
pub mod report;

use crate::data::{self, Dataset, QaSample, ReadOptions};
use crate::features::extract::{decoded_frames, extract_features, ExtractOptions, ExtractProgress, FeatureModels, VideoJob};
use crate::features::labels::{label_questions, ClipTextEncoder, EventSource, LabelOptions, LabelProgress};
use crate::model::{AnswerFormat, Mode};
use crate::models::Preset;
use crate::run::{self, DataConfig, RunConfig, WeightsConfig};
use crate::synth::{write_world, Mp4Mode, SynthConfig, World, WriteOptions};
use crate::train::trainer::{Event, TrainConfig};
use crate::train::LrSchedule;
use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use clip::ClipPretrainConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The run directory name of the shared language-model pre-training.
const PRETRAIN: &str = "lmm-pretrain";

/// Everything that defines a demo run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoConfig {
    pub seed: u64,
    pub quick: bool,
    pub world: SynthConfig,
    pub clip: ClipPretrainConfig,
    pub modes: Vec<Mode>,
    /// The run every mode (and the shared pre-training) starts from: the tiny model, the GCG
    /// settings that differ from the paper's for this tiny world (see the report) and the same
    /// training budget for every mode. Each run sets its mode, paths and run directory.
    pub run: RunConfig,
    /// Epochs and learning rate of the shared language-model pre-training (0 = none; see the
    /// module docs). The modes then fine-tune the language model at `run.train.lr`, 10× below
    /// the grounding module's rate, as the official recipe keeps it well below (1e-5 vs 7e-5).
    pub pretrain_epochs: u64,
    pub pretrain_lr: f64,
    /// Write mp4 files too (when ffmpeg is there).
    pub mp4: bool,
}

impl DemoConfig {
    /// The run template of the demo: a tiny GCG (random Q-Former and T5, trained too) with the
    /// spatial pass off, so the modes differ only in which K frames the language model sees.
    fn run_template(seed: u64) -> RunConfig {
        let mut run = RunConfig {
            weights: WeightsConfig {
                preset: Preset::Tiny,
                // N(0, 1/fan_in) instead of the checkpoints' std 0.02 (see WeightsConfig::fan_in_init).
                fan_in_init: true,
                seed,
                ..WeightsConfig::default()
            },
            data: DataConfig {
                dataset: Dataset::NextQa,
                workers: 1,
                ..DataConfig::default()
            },
            train: TrainConfig {
                seed,
                epochs: 2,
                grounding_warmup_epochs: 16,
                batch_size: 8,
                grad_accum: 1,
                lr: 3e-4,
                grounding_lr: 3e-3,
                weight_decay: 0.02,
                schedule: LrSchedule::WarmupCosine,
                warmup_fraction: 0.05,
                min_lr_factor: 0.1,
                max_grad_norm: Some(1.0),
                checkpoint_every: 100_000,
                train_t5: true,
                ..TrainConfig::default()
            },
            ..RunConfig::default()
        };
        let m = &mut run.model;
        m.alpha_con = 0.1;
        m.answer_format = AnswerFormat::Text;
        m.lmm.spatial = false;
        m.lmm.dropout = Some(0.0);
        m.grounding.heads = 2;
        m.grounding.frames = 32;
        m.grounding.moments = 4;
        m.grounding.dropout = 0.0;
        m.grounding.topk.num_samples = 100;
        run
    }

    /// The default demo (≤ 10 minutes on 2 cores).
    pub fn standard(seed: u64) -> Self {
        Self {
            seed,
            quick: false,
            world: SynthConfig {
                seed,
                videos: 300,
                questions_per_video: 8,
                ..SynthConfig::default()
            },
            clip: ClipPretrainConfig {
                seed,
                ..ClipPretrainConfig::default()
            },
            modes: vec![Mode::Uniform, Mode::Grounding, Mode::Oracle],
            run: Self::run_template(seed),
            pretrain_epochs: 3,
            pretrain_lr: 3e-3,
            mp4: false,
        }
    }

    /// A small, fast version for tests (≤ 2 minutes): fewer videos, steps and epochs.
    pub fn quick(seed: u64) -> Self {
        let mut c = Self::standard(seed);
        c.quick = true;
        c.world.videos = 24;
        c.world.questions_per_video = 2;
        c.world.val_fraction = 0.25;
        c.world.test_fraction = 0.25;
        c.clip.steps = 30;
        c.clip.batch_size = 32;
        c.run.train.epochs = 1;
        c.run.train.grounding_warmup_epochs = 2;
        c.pretrain_epochs = 1;
        c.mp4 = false;
        c
    }

    /// T frames sampled per video.
    pub fn frames(&self) -> usize {
        self.run.model.frames()
    }

    /// K moments given to the language model.
    pub fn moments(&self) -> usize {
        self.run.model.moments()
    }
}

/// What the demo tells its caller.
#[derive(Debug)]
pub enum DemoEvent<'a> {
    /// A stage begins; `total` units of work (0 when unknown).
    Stage { name: &'a str, total: u64 },
    /// Progress within the stage.
    Progress { done: u64, message: String },
    /// A line for the log.
    Note(String),
}

/// Metrics of one mode on the test split (percent) and its training curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModeResult {
    pub mode: String,
    pub accuracy: f64,
    #[serde(rename = "Acc@GQA")]
    pub acc_gqa: f64,
    #[serde(rename = "mIoP")]
    pub miop: f64,
    #[serde(rename = "IoP@0.3")]
    pub iop3: f64,
    #[serde(rename = "IoP@0.5")]
    pub iop5: f64,
    #[serde(rename = "mIoU")]
    pub miou: f64,
    #[serde(rename = "IoU@0.3")]
    pub iou3: f64,
    #[serde(rename = "IoU@0.5")]
    pub iou5: f64,
    /// Share of test questions whose K moments include a frame of the true event (percent).
    pub event_hit: f64,
    /// (step, loss, L_vqa, L_reg, L_con) of every optimiser step of the joint epochs.
    pub curve: Vec<(u64, f64, f64, Option<f64>, Option<f64>)>,
    /// (step, L_reg, L_con) of every step of the grounding warm-up (grounding mode).
    #[serde(default)]
    pub warmup_curve: Vec<(u64, f64, f64)>,
    /// Validation accuracy after each epoch.
    pub val_accuracy: Vec<f64>,
    pub train_seconds: f64,
    pub run_dir: PathBuf,
}

/// The shared language-model pre-training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pretrain {
    pub curve: Vec<(u64, f64, f64, Option<f64>, Option<f64>)>,
    pub val_accuracy: Vec<f64>,
    pub seconds: f64,
}

/// The whole result of a demo.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoResult {
    pub config: DemoConfig,
    pub questions: [usize; 3],
    /// CLIP pre-training: (step, loss) and held-out caption retrieval top-1 (percent).
    pub clip_losses: Vec<(usize, f64)>,
    pub clip_heldout_top1: f64,
    /// Pseudo-labels of the test split: share of questions whose top-K pseudo-label frames
    /// include a frame of the true event (percent), and the same for uniform K frames.
    pub pseudo_label_hit: f64,
    pub uniform_hit: f64,
    pub pretrain: Option<Pretrain>,
    pub modes: Vec<ModeResult>,
    pub seconds: f64,
    /// Seconds per stage.
    pub stages: Vec<(String, f64)>,
}

fn read_split(world: &Path, split: &str) -> Result<Vec<QaSample>> {
    Ok(data::read_annotations(Dataset::NextQa, &world.join(format!("{split}.csv")), &ReadOptions::default())?.samples)
}

/// Where a demo writes.
struct Paths {
    out: PathBuf,
    world: PathBuf,
    store: PathBuf,
    tokenizers: PathBuf,
}

impl Paths {
    fn new(out: &Path) -> Self {
        Self {
            out: out.to_path_buf(),
            world: out.join("world"),
            store: out.join("store"),
            tokenizers: out.join("tokenizers"),
        }
    }

    /// The run directory of a mode or of the pre-training.
    fn run(&self, name: &str) -> PathBuf {
        self.out.join("runs").join(name)
    }
}

/// Seconds per stage, in order.
#[derive(Default)]
struct Stages(Vec<(String, f64)>);

impl Stages {
    fn time<T>(&mut self, name: &str, stage: impl FnOnce() -> Result<T>) -> Result<T> {
        let t0 = Instant::now();
        let out = stage()?;
        self.0.push((name.to_string(), t0.elapsed().as_secs_f64()));
        Ok(out)
    }
}

/// Run the demo into `out` (replaced when it holds a previous demo).
///
/// The new demo is built in a staging folder beside `out` (`.{name}.tmp-{pid}`) and replaces the
/// previous one only once it is complete ([`crate::util::write_dir_atomic`]): a demo killed
/// midway leaves the previous one as it was, and the next run clears the killed run's staging
/// folder. The paths the runs record (configs, prediction sidecars, the store's frame sources)
/// are rewritten from the staging folder to `out` before the swap.
pub fn run_demo(cfg: &DemoConfig, out: &Path, on: &mut dyn FnMut(DemoEvent<'_>)) -> Result<DemoResult> {
    check_out(out)?;
    for p in crate::util::clear_stale_dir_temps(out)? {
        on(DemoEvent::Note(format!("cleared {}, left by a killed demo", p.display())));
    }
    let mut result = crate::util::write_dir_atomic(out, |stage| {
        let result = build_demo(cfg, stage, on)?;
        relocate(stage, out)?;
        Ok(result)
    })?;
    let paths = Paths::new(out);
    for m in &mut result.modes {
        m.run_dir = paths.run(&m.mode);
    }
    Ok(result)
}

/// The demo, built in the folder `out` (the staging folder).
fn build_demo(cfg: &DemoConfig, out: &Path, on: &mut dyn FnMut(DemoEvent<'_>)) -> Result<DemoResult> {
    let t0 = Instant::now();
    let paths = Paths::new(out);
    crate::util::write_atomic(&out.join("demo.json"), serde_json::to_string_pretty(cfg)?.as_bytes())?;
    let mut stages = Stages::default();
    let world = stages.time("world", || write_demo_world(cfg, &paths, on))?;
    let splits: Vec<Vec<QaSample>> = ["train", "val", "test"]
        .iter()
        .map(|s| read_split(&paths.world, s))
        .collect::<Result<_>>()?;
    for (s, name) in splits.iter().zip(["train", "val", "test"]) {
        ensure!(!s.is_empty(), "the demo world has no {name} questions; use more videos");
    }
    write_tokenizers(&splits, &paths.tokenizers)?;
    let enc = stages.time("clip", || train_encoders(cfg, &paths, on))?;
    let (pseudo_label_hit, uniform_hit) = stages.time("features+labels", || {
        extract_demo_features(cfg, &paths, &world, &enc, on)?;
        label_demo_questions(cfg, &paths, &splits, &enc, on)?;
        let (hit, uniform) = pseudo_label_quality(&paths.store, &world, &splits[2], cfg)?;
        on(DemoEvent::Note(format!(
            "pseudo-labels (test): top-{} frames hit the true event in {hit:.1}% of questions (uniform: {uniform:.1}%)",
            cfg.moments()
        )));
        Ok((hit, uniform))
    })?;
    let pretrain = match cfg.pretrain_epochs {
        0 => None,
        _ => Some(stages.time("lmm pre-training", || pretrain_language_model(cfg, &paths, on))?),
    };
    let init = pretrain
        .as_ref()
        .map(|_| run::checkpoint_weights(&paths.run(PRETRAIN), run::Checkpoint::Best))
        .transpose()?;
    // Training, prediction and evaluation per mode, from the same start. The modes are
    // independent (own seeds, own run folders): with two cores or more, the longest one
    // (grounding) runs here with its progress shown while the others run one after the other
    // on a second thread, their notes reported when they finish. Each mode's result is the same
    // either way.
    let concurrent = cfg.modes.len() > 1 && std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    let main_mode = if concurrent {
        cfg.modes
            .iter()
            .copied()
            .find(|&m| m == Mode::Grounding)
            .or(cfg.modes.first().copied())
    } else {
        None
    };
    let mut by_mode: Vec<(Mode, ModeResult, f64)> = Vec::new();
    if let Some(main_mode) = main_mode {
        let others: Vec<Mode> = cfg.modes.iter().copied().filter(|&m| m != main_mode).collect();
        let (main_result, side) = std::thread::scope(|scope| {
            let side = scope.spawn(|| -> Result<(Vec<(Mode, ModeResult, f64)>, Vec<String>)> {
                let mut notes = Vec::new();
                let mut done = Vec::new();
                for &mode in &others {
                    let t = Instant::now();
                    let r = run_mode(cfg, mode, init.clone(), &paths, &world, &mut |e| {
                        if let DemoEvent::Note(n) = e {
                            notes.push(n);
                        }
                    })?;
                    done.push((mode, r, t.elapsed().as_secs_f64()));
                }
                Ok((done, notes))
            });
            let t = Instant::now();
            let main_result = run_mode(cfg, main_mode, init.clone(), &paths, &world, on).map(|r| (r, t.elapsed().as_secs_f64()));
            let side = side
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a demo training thread panicked")));
            (main_result, side)
        });
        let (r, secs) = main_result?;
        let (done, notes) = side?;
        for n in notes {
            on(DemoEvent::Note(n));
        }
        by_mode.push((main_mode, r, secs));
        by_mode.extend(done);
    } else {
        for &mode in &cfg.modes {
            let t = Instant::now();
            let r = run_mode(cfg, mode, init.clone(), &paths, &world, on)?;
            by_mode.push((mode, r, t.elapsed().as_secs_f64()));
        }
    }
    let mut modes = Vec::new();
    for &mode in &cfg.modes {
        let i = by_mode.iter().position(|(m, _, _)| *m == mode).expect("every mode ran");
        let (_, r, secs) = by_mode.swap_remove(i);
        let overlap = if concurrent { " (concurrent)" } else { "" };
        stages.0.push((format!("train+test {}{overlap}", mode.name()), secs));
        on(DemoEvent::Note(format!(
            "{}: accuracy {:.1}%, IoP@0.5 {:.1}%, mIoU {:.1}%, event hit {:.1}%",
            r.mode, r.accuracy, r.iop5, r.miou, r.event_hit
        )));
        modes.push(r);
    }
    let result = DemoResult {
        config: cfg.clone(),
        questions: [splits[0].len(), splits[1].len(), splits[2].len()],
        clip_losses: enc.losses.clone(),
        clip_heldout_top1: enc.heldout_top1,
        pseudo_label_hit,
        uniform_hit,
        pretrain,
        modes,
        seconds: t0.elapsed().as_secs_f64(),
        stages: stages.0,
    };
    on(DemoEvent::Stage { name: "report", total: 0 });
    report::write_report(&result, &world, out)?;
    Ok(result)
}

/// Refuse an `out` that is not a demo's (a file, or a non-empty folder without `demo.json`).
fn check_out(out: &Path) -> Result<()> {
    if out.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
        bail!(
            "{} exists and is not a demo output (a file or a symbolic link; give the folder itself, or an empty or new one)",
            out.display()
        );
    }
    crate::util::check_replaceable_dir(out, "demo.json", "a demo output")
}

/// Maps paths under one folder to the same paths under another, both as absolute paths and as
/// given (absolute configs, relative frame sources).
struct PathMap {
    pairs: [(PathBuf, PathBuf); 2],
}

impl PathMap {
    fn new(from: &Path, to: &Path) -> Result<Self> {
        let abs = |p: &Path| std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
        Ok(Self {
            pairs: [(abs(from)?, abs(to)?), (from.to_path_buf(), to.to_path_buf())],
        })
    }
    /// `p` moved, or `None` when it is not under the folder.
    fn apply(&self, p: &Path) -> Option<PathBuf> {
        self.pairs.iter().find_map(|(from, to)| {
            let rest = p.strip_prefix(from).ok()?;
            Some(if rest.as_os_str().is_empty() { to.clone() } else { to.join(rest) })
        })
    }
    /// Every string of a JSON value that is a path under the folder, moved.
    fn apply_json(&self, v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => {
                if let Some(p) = self.apply(Path::new(s.as_str())) {
                    *s = p.display().to_string();
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| self.apply_json(x)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|x| self.apply_json(x)),
            _ => {}
        }
    }
}

/// The demo built in `stage` becomes `out`: rewrite the paths under `stage` that it recorded —
/// the run configs (also the checkpoints' copies), the prediction sidecars (their config hash
/// follows the config's paths) and the store's frame sources.
fn relocate(stage: &Path, out: &Path) -> Result<()> {
    let map = PathMap::new(stage, out)?;
    let index_path = stage.join("store").join(crate::store::INDEX_FILE);
    let bytes = std::fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
    let mut index = crate::store::Index::from_bytes(&bytes, &index_path)?;
    for v in index.videos.values_mut() {
        if let Some(p) = v.source.as_deref().and_then(|s| map.apply(Path::new(s))) {
            v.source = Some(p.display().to_string());
        }
    }
    crate::util::write_atomic(&index_path, &serde_json::to_vec(&index)?)?;

    let runs = stage.join("runs");
    for run in std::fs::read_dir(&runs).with_context(|| format!("listing {}", runs.display()))? {
        let run = run?.path();
        // The sidecars' config hash is redone only where it is the run config's.
        let hash_before = run::config_hash(&RunConfig::from_run_dir(&run)?)?;
        let mut configs = vec![run.join("config.json")];
        if let Ok(cps) = std::fs::read_dir(run.join("checkpoints")) {
            for cp in cps {
                configs.push(cp?.path().join("config.json"));
            }
        }
        for c in configs.iter().filter(|c| c.is_file()) {
            let text = std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?;
            let mut v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", c.display()))?;
            map.apply_json(&mut v);
            crate::util::write_atomic(c, serde_json::to_string_pretty(&v)?.as_bytes())?;
        }
        let hash_after = run::config_hash(&RunConfig::from_run_dir(&run)?)?;
        for f in std::fs::read_dir(&run).with_context(|| format!("listing {}", run.display()))? {
            let f = f?.path();
            let Some(predictions) = f.to_str().and_then(|s| s.strip_suffix(".meta.json")).map(PathBuf::from) else {
                continue;
            };
            let Some(mut prov) = crate::eval::predictions::Provenance::read(&predictions)? else {
                continue;
            };
            for s in [&mut prov.run_dir, &mut prov.weights].into_iter().flatten() {
                if let Some(p) = map.apply(Path::new(s.as_str())) {
                    *s = p.display().to_string();
                }
            }
            for s in [&mut prov.annotations, &mut prov.store] {
                if let Some(p) = map.apply(Path::new(s.as_str())) {
                    *s = p.display().to_string();
                }
            }
            if prov.config_hash == hash_before {
                prov.config_hash = hash_after.clone();
            }
            prov.write(&predictions)?;
        }
    }
    Ok(())
}

/// 1. The world: videos, annotations and grounding files.
fn write_demo_world(cfg: &DemoConfig, paths: &Paths, on: &mut dyn FnMut(DemoEvent<'_>)) -> Result<World> {
    let world = World::generate(&cfg.world)?;
    on(DemoEvent::Stage {
        name: "world",
        total: cfg.world.videos as u64,
    });
    let summary = write_world(
        &world,
        &paths.world,
        &WriteOptions {
            mp4: if cfg.mp4 { Mp4Mode::Auto } else { Mp4Mode::Never },
            overwrite: true,
            threads: 0,
            ..WriteOptions::default()
        },
        &|_| {},
    )?;
    on(DemoEvent::Note(format!(
        "world: {} videos, {} questions, mp4 {}",
        cfg.world.videos,
        summary.questions.values().sum::<usize>(),
        if summary.mp4 { "written" } else { "skipped" }
    )));
    Ok(world)
}

/// 2. Tokenizers of the tiny language model: a closed vocabulary over every prompt and answer.
fn write_tokenizers(splits: &[Vec<QaSample>], dir: &Path) -> Result<()> {
    let texts: Vec<String> = splits
        .iter()
        .flatten()
        .flat_map(|s| [data::prompt(s), data::target(s)])
        .chain(["A B C D E".to_string()])
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    crate::text::vocab::closed_vocab_tokenizers(&refs, dir)?;
    Ok(())
}

/// 3. The frozen encoders, pre-trained contrastively on the training videos.
fn train_encoders(cfg: &DemoConfig, paths: &Paths, on: &mut dyn FnMut(DemoEvent<'_>)) -> Result<clip::Encoders> {
    on(DemoEvent::Stage {
        name: "clip pre-training",
        total: cfg.clip.steps as u64,
    });
    let enc = clip::pretrain(&paths.world, &cfg.clip, &mut |step, loss| {
        on(DemoEvent::Progress {
            done: step as u64,
            message: format!("loss {loss:.3}"),
        })
    })?;
    enc.save(&paths.out.join("encoders.safetensors"))?;
    on(DemoEvent::Note(format!(
        "clip: loss {:.3} -> {:.3}, held-out caption retrieval top-1 {:.1}%",
        enc.losses.first().map_or(f64::NAN, |x| x.1),
        enc.losses.last().map_or(f64::NAN, |x| x.1),
        enc.heldout_top1
    )));
    Ok(enc)
}

/// 4a. Features of every video from its frame folder, into the store.
fn extract_demo_features(
    cfg: &DemoConfig,
    paths: &Paths,
    world: &World,
    enc: &clip::Encoders,
    on: &mut dyn FnMut(DemoEvent<'_>),
) -> Result<()> {
    let jobs: Vec<VideoJob> = world
        .videos
        .iter()
        .map(|v| VideoJob {
            id: v.id.clone(),
            path: paths.world.join("frames").join(&v.id),
        })
        .collect();
    let ffmpeg = crate::video::Ffmpeg::from_env();
    let image_size = enc.vit_config.image_size;
    let source = move |job: &VideoJob, t: usize| decoded_frames(job, t, crate::video::Sampling::Uniform, &ffmpeg, image_size);
    on(DemoEvent::Stage {
        name: "features",
        total: jobs.len() as u64,
    });
    let mut done = 0u64;
    let rep = extract_features(
        &paths.store,
        &jobs,
        &source,
        &FeatureModels {
            vit: &enc.vit,
            clip: &enc.image,
            frame_batch: 64,
        },
        &ExtractOptions {
            num_frames: cfg.frames(),
            jobs: 2,
            overwrite: true,
            extractor: Some(crate::features::provenance::extractor(
                crate::video::Sampling::Uniform.to_string(),
                demo_image_models(cfg.seed, &paths.out.join("encoders.safetensors"))?,
            )),
            ..ExtractOptions::default()
        },
        &mut |p| {
            if let ExtractProgress::Done { video, .. } = p {
                done += 1;
                on(DemoEvent::Progress {
                    done,
                    message: video.to_string(),
                });
            }
        },
    )?;
    if let Some((v, e)) = rep.failed.first() {
        bail!("features: {} of {} videos failed (first: {v}: {e})", rep.failed.len(), jobs.len());
    }
    Ok(())
}

/// How a demo's store names its image networks: the demo's seed and its encoders file's
/// fingerprint (two demos of one seed but other sizes train other encoders).
pub fn demo_image_models(seed: u64, encoders: &Path) -> Result<String> {
    let fp = crate::features::provenance::files_fingerprint(&[encoders.to_path_buf()])?;
    Ok(format!("demo-trained vit + clip image, demo seed {seed}, encoders {fp}"))
}

/// How a demo's store names its CLIP text tower (see [`demo_image_models`]).
pub fn demo_text_encoder(seed: u64, encoders: &Path) -> Result<String> {
    let fp = crate::features::provenance::files_fingerprint(&[encoders.to_path_buf()])?;
    Ok(format!("demo-trained clip text, demo seed {seed}, encoders {fp}"))
}

/// 4b. CLIP text embeddings and pseudo-labels of every question (event text: question + answer).
fn label_demo_questions(
    cfg: &DemoConfig,
    paths: &Paths,
    splits: &[Vec<QaSample>],
    enc: &clip::Encoders,
    on: &mut dyn FnMut(DemoEvent<'_>),
) -> Result<()> {
    let all: Vec<QaSample> = splits.iter().flatten().cloned().collect();
    on(DemoEvent::Stage {
        name: "pseudo-labels",
        total: all.len() as u64,
    });
    let encoder = ClipTextEncoder {
        model: &enc.text,
        tokenizer: &enc.tokenizer,
        device: Device::Cpu,
        batch_size: 256,
    };
    let mut done = 0u64;
    let rep = label_questions(
        &paths.store,
        &all,
        &encoder,
        &LabelOptions {
            event: EventSource::QuestionAnswer,
            top_k: cfg.moments(),
            skip_existing: false,
            text_encoder: Some(demo_text_encoder(cfg.seed, &paths.out.join("encoders.safetensors"))?),
            ..LabelOptions::default()
        },
        &mut |p| {
            if let LabelProgress::Done { .. } = p {
                done += 1;
                if done % 64 == 0 {
                    on(DemoEvent::Progress {
                        done,
                        message: String::new(),
                    });
                }
            }
        },
    )?;
    if let Some((k, e)) = rep.failed.first() {
        bail!("pseudo-labels: {} questions failed (first: {k}: {e})", rep.failed.len());
    }
    Ok(())
}

/// 5. The shared language-model pre-training: the tiny Q-Former and T5 learn to answer from the
/// frames the CLIP pseudo-labels point at (the oracle selection) on the training split — the
/// stand-in for InstructBLIP's pre-training, which no tiny model has.
fn pretrain_language_model(cfg: &DemoConfig, paths: &Paths, on: &mut dyn FnMut(DemoEvent<'_>)) -> Result<Pretrain> {
    let rc = run_config(cfg, PRETRAIN, Mode::Oracle, cfg.pretrain_epochs, None, paths);
    let (curve, _, val, secs) = train(&rc, "lmm pre-training", on)?;
    on(DemoEvent::Note(format!(
        "language model pre-training: validation accuracy {} (oracle frames)",
        val.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" → ")
    )));
    Ok(Pretrain {
        curve,
        val_accuracy: val,
        seconds: secs,
    })
}

/// The true event frames (indices into the T sampled frames) of a test question.
fn event_frames(world: &World, s: &QaSample, timestamps: &[f64]) -> Vec<usize> {
    let Some(v) = world.videos.iter().find(|v| v.id == s.video) else {
        return vec![];
    };
    let Some(q) = v.questions.iter().find(|q| q.qid.to_string() == s.qid) else {
        return vec![];
    };
    let [a, b] = q.span;
    timestamps
        .iter()
        .enumerate()
        .filter(|(_, &t)| t >= a - 1e-9 && t <= b + 1e-9)
        .map(|(i, _)| i)
        .collect()
}

/// How often the store's pseudo-labels and uniform sampling hit the true event (test split).
fn pseudo_label_quality(store_dir: &Path, world: &World, test: &[QaSample], cfg: &DemoConfig) -> Result<(f64, f64)> {
    let store = crate::store::Store::open(store_dir)?;
    let snap = store.snapshot();
    let uni = crate::model::uniform_indices(cfg.frames(), cfg.moments(), crate::model::UniformRule::OfficialTruncate);
    let (mut hit, mut uhit, mut n) = (0usize, 0usize, 0usize);
    for s in test {
        let Some(q) = snap.index().questions.get(&s.key) else { continue };
        let Some(v) = snap.index().videos.get(&s.video) else { continue };
        let ev = event_frames(world, s, &v.timestamps);
        n += 1;
        hit += usize::from(q.pseudo_labels.iter().any(|i| ev.contains(&(*i as usize))));
        uhit += usize::from(uni.iter().any(|i| ev.contains(i)));
    }
    ensure!(n > 0, "no test question is labelled in the store");
    Ok((100.0 * hit as f64 / n as f64, 100.0 * uhit as f64 / n as f64))
}

/// The run config of a mode (or of the pre-training, `name` "lmm-pretrain"): the template with
/// the mode, the paths of this demo and the run's epochs, learning rate and starting weights.
fn run_config(cfg: &DemoConfig, name: &str, mode: Mode, epochs: u64, init: Option<PathBuf>, paths: &Paths) -> RunConfig {
    let mut rc = cfg.run.clone();
    rc.run_dir = Some(paths.run(name));
    let (world_dir, store_dir, tok_dir) = (&paths.world, &paths.store, &paths.tokenizers);
    rc.model.mode = mode;
    rc.weights.tokenizers = Some(tok_dir.to_path_buf());
    rc.weights.init_partial = init.is_some();
    rc.weights.init = init;
    rc.data.store = store_dir.to_path_buf();
    rc.data.train = Some(world_dir.join("train.csv"));
    rc.data.val = Some(world_dir.join("val.csv"));
    rc.data.test = Some(world_dir.join("test.csv"));
    rc.data.val_grounding = Some(world_dir.join("gsub_val.json"));
    rc.data.test_grounding = Some(world_dir.join("gsub_test.json"));
    rc.train.epochs = epochs;
    if name == PRETRAIN {
        rc.train.lr = cfg.pretrain_lr;
        // Each step's batch as two micro-batches of half its size, computed side by side when
        // there are two cores (the run is the same either way): the tiny model's operations
        // are too small to split across cores, its batches are not.
        rc.train.batch_size = cfg.run.train.batch_size.div_ceil(2);
        rc.train.grad_accum = 2 * cfg.run.train.grad_accum;
        rc.train.data_parallel = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2);
    }
    rc
}

/// Train a run; (joint curve, warm-up curve, validation accuracies, seconds).
#[allow(clippy::type_complexity)]
fn train(
    rc: &RunConfig,
    name: &str,
    on: &mut dyn FnMut(DemoEvent<'_>),
) -> Result<(Vec<(u64, f64, f64, Option<f64>, Option<f64>)>, Vec<(u64, f64, f64)>, Vec<f64>, f64)> {
    let t0 = Instant::now();
    let mut curve = Vec::new();
    let mut warmup = Vec::new();
    let mut val_accuracy = Vec::new();
    on(DemoEvent::Stage { name, total: 0 });
    run::train_run(rc, run::RunStart::New, &mut |e| match e {
        Event::Step(m) if m.warmup => {
            warmup.push((m.step, m.reg.unwrap_or(f64::NAN), m.con.unwrap_or(f64::NAN)));
            on(DemoEvent::Progress {
                done: m.step,
                message: format!("warm-up ep {} L_reg {:.2}", m.epoch, m.reg.unwrap_or(f64::NAN)),
            });
        }
        Event::Step(m) => {
            curve.push((m.step, m.loss, m.vqa, m.reg, m.con));
            on(DemoEvent::Progress {
                done: m.step,
                message: format!("ep {} loss {:.3}", m.epoch, m.loss),
            });
        }
        Event::Validation { accuracy, .. } => val_accuracy.push(accuracy),
        _ => {}
    })?;
    Ok((curve, warmup, val_accuracy, t0.elapsed().as_secs_f64()))
}

/// 6. One mode: train, predict the test split with the best checkpoint, score it.
fn run_mode(
    cfg: &DemoConfig,
    mode: Mode,
    init: Option<PathBuf>,
    paths: &Paths,
    world: &World,
    on: &mut dyn FnMut(DemoEvent<'_>),
) -> Result<ModeResult> {
    let rc = run_config(cfg, mode.name(), mode, cfg.run.train.epochs, init, paths);
    let run_dir = paths.run(mode.name());
    let (curve, warmup_curve, val_accuracy, train_seconds) = train(&rc, mode.name(), on)?;

    // Test with the best-on-validation checkpoint.
    let ev = run::predict_run(&rc, run::EvalSplit::Test, run::Checkpoint::Best, &mut |_, _| {})?;
    let m = &ev.metrics;
    let get = |k: &str| m.get(k).unwrap_or(f64::NAN);
    // Event hits of the selected moments.
    let preds = crate::eval::read_predictions(&run_dir.join("predictions-test.jsonl"))?;
    let preds: std::collections::HashMap<(String, String), crate::eval::predictions::PredictionRow> =
        preds.rows.into_iter().map(|(_, r)| (r.key(), r)).collect();
    let store = crate::store::Store::open(&paths.store)?;
    let snap = store.snapshot();
    let test = read_split(&paths.world, "test")?;
    let (mut hit, mut n) = (0usize, 0usize);
    for s in &test {
        let (Some(row), Some(v)) = (preds.get(&(s.video.clone(), s.qid.clone())), snap.index().videos.get(&s.video)) else {
            continue;
        };
        let ev = event_frames(world, s, &v.timestamps);
        if let Some(mo) = &row.moments {
            n += 1;
            hit += usize::from(mo.frames.iter().any(|i| ev.contains(i)));
        }
    }
    Ok(ModeResult {
        mode: mode.name().to_string(),
        accuracy: get("overall"),
        acc_gqa: get("Acc@GQA"),
        miop: get("mIoP"),
        iop3: get("IoP@0.3"),
        iop5: get("IoP@0.5"),
        miou: get("mIoU"),
        iou3: get("IoU@0.3"),
        iou5: get("IoU@0.5"),
        event_hit: if n == 0 { f64::NAN } else { 100.0 * hit as f64 / n as f64 },
        curve,
        warmup_curve,
        val_accuracy,
        train_seconds,
        run_dir,
    })
}
