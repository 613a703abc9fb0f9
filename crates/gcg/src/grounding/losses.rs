//! The grounding losses: L_reg (centre regression to the pseudo-labels + ordering hinge) and
//! L_con (Gaussian contrastive InfoNCE), as SPEC §5 and the official `calculate_regression_loss` /
//! `calculate_contrastive_loss`.
//!
//! Differences from the official code (all deliberate, none changes a value in eval mode):
//! * The official code also builds "inter-video" negative frames from `torch.randperm` and projects
//!   them, but their logits are commented out of the InfoNCE; they are not computed here.
//! * The official projection head is applied separately to the answer anchors and to the "other
//!   answers" (different dropout masks in training); here the answers are projected once and the
//!   same projections serve as anchors and as the other samples' negatives.
//! * With K = 1 the official ordering term divides 0 by 0 (NaN); here it is 0 (nothing to order).

use super::topk::hard_topk;
use crate::nn::{log_softmax_last_dim, push_linear, torch_linear, Activation, Ctx, Dropout, Linear};
use crate::weights::Loader;
use anyhow::{ensure, Context, Result};
use candle_core::{Tensor, D};

/// The contrastive projection head: dropout → Linear(d → h/2, no bias) → GELU → Linear(h/2 → h/2)
/// (official `proj_head.{1,3}`).
#[derive(Debug, Clone)]
pub struct ProjectionHead {
    pub dropout: Dropout,
    pub lin1: Linear, // [h/2, d]
    pub lin2: Linear, // [h/2, h/2]
}

impl ProjectionHead {
    /// From a loader at the grounding prefix (reads `proj_head.1.weight`, `proj_head.3.*`).
    pub fn load(lb: &Loader, dim: usize, inner: usize, dropout: f64) -> Result<Self> {
        Ok(Self {
            dropout: Dropout::new(dropout),
            lin1: torch_linear(&lb.pp("proj_head.1"), dim, inner / 2, false)?,
            lin2: torch_linear(&lb.pp("proj_head.3"), inner / 2, inner / 2, true)?,
        })
    }

    /// [..., d] → [..., h/2]
    pub fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let x = x.to_dtype(self.lin1.weight.dtype())?;
        let h = self.lin1.forward(&self.dropout.forward(&x, ctx)?)?;
        self.lin2.forward(&Activation::Gelu.forward(&h)?)
    }

    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v = Vec::new();
        push_linear(&mut v, "proj_head.1", &mut self.lin1);
        push_linear(&mut v, "proj_head.3", &mut self.lin2);
        v
    }
}

/// SmoothL1 with β = 1, element-wise: 0.5·x² where |x| < 1, |x| − 0.5 elsewhere.
pub fn smooth_l1(x: &Tensor) -> Result<Tensor> {
    let ax = x.abs()?;
    let small = ax.lt(1.0)?;
    Ok(small.where_cond(&(x.sqr()? * 0.5)?, &(ax - 0.5)?)?)
}

/// The two parts of L_reg.
#[derive(Debug, Clone)]
pub struct RegressionLoss {
    /// mean SmoothL1(μ·(T−1), sorted hard top-K of the pseudo-label scores)
    pub smooth_l1: Tensor,
    /// mean over the batch of (1/(K−1)) Σ_j max(0, 1 + c_j − c_{j+1}), c = μ·(T−1)
    pub ordering: Tensor,
}

impl RegressionLoss {
    pub fn total(&self) -> Result<Tensor> {
        Ok((&self.smooth_l1 + &self.ordering)?)
    }
}

/// L_reg: centres μ [B, K] ∈ (0, 1), pseudo-label scores s [B, T] (e.g. the cosine similarity of
/// each frame with the event text). The targets are the K highest-scoring frames in time order.
pub fn regression_loss(centres: &Tensor, pseudo_label_scores: &Tensor) -> Result<RegressionLoss> {
    let (b, k) = centres
        .dims2()
        .with_context(|| format!("regression loss: centres must be [B, K], got {:?}", centres.dims()))?;
    let (bs, t) = pseudo_label_scores.dims2().with_context(|| {
        format!(
            "regression loss: pseudo-label scores must be [B, T], got {:?}",
            pseudo_label_scores.dims()
        )
    })?;
    ensure!(bs == b, "regression loss: {b} centre rows but {bs} pseudo-label rows");
    ensure!(k <= t, "regression loss: {k} centres but only {t} frames");
    let pseudo_labels = hard_topk(pseudo_label_scores, k).context("regression loss: pseudo-labels")?;
    regression_loss_to(centres, &pseudo_labels, t)
}

/// L_reg towards given pseudo-labels: per sample the K target frames in time order, of T frames.
pub fn regression_loss_to(centres: &Tensor, pseudo_labels: &[Vec<usize>], frames: usize) -> Result<RegressionLoss> {
    let (b, k) = centres
        .dims2()
        .with_context(|| format!("regression loss: centres must be [B, K], got {:?}", centres.dims()))?;
    ensure!(
        pseudo_labels.len() == b && pseudo_labels.iter().all(|p| p.len() == k && p.iter().all(|&f| f < frames)),
        "regression loss: pseudo-labels must be {b} rows of {k} frames below {frames}, got {pseudo_labels:?}"
    );
    let t = frames;
    let targets: Vec<f64> = pseudo_labels.iter().flatten().map(|&i| i as f64).collect();
    let targets = Tensor::from_vec(targets, (b, k), centres.device())?.to_dtype(centres.dtype())?;
    let c = (centres * (t as f64 - 1.0))?; // [B, K] in frame units
    let smooth = smooth_l1(&(&c - &targets)?)?.mean_all()?;
    let ordering = if k >= 2 {
        let gap = ((c.narrow(1, 0, k - 1)? - c.narrow(1, 1, k - 1)?)? + 1.0)?; // [B, K-1]
        gap.relu()?.mean_all()?
    } else {
        smooth.zeros_like()?
    };
    Ok(RegressionLoss {
        smooth_l1: smooth,
        ordering,
    })
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?)
}

/// The inputs of L_con for a batch.
pub struct ContrastiveInputs<'a> {
    /// CLIP frame embeddings F.
    pub frames: &'a Tensor, // [B, T, d]
    /// CLIP text embedding of the answer (the anchor).
    pub answer: &'a Tensor, // [B, d]
    /// CLIP text embeddings of all options (multiple choice) and the index of the right one per
    /// sample; the wrong options are negatives. `None` for open-ended questions.
    pub options: Option<(&'a Tensor, &'a [usize])>, // [B, O, d], B indices
    /// TopK_σ(p, K): the soft positive frames.
    pub positive_selection: &'a Tensor, // [B, K, T]
    /// TopK_σ(1 − p, T − K): the soft intra-video negative frames.
    pub negative_selection: &'a Tensor, // [B, T-K, T]
}

/// L_con (InfoNCE, label at index 0). For each positive k the logits are
/// `[pos_k·ans, intra·ans, pos_k·wrong_options, pos_k·other_answers] / temperature` on projected,
/// L2-normalised embeddings; the cross-entropy is averaged over the batch and the K positives.
/// With B = 1 there are no other answers; without options no option negatives.
pub fn contrastive_loss(head: &ProjectionHead, inputs: &ContrastiveInputs, temperature: f64, ctx: Ctx) -> Result<Tensor> {
    let (b, t, d) = inputs
        .frames
        .dims3()
        .with_context(|| format!("contrastive loss: frames must be [B, T, d], got {:?}", inputs.frames.dims()))?;
    let (ba, da) = inputs
        .answer
        .dims2()
        .with_context(|| format!("contrastive loss: answer embeddings must be [B, d], got {:?}", inputs.answer.dims()))?;
    ensure!(
        ba == b && da == d,
        "contrastive loss: answer embeddings {:?}, expected [{b}, {d}]",
        inputs.answer.dims()
    );
    let (bp, k, tp) = inputs
        .positive_selection
        .dims3()
        .context("contrastive loss: positive selection must be [B, K, T]")?;
    let (bn, kn, tn) = inputs
        .negative_selection
        .dims3()
        .context("contrastive loss: negative selection must be [B, T-K, T]")?;
    ensure!(
        bp == b && tp == t && bn == b && tn == t,
        "contrastive loss: selections {:?} / {:?} do not match frames {:?}",
        inputs.positive_selection.dims(),
        inputs.negative_selection.dims(),
        inputs.frames.dims()
    );
    ensure!(temperature > 0.0, "contrastive loss: temperature {temperature} must be > 0");
    let dtype = head.lin1.weight.dtype();
    let frames = inputs.frames.to_dtype(dtype)?;

    let pos = inputs.positive_selection.to_dtype(dtype)?.matmul(&frames)?; // [B, K, d]
    let neg = inputs.negative_selection.to_dtype(dtype)?.matmul(&frames)?; // [B, T-K, d]
    let pos = l2_normalize(&head.forward(&pos, ctx)?)?; // [B, K, e]
    let neg = l2_normalize(&head.forward(&neg, ctx)?)?; // [B, T-K, e]
    let ans = l2_normalize(&head.forward(inputs.answer, ctx)?)?; // [B, e]
    let e = ans.dim(1)?;

    let mut parts: Vec<Tensor> = Vec::new();
    parts.push(pos.broadcast_mul(&ans.unsqueeze(1)?)?.sum_keepdim(2)?); // [B, K, 1]
    if kn > 0 {
        let intra = neg.matmul(&ans.unsqueeze(2)?)?.squeeze(2)?; // [B, T-K]
        parts.push(intra.unsqueeze(1)?.broadcast_as((b, k, kn))?.contiguous()?);
        // [B, K, T-K]
    }
    if let Some((options, answer_ids)) = inputs.options {
        let (bo, o, dopt) = options
            .dims3()
            .with_context(|| format!("contrastive loss: options must be [B, O, d], got {:?}", options.dims()))?;
        ensure!(
            bo == b && dopt == d,
            "contrastive loss: options {:?}, expected [{b}, O, {d}]",
            options.dims()
        );
        ensure!(
            answer_ids.len() == b,
            "contrastive loss: {} answer indices for {b} samples",
            answer_ids.len()
        );
        let mut wrong = Vec::with_capacity(b * o.saturating_sub(1));
        for (i, &a) in answer_ids.iter().enumerate() {
            ensure!(a < o, "contrastive loss: answer index {a} of sample {i} is outside its {o} options");
            wrong.extend((0..o).filter(|&j| j != a).map(|j| (i * o + j) as u32));
        }
        if o > 1 {
            let idx = Tensor::new(wrong.as_slice(), options.device())?;
            let wrong = options.reshape((b * o, d))?.index_select(&idx, 0)?.reshape((b, o - 1, d))?; // [B, O-1, d]
            let wrong = l2_normalize(&head.forward(&wrong, ctx)?)?; // [B, O-1, e]
            parts.push(pos.matmul(&wrong.transpose(1, 2)?.contiguous()?)?); // [B, K, O-1]
        }
    }
    if b > 1 {
        let others: Vec<u32> = (0..b).flat_map(|i| (0..b).filter(move |&j| j != i).map(|j| j as u32)).collect();
        let idx = Tensor::new(others.as_slice(), ans.device())?;
        let others = ans.index_select(&idx, 0)?.reshape((b, b - 1, e))?; // [B, B-1, e]
        parts.push(pos.matmul(&others.transpose(1, 2)?.contiguous()?)?); // [B, K, B-1]
    }
    let logits = (Tensor::cat(&parts, 2)? / temperature)?; // [B, K, L]
    let logp = log_softmax_last_dim(&logits)?;
    Ok(logp.narrow(2, 0, 1)?.mean_all()?.neg()?)
}
