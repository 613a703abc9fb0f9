//! The grounding module against the torch reference of `tools/fixtures/parity_grounding.py`
//! (SPEC §4–5 / the official `grounding_module.py` math, seeded, eval mode, fixed noise): μ, p, the
//! perturbed top-k selections, the hard top-K, L_reg, L_con, and the gradients of
//! L_reg + L_con + Σ selection·R w.r.t. every grounding parameter and the inputs, for both
//! backward estimators of the perturbed top-k (full and the official diagonal).

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
use common::{assert_close, get, load_io, parity_dirs};
use gcg::grounding::{perturbed_topk, Grounding, GroundingConfig, GroundingInputs, Noise, PerturbedTopK, TopkGradient, TopkNoises};
use gcg::nn::Ctx;
use gcg::weights::{Loader, SafetensorsSource};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const OUT_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-3;

struct Fixture {
    cfg: GroundingConfig,
    json: serde_json::Value,
    io: HashMap<String, Tensor>,
}

fn fixture(dir: &Path) -> Result<Option<Fixture>> {
    let jpath = dir.join("io/grounding.json");
    if !jpath.exists() {
        return Ok(None);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&jpath)?).with_context(|| format!("{}", jpath.display()))?;
    // The CLIP width d is not a run setting (it is the feature store's), so it is read apart.
    let mut sizes = json["config"].clone();
    let dim = sizes
        .as_object_mut()
        .and_then(|o| o.remove("dim"))
        .and_then(|d| d.as_u64())
        .context("grounding.json config has no dim")? as usize;
    let mut cfg: GroundingConfig = serde_json::from_value(sizes).context("grounding.json config")?;
    cfg.dim = dim;
    let io = load_io(&dir.join("io/grounding.safetensors"))?;
    Ok(Some(Fixture { cfg, json, io }))
}

/// Committed fixture dirs must carry the grounding fixture; extra dirs may predate it.
fn fixtures() -> Vec<(String, Fixture)> {
    let committed = common::fixtures_dir().join("parity");
    let mut out = Vec::new();
    for dir in parity_dirs() {
        match fixture(&dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display())) {
            Some(f) => out.push((dir.display().to_string(), f)),
            None if dir.starts_with(&committed) => panic!("{}: committed fixture dir has no io/grounding.json", dir.display()),
            None => eprintln!("{}: no grounding fixture, skipped", dir.display()),
        }
    }
    assert!(!out.is_empty(), "no grounding fixtures");
    out
}

fn load_model(dir: &str, cfg: &GroundingConfig) -> Result<(Grounding, Loader)> {
    let src = SafetensorsSource::open(Path::new(dir).join("io/grounding_weights.safetensors"))?;
    let lb = Loader::from_source(Arc::new(src), &common::device(), DType::F32).with_trainable(gcg::grounding::is_trainable);
    let g = Grounding::load(&lb.pp("grounding"), cfg)?;
    lb.finish()?;
    Ok((g, lb))
}

#[test]
fn config_presets_match_the_fixture_sizes() {
    for (dir, f) in fixtures() {
        if f.json["preset"] == "tiny" {
            let mut tiny = GroundingConfig::tiny();
            // The fixture's noise has its own sample count; everything else is the preset.
            tiny.topk.num_samples = f.cfg.topk.num_samples;
            assert_eq!(f.cfg, tiny, "{dir}: GroundingConfig::tiny() differs from the fixture's config");
        }
        f.cfg.validate().unwrap();
    }
    let g = GroundingConfig::gcg();
    assert_eq!(
        (g.dim, g.inner_dim(), g.heads, g.layers, g.frames, g.moments),
        (1024, 256, 4, 2, 32, 4)
    );
    assert_eq!((g.topk.num_samples, g.topk.sigma, g.topk.gradient), (500, 0.05, TopkGradient::Full));
}

#[test]
fn every_parameter_has_its_official_name() {
    for (dir, f) in fixtures() {
        let (mut g, lb) = load_model(&dir, &f.cfg).unwrap();
        let mut names: Vec<String> = g.params_mut().into_iter().map(|(n, _)| format!("grounding.{n}")).collect();
        names.sort();
        let vars: Vec<String> = lb.vars().iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, vars, "{dir}: params_mut names vs loaded variables");
        let h = f.cfg.inner_dim();
        assert_eq!(lb.vars().num_params(), {
            let d = f.cfg.dim;
            let (k, t, m) = (f.cfg.moments, f.cfg.frames, f.cfg.ffn_mult);
            let block = 4 * (h * h + h) + 4 * h + (h * m * h + m * h) + (m * h * h + h);
            d * h
                + 2 * h
                + t * h
                + f.cfg.layers * block
                + (h * h / 2 + h / 2)
                + (h / 2 + 1)
                + (h * k + k)
                + (d * h / 2)
                + (h / 2 * h / 2 + h / 2)
        });
    }
}

#[test]
fn standalone_perturbed_topk_matches_reference() {
    for (dir, f) in fixtures() {
        let x = get(&f.io, "topk.x").unwrap();
        let noise = get(&f.io, "topk.noise").unwrap();
        let r = get(&f.io, "topk.r").unwrap();
        let k = r.dim(1).unwrap();
        for (mode, grad) in [("full", TopkGradient::Full), ("diag", TopkGradient::Diagonal)] {
            let cfg = PerturbedTopK {
                num_samples: 0,
                sigma: f.cfg.topk.sigma,
                gradient: grad,
            };
            let xv = Var::from_tensor(x).unwrap();
            let y = perturbed_topk(xv.as_tensor(), k, &cfg, Noise::Given(noise)).unwrap();
            assert_close(&format!("{dir} topk out"), &y, get(&f.io, "topk.out").unwrap(), 1e-6);
            let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = grads.get(xv.as_tensor()).expect("gradient of x");
            assert_close(
                &format!("{dir} topk grad ({mode})"),
                gx,
                get(&f.io, &format!("topk.grad_{mode}")).unwrap(),
                1e-5,
            );
        }
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn case_names(f: &Fixture) -> Vec<String> {
    f.json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn forward_losses_and_gradients_match_reference() {
    for (dir, f) in fixtures() {
        for case in case_names(&f) {
            for (mode, grad) in [("full", TopkGradient::Full), ("diag", TopkGradient::Diagonal)] {
                check_case(&dir, &f, &case, mode, grad).unwrap_or_else(|e| panic!("{dir} {case} {mode}: {e:#}"));
            }
        }
    }
}

fn check_case(dir: &str, f: &Fixture, case: &str, mode: &str, grad: TopkGradient) -> Result<()> {
    let io = &f.io;
    let t = |name: &str| get(io, &format!("{case}.{name}"));
    let (mut g, lb) = load_model(dir, &f.cfg)?;
    g.cfg.topk.gradient = grad;
    let frames = Var::from_tensor(t("frames")?)?;
    let question = Var::from_tensor(t("question")?)?;
    let answer = Var::from_tensor(t("answer")?)?;
    let options = match io.get(&format!("{case}.options")) {
        Some(o) => Some(Var::from_tensor(o)?),
        None => None,
    };
    let answer_ids: Option<Vec<usize>> = match io.get(&format!("{case}.answer_ids")) {
        Some(a) => Some(a.to_vec1::<i64>()?.into_iter().map(|v| v as usize).collect()),
        None => None,
    };
    let inputs = GroundingInputs {
        frames: frames.as_tensor(),
        question: question.as_tensor(),
        options: options.as_ref().map(|o| o.as_tensor()),
        answer_ids: answer_ids.as_deref(),
        answer: answer.as_tensor(),
        pseudo_label_scores: t("label_scores")?,
        pseudo_labels: None,
    };
    let noises = TopkNoises {
        positives: Noise::Given(t("noise_pos")?),
        negatives: Noise::Given(t("noise_neg")?),
        selection: Noise::Given(t("noise_sel")?),
    };
    let out = g.forward_train(&inputs, noises, Ctx::eval())?;
    let what = |s: &str| format!("{dir} {case} [{mode}] {s}");
    assert_close(&what("centres"), &out.gaussian_centres, t("centres")?, OUT_TOL);
    assert_close(&what("scores"), &out.frame_scores, t("scores")?, OUT_TOL);
    assert_close(&what("positive selection"), &out.positive_selection, t("sel_pos")?, OUT_TOL);
    assert_close(&what("negative selection"), &out.negative_selection, t("sel_neg")?, OUT_TOL);
    assert_close(&what("selection"), &out.selection, t("selection")?, OUT_TOL);
    assert_close(&what("L_reg smooth-l1"), &out.regression.smooth_l1, t("reg_smooth_l1")?, OUT_TOL);
    assert_close(&what("L_reg ordering"), &out.regression.ordering, t("reg_ordering")?, OUT_TOL);
    assert_close(&what("L_con"), &out.contrastive, t("con")?, OUT_TOL);

    let (moments, onehot) = g.hard_selection(&out.frame_scores)?;
    let want: Vec<Vec<usize>> = t("hard_idx")?
        .to_vec2::<i64>()?
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as usize).collect())
        .collect();
    assert_eq!(moments, want, "{}", what("hard top-K"));
    assert_eq!(onehot.sum_all()?.to_scalar::<f32>()?, (want.len() * f.cfg.moments) as f32);
    let pred = g.predict(frames.as_tensor(), question.as_tensor(), options.as_ref().map(|o| o.as_tensor()))?;
    assert_eq!(pred.moments, want, "{}", what("predict moments"));

    let total = ((out.regression.total()? + &out.contrastive)? + (&out.selection * t("r_sel")?)?.sum_all()?)?;
    assert_close(&what("total"), &total, t("total")?, OUT_TOL);
    let grads = total.backward()?;
    // The key bias and the pooling score bias have exactly zero gradient (softmax is invariant to
    // a shift shared by all keys / frames): both sides hold float noise there. Such tensors are
    // compared on the scale of the case's gradients, and checked to be ~0 on both sides.
    let scale = lb
        .vars()
        .iter()
        .map(|(name, _)| max_abs(t(&format!("grad_{mode}.{name}")).unwrap()))
        .fold(0f64, f64::max);
    let mut checked = 0;
    for (name, var) in lb.vars().iter() {
        let gv = grads.get(var.as_tensor()).with_context(|| format!("no gradient for {name}"))?;
        let want = t(&format!("grad_{mode}.{name}"))?;
        let structural_zero = name.ends_with("attention.k_lin.bias") || name.ends_with("satt_pool_frame.2.bias");
        if structural_zero {
            assert!(
                max_abs(gv) <= 1e-6 * scale && max_abs(want) <= 1e-6 * scale,
                "{}",
                what(&format!("{name} is not ~0"))
            );
        } else {
            assert!(
                max_abs(want) > 1e-3 * scale,
                "{}",
                what(&format!("reference gradient of {name} is unexpectedly ~0"))
            );
            assert_close(&what(&format!("grad {name}")), gv, want, GRAD_TOL);
        }
        checked += 1;
    }
    let mut leaves = vec![("frames", &frames), ("question", &question), ("answer", &answer)];
    if let Some(o) = &options {
        leaves.push(("options", o));
    }
    for (name, var) in leaves {
        let gv = grads
            .get(var.as_tensor())
            .with_context(|| format!("no gradient for input {name}"))?;
        assert_close(
            &what(&format!("grad input {name}")),
            gv,
            t(&format!("grad_{mode}.{name}"))?,
            GRAD_TOL,
        );
        checked += 1;
    }
    let expected = io.keys().filter(|k| k.starts_with(&format!("{case}.grad_{mode}."))).count();
    assert_eq!(checked, expected, "{}: every reference gradient is compared", what(""));
    Ok(())
}

#[test]
fn the_estimators_give_different_gradients() {
    // Guards the comparison above: the two backward modes must not coincide on the fixture.
    for (dir, f) in fixtures() {
        let a = get(&f.io, "mc.grad_full.grounding.logit_gauss_c.1.weight").unwrap();
        let b = get(&f.io, "mc.grad_diag.grounding.logit_gauss_c.1.weight").unwrap();
        assert!(common::rel_err(a, b).unwrap() > 1e-2, "{dir}: full and diagonal gradients coincide");
    }
}
