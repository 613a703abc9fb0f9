//! What several commands print: the metrics table of a scored prediction file (`gcg eval`,
//! `gcg train`'s test split, `gcg predict`).

use gcg::eval::{Evaluation, Metrics};
use std::path::Path;

/// Where the predictions are (stderr), the problems found in them, and the metrics table.
pub fn show_scores(ev: &Evaluation, predictions: &Path) {
    eprintln!("predictions: {}", predictions.display());
    if !ev.problems.is_empty() {
        eprintln!("{} problem(s) in the predictions (first: {})", ev.problems.len(), ev.problems[0]);
    }
    println!("{}", metrics_table(&ev.metrics, predictions));
}

/// A readable table: one row per metric with its count.
pub fn metrics_table(m: &Metrics, predictions: &Path) -> String {
    let mut out = format!(
        "{} — {} ({} questions, {} without a prediction, counted wrong)\n",
        m.dataset.name(),
        predictions.display(),
        m.questions,
        m.missing
    );
    if m.excluded > 0 {
        out.push_str(&format!(
            "{} annotated questions are not scored ({})\n",
            m.excluded,
            if m.dataset == gcg::data::Dataset::CausalVidQa {
                "their videos lack some of the six questions"
            } else {
                "no spans in the grounding file, as NExT-GQA's script"
            }
        ));
    }
    out.push_str(&format!("{:<10} {:>8} {:>14}\n", "metric", "%", "correct/total"));
    for s in &m.scores {
        out.push_str(&format!(
            "{:<10} {:>8.2} {:>14}\n",
            s.name,
            s.value,
            format!("{}/{}", s.correct, s.total)
        ));
    }
    if !m.by_type.is_empty() {
        out.push_str("by type:\n");
        for s in &m.by_type {
            out.push_str(&format!(
                "  {:<8} {:>8.2} {:>14}\n",
                s.name,
                s.value,
                format!("{}/{}", s.correct, s.total)
            ));
        }
    }
    if let Some(g) = &m.grounding {
        let elsewhere = if g.not_in_annotations > 0 {
            format!(
                "; {} of the grounding file's questions are not in the annotations",
                g.not_in_annotations
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "grounding ({} questions with a predicted span, {} without, skipped{elsewhere}):\n",
            g.evaluated, g.missing
        ));
        if g.missing > 0 {
            // As the official eval_ground.py: the grounding metrics average over the predicted
            // spans only, where the accuracy above counts a missing prediction as wrong.
            out.push_str(&format!(
                "  (these cover the {} questions with a predicted span only, as eval_ground.py's; Acc@GQA is not comparable with the accuracy above)\n",
                g.evaluated
            ));
        }
        for (n, v) in g.named() {
            out.push_str(&format!("{n:<10} {v:>8.2}\n"));
        }
    }
    out.trim_end().to_string()
}
