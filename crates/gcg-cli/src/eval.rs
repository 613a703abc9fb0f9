//! `gcg eval`: score a prediction file against a benchmark's annotations with its official
//! metrics; prints a table and optionally writes the metrics as JSON.

use anyhow::{bail, Context, Result};
use clap::Args;
use gcg::data::nextgqa::Grounding;
use gcg::data::{causalvidqa, read_annotations, Dataset, ReadOptions};
use gcg::eval::{evaluate, read_predictions, Evaluation};
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The benchmark: nextqa | nextgqa | intentqa | causalvidqa | star | trafficqa | vlep |
    /// open-ended (msvd-qa, msrvtt-qa, activitynet-qa).
    #[arg(long)]
    dataset: Dataset,
    /// The annotations: the split's CSV (NExT-QA, NExT-GQA, IntentQA), the QA directory
    /// (Causal-VidQA), `STAR_{train,val}.json` (STAR), `R2_all.jsonl` / `R3_{train,test}.jsonl`
    /// (TrafficQA), `vlep_{train,dev}_release.jsonl` (VLEP), the JSON file (open-ended;
    /// ActivityNet-QA: the `_q.json`).
    #[arg(long)]
    annotations: PathBuf,
    /// NExT-GQA: `gsub_{val,test}.json`, for the grounding metrics (also with --dataset nextqa:
    /// the NExT-QA-format questions are then scored as NExT-GQA).
    #[arg(long)]
    grounding: Option<PathBuf>,
    /// Causal-VidQA: the split's video list (`.pkl` as released, `.json` or `.txt`); default:
    /// every video folder of the QA directory.
    #[arg(long)]
    split: Option<PathBuf>,
    /// The prediction file: JSONL (one row per line, as `gcg predict` writes), a JSON array of
    /// rows, or the official scripts' result object (`{"<video>_<qid>": {"prediction": i}}`).
    #[arg(long)]
    predictions: PathBuf,
    /// Write the metrics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Skip malformed annotation rows (listed) instead of failing.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Fail (exit 1, no --json file) when the prediction file has problems (malformed rows,
    /// duplicates, unknown questions, invalid predictions, answers or types that disagree) or
    /// misses questions.
    #[arg(long)]
    strict: bool,
    /// How many prediction problems to list (all are counted).
    #[arg(long, default_value_t = 20)]
    show_problems: usize,
}

pub fn run(a: EvalArgs) -> Result<()> {
    if let Some(j) = &a.json {
        let inputs = [
            ("--annotations", Some(a.annotations.as_path())),
            ("--predictions", Some(a.predictions.as_path())),
            ("--grounding", a.grounding.as_deref()),
            ("--split", a.split.as_deref()),
        ];
        crate::args::check_not_an_input("--json", j, &inputs)?;
        gcg::eval::check_metrics_target(j)?;
    }
    if a.grounding.is_some() && !matches!(a.dataset, Dataset::NextGqa | Dataset::NextQa) {
        bail!("--grounding is for --dataset nextgqa (or a NExT-QA-format split with NExT-GQA spans)");
    }
    if a.split.is_some() && a.dataset != Dataset::CausalVidQa {
        bail!("--split is for --dataset causalvidqa");
    }
    let result = score(&a);
    // A run that fails in reading or scoring leaves no earlier run's metrics at its --json path
    // (a gcg metrics file, checked above and again now), where a script would take them for this
    // run's result.
    if let (Err(e), Some(j)) = (&result, &a.json) {
        if std::fs::metadata(j).is_ok_and(|m| m.len() > 0) && gcg::eval::check_metrics_target(j).is_ok() {
            return Err(match std::fs::remove_file(j) {
                Ok(()) => anyhow::anyhow!("{e:#}\nthe metrics in {} were an earlier run's: removed", j.display()),
                Err(r) => anyhow::anyhow!(
                    "{e:#}\nthe metrics in {} are an earlier run's (removing them failed: {r})",
                    j.display()
                ),
            });
        }
    }
    result
}

/// Reads, scores, prints, and writes the metrics JSON (with the paths of its inputs).
fn score(a: &EvalArgs) -> Result<()> {
    let dataset = a.dataset;
    let opts = ReadOptions {
        skip_bad_rows: a.skip_bad_rows,
    };
    let ann = match (&a.split, dataset) {
        (Some(split), Dataset::CausalVidQa) => {
            let videos = causalvidqa::read_split(split)?;
            causalvidqa::read_with(&a.annotations, Some(&videos), &opts)?
        }
        _ => read_annotations(dataset, &a.annotations, &opts)?,
    };
    for b in &ann.bad_rows {
        eprintln!("skipped annotation row: {b}");
    }
    let grounding = match &a.grounding {
        Some(p) => {
            let g = Grounding::read_with(p, &opts)?;
            for b in &g.bad_rows {
                eprintln!("skipped grounding entry: {b}");
            }
            Some(g)
        }
        None => None,
    };
    let preds = read_predictions(&a.predictions)?;
    // A NExT-QA-format split with a gsub file (e.g. `gcg synth`'s) is scored as NExT-GQA, as
    // `gcg train` / `gcg predict` do.
    let scored_as = if grounding.is_some() { Dataset::NextGqa } else { dataset };
    if grounding.is_none() && dataset == Dataset::NextGqa {
        eprintln!(
            "note: QA accuracy only; NExT-GQA's grounding metrics (mIoP, IoP@0.3/0.5, mIoU, IoU@0.3/0.5, Acc@GQA) need \
             its spans: --grounding gsub_{{val,test}}.json"
        );
    }
    let Evaluation { metrics, problems } = evaluate(scored_as, &ann.samples, &preds, grounding.as_ref()).with_context(|| {
        let gsub = a.grounding.as_ref().map(|g| format!(" and {}", g.display())).unwrap_or_default();
        format!("scoring {} against {}{gsub}", a.predictions.display(), a.annotations.display())
    })?;

    if !problems.is_empty() {
        eprintln!("{}: {} problem(s):", a.predictions.display(), problems.len());
        for p in problems.iter().take(a.show_problems) {
            eprintln!("  {p}");
        }
        if problems.len() > a.show_problems {
            eprintln!("  ... and {} more", problems.len() - a.show_problems);
        }
    }
    let spans = preds.rows.iter().filter(|(_, r)| r.span.is_some()).count();
    if grounding.is_none() && spans > 0 {
        eprintln!(
            "note: {spans} rows carry a span, which is not scored without the ground truth's: --grounding gsub_{{val,test}}.json \
             (NExT-GQA)"
        );
    }
    println!("{}", crate::report::metrics_table(&metrics, &a.predictions));

    let failed = a.strict && (!problems.is_empty() || metrics.missing > 0);
    if failed {
        // No metrics file for a run --strict refuses: nothing downstream takes it for a result.
        bail!(
            "{} prediction problem(s), {} question(s) without a prediction (--strict){}",
            problems.len(),
            metrics.missing,
            a.json
                .as_ref()
                .map(|j| format!("; {} not written", j.display()))
                .unwrap_or_default()
        );
    }
    if let Some(path) = &a.json {
        let mut j = metrics.to_json();
        if let Some(o) = j.as_object_mut() {
            let path_of = |p: &Path| serde_json::Value::from(p.display().to_string());
            o.insert(
                "inputs".into(),
                serde_json::json!({
                    "predictions": path_of(&a.predictions),
                    "annotations": path_of(&a.annotations),
                    "grounding": a.grounding.as_deref().map(path_of),
                    "split": a.split.as_deref().map(path_of),
                }),
            );
            o.insert("problems".into(), serde_json::to_value(&problems)?);
            o.insert("skipped_annotation_rows".into(), serde_json::to_value(&ann.bad_rows)?);
        }
        gcg::eval::write_metrics_json(path, &j).with_context(|| format!("writing metrics to {}", path.display()))?;
    }
    Ok(())
}
