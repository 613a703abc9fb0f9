//! NExT-GQA grounding metrics, as the official `eval_ground.py` (TempGQA) computes them with
//! spans given in seconds:
//!
//! * a point span (`start == end`): IoU 0, IoP 1 if the point is inside the segment (bounds
//!   included), else 0;
//! * otherwise inter = min(ends) − max(starts) (NOT clamped, it may be negative),
//!   IoU = inter / (max end − min start) (0 if that is not positive),
//!   IoP = inter / (end − start) of the prediction (0 if the prediction is reversed);
//! * per question the maximum over its ground-truth segments, starting from 0 (so negative values
//!   floor at 0);
//! * questions in `gsub` without a predicted span are skipped (counted in `missing`), predictions
//!   for questions not in `gsub` are ignored;
//! * mIoU / mIoP are means in percent; IoU@x / IoP@x the share of questions with max ≥ x;
//!   Acc@GQA the share with IoP ≥ 0.5 AND the answer right.
//!
//! Sums run in the file order of `gsub` and use the same operations in the same order as the
//! official script, so the numbers agree to the last bit.

use crate::data::nextgqa::Grounding;
use serde::Serialize;

/// IoU and IoP of a predicted span against one ground-truth segment (the official `get_tIoU`).
pub fn iou_iop(segment: [f64; 2], span: [f64; 2]) -> (f64, f64) {
    let [l0, l1] = segment;
    let [s0, s1] = span;
    if s0 == s1 {
        return if l0 <= s0 && s0 <= l1 { (0.0, 1.0) } else { (0.0, 0.0) };
    }
    let (u0, u1) = (l0.min(s0), l1.max(s1));
    let (i0, i1) = (l0.max(s0), l1.min(s1));
    let inter = i1 - i0;
    let iou = if u1 > u0 { inter / (u1 - u0) } else { 0.0 };
    let iop = if s1 > s0 { inter / (s1 - s0) } else { 0.0 };
    (iou, iop)
}

/// Max IoU and max IoP over the segments of a question, floored at 0.
pub fn best_iou_iop(segments: &[[f64; 2]], span: [f64; 2]) -> (f64, f64) {
    let (mut best_iou, mut best_iop) = (0.0f64, 0.0f64);
    for &seg in segments {
        let (iou, iop) = iou_iop(seg, span);
        if iou > best_iou {
            best_iou = iou;
        }
        if iop > best_iop {
            best_iop = iop;
        }
    }
    (best_iou, best_iop)
}

/// The grounding numbers of a NExT-GQA split, in percent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroundingMetrics {
    #[serde(rename = "mIoP")]
    pub m_iop: f64,
    #[serde(rename = "IoP@0.3")]
    pub iop_03: f64,
    #[serde(rename = "IoP@0.5")]
    pub iop_05: f64,
    #[serde(rename = "mIoU")]
    pub m_iou: f64,
    #[serde(rename = "IoU@0.3")]
    pub iou_03: f64,
    #[serde(rename = "IoU@0.5")]
    pub iou_05: f64,
    #[serde(rename = "Acc@GQA")]
    pub acc_gqa: f64,
    /// Questions with a ground-truth entry and a predicted span.
    pub evaluated: usize,
    /// Questions with a ground-truth entry but no predicted span (skipped).
    pub missing: usize,
    /// Of the ground-truth entries, those of questions the evaluated annotations do not hold (a
    /// cut annotation file): set by the caller that knows them, and left out of `missing`.
    pub not_in_annotations: usize,
}

impl GroundingMetrics {
    /// `(name, value)` in the order of the official print-out's header, Acc@GQA last.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("mIoP", self.m_iop),
            ("IoP@0.3", self.iop_03),
            ("IoP@0.5", self.iop_05),
            ("mIoU", self.m_iou),
            ("IoU@0.3", self.iou_03),
            ("IoU@0.5", self.iou_05),
            ("Acc@GQA", self.acc_gqa),
        ]
    }
}

/// Evaluate predicted spans. `pred(video, qid)` gives the span and whether the answer was right
/// for a question, or `None` when it has no predicted span.
pub fn grounding_metrics(gt: &Grounding, pred: impl Fn(&str, &str) -> Option<([f64; 2], bool)>) -> GroundingMetrics {
    let (mut m_iou, mut m_iop) = (0.0f64, 0.0f64);
    let (mut cnt, mut cqt, mut missing) = (0usize, 0usize, 0usize);
    let (mut crt3, mut crt5, mut crtp3, mut crtp5) = (0usize, 0usize, 0usize, 0usize);
    for v in &gt.videos {
        for (qid, segments) in &v.location {
            let Some((span, correct)) = pred(&v.video, qid) else {
                missing += 1;
                continue;
            };
            let (iou, iop) = best_iou_iop(segments, span);
            if iop >= 0.3 {
                crtp3 += 1;
                if iop >= 0.5 {
                    crtp5 += 1;
                    if correct {
                        cqt += 1;
                    }
                }
            }
            if iou >= 0.3 {
                crt3 += 1;
                if iou >= 0.5 {
                    crt5 += 1;
                }
            }
            cnt += 1;
            m_iou += iou;
            m_iop += iop;
        }
    }
    if cnt == 0 {
        let nan = f64::NAN;
        return GroundingMetrics {
            m_iop: nan,
            iop_03: nan,
            iop_05: nan,
            m_iou: nan,
            iou_03: nan,
            iou_05: nan,
            acc_gqa: nan,
            evaluated: 0,
            missing,
            not_in_annotations: 0,
        };
    }
    let n = cnt as f64;
    // The official: mIoU / cnt * 100 and c * 1.0 / cnt * 100.
    let rate = |c: usize| c as f64 * 1.0 / n * 100.0;
    GroundingMetrics {
        m_iop: m_iop / n * 100.0,
        iop_03: rate(crtp3),
        iop_05: rate(crtp5),
        m_iou: m_iou / n * 100.0,
        iou_03: rate(crt3),
        iou_05: rate(crt5),
        acc_gqa: rate(cqt),
        evaluated: cnt,
        missing,
        not_in_annotations: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_iop_cases() {
        // Values worked out by hand.
        assert_eq!(iou_iop([2.0, 6.0], [4.0, 8.0]), (2.0 / 6.0, 2.0 / 4.0));
        assert_eq!(iou_iop([2.0, 6.0], [3.0, 5.0]), (2.0 / 4.0, 1.0));
        // Disjoint: negative intersection, kept raw (the max over segments floors it).
        assert_eq!(iou_iop([2.0, 4.0], [6.0, 10.0]), (-2.0 / 8.0, -2.0 / 4.0));
        assert_eq!(best_iou_iop(&[[2.0, 4.0]], [6.0, 10.0]), (0.0, 0.0));
        // Point spans: inside (bounds included) / outside.
        assert_eq!(iou_iop([2.0, 4.0], [3.0, 3.0]), (0.0, 1.0));
        assert_eq!(iou_iop([2.0, 4.0], [4.0, 4.0]), (0.0, 1.0));
        assert_eq!(iou_iop([2.0, 4.0], [4.5, 4.5]), (0.0, 0.0));
        // Reversed span: IoP 0, IoU negative.
        let (iou, iop) = iou_iop([1.0, 5.0], [4.0, 2.0]);
        assert!(iou < 0.0 && iop == 0.0);
        // A span covering two segments: the best single segment counts.
        let (iou, iop) = best_iou_iop(&[[1.0, 3.0], [5.0, 9.0]], [2.0, 8.0]);
        assert_eq!((iou, iop), (3.0 / 7.0, 3.0 / 6.0));
        // No segments: 0.
        assert_eq!(best_iou_iop(&[], [1.0, 2.0]), (0.0, 0.0));
    }
}
