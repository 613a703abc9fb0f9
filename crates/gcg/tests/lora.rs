//! LoRA against PEFT (tests/fixtures/lora, from tools/fixtures/make_lora.py): one adapted
//! projection's output and gradients (x, A, B), the official `--use_lora` on the tiny Flan-T5
//! (which attentions get adapters, their names, logits, loss and gradients), dropout on the
//! branch input only, and an adapter with B = 0 leaving the frozen T5 exactly as it was.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{assert_close, get, load_io};
use gcg::models::t5::{GenerateConfig, T5Config, T5Model};
use gcg::nn::lora::{is_lora_name, LoraAdapter, LoraConfig, LoraTarget};
use gcg::nn::{Ctx, Linear};
use gcg::weights::checkpoints::read_json;
use gcg::weights::{Loader, MergedSource, RenamedSource, SafetensorsSource, TensorSource};
use gcg::SeededRng;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

fn lora_dir() -> PathBuf {
    common::fixtures_dir().join("lora")
}

fn t5_dir() -> PathBuf {
    common::fixtures_dir().join("parity/tiny-s0/gcg/flan-t5")
}

#[test]
fn one_adapted_projection_matches_peft_forward_and_backward() {
    let io = load_io(&lora_dir().join("layer.safetensors")).unwrap();
    let meta = read_json(&lora_dir().join("layer.json")).unwrap();
    let cases = meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 3);
    for (name, c) in cases {
        let t = |k: &str| get(&io, &format!("{name}.{k}")).unwrap().clone();
        let cfg = LoraConfig {
            rank: c["rank"].as_u64().unwrap() as usize,
            alpha: c["alpha"].as_f64().unwrap(),
            dropout: c["dropout"].as_f64().unwrap(),
            targets: vec![LoraTarget::Q],
        };
        assert_eq!(cfg.scaling(), c["scaling"].as_f64().unwrap(), "{name}: PEFT's scaling is alpha / r");
        let (a, b, x) = (
            Var::from_tensor(&t("lora_A")).unwrap(),
            Var::from_tensor(&t("lora_B")).unwrap(),
            Var::from_tensor(&t("x")).unwrap(),
        );
        // The frozen weight is a plain tensor: its product is the FrozenMatmul node.
        let lin = Linear::new(t("weight"), None).with_lora(LoraAdapter::new(
            a.as_tensor().clone(),
            b.as_tensor().clone(),
            cfg.scaling(),
            cfg.dropout,
        ));
        for (path, y) in [
            ("project(eval)", lin.project(x.as_tensor(), Ctx::eval()).unwrap()),
            ("forward_frozen", lin.forward_frozen(x.as_tensor()).unwrap()),
            ("forward", lin.forward(x.as_tensor()).unwrap()),
        ] {
            let what = format!("{name} {path}");
            assert_close(&format!("{what}: y"), &y, &t("y"), 1e-5);
            let grads = (&y * &t("r")).unwrap().sum_all().unwrap().backward().unwrap();
            assert_close(&format!("{what}: grad x"), grads.get(x.as_tensor()).unwrap(), &t("grad_x"), 1e-5);
            assert_close(
                &format!("{what}: grad A"),
                grads.get(a.as_tensor()).unwrap(),
                &t("grad_lora_A"),
                1e-5,
            );
            assert_close(
                &format!("{what}: grad B"),
                grads.get(b.as_tensor()).unwrap(),
                &t("grad_lora_B"),
                1e-5,
            );
        }
        // Without the adapter the layer is W x alone, which the fixture's y is not.
        let plain = Linear::new(t("weight"), None).forward(x.as_tensor()).unwrap();
        assert!(
            common::rel_err(&plain, &t("y")).unwrap() > 1e-2,
            "{name}: the adapter changes nothing?"
        );
    }
}

#[test]
fn dropout_acts_on_the_branch_input_only_and_only_in_training() {
    let (din, dout, r, p) = (6, 5, 3, 0.5);
    let w = common::randn_f32(&[dout, din], 1);
    let a = common::randn_f32(&[r, din], 2);
    let b = common::randn_f32(&[dout, r], 3);
    let x = common::randn_f32(&[4, din], 4);
    let lin = Linear::new(w.clone(), None).with_lora(LoraAdapter::new(a.clone(), b.clone(), 1.5, p));
    let rng = RefCell::new(SeededRng::new(9));
    let mut twin = rng.borrow().clone();
    let y = lin.project(&x, Ctx::train(&rng)).unwrap();
    // The documented formula with the mask the dropout draws: keep where u >= p, scale 1/(1-p).
    let keep: Vec<f32> = (0..x.elem_count())
        .map(|_| if twin.uniform() >= p { 1.0 / (1.0 - p as f32) } else { 0.0 })
        .collect();
    assert!(keep.contains(&0.0) && keep.iter().any(|&k| k > 0.0));
    let xd = (&x * Tensor::from_vec(keep, x.shape(), x.device()).unwrap()).unwrap();
    let want = (x.matmul(&w.t().unwrap()).unwrap() + (xd.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 1.5).unwrap())
        .unwrap();
    assert_close("training: W x + s·B·A·dropout(x)", &y, &want, 1e-6);
    assert_eq!(*rng.borrow(), twin, "one draw per input value");
    let eval = lin.project(&x, Ctx::eval()).unwrap();
    let want = (x.matmul(&w.t().unwrap()).unwrap() + (x.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 1.5).unwrap())
        .unwrap();
    assert_close("eval: no dropout", &eval, &want, 1e-6);
}

#[test]
fn new_adapters_are_initialised_as_peft_and_named_as_its_state_dict() {
    let cfg = LoraConfig {
        rank: 4,
        ..LoraConfig::default()
    };
    let lb = Loader::random(&candle_core::Device::Cpu, DType::F32, 3).with_trainable(is_lora_name);
    let ad = LoraAdapter::load(&lb.pp("layer.q"), 64, 8, &cfg).unwrap();
    let a = ad.a.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bound = 1.0 / 8.0; // kaiming_uniform(a = √5): ±1/√in
    assert!(
        a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > 0.9 * bound),
        "A not uniform in ±1/√in"
    );
    assert_eq!(ad.a.weight.dims(), &[4, 64]);
    assert_eq!(ad.b.weight.dims(), &[8, 4]);
    assert!(ad
        .b
        .weight
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|&v| v == 0.0));
    assert_eq!(ad.scaling, 32.0 / 4.0);
    let names: Vec<String> = lb.vars().iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, ["layer.q.lora_A.weight", "layer.q.lora_B.weight"]);
}

/// The tiny Flan-T5 of the parity fixture, with the PEFT adapter of the LoRA fixture (trainable)
/// or without adapters in the source (`adapter` false: the adapters are initialised).
fn lora_t5(cfg: Option<&LoraConfig>, adapter: bool) -> (T5Model, gcg::weights::VarStore) {
    lora_t5_with(cfg, adapter, true)
}

/// [`lora_t5`], the adapters trainable variables or (`trainable` false) plain tensors.
fn lora_t5_with(cfg: Option<&LoraConfig>, adapter: bool, trainable: bool) -> (T5Model, gcg::weights::VarStore) {
    let t5cfg = T5Config::from_hf_config(&read_json(&t5_dir().join("config.json")).unwrap()).unwrap();
    let base: Arc<dyn TensorSource + Send + Sync> = Arc::new(SafetensorsSource::open_dir(t5_dir()).unwrap());
    let src: Arc<dyn TensorSource + Send + Sync> = if adapter {
        let fx: Arc<dyn TensorSource + Send + Sync> = Arc::new(SafetensorsSource::open(lora_dir().join("t5.safetensors")).unwrap());
        // `adapter.base_model.model.X` → `X`: a PEFT adapter state dict under the T5's names.
        let ad = RenamedSource::new(fx, |n| n.strip_prefix("adapter.base_model.model.").map(str::to_string)).unwrap();
        Arc::new(MergedSource::new(vec![base, Arc::new(ad)]).unwrap())
    } else {
        base
    };
    let lb = Loader::from_source(src, &common::device(), DType::F32).with_trainable(move |n| trainable && is_lora_name(n));
    let m = T5Model::load_with_lora(&lb, &t5cfg, cfg).unwrap();
    lb.finish().unwrap(); // every adapter tensor PEFT made has its place, and no more
    (m, lb.vars())
}

#[test]
fn the_official_use_lora_on_the_tiny_t5_matches_peft() {
    let meta = read_json(&lora_dir().join("t5.json")).unwrap();
    let lc = &meta["lora_config"];
    // The official LoraConfig is this crate's default.
    let cfg = LoraConfig::default();
    assert_eq!(cfg.rank as u64, lc["r"].as_u64().unwrap());
    assert_eq!(cfg.alpha, lc["lora_alpha"].as_f64().unwrap());
    assert_eq!(cfg.dropout, lc["lora_dropout"].as_f64().unwrap());
    let targets: Vec<&str> = lc["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(targets, cfg.targets.iter().map(|t| t.name()).collect::<Vec<_>>());
    assert_eq!(lc["bias"], "none");

    let (m, vars) = lora_t5(Some(&cfg), true);
    // q and v of every attention: encoder self, decoder self and cross (2 + 2·2 per layer pair).
    let want: BTreeSet<String> = meta["adapter_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().strip_prefix("base_model.model.").unwrap().to_string())
        .collect();
    let got: BTreeSet<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 2 * 2 * (m.cfg.num_layers + 2 * m.cfg.num_decoder_layers));
    assert!(got.iter().any(|n| n.contains("EncDecAttention.v.lora_B")));

    let io = load_io(&common::fixtures_dir().join("parity/tiny-s0/io/t5.safetensors")).unwrap();
    let fx = load_io(&lora_dir().join("t5.safetensors")).unwrap();
    let mask = get(&io, "attention_mask").unwrap();
    let labels = get(&io, "labels").unwrap();
    let x = Var::from_tensor(get(&io, "inputs_embeds").unwrap()).unwrap();
    let enc = m.encode(x.as_tensor(), mask, Ctx::eval()).unwrap();
    let logits = m.forward_logits(&enc, mask, &m.shift_right(labels).unwrap()).unwrap();
    assert_close("logits", &logits, get(&fx, "logits").unwrap(), 1e-4);
    let loss = m.loss(&enc, mask, labels, Ctx::eval()).unwrap();
    assert_close("loss", &loss.reshape(1).unwrap(), get(&fx, "loss").unwrap(), 1e-4);
    let grads = loss.backward().unwrap();
    assert_close(
        "grad inputs_embeds",
        grads.get(x.as_tensor()).unwrap(),
        get(&fx, "grad_inputs_embeds").unwrap(),
        1e-3,
    );
    for (name, var) in vars.iter() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_close(
            &format!("grad {name}"),
            g,
            get(&fx, &format!("grad.base_model.model.{name}")).unwrap(),
            1e-3,
        );
    }
    // The plain T5 on the same inputs differs: the adapters are in the computation.
    let (plain, _) = lora_t5(None, false);
    let enc0 = plain.encode(x.as_tensor(), mask, Ctx::eval()).unwrap();
    let logits0 = plain.forward_logits(&enc0, mask, &plain.shift_right(labels).unwrap()).unwrap();
    assert!(common::rel_err(&logits0, get(&fx, "logits").unwrap()).unwrap() > 1e-2);
}

#[test]
fn adapters_with_b_zero_leave_the_frozen_t5_exactly_as_it_was() {
    let io = load_io(&common::fixtures_dir().join("parity/tiny-s0/io/t5.safetensors")).unwrap();
    let mask = get(&io, "attention_mask").unwrap();
    let labels = get(&io, "labels").unwrap();
    let (plain, none) = lora_t5(None, false);
    assert!(none.is_empty());
    let all = LoraConfig {
        rank: 4,
        alpha: 7.0,
        dropout: 0.1,
        targets: vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O],
    };
    // Adapters as plain tensors: every op runs as in the plain T5, and the B = 0 branch adds
    // exactly 0. As trainable variables they make the activations after them carry gradients,
    // which switches candle from its fused softmax / norm kernels to the differentiable
    // compositions (see nn::ops): equal to rounding, and bit for bit wherever the plain T5's
    // activations carry gradients too (the encoder over soft prompts from the Q-Former).
    let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let run = |m: &T5Model, tracked: bool| {
        let x = get(&io, "inputs_embeds").unwrap();
        let x = if tracked {
            Var::from_tensor(x).unwrap().as_tensor().clone()
        } else {
            x.clone()
        };
        let enc = m.encode(&x, mask, Ctx::eval()).unwrap();
        let logits = m.forward_logits(&enc, mask, &m.shift_right(labels).unwrap()).unwrap();
        let loss = m.loss(&enc, mask, labels, Ctx::eval()).unwrap().reshape(1).unwrap();
        let gen = m
            .generate(
                &enc,
                mask,
                &GenerateConfig {
                    num_beams: 3,
                    ..Default::default()
                },
            )
            .unwrap();
        (enc, logits, loss, gen)
    };
    for cfg in [LoraConfig::default(), all] {
        let (m, vars) = lora_t5_with(Some(&cfg), false, false);
        assert!(vars.is_empty());
        let (want, got) = (run(&plain, false), run(&m, false));
        assert!(f(&want.0) == f(&got.0), "encoder output differs");
        assert!(f(&want.1) == f(&got.1), "logits differ");
        assert!(f(&want.2) == f(&got.2), "loss differs");
        assert_eq!(want.3, got.3, "generated ids differ");

        let (m, vars) = lora_t5(Some(&cfg), false);
        assert_eq!(
            vars.len(),
            2 * cfg.targets.len() * (m.cfg.num_layers + 2 * m.cfg.num_decoder_layers)
        );
        let (want, got) = (run(&plain, true), run(&m, true));
        assert!(f(&want.0) == f(&got.0), "trainable adapters: encoder output differs");
        assert_close("trainable adapters: logits", &got.1, &want.1, 1e-6);
        assert_close("trainable adapters: loss", &got.2, &want.2, 1e-6);
        assert_eq!(want.3, got.3, "trainable adapters: generated ids differ");
    }
}

#[test]
fn bad_lora_settings_are_refused_by_name() {
    let ok = LoraConfig::default();
    ok.validate().unwrap();
    for (cfg, needle) in [
        (LoraConfig { rank: 0, ..ok.clone() }, "rank = 0"),
        (LoraConfig { alpha: 0.0, ..ok.clone() }, "alpha = 0"),
        (
            LoraConfig {
                alpha: f64::NAN,
                ..ok.clone()
            },
            "alpha = NaN",
        ),
        (
            LoraConfig {
                dropout: 1.0,
                ..ok.clone()
            },
            "dropout = 1",
        ),
        (
            LoraConfig {
                dropout: -0.1,
                ..ok.clone()
            },
            "dropout = -0.1",
        ),
        (
            LoraConfig {
                targets: vec![],
                ..ok.clone()
            },
            "targets",
        ),
        (
            LoraConfig {
                targets: vec![LoraTarget::V, LoraTarget::V],
                ..ok.clone()
            },
            "names v twice",
        ),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should name {needle:?}");
    }
}
