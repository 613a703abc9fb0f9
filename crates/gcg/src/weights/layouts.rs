//! Name maps from the published checkpoint layouts onto the canonical names the models load
//! (`vision_model.*`, `qformer.*`, `query_tokens`, `language_projection.*`, `language_model.*`).

use super::pth::PthSource;
use super::source::{MergedSource, RenamedSource, TensorSource};
use anyhow::{bail, Result};
use std::path::Path;
use std::sync::Arc;

/// Map a tensor name of GCG's `qformer_t5.pth` (LAVIS `BertLMHeadModel` state dict without `cls`)
/// to its canonical HF name under `qformer.`:
///
/// * `bert.embeddings.LayerNorm.*` → `qformer.embeddings.layernorm.*`
/// * `bert.encoder.layer.{i}.attention.self.*` → `qformer.encoder.layer.{i}.attention.attention.*`
/// * `bert.encoder.layer.{i}.crossattention.self.*` → `...crossattention.attention.*`
/// * every other `bert.X` → `qformer.X`
/// * `bert.embeddings.position_ids` (a constant buffer) → None (dropped)
///
/// A name outside `bert.` is returned unchanged, so a loader that consumes `qformer.*` reports it
/// as an unexpected tensor instead of silently ignoring it.
pub fn gcg_qformer_name(lavis_name: &str) -> Option<String> {
    let Some(rest) = lavis_name.strip_prefix("bert.") else {
        return Some(lavis_name.to_string());
    };
    if rest == "embeddings.position_ids" {
        return None;
    }
    if let Some(ln) = rest.strip_prefix("embeddings.LayerNorm.") {
        return Some(format!("qformer.embeddings.layernorm.{ln}"));
    }
    let renamed =
        rest.replacen(".attention.self.", ".attention.attention.", 1)
            .replacen(".crossattention.self.", ".crossattention.attention.", 1);
    Some(format!("qformer.{renamed}"))
}

/// GCG's release files in `dir` under the canonical names (`vision_model.*`):
/// `eva_vit_g.pth` (the vision model's state dict, no prefix; qkv bias packed) and
/// `eva_vit_post_layernorm.pth` (`weight`, `bias`). GCG applies the separate post-LayerNorm to
/// the cached features, so when both files hold one, the separate file's is used and the copy
/// inside `eva_vit_g.pth` is hidden.
pub fn eva_vit_source(dir: &Path) -> Result<Arc<dyn TensorSource + Send + Sync>> {
    let vit_path = dir.join("eva_vit_g.pth");
    let ln_path = dir.join("eva_vit_post_layernorm.pth");
    let vit: Arc<dyn TensorSource + Send + Sync> = Arc::new(PthSource::open(&vit_path, None, "eva_vit_g")?);
    if !ln_path.exists() {
        if !vit.contains("post_layernorm.weight") {
            bail!(
                "{} has no post_layernorm and {} does not exist",
                vit_path.display(),
                ln_path.display()
            );
        }
        return Ok(Arc::new(RenamedSource::prefixed(vit, "vision_model.")?));
    }
    let vit = RenamedSource::new(vit, |n| (!n.starts_with("post_layernorm.")).then(|| format!("vision_model.{n}")))?;
    let ln = RenamedSource::prefixed(
        Arc::new(PthSource::open(&ln_path, None, "eva_vit_post_layernorm")?),
        "vision_model.post_layernorm.",
    )?;
    Ok(Arc::new(MergedSource::new(vec![Arc::new(vit), Arc::new(ln)])?))
}
