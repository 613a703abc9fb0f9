//! The Q-Former (models/qformer.rs): the GCG release's LAVIS names map onto the HF names one to
//! one; loading uses exactly the HF names; the HF config is read; gradients match finite
//! differences; padding, dropout and shape errors behave.

use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_core::{Device, Var};
use gcg::models::qformer::*;
use gcg::nn::Ctx;
use gcg::rng::SeededRng;
use gcg::weights::layouts::gcg_qformer_name;
use gcg::weights::Loader;
use gcg::weights::{MapSource, TensorMeta, TensorSource};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

fn names_fixture(file: &str) -> BTreeMap<String, Vec<usize>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/qformer")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, shape) = l.split_once(' ').unwrap_or_else(|| panic!("bad line {l:?} in {file}"));
            (name.to_string(), shape.split(',').map(|d| d.parse().expect("dimension")).collect())
        })
        .collect()
}

/// Every name of the LAVIS state dict (written by GCG's own `models/Qformer.py`, see
/// `tools/fixtures/qformer_names.py`) maps onto the HF name with the same shape, one to one.
fn check_lavis_mapping(preset: &str) {
    let lavis = names_fixture(&format!("lavis_names_{preset}.txt"));
    let hf = names_fixture(&format!("hf_names_{preset}.txt"));
    let mut mapped = BTreeMap::new();
    let mut dropped = Vec::new();
    for (name, shape) in &lavis {
        match gcg_qformer_name(name) {
            None => dropped.push(name.clone()),
            Some(m) => assert!(mapped.insert(m.clone(), shape.clone()).is_none(), "two LAVIS names map to {m}"),
        }
    }
    assert_eq!(dropped, vec!["bert.embeddings.position_ids".to_string()]);
    let only_lavis: Vec<_> = mapped.iter().filter(|(k, v)| hf.get(*k) != Some(*v)).collect();
    let only_hf: Vec<_> = hf.iter().filter(|(k, v)| mapped.get(*k) != Some(*v)).collect();
    assert!(
        only_lavis.is_empty() && only_hf.is_empty(),
        "{preset}: mapped LAVIS names without an HF twin {only_lavis:?}; HF names without a LAVIS twin {only_hf:?}"
    );
    assert_eq!(mapped.len(), hf.len());
}

#[test]
fn lavis_names_map_onto_hf_names_tiny() {
    check_lavis_mapping("tiny");
}

#[test]
fn lavis_names_map_onto_hf_names_instructblip() {
    check_lavis_mapping("instructblip");
}

#[test]
fn unknown_lavis_names_pass_through() {
    assert_eq!(gcg_qformer_name("cls.predictions.bias").as_deref(), Some("cls.predictions.bias"));
    assert_eq!(
        gcg_qformer_name("bert.encoder.layer.3.crossattention.self.value.bias").as_deref(),
        Some("qformer.encoder.layer.3.crossattention.attention.value.bias")
    );
}

/// Serves zeros of the listed shapes without allocating (a broadcast scalar), so the full
/// BERT-base Q-Former can be "loaded" in a test.
struct ShapeSource(BTreeMap<String, Vec<usize>>);

impl TensorSource for ShapeSource {
    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.0.get(name).map(|s| TensorMeta {
            shape: s.clone(),
            dtype: DType::F32,
        })
    }
    fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let shape = self.0.get(name).ok_or_else(|| anyhow::anyhow!("no {name}"))?;
        Ok(Tensor::zeros((), DType::F32, dev)?.broadcast_as(shape.as_slice())?)
    }
    fn origin(&self, name: &str) -> String {
        format!("'{name}' in the name list")
    }
    fn describe(&self) -> String {
        "the name list".into()
    }
}

/// The model asks for exactly the names and shapes transformers writes (and accepts the
/// `position_ids` buffer of the published checkpoint).
fn check_load_names(preset: &str, cfg: &QFormerConfig) {
    let mut names = names_fixture(&format!("hf_names_{preset}.txt"));
    names.insert("qformer.embeddings.position_ids".into(), vec![1, cfg.max_position_embeddings]);
    let lb = Loader::from_source(Arc::new(ShapeSource(names)), &Device::Cpu, DType::F32);
    let qf = QFormer::load(&lb.pp("qformer"), cfg).expect("load");
    lb.finish().expect("every checkpoint tensor is used");
    assert_eq!(
        qf.layers.iter().filter(|l| l.crossattention.is_some()).count(),
        cfg.num_hidden_layers.div_ceil(2)
    );
}

#[test]
fn load_uses_exactly_the_hf_names_tiny() {
    check_load_names("tiny", &QFormerConfig::tiny());
}

#[test]
fn load_uses_exactly_the_hf_names_instructblip() {
    check_load_names("instructblip", &QFormerConfig::instructblip());
}

#[test]
fn load_accepts_the_old_layernorm_spelling() {
    let mut names = names_fixture("hf_names_tiny.txt");
    for suffix in ["weight", "bias"] {
        let shape = names.remove(&format!("qformer.embeddings.layernorm.{suffix}")).expect("layernorm");
        names.insert(format!("qformer.embeddings.LayerNorm.{suffix}"), shape);
    }
    let lb = Loader::from_source(Arc::new(ShapeSource(names)), &Device::Cpu, DType::F32);
    QFormer::load(&lb.pp("qformer"), &QFormerConfig::tiny()).expect("load");
    lb.finish().expect("all used");
}

#[test]
fn config_from_hf_json() {
    // transformers writes only the values that differ from the defaults.
    let published = serde_json::json!({"model_type": "instructblip_qformer", "vocab_size": 30523});
    assert_eq!(
        QFormerConfig::from_hf_config(&published, 32).unwrap(),
        QFormerConfig::instructblip()
    );
    let tiny = serde_json::json!({
        "vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 64, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
        "cross_attention_frequency": 2, "encoder_hidden_size": 48, "model_type": "instructblip_qformer"
    });
    assert_eq!(QFormerConfig::from_hf_config(&tiny, 8).unwrap(), QFormerConfig::tiny());
    let bad = serde_json::json!({"hidden_act": "swish"});
    assert!(format!("{:#}", QFormerConfig::from_hf_config(&bad, 32).unwrap_err()).contains("hidden_act"));
    let bad = serde_json::json!({"hidden_size": "768"});
    assert!(format!("{:#}", QFormerConfig::from_hf_config(&bad, 32).unwrap_err()).contains("hidden_size"));
    let bad = serde_json::json!({"hidden_size": 100});
    assert!(QFormerConfig::from_hf_config(&bad, 32).is_err());
    let s = serde_json::to_string(&QFormerConfig::tiny()).unwrap();
    assert_eq!(serde_json::from_str::<QFormerConfig>(&s).unwrap(), QFormerConfig::tiny());
}

// ---- gradients against finite differences (f64, independent of torch) ----

fn randn(rng: &mut SeededRng, shape: &[usize], std: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.normal_vec(n, 0.0, std), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// A random f64 checkpoint for `cfg` with every tensor non-trivial (LayerNorm weights near 1).
fn random_checkpoint(cfg: &QFormerConfig, seed: u64) -> MapSource {
    let lb = Loader::random(&Device::Cpu, DType::F32, seed).with_trainable(|_| true);
    QFormer::load(&lb, cfg).unwrap();
    let mut rng = SeededRng::new(seed + 1);
    let mut map = MapSource::default();
    for (name, var) in lb.vars().iter() {
        let t = randn(&mut rng, var.dims(), 0.2);
        let t = if name.contains("ayer") && name.ends_with("weight") && var.rank() == 1 {
            (t + 1.0).unwrap()
        } else {
            t
        };
        map.insert(name.clone(), t);
    }
    map
}

struct Inputs {
    query_tokens: Tensor,
    input_ids: Tensor,
    mask: Tensor,
    image: Tensor,
    r: Tensor,
}

fn inputs(cfg: &QFormerConfig, seed: u64) -> Inputs {
    let mut rng = SeededRng::new(seed);
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..10).map(|_| 1 + rng.below(cfg.vocab_size - 1) as u32).collect();
    let mut ids = ids;
    ids[8] = 0;
    ids[9] = 0; // second row: 3 tokens, 2 padding
    Inputs {
        query_tokens: randn(&mut rng, &[1, cfg.num_query_tokens, cfg.hidden_size], 1.0),
        input_ids: Tensor::from_vec(ids, (2, 5), &dev).unwrap(),
        mask: Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 1, 1, 0, 0], (2, 5), &dev).unwrap(),
        image: randn(&mut rng, &[2, 6, cfg.encoder_hidden_size], 1.0),
        r: randn(&mut rng, &[2, cfg.num_query_tokens, cfg.hidden_size], 1.0),
    }
}

fn loss(qf: &QFormer, qt: &Tensor, image: &Tensor, x: &Inputs) -> Tensor {
    let out = qf.forward(qt, Some(&x.input_ids), Some(&x.mask), image, None, Ctx::eval()).unwrap();
    (out.query_output * &x.r).unwrap().sum_all().unwrap()
}

fn param_mut<'a>(qf: &'a mut QFormer, name: &str) -> &'a mut Tensor {
    match name {
        "embeddings.layernorm.weight" => &mut qf.embeddings.layernorm.weight,
        "embeddings.word_embeddings.weight" => &mut qf.embeddings.word_embeddings.weight,
        "embeddings.position_embeddings.weight" => &mut qf.embeddings.position_embeddings.weight,
        "encoder.layer.0.crossattention.attention.key.weight" => {
            &mut qf.layers[0].crossattention.as_mut().expect("cross layer").attention.k.weight
        }
        "encoder.layer.0.intermediate.dense.weight" => &mut qf.layers[0].feed_forward.intermediate.weight,
        "encoder.layer.1.output_query.dense.weight" => &mut qf.layers[1].feed_forward_query.output.weight,
        "encoder.layer.2.attention.output.LayerNorm.bias" => &mut qf.layers[2].attention.layernorm.bias,
        other => panic!("no accessor for {other}"),
    }
}

fn perturb(t: &Tensor, index: usize, delta: f64) -> Tensor {
    let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    v[index] += delta;
    Tensor::from_vec(v, t.dims(), t.device()).unwrap()
}

fn assert_fd(what: &str, analytic: &Tensor, indices: &[usize], f: impl Fn(usize, f64) -> f64) {
    let a = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(scale > 1e-6, "{what}: analytic gradient is zero");
    let h = 1e-5;
    for &i in indices {
        let fd = (f(i, h) - f(i, -h)) / (2.0 * h);
        let err = (fd - a[i]).abs() / scale;
        assert!(
            err < 1e-6,
            "{what}[{i}]: finite difference {fd:.9e} vs analytic {:.9e} (rel {err:.2e})",
            a[i]
        );
    }
}

#[test]
fn gradients_match_finite_differences_f64() {
    let cfg = QFormerConfig::tiny();
    let ck = random_checkpoint(&cfg, 7);
    let x = inputs(&cfg, 11);
    let build = |ck: &MapSource| QFormer::load(&Loader::from_source(Arc::new(ck.clone()), &Device::Cpu, DType::F64), &cfg).unwrap();
    let params = [
        "embeddings.layernorm.weight",
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "encoder.layer.0.crossattention.attention.key.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.1.output_query.dense.weight",
        "encoder.layer.2.attention.output.LayerNorm.bias",
    ];
    let mut qf = build(&ck);
    let mut vars = Vec::new();
    for p in params {
        let v = Var::from_tensor(param_mut(&mut qf, p)).unwrap();
        *param_mut(&mut qf, p) = v.as_tensor().clone();
        vars.push(v);
    }
    let qt = Var::from_tensor(&x.query_tokens).unwrap();
    let image = Var::from_tensor(&x.image).unwrap();
    let grads = loss(&qf, qt.as_tensor(), image.as_tensor(), &x).backward().unwrap();

    let g_qt = grads.get(qt.as_tensor()).expect("query_tokens gradient");
    assert_fd("query_tokens", g_qt, &[0, 5, 37, 100, 255], |i, d| {
        loss(&qf, &perturb(&x.query_tokens, i, d), &x.image, &x).to_scalar::<f64>().unwrap()
    });
    let g_img = grads.get(image.as_tensor()).expect("image gradient");
    assert_fd("image_embeds", g_img, &[0, 49, 300, 575], |i, d| {
        loss(&qf, &x.query_tokens, &perturb(&x.image, i, d), &x).to_scalar::<f64>().unwrap()
    });
    let ids = x.input_ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    for (p, v) in params.iter().zip(&vars) {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {p}"));
        let dims = g.dims().to_vec();
        let n = g.elem_count();
        // Elements that matter: for the embedding tables, the rows of the tokens / positions used.
        let idx: Vec<usize> = match *p {
            "embeddings.word_embeddings.weight" => vec![ids[0] as usize * dims[1] + 3, ids[6] as usize * dims[1] + 17],
            "embeddings.position_embeddings.weight" => vec![2 * dims[1] + 1, 4 * dims[1] + 30],
            _ => vec![0, n / 3, n - 1],
        };
        let base = ck.clone();
        let stored = base.load(p, &Device::Cpu).unwrap();
        assert_fd(p, g, &idx, |i, d| {
            let mut ck2 = base.clone();
            ck2.insert(*p, perturb(&stored, i, d));
            loss(&build(&ck2), &x.query_tokens, &x.image, &x).to_scalar::<f64>().unwrap()
        });
    }
}

#[test]
fn padding_is_invisible_to_the_queries() {
    let cfg = QFormerConfig::tiny();
    let qf = QFormer::load(
        &Loader::from_source(Arc::new(random_checkpoint(&cfg, 3)), &Device::Cpu, DType::F64),
        &cfg,
    )
    .unwrap();
    let x = inputs(&cfg, 5);
    let run = |ids: &Tensor| {
        qf.forward(&x.query_tokens, Some(ids), Some(&x.mask), &x.image, None, Ctx::eval())
            .unwrap()
            .query_output
    };
    let a = run(&x.input_ids);
    // Change the ids at the two padded positions of row 1.
    let mut ids = x.input_ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    ids[8] = 17;
    ids[9] = 42;
    let b = run(&Tensor::from_vec(ids.clone(), (2, 5), &Device::Cpu).unwrap());
    let diff = (a.clone() - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff < 1e-12, "padded ids changed the query output by {diff}");
    // A visible token does change it (the check above can fail).
    ids[7] = 1 + (ids[7] % 100);
    let c = run(&Tensor::from_vec(ids, (2, 5), &Device::Cpu).unwrap());
    let diff = (a - c).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(diff > 1e-6, "a visible token did not change the query output");
}

#[test]
fn dropout_only_in_training_and_seeded() {
    let cfg = QFormerConfig::tiny();
    let qf = QFormer::load(&Loader::random(&Device::Cpu, DType::F32, 1), &cfg).unwrap();
    let x = inputs(&cfg, 2);
    let qt = x.query_tokens.to_dtype(DType::F32).unwrap();
    let img = x.image.to_dtype(DType::F32).unwrap();
    let run = |ctx: Ctx| {
        qf.forward(&qt, Some(&x.input_ids), Some(&x.mask), &img, None, ctx)
            .unwrap()
            .query_output
    };
    let max_diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let e1 = run(Ctx::eval());
    assert_eq!(max_diff(&e1, &run(Ctx::eval())), 0.0);
    let r1 = std::cell::RefCell::new(SeededRng::new(9));
    let r2 = std::cell::RefCell::new(SeededRng::new(9));
    let t1 = run(Ctx::train(&r1));
    assert_eq!(max_diff(&t1, &run(Ctx::train(&r2))), 0.0, "same seed, same masks");
    assert!(max_diff(&t1, &e1) > 1e-3, "dropout had no effect in training");
    assert!(max_diff(&t1, &run(Ctx::train(&r1))) > 1e-3, "successive masks are equal");
}

#[test]
fn shape_errors_are_reported() {
    let cfg = QFormerConfig::tiny();
    let qf = QFormer::load(&Loader::random(&Device::Cpu, DType::F32, 1), &cfg).unwrap();
    let dev = Device::Cpu;
    let qt = Tensor::zeros((1, 8, 32), DType::F32, &dev).unwrap();
    let img = Tensor::zeros((2, 6, 48), DType::F32, &dev).unwrap();
    let err = |r: Result<QFormerOutput>| format!("{:#}", r.unwrap_err());
    let wide = Tensor::zeros((2, 6, 40), DType::F32, &dev).unwrap();
    assert!(err(qf.forward(&qt, None, None, &wide, None, Ctx::eval())).contains("encoder_hidden_size is 48"));
    let ids = Tensor::zeros((3, 4), DType::U32, &dev).unwrap();
    assert!(err(qf.forward(&qt, Some(&ids), None, &img, None, Ctx::eval())).contains("batch 3"));
    let long = Tensor::zeros((2, 65), DType::U32, &dev).unwrap();
    assert!(err(qf.forward(&qt, Some(&long), None, &img, None, Ctx::eval())).contains("max_position_embeddings"));
    let ids = Tensor::zeros((2, 4), DType::U32, &dev).unwrap();
    let mask = Tensor::ones((2, 5), DType::U32, &dev).unwrap();
    assert!(err(qf.forward(&qt, Some(&ids), Some(&mask), &img, None, Ctx::eval())).contains("attention_mask"));
    let big = Tensor::full(120u32, (2, 4), &dev).unwrap();
    assert!(err(qf.forward(&qt, Some(&big), None, &img, None, Ctx::eval())).contains("id 120"));
    let q3 = Tensor::zeros((3, 8, 32), DType::F32, &dev).unwrap();
    assert!(err(qf.forward(&q3, None, None, &img, None, Ctx::eval())).contains("query_tokens"));
    let out = qf.forward(&qt, None, None, &img, None, Ctx::eval()).unwrap();
    assert_eq!(out.query_output.dims(), [2, 8, 32]);
    assert_eq!(out.last_hidden_state.dims(), [2, 8, 32]);
}
