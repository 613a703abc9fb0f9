//! The Q-Former against transformers' InstructBLIP Q-Former on the parity fixtures
//! (`tools/fixtures/parity_qformer.py`): outputs with and without instruction text, with an image
//! mask, and the gradients of sum(query_output · R) w.r.t. the query tokens, the image tokens and
//! Q-Former parameters — loaded from the HF snapshot and from the GCG release files.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
use common::{assert_close, get, load_io, parity_dirs};
use gcg::models::qformer::{QFormer, QFormerConfig};
use gcg::nn::attention::set_folded_attention_here;
use gcg::nn::init::Init;
use gcg::nn::Ctx;
use gcg::weights::layouts::gcg_qformer_name;
use gcg::weights::pth::PthSource;
use gcg::weights::{Loader, MergedSource, RenamedSource, SafetensorsSource, TensorSource};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const OUT_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-3;

fn config(dir: &Path) -> Result<QFormerConfig> {
    let path = dir.join("hf/config.json");
    let v = gcg::weights::checkpoints::read_json(&path)?;
    let q = v["num_query_tokens"].as_u64().context("config.json: num_query_tokens")? as usize;
    QFormerConfig::from_hf_config(&v["qformer_config"], q)
}

/// The Q-Former tensors and `query_tokens` of the HF snapshot (the rest belongs to other networks).
fn hf_source(dir: &Path) -> Result<Arc<dyn TensorSource + Send + Sync>> {
    let all = Arc::new(SafetensorsSource::open_dir(dir.join("hf"))?);
    let keep = |n: &str| (n.starts_with("qformer.") || n == "query_tokens").then(|| n.to_string());
    Ok(Arc::new(RenamedSource::new(all, keep)?))
}

/// GCG's release files: `qformer_t5.pth` (LAVIS names) and `query_tokens_t5.pth` (a bare parameter).
fn gcg_source(dir: &Path) -> Result<Option<Arc<dyn TensorSource + Send + Sync>>> {
    let qformer = dir.join("gcg/qformer_t5.pth");
    let queries = dir.join("gcg/query_tokens_t5.pth");
    if !qformer.exists() {
        return Ok(None);
    }
    let q = RenamedSource::new(Arc::new(PthSource::open(&qformer, None, "qformer")?), gcg_qformer_name)?;
    let t = PthSource::open(&queries, None, "query_tokens")?;
    Ok(Some(Arc::new(MergedSource::new(vec![Arc::new(q), Arc::new(t)])?)))
}

struct Model {
    qformer: QFormer,
    query_tokens: Tensor,
    lb: Loader,
}

fn load(src: Arc<dyn TensorSource + Send + Sync>, cfg: &QFormerConfig, trainable: bool) -> Result<Model> {
    let mut lb = Loader::from_source(src, &common::device(), DType::F32);
    if trainable {
        lb = lb.with_trainable(|_| true);
    }
    let qformer = QFormer::load(&lb.pp("qformer"), cfg)?;
    let query_tokens = lb.get((1, cfg.num_query_tokens, cfg.hidden_size), "query_tokens", Init::Zeros)?;
    lb.finish()?;
    Ok(Model { qformer, query_tokens, lb })
}

fn check_outputs(what: &str, m: &Model, io: &HashMap<String, Tensor>) -> Result<()> {
    let ids = get(io, "input_ids")?;
    let mask = get(io, "attention_mask")?;
    let image = get(io, "image_embeds")?;
    let ctx = Ctx::eval();
    let out = m.qformer.forward(&m.query_tokens, Some(ids), Some(mask), image, None, ctx)?;
    assert_close(
        &format!("{what} query_output"),
        &out.query_output,
        get(io, "query_output")?,
        OUT_TOL,
    );
    assert_close(
        &format!("{what} last_hidden_state"),
        &out.last_hidden_state,
        get(io, "last_hidden_state")?,
        OUT_TOL,
    );
    let out = m.qformer.forward(&m.query_tokens, None, None, image, None, ctx)?;
    assert_close(
        &format!("{what} query_output_notext"),
        &out.query_output,
        get(io, "query_output_notext")?,
        OUT_TOL,
    );
    let image_mask = get(io, "image_attention_mask")?;
    let out = m
        .qformer
        .forward(&m.query_tokens, Some(ids), Some(mask), image, Some(image_mask), ctx)?;
    assert_close(
        &format!("{what} query_output_imgmask"),
        &out.query_output,
        get(io, "query_output_imgmask")?,
        OUT_TOL,
    );
    Ok(())
}

fn check_gradients(what: &str, m: &Model, io: &HashMap<String, Tensor>) -> Result<()> {
    let image = Var::from_tensor(get(io, "image_embeds")?)?;
    let out = m.qformer.forward(
        &m.query_tokens,
        Some(get(io, "input_ids")?),
        Some(get(io, "attention_mask")?),
        image.as_tensor(),
        None,
        Ctx::eval(),
    )?;
    let loss = (out.query_output * get(io, "R")?)?.sum_all()?;
    let grads = loss.backward()?;
    let vars = m.lb.vars();
    let mut checked = 0;
    for (key, expected) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let actual = if name == "image_embeds" {
            grads.get(image.as_tensor())
        } else {
            let var = vars.get(name).with_context(|| format!("{what}: no trainable variable '{name}'"))?;
            grads.get(var.as_tensor())
        };
        let actual = actual.with_context(|| format!("{what}: no gradient reached '{name}'"))?;
        assert_close(&format!("{what} {key}"), actual, expected, GRAD_TOL);
        checked += 1;
    }
    anyhow::ensure!(checked >= 4, "{what}: the fixture has only {checked} gradients");
    Ok(())
}

#[test]
fn qformer_matches_transformers_hf_layout() -> Result<()> {
    for dir in parity_dirs() {
        let io = load_io(&dir.join("io/qformer.safetensors"))?;
        let cfg = config(&dir)?;
        let label = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        // Frozen (inference kernels) and trainable (differentiable ops) paths.
        let frozen = load(hf_source(&dir)?, &cfg, false)?;
        check_outputs(&format!("{label} hf frozen"), &frozen, &io)?;
        let trained = load(hf_source(&dir)?, &cfg, true)?;
        check_outputs(&format!("{label} hf trainable"), &trained, &io)?;
        check_gradients(&format!("{label} hf"), &trained, &io)?;
    }
    Ok(())
}

/// The cross-attentions with their key and value projections folded into the queries' side
/// (`MultiHeadAttention::forward_cross`, which the real Q-Former's 32 queries over a video's
/// ViT tokens take; the fixture's 10 image tokens would not), forced on: the same outputs and
/// gradients as transformers.
#[test]
fn qformer_with_folded_cross_attention_matches_transformers() -> Result<()> {
    for dir in parity_dirs() {
        let io = load_io(&dir.join("io/qformer.safetensors"))?;
        let cfg = config(&dir)?;
        let label = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let frozen = load(hf_source(&dir)?, &cfg, false)?;
        let trained = load(hf_source(&dir)?, &cfg, true)?;
        let image = get(&io, "image_embeds")?;
        let cross = frozen.qformer.layers[0].crossattention.as_ref().context("layer 0 cross-attends")?;
        let queries = frozen
            .query_tokens
            .broadcast_as((image.dim(0)?, cfg.num_query_tokens, cfg.hidden_size))?;
        anyhow::ensure!(
            !cross.attention.folds(&queries, image, Ctx::eval()),
            "{label}: the fixture folds by itself"
        );
        set_folded_attention_here(Some(true));
        anyhow::ensure!(
            cross.attention.folds(&queries, image, Ctx::eval()),
            "{label}: forced folding does not apply"
        );
        let checked = check_outputs(&format!("{label} folded frozen"), &frozen, &io)
            .and_then(|_| check_outputs(&format!("{label} folded trainable"), &trained, &io))
            .and_then(|_| check_gradients(&format!("{label} folded"), &trained, &io));
        set_folded_attention_here(None);
        checked?;
    }
    Ok(())
}

#[test]
fn qformer_matches_transformers_gcg_layout() -> Result<()> {
    let mut seen = 0;
    for dir in parity_dirs() {
        let Some(src) = gcg_source(&dir)? else {
            continue;
        };
        let io = load_io(&dir.join("io/qformer.safetensors"))?;
        let cfg = config(&dir)?;
        let label = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let m = load(src, &cfg, true)?;
        check_outputs(&format!("{label} gcg"), &m, &io)?;
        check_gradients(&format!("{label} gcg"), &m, &io)?;
        seen += 1;
    }
    anyhow::ensure!(seen > 0, "no parity directory has gcg/qformer_t5.pth");
    Ok(())
}
