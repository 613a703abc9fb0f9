//! EVA ViT-g (HF `InstructBlipVisionModel`) against transformers on the parity fixtures, loaded
//! from the HF snapshot layout, from GCG's release files, and from the EVA layout with separate
//! q/v biases.

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor};
use common::{assert_close, get, load_io, parity_dirs};
use gcg::models::vit::{VisionModel, VitConfig};
use gcg::weights::{Loader, MapSource, RenamedSource, SafetensorsSource, TensorSource};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const TOL: f64 = 1e-4;

fn vit_config(dir: &Path) -> Result<VitConfig> {
    let path = dir.join("hf/config.json");
    let cfg = VitConfig::from_hf_config(&gcg::weights::checkpoints::read_json(&path)?)?;
    if dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tiny")) {
        assert_eq!(cfg, VitConfig::tiny(), "the tiny preset must equal the fixture's vision_config");
    }
    Ok(cfg)
}

/// The HF snapshot's `vision_model.*` tensors only (the snapshot also holds the Q-Former and T5).
fn hf_vision_source(dir: &Path) -> Result<Arc<dyn TensorSource + Send + Sync>> {
    let all: Arc<dyn TensorSource + Send + Sync> = Arc::new(SafetensorsSource::open_dir(dir.join("hf"))?);
    Ok(Arc::new(RenamedSource::new(all, |n| {
        n.starts_with("vision_model.").then(|| n.to_string())
    })?))
}

fn check(what: &str, src: Arc<dyn TensorSource + Send + Sync>, cfg: &VitConfig, io: &HashMap<String, Tensor>) -> Result<()> {
    let lb = Loader::from_source(src, &common::device(), DType::F32);
    let vm = VisionModel::load(&lb.pp("vision_model"), cfg)?;
    lb.finish()?;
    let out = vm.forward(get(io, "pixel_values")?)?;
    assert_close(
        &format!("{what}: hidden_wo_norm"),
        &out.hidden_wo_norm,
        get(io, "hidden_wo_norm")?,
        TOL,
    );
    assert_close(&format!("{what}: hidden"), &out.hidden, get(io, "hidden")?, TOL);
    let cached = vm.post_layernorm(get(io, "hidden_wo_norm")?)?;
    assert_close(&format!("{what}: post_layernorm(cached)"), &cached, get(io, "hidden")?, TOL);
    Ok(())
}

#[test]
fn vision_model_hf_layout_matches_transformers() -> Result<()> {
    for dir in parity_dirs() {
        let io = load_io(&dir.join("io/vision.safetensors"))?;
        check(&format!("{} [hf]", dir.display()), hf_vision_source(&dir)?, &vit_config(&dir)?, &io)?;
    }
    Ok(())
}

#[test]
fn vision_model_gcg_release_files_match_transformers() -> Result<()> {
    for dir in parity_dirs() {
        let io = load_io(&dir.join("io/vision.safetensors"))?;
        let src = gcg::weights::layouts::eva_vit_source(&dir.join("gcg"))?;
        check(&format!("{} [gcg]", dir.display()), src, &vit_config(&dir)?, &io)?;
    }
    Ok(())
}

/// The original EVA / LAVIS layout stores `q_bias` and `v_bias` instead of the packed
/// `qkv.bias`. A k bias shifts every score of a query row equally, so the outputs are the same.
#[test]
fn vision_model_separate_q_v_bias_layout_matches_transformers() -> Result<()> {
    for dir in parity_dirs() {
        let io = load_io(&dir.join("io/vision.safetensors"))?;
        let cfg = vit_config(&dir)?;
        let hf = hf_vision_source(&dir)?;
        let d = cfg.hidden_size;
        let mut map = MapSource::new(Vec::new(), "EVA layout (q_bias, v_bias) rebuilt from the HF snapshot");
        let mut split = 0;
        for name in hf.names() {
            let t = hf.load(&name, &common::device())?;
            match name.strip_suffix("qkv.bias") {
                Some(stem) => {
                    map.insert(format!("{stem}q_bias"), t.narrow(0, 0, d)?);
                    map.insert(format!("{stem}v_bias"), t.narrow(0, 2 * d, d)?);
                    split += 1;
                }
                None => map.insert(name, t),
            }
        }
        assert_eq!(split, cfg.num_hidden_layers, "every layer has a packed qkv bias to split");
        check(&format!("{} [q_bias/v_bias]", dir.display()), Arc::new(map), &cfg, &io)?;
    }
    Ok(())
}

/// Trained weights must take effect: load the model with every tensor a variable, change every
/// variable in place (as an optimizer step does), and compare with a model loaded afresh from the
/// changed values. Anything derived from a weight at load time (a folded scale, a packed bias)
/// would keep the old values and fail this. Both bias layouts.
#[test]
fn vision_model_variables_updated_in_place_take_effect() -> Result<()> {
    let dir = parity_dirs().into_iter().next().expect("a parity fixture directory");
    let io = load_io(&dir.join("io/vision.safetensors"))?;
    let cfg = vit_config(&dir)?;
    let hf = hf_vision_source(&dir)?;
    let d = cfg.hidden_size;
    let mut eva = MapSource::new(Vec::new(), "EVA layout");
    for name in hf.names() {
        let t = hf.load(&name, &common::device())?;
        match name.strip_suffix("qkv.bias") {
            Some(stem) => {
                eva.insert(format!("{stem}q_bias"), t.narrow(0, 0, d)?);
                eva.insert(format!("{stem}v_bias"), t.narrow(0, 2 * d, d)?);
            }
            None => eva.insert(name, t),
        }
    }
    let layouts: Vec<(&str, Arc<dyn TensorSource + Send + Sync>)> = vec![("hf", hf), ("q_bias/v_bias", Arc::new(eva))];
    for (what, src) in layouts {
        let lb = Loader::from_source(src, &common::device(), DType::F32).with_trainable(|_| true);
        let vm = VisionModel::load(&lb.pp("vision_model"), &cfg)?;
        lb.finish()?;
        let before = vm.forward(get(&io, "pixel_values")?)?.hidden;
        let mut changed = MapSource::new(Vec::new(), "updated variables");
        for (i, (name, var)) in lb.vars().iter().enumerate() {
            let t = var.as_tensor();
            let delta = ((t.ones_like()? * (0.01 * ((i % 7) as f64 + 1.0)))? + (t * 0.05)?)?;
            var.set(&(t + delta)?)?;
            changed.insert(name.clone(), var.as_tensor().copy()?);
        }
        let after = vm.forward(get(&io, "pixel_values")?)?.hidden;
        let fresh_lb = Loader::from_source(Arc::new(changed), &common::device(), DType::F32);
        let fresh = VisionModel::load(&fresh_lb.pp("vision_model"), &cfg)?;
        fresh_lb.finish()?;
        let expected = fresh.forward(get(&io, "pixel_values")?)?.hidden;
        assert_close(&format!("{what}: updated in place vs loaded afresh"), &after, &expected, TOL);
        let moved = (&after - &before)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(moved > 1e-3, "{what}: the update did not change the output ({moved})");
    }
    Ok(())
}

/// The ViT's operation count (what `gcg bench forward` divides by time for GFLOP/s) against
/// PyTorch's `FlopCounterMode` on HF's `InstructBlipVisionModel` (`tools/fixtures/make_flops.py`):
/// EVA ViT-g/14, the tiny preset and a model of odd sizes, exactly.
#[test]
fn flop_count_equals_pytorchs_counter() -> Result<()> {
    let path = common::fixtures_dir().join("flops/vit.json");
    let doc = gcg::weights::checkpoints::read_json(&path)?;
    let models = doc["models"].as_array().expect("models");
    assert_eq!(models.len(), 3);
    for m in models {
        let name = m["name"].as_str().expect("name");
        let c = &m["config"];
        let size = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{name}: config.{k}")) as usize;
        let cfg = VitConfig {
            hidden_size: size("hidden_size"),
            intermediate_size: size("intermediate_size"),
            num_hidden_layers: size("num_hidden_layers"),
            num_attention_heads: size("num_attention_heads"),
            image_size: size("image_size"),
            patch_size: size("patch_size"),
            ..VitConfig::eva_vit_g()
        };
        match name {
            "eva_vit_g" => assert_eq!(cfg, VitConfig::eva_vit_g()),
            "tiny" => assert_eq!(cfg, VitConfig::tiny()),
            _ => {}
        }
        assert_eq!(
            cfg.flops_per_frame(),
            m["flops_per_frame"].as_u64().expect("flops_per_frame"),
            "{name}"
        );
    }
    Ok(())
}
