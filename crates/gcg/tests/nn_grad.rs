//! Every `nn` building block's backward pass against central finite differences (f64).

use candle_core::{DType, Device, Tensor, Var};
use gcg::nn::attention::{causal_bias, padding_bias, scaled_dot_product_attention, MultiHeadAttention, ProjNames};
use gcg::nn::{self, Activation, Ctx, Dropout, Embedding, LayerNorm, Linear, RmsNorm};
use gcg::weights::Loader;
use gcg::SeededRng;
use std::cell::RefCell;

mod common;
use common::randn;

/// Compare d(sum(f(x) * R))/dx from autograd with central differences, for every input in `xs`.
fn check_grads(name: &str, xs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let vt: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&vt);
    let r = randn(out.dims(), 999, 1.0);
    let loss = (&out * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let scalar = |inputs: &[Tensor]| -> f64 { (f(inputs) * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() };
    for (i, var) in vars.iter().enumerate() {
        let g = grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient for input {i}"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = xs[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        let mut max_err = 0f64;
        let mut max_ref = 0f64;
        // All coordinates for small tensors, a strided sample for larger ones.
        let step = (base.len() / 64).max(1);
        for j in (0..base.len()).step_by(step) {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let xj = Tensor::from_vec(v, xs[i].dims(), &Device::Cpu).unwrap();
                let mut inputs: Vec<Tensor> = xs.to_vec();
                inputs[i] = xj;
                scalar(&inputs)
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            max_err = max_err.max((fd - g[j]).abs());
            max_ref = max_ref.max(fd.abs());
        }
        let rel = max_err / max_ref.max(1e-8);
        eprintln!("{name} input {i}: max |autograd - fd| = {max_err:.2e} (rel {rel:.2e})");
        assert!(rel < 1e-5, "{name} input {i}: relative gradient error {rel:.2e}");
    }
}

#[test]
fn linear_grad() {
    check_grads(
        "linear",
        &[randn(&[2, 3, 5], 1, 1.0), randn(&[4, 5], 2, 0.5), randn(&[4], 3, 0.5)],
        &|t| Linear::new(t[1].clone(), Some(t[2].clone())).forward(&t[0]).unwrap(),
    );
}

#[test]
fn lora_projection_grad() {
    // A frozen weight (the FrozenMatmul path) with a LoRA branch whose dropout acts (training,
    // the same mask at every evaluation): the gradients of x, A and B.
    let w = randn(&[4, 5], 80, 0.5);
    check_grads(
        "lora",
        &[randn(&[2, 3, 5], 81, 1.0), randn(&[3, 5], 82, 0.5), randn(&[4, 3], 83, 0.5)],
        &|t| {
            let lin = Linear::new(w.clone(), None).with_lora(nn::LoraAdapter::new(t[1].clone(), t[2].clone(), 1.7, 0.3));
            let rng = RefCell::new(SeededRng::new(84));
            lin.project(&t[0], Ctx::train(&rng)).unwrap()
        },
    );
}

#[test]
fn layer_norm_grad() {
    check_grads(
        "layer_norm",
        &[randn(&[3, 4, 8], 4, 2.0), randn(&[8], 5, 1.0), randn(&[8], 6, 1.0)],
        &|t| {
            LayerNorm {
                weight: t[1].clone(),
                bias: t[2].clone(),
                eps: 1e-5,
            }
            .forward(&t[0])
            .unwrap()
        },
    );
}

#[test]
fn rms_norm_grad() {
    check_grads("rms_norm", &[randn(&[3, 4, 8], 7, 2.0), randn(&[8], 8, 1.0)], &|t| {
        RmsNorm {
            weight: t[1].clone(),
            eps: 1e-6,
        }
        .forward(&t[0])
        .unwrap()
    });
}

#[test]
fn softmax_and_log_softmax_grad() {
    check_grads("softmax", &[randn(&[3, 7], 9, 3.0)], &|t| nn::softmax_last_dim(&t[0]).unwrap());
    check_grads("log_softmax", &[randn(&[3, 7], 10, 3.0)], &|t| {
        nn::log_softmax_last_dim(&t[0]).unwrap()
    });
}

#[test]
fn activations_grad() {
    for (i, act) in [Activation::Gelu, Activation::GeluTanh, Activation::QuickGelu]
        .into_iter()
        .enumerate()
    {
        check_grads(&format!("{act:?}"), &[randn(&[5, 6], 11 + i as u64, 2.0)], &|t| {
            act.forward(&t[0]).unwrap()
        });
    }
}

#[test]
fn attention_with_masks_and_bias_grad() {
    let dev = Device::Cpu;
    // [B=2, H=2, L=4, D=3]; padding on the last key of batch 1, causal, plus a free additive bias.
    let mask = Tensor::new(&[[1f64, 1., 1., 1.], [1., 1., 1., 0.]], &dev).unwrap();
    let pad = padding_bias(&mask, DType::F64).unwrap();
    let causal = causal_bias(4, 4, 0, DType::F64, &dev).unwrap();
    let xs = [
        randn(&[2, 2, 4, 3], 20, 1.0),
        randn(&[2, 2, 4, 3], 21, 1.0),
        randn(&[2, 2, 4, 3], 22, 1.0),
        randn(&[1, 2, 4, 4], 23, 1.0),
    ];
    check_grads("sdpa", &xs, &|t| {
        let bias = t[3].broadcast_add(&pad).unwrap().broadcast_add(&causal).unwrap();
        scaled_dot_product_attention(&t[0], &t[1], &t[2], Some(0.5), Some(&bias), None).unwrap()
    });
}

#[test]
fn causal_and_padding_masks_hide_keys() {
    let dev = Device::Cpu;
    let q = randn(&[1, 1, 3, 2], 30, 1.0);
    let k = randn(&[1, 1, 3, 2], 31, 1.0);
    // v = identity rows so the output equals the attention weights.
    let v = Tensor::eye(3, DType::F64, &dev).unwrap().reshape((1, 1, 3, 3)).unwrap();
    let causal = causal_bias(3, 3, 0, DType::F64, &dev).unwrap();
    let w = scaled_dot_product_attention(&q, &k, &v, None, Some(&causal), None).unwrap();
    let w = w.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f64>().unwrap();
    assert!((w[0][0] - 1.0).abs() < 1e-12 && w[0][1] == 0.0 && w[0][2] == 0.0, "{w:?}");
    assert!(w[1][2] == 0.0 && (w[1][0] + w[1][1] - 1.0).abs() < 1e-12, "{w:?}");
    let mask = Tensor::new(&[[1f64, 0., 1.]], &dev).unwrap();
    let pad = padding_bias(&mask, DType::F64).unwrap();
    let w = scaled_dot_product_attention(&q, &k, &v, None, Some(&pad), None).unwrap();
    let w = w.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for row in 0..3 {
        assert_eq!(w[row * 3 + 1], 0.0, "padded key got weight: {w:?}");
    }
    // A KV-cache style offset: query at position 2 of 3 sees all keys.
    let c = causal_bias(1, 3, 2, DType::F64, &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(c, vec![0.0, 0.0, 0.0]);
}

#[test]
fn multi_head_attention_grad() {
    let dev = Device::Cpu;
    let lb = Loader::random(&dev, DType::F64, 5);
    let mha = MultiHeadAttention::load(
        &lb,
        ProjNames {
            q: "q",
            k: "k",
            v: "v",
            o: "o",
        },
        6,
        4,
        6,
        2,
        true,
        true,
        0.0,
    )
    .unwrap();
    let xs = [
        randn(&[2, 3, 6], 40, 1.0),
        randn(&[2, 5, 4], 41, 1.0),
        mha.q.weight.clone(),
        mha.k.weight.clone(),
    ];
    check_grads("mha", &xs, &|t| {
        let mut m = mha.clone();
        m.q.weight = t[2].clone();
        m.k.weight = t[3].clone();
        m.forward(&t[0], &t[1], None, Ctx::eval()).unwrap()
    });
}

#[test]
fn embedding_grad_and_range_error() {
    let ids = Tensor::new(&[[0u32, 2, 2], [3, 1, 0]], &Device::Cpu).unwrap();
    check_grads("embedding", &[randn(&[4, 5], 50, 1.0)], &|t| {
        Embedding::new(t[0].clone()).forward(&ids).unwrap()
    });
    let bad = Tensor::new(&[[4u32]], &Device::Cpu).unwrap();
    let err = Embedding::new(randn(&[4, 5], 51, 1.0)).forward(&bad).unwrap_err().to_string();
    assert!(err.contains("id 4") && err.contains("4 rows"), "{err}");
}

#[test]
fn cross_entropy_grad_and_value() {
    let targets = Tensor::new(&[2i64, -100, 0, 4], &Device::Cpu).unwrap();
    check_grads("cross_entropy", &[randn(&[4, 5], 60, 2.0)], &|t| {
        nn::cross_entropy(&t[0], &targets, -100).unwrap()
    });
    // Value against a direct computation: mean of -log softmax at the kept targets.
    let logits = randn(&[4, 5], 61, 2.0);
    let l = nn::cross_entropy(&logits, &targets, -100).unwrap().to_scalar::<f64>().unwrap();
    let rows = logits.to_vec2::<f64>().unwrap();
    let mut want = 0.0;
    for (row, t) in [(0usize, 2usize), (2, 0), (3, 4)] {
        let m = rows[row].iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + rows[row].iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        want += lse - rows[row][t];
    }
    want /= 3.0;
    assert!((l - want).abs() < 1e-12, "{l} vs {want}");
}

#[test]
fn dropout_is_seeded_and_scales() {
    let x = Tensor::ones((1000,), DType::F64, &Device::Cpu).unwrap();
    let rng = RefCell::new(SeededRng::new(3));
    let y = Dropout::new(0.25).forward(&x, Ctx::train(&rng)).unwrap().to_vec1::<f64>().unwrap();
    let kept = y.iter().filter(|&&v| v != 0.0).count();
    assert!((650..850).contains(&kept), "kept {kept}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-12));
    let rng2 = RefCell::new(SeededRng::new(3));
    let y2 = Dropout::new(0.25).forward(&x, Ctx::train(&rng2)).unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(y, y2);
    let e = Dropout::new(0.25).forward(&x, Ctx::eval()).unwrap().to_vec1::<f64>().unwrap();
    assert!(e.iter().all(|&v| v == 1.0));
    // Gradient through a fixed mask: re-seeding the generator makes each evaluation use one mask.
    check_grads("dropout", &[randn(&[6, 7], 70, 1.0)], &|t| {
        let r = RefCell::new(SeededRng::new(11));
        Dropout::new(0.3).forward(&t[0], Ctx::train(&r)).unwrap()
    });
}

#[test]
fn fused_and_composed_paths_agree_in_f32() {
    // Frozen inference takes candle's fused kernels; training composes primitives. Same numbers.
    let x = randn(&[3, 5, 16], 80, 3.0).to_dtype(DType::F32).unwrap();
    let w = randn(&[16], 81, 1.0).to_dtype(DType::F32).unwrap();
    let b = randn(&[16], 82, 1.0).to_dtype(DType::F32).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let ln = LayerNorm {
        weight: w.clone(),
        bias: b,
        eps: 1e-6,
    };
    let d = (ln.forward(&x).unwrap() - ln.forward(xv.as_tensor()).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    let rms = RmsNorm { weight: w, eps: 1e-6 };
    let d = (rms.forward(&x).unwrap() - rms.forward(xv.as_tensor()).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    let d = (nn::softmax_last_dim(&x).unwrap() - nn::softmax_last_dim(xv.as_tensor()).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
}
