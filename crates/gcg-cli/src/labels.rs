//! `gcg labels`: CLIP text embeddings of each question's texts and its pseudo-labels, into the
//! feature store (which must already hold the videos' features, `gcg features`).

use crate::args::{progress_bar, AnnotationFormat, DeviceArgs, RandomWeightsArgs};
use crate::store_args::{finish_report, writer_options};
use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Args;
use gcg::data::{read_annotations, QaSample, ReadOptions};
use gcg::features::labels::{label_questions, ClipTextEncoder, EventSource, LabelOptions, LabelProgress};
use gcg::features::{frozen, provenance};
use gcg::models::Preset;
use gcg::text::tokenizers::ClipTokenizer;
use gcg::weights::hub::{self, Need};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct LabelsArgs {
    /// The feature store directory.
    #[arg(long)]
    store: PathBuf,
    /// The annotation file (e.g. NExT-QA's val.csv).
    #[arg(long)]
    annotations: PathBuf,
    /// Its format: nextqa | nextgqa | intentqa | causalvidqa | star | trafficqa | vlep |
    /// open-ended (msvd-qa, msrvtt-qa, activitynet-qa) for the published files, or json (a JSON array, or JSON lines, of gcg
    /// QaSample objects).
    #[arg(long)]
    dataset: AnnotationFormat,
    /// Skip malformed annotation rows (listed) instead of failing.
    #[arg(long)]
    skip_bad_rows: bool,
    /// The event text: `answer` (the official choice for NExT-QA), `question-answer`, or
    /// `statements FILE` (a JSON object: question key → declarative sentence).
    #[arg(long, num_args = 1..=2, value_names = ["MODE", "FILE"], default_values_t = ["answer".to_string()])]
    event: Vec<String>,
    /// K, the pseudo-labelled frames per question.
    #[arg(long, default_value_t = 4)]
    top_k: usize,
    /// The GCG CLIP branch files (eva_clip_*.pth): a directory, or a Hugging Face model id
    /// (`WHB139426/GCG`) resolved through the HF cache (missing files downloaded unless
    /// HF_HUB_OFFLINE=1).
    #[arg(long, required_unless_present = "random_weights")]
    clip: Option<PathBuf>,
    /// The CLIP BPE: a tokenizer.json or the merges file (bpe_simple_vocab_16e6.txt.gz);
    /// default: bpe_simple_vocab_16e6.txt.gz in the --clip directory, or with --random-weights the
    /// official one this binary carries. With --random-weights the text vocabulary is sized to it.
    #[arg(long)]
    clip_tokenizer: Option<PathBuf>,
    /// Network sizes: tiny | instructblip-flan-t5-xl (EVA-CLIP-g).
    #[arg(long, default_value = "instructblip-flan-t5-xl")]
    preset: Preset,
    #[command(flatten)]
    random: RandomWeightsArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Texts per CLIP forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Relabel questions already labelled the same way.
    #[arg(long)]
    overwrite: bool,
    /// Shard size in MiB (a shard is written when this much is buffered).
    #[arg(long, default_value_t = 64.0)]
    shard_mb: f64,
}

fn event_source(spec: &[String]) -> Result<EventSource> {
    match spec {
        [m] if m == "answer" => Ok(EventSource::Answer),
        [m] if m == "question-answer" => Ok(EventSource::QuestionAnswer),
        [m, file] if m == "statements" => EventSource::statements_file(Path::new(file)),
        [m] if m == "statements" => bail!("--event statements needs the statements file: --event statements FILE"),
        other => bail!("--event {}: expected answer, question-answer or statements FILE", other.join(" ")),
    }
}

/// Reads the annotations as samples: a benchmark's files through `gcg::data`, or `json` (an
/// array or JSON lines of `QaSample` objects).
fn read_samples(path: &Path, format: AnnotationFormat, skip_bad_rows: bool) -> Result<Vec<QaSample>> {
    let ds = match format {
        AnnotationFormat::Benchmark(ds) => ds,
        AnnotationFormat::Json => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading the annotations {}", path.display()))?;
            let t = text.trim_start();
            return if t.starts_with('[') {
                serde_json::from_str(t).with_context(|| format!("{}: expected a JSON array of QaSample objects", path.display()))
            } else {
                t.lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                    .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}: not a QaSample", path.display(), i + 1)))
                    .collect()
            };
        }
    };
    let opts = if skip_bad_rows {
        ReadOptions::skip_bad_rows()
    } else {
        ReadOptions::strict()
    };
    let ann = read_annotations(ds, path, &opts)?;
    for bad in &ann.bad_rows {
        eprintln!("skipped: {bad}");
    }
    ensure!(!ann.samples.is_empty(), "no questions in {}", path.display());
    Ok(ann.samples)
}

/// The CLIP tokenizer's file: --clip-tokenizer, else the BPE merges in the (resolved) CLIP directory.
fn tokenizer_path(a: &LabelsArgs, clip_dir: Option<&Path>) -> Result<PathBuf> {
    Ok(match (&a.clip_tokenizer, clip_dir) {
        (Some(p), _) => p.clone(),
        (None, Some(dir)) => dir.join("bpe_simple_vocab_16e6.txt.gz"),
        (None, None) => gcg::demo::clip::embedded_clip_bpe()?,
    })
}

fn tokenizer(a: &LabelsArgs, clip_dir: Option<&Path>) -> Result<ClipTokenizer> {
    let path = tokenizer_path(a, clip_dir)?;
    if path.extension().is_some_and(|e| e == "json") {
        ClipTokenizer::from_file(&path)
    } else {
        ClipTokenizer::from_bpe_file(&path)
    }
}

pub fn run(a: LabelsArgs) -> Result<()> {
    let (dev, dtype) = a.device.open()?;
    let event = event_source(&a.event)?;
    let samples = read_samples(&a.annotations, a.dataset, a.skip_bad_rows)?;
    let clip_dir = a.clip.as_deref().map(|c| hub::locate(c, Need::ClipBranch)).transpose()?;
    let tok = tokenizer(&a, clip_dir.as_deref())?;
    let (_, mut clip_cfg) = frozen::preset(a.preset);
    let model = if a.random.random_weights {
        clip_cfg.text.vocab_size = tok.vocab_size();
        frozen::random_clip_text(&clip_cfg, &dev, dtype, a.random.seed)?
    } else {
        let dir = clip_dir
            .as_ref()
            .ok_or_else(|| anyhow!("--clip is needed without --random-weights"))?;
        frozen::load_clip_text(dir, &clip_cfg, &dev, dtype)?
    };
    let encoder = ClipTextEncoder {
        model: &model,
        tokenizer: &tok,
        device: dev.clone(),
        batch_size: a.batch,
    };
    let opts = LabelOptions {
        event,
        top_k: a.top_k,
        skip_existing: !a.overwrite,
        text_encoder: Some(provenance::text_encoder(
            a.preset,
            a.random.random_weights.then_some(a.random.seed),
            clip_dir.as_deref(),
            &tokenizer_path(&a, clip_dir.as_deref())?,
        )?),
        writer: writer_options(a.shard_mb, 120.0)?,
        ..Default::default()
    };
    let pb = progress_bar(0, false);
    pb.set_prefix("labels");
    let report = label_questions(&a.store, &samples, &encoder, &opts, &mut |ev| match ev {
        LabelProgress::Start { total, skipped } => {
            pb.set_length((total - skipped) as u64);
            if skipped > 0 {
                pb.println(format!("{skipped} of {total} questions are already labelled this way"));
            }
        }
        LabelProgress::Done { .. } => pb.inc(1),
        LabelProgress::Failed { key, error } => {
            pb.inc(1);
            pb.println(format!("failed: {key}: {error}"));
        }
    })?;
    pb.finish_and_clear();
    // Questions of videos the store does not have: one line per video.
    let grouped: std::collections::HashSet<&str> = report.missing_videos.values().flatten().map(String::as_str).collect();
    if !report.missing_videos.is_empty() {
        let n = report.missing_videos.len();
        eprintln!(
            "{n} videos are not in the store {} ({} questions; `gcg features` stores them, or cut the annotations to the videos you have):",
            a.store.display(),
            grouped.len()
        );
        for (video, keys) in report.missing_videos.iter().take(10) {
            eprintln!("  {video} ({} questions)", keys.len());
        }
        if n > 10 {
            eprintln!("  ... and {} more videos", n - 10);
        }
    }
    let listed: Vec<(String, String)> = report
        .failed
        .iter()
        .filter(|(k, _)| !grouped.contains(k.as_str()))
        .cloned()
        .collect();
    finish_report(report.labelled, report.skipped, &listed, grouped.len(), "questions")
}
