//! Finite-difference gradient checks (f64) of the Gaussian generator, the Gaussian mixture, L_reg,
//! L_con, and of the whole grounding objective with the perturbation noise fixed (where the soft
//! selections are locally constant in p, so finite differences see L_reg + L_con through the
//! generator and the frames, and autograd must agree with the selections detached).

use candle_core::{DType, Device, Tensor, Var};
use gcg::grounding::{
    contrastive_loss, gaussian_mixture, perturbed_topk, regression_loss, ContrastiveInputs, Grounding, GroundingConfig, Noise, TopkGradient,
};
use gcg::nn::Ctx;
use gcg::weights::Loader;
use gcg::SeededRng;

mod common;
use common::{randn, randn_mean};

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// An f64 grounding module with every parameter random (LayerNorm weights near 1).
fn random_grounding(cfg: &GroundingConfig, seed: u64) -> Grounding {
    let lb = Loader::random(&Device::Cpu, DType::F64, seed);
    let mut g = Grounding::load(&lb.pp("grounding"), cfg).unwrap();
    for (i, (name, p)) in g.params_mut().into_iter().enumerate() {
        let dims = p.dims().to_vec();
        let fan_in = *dims.last().unwrap() as f64;
        *p = if name.contains("layer_norm") {
            randn_mean(&dims, 100 + i as u64, 0.1, if name.ends_with("weight") { 1.0 } else { 0.0 })
        } else if dims.len() == 1 {
            randn(&dims, 100 + i as u64, 0.1)
        } else if name.contains("position") || name.contains("modality") {
            randn(&dims, 100 + i as u64, 0.5)
        } else {
            randn(&dims, 100 + i as u64, 1.0 / fan_in.sqrt())
        };
    }
    g
}

type Objective<'a> = &'a dyn Fn(&Grounding, &[Tensor]) -> Tensor;

/// Autograd vs central differences for every parameter (a strided sample of coordinates) and every
/// input of `f`, a scalar function of the module and the inputs.
fn check(name: &str, model: &Grounding, inputs: &[Tensor], f: Objective, tol: f64) {
    let mut m = model.clone();
    let mut pvars = Vec::new();
    for (_, p) in m.params_mut() {
        let v = Var::from_tensor(p).unwrap();
        *p = v.as_tensor().clone();
        pvars.push(v);
    }
    let ivars: Vec<Var> = inputs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let it: Vec<Tensor> = ivars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&m, &it).backward().unwrap();
    let names: Vec<String> = model.clone().params_mut().into_iter().map(|(n, _)| n).collect();
    let h = 1e-6;
    let mut worst = (0f64, String::new());
    let mut fd_check = |label: String, analytic: Option<&Tensor>, base: &Tensor, eval: &dyn Fn(Tensor) -> f64| {
        let flat = base.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let g = analytic
            .map(|g| g.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .unwrap_or_else(|| vec![0.0; flat.len()]);
        let (mut max_err, mut max_ref) = (0f64, 0f64);
        for j in (0..flat.len()).step_by((flat.len() / 12).max(1)) {
            let at = |delta: f64| {
                let mut v = flat.clone();
                v[j] += delta;
                eval(Tensor::from_vec(v, base.dims(), &Device::Cpu).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            max_err = max_err.max((fd - g[j]).abs());
            max_ref = max_ref.max(fd.abs()).max(g[j].abs());
        }
        // Absolute floor 1e-3: tensors whose gradient is exactly zero (the key bias, the pooling
        // score bias: softmax shift invariance) hold only rounding noise (~1e-9) on both sides.
        let rel = max_err / max_ref.max(1e-3);
        if rel > worst.0 {
            worst = (rel, label.clone());
        }
        assert!(
            rel < tol,
            "{name}: {label}: relative gradient error {rel:.2e} (max |fd - autograd| {max_err:.2e})"
        );
    };
    for (i, pname) in names.iter().enumerate() {
        let base = model.clone().params_mut()[i].1.clone();
        fd_check(format!("param {pname}"), grads.get(pvars[i].as_tensor()), &base, &|t| {
            let mut mm = model.clone();
            *mm.params_mut()[i].1 = t;
            scalar(&f(&mm, inputs))
        });
    }
    for (i, x) in inputs.iter().enumerate() {
        fd_check(format!("input {i}"), grads.get(ivars[i].as_tensor()), x, &|t| {
            let mut xs = inputs.to_vec();
            xs[i] = t;
            scalar(&f(model, &xs))
        });
    }
    eprintln!("{name}: worst relative error {:.2e} ({})", worst.0, worst.1);
}

fn cfg() -> GroundingConfig {
    GroundingConfig {
        dim: 16,
        heads: 2,
        frames: 6,
        moments: 3,
        ..GroundingConfig::tiny()
    }
}

#[test]
fn gaussian_mixture_gradient() {
    let mu = Var::from_tensor(&Tensor::new(&[[0.21f64, 0.47, 0.83], [0.1, 0.5, 0.58]], &Device::Cpu).unwrap()).unwrap();
    let r = randn(&[2, 9], 3, 1.0);
    let f = |m: &Tensor| (gaussian_mixture(m, 9, 0.2).unwrap() * &r).unwrap().sum_all().unwrap();
    let g = f(mu.as_tensor())
        .backward()
        .unwrap()
        .get(mu.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = mu.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for j in 0..base.len() {
        let at = |d: f64| {
            let mut v = base.clone();
            v[j] += d;
            scalar(&f(&Tensor::from_vec(v, (2, 3), &Device::Cpu).unwrap()))
        };
        let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
        assert!(
            (fd - g[j]).abs() < 1e-6 * (1.0 + fd.abs()),
            "centre {j}: fd {fd} vs autograd {}",
            g[j]
        );
    }
    // Tied maxima (centres equidistant from grid points): the gradient flows through one frame,
    // as torch.max(dim) does, so it equals the finite difference from the side that keeps it.
    let tied = Tensor::new(&[[0.2f64, 0.45, 0.8]], &Device::Cpu).unwrap();
    let raw = gcg::grounding::gaussians(&tied, 9, 0.2)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    assert_eq!(raw[0][2], raw[0][4], "the test needs a tie");
    let tv = Var::from_tensor(&tied).unwrap();
    let r0 = Tensor::new(&[[1f64, 0., 0., 0., 0., 0., 0., 0., 0.]], &Device::Cpu).unwrap();
    let gt = (gaussian_mixture(tv.as_tensor(), 9, 0.2).unwrap() * &r0)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gt = gt.get(tv.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    // p[0] = g(0)/g_max with g_max at frame 2 (the first argmax), which depends on centre 0 only:
    // nudging centre 0 up keeps frame 2 the maximum, so the one-sided difference is the derivative.
    let at = |d: f64| {
        let t = Tensor::new(&[[0.2f64 + d, 0.45, 0.8]], &Device::Cpu).unwrap();
        (gaussian_mixture(&t, 9, 0.2).unwrap() * &r0)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let fd = (at(1e-7) - at(0.0)) / 1e-7;
    assert!(
        (gt[0][0] - fd).abs() < 1e-5 * (1.0 + fd.abs()),
        "tied max: autograd {} vs one-sided fd {fd}",
        gt[0][0]
    );

    // The values: normalised to max 1, peaks at the centres' nearest grid points.
    let p = gaussian_mixture(mu.as_tensor(), 9, 0.2).unwrap().to_vec2::<f64>().unwrap();
    for row in &p {
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        assert!((max - 1.0).abs() < 1e-15 && row.iter().all(|&v| v > 0.0));
    }
    let s = 0.2 / 9.0;
    let g = |tau: f64, c: f64| (-(tau - c) * (tau - c) / (2.0 * s * s)).exp();
    let raw: Vec<f64> = (0..9)
        .map(|t| [0.21, 0.47, 0.83].iter().map(|&c| g(t as f64 / 8.0, c)).sum())
        .collect();
    let max = raw.iter().cloned().fold(f64::MIN, f64::max);
    for t in 0..9 {
        assert!(
            (p[0][t] - raw[t] / max).abs() < 1e-12,
            "p[0][{t}] = {} vs {}",
            p[0][t],
            raw[t] / max
        );
    }
}

#[test]
fn generator_gradient() {
    let c = cfg();
    let g = random_grounding(&c, 1);
    let frames = randn(&[2, 6, 16], 2, 1.0);
    let text = randn(&[2, 4, 16], 3, 1.0);
    let r_p = randn(&[2, 6], 4, 1.0);
    let r_mu = randn(&[2, 3], 5, 1.0);
    let f = |m: &Grounding, x: &[Tensor]| {
        let out = m.generate(&x[0], &x[1], Ctx::eval()).unwrap();
        let a = (out.frame_scores * &r_p).unwrap().sum_all().unwrap();
        let b = (out.gaussian_centres * &r_mu).unwrap().sum_all().unwrap();
        (a + b).unwrap()
    };
    check("generator", &g, &[frames, text], &f, 1e-5);
}

#[test]
fn regression_loss_gradient_and_value() {
    // Centres chosen away from the SmoothL1 kink (|c − target| = 1) and the hinge kink.
    let centres = Tensor::new(&[[0.05f64, 0.62, 0.4], [0.3, 0.35, 0.9]], &Device::Cpu).unwrap();
    let scores = Tensor::new(&[[0.1f64, 0.9, 0.2, 0.8, 0.3, 0.7], [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]], &Device::Cpu).unwrap();
    // targets: [1, 3, 5] and [0, 1, 2]; c = μ·5
    let c = [[0.25, 3.1, 2.0], [1.5, 1.75, 4.5]];
    let t = [[1.0, 3.0, 5.0], [0.0, 1.0, 2.0]];
    let sl1 = |x: f64| if x.abs() < 1.0 { 0.5 * x * x } else { x.abs() - 0.5 };
    let smooth: f64 = (0..2)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .map(|(i, j)| sl1(c[i][j] - t[i][j]))
        .sum::<f64>()
        / 6.0;
    let order: f64 = (0..2)
        .map(|i| (0..2).map(|j| (1.0 + c[i][j] - c[i][j + 1]).max(0.0)).sum::<f64>() / 2.0)
        .sum::<f64>()
        / 2.0;
    let l = regression_loss(&centres, &scores).unwrap();
    assert!(
        (scalar(&l.smooth_l1) - smooth).abs() < 1e-12,
        "{} vs {smooth}",
        scalar(&l.smooth_l1)
    );
    assert!((scalar(&l.ordering) - order).abs() < 1e-12, "{} vs {order}", scalar(&l.ordering));

    let v = Var::from_tensor(&centres).unwrap();
    let f = |x: &Tensor| regression_loss(x, &scores).unwrap().total().unwrap();
    let g = f(v.as_tensor())
        .backward()
        .unwrap()
        .get(v.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = centres.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for j in 0..base.len() {
        let at = |d: f64| {
            let mut b = base.clone();
            b[j] += d;
            scalar(&f(&Tensor::from_vec(b, (2, 3), &Device::Cpu).unwrap()))
        };
        let fd = (at(1e-7) - at(-1e-7)) / 2e-7;
        assert!((fd - g[j]).abs() < 1e-6, "centre {j}: fd {fd} vs autograd {}", g[j]);
    }
    // K = 1: no ordering term (the official code would divide 0 by 0).
    let one = regression_loss(&centres.narrow(1, 0, 1).unwrap(), &scores).unwrap();
    assert_eq!(scalar(&one.ordering), 0.0);
}

/// L_con as a function of the projection head's parameters and its inputs (selections are inputs).
fn contrastive_case(name: &str, b: usize, options: usize, seed: u64) {
    let c = cfg();
    let g = random_grounding(&c, seed);
    let (t, k, d) = (c.frames, c.moments, c.dim);
    let answer_ids: Vec<usize> = (0..b).map(|i| (i * 2 + 1) % options.max(1)).collect();
    let mut inputs = vec![
        randn(&[b, t, d], seed + 1, 1.0),
        randn(&[b, d], seed + 2, 1.0),
        randn_mean(&[b, k, t], seed + 3, 0.5, 0.2),
        randn_mean(&[b, t - k, t], seed + 4, 0.5, 0.2),
    ];
    if options > 0 {
        inputs.push(randn(&[b, options, d], seed + 5, 1.0));
    }
    let f = |m: &Grounding, x: &[Tensor]| {
        contrastive_loss(
            &m.proj_head,
            &ContrastiveInputs {
                frames: &x[0],
                answer: &x[1],
                options: x.get(4).map(|o| (o, answer_ids.as_slice())),
                positive_selection: &x[2],
                negative_selection: &x[3],
            },
            c.temperature,
            Ctx::eval(),
        )
        .unwrap()
    };
    check(name, &g, &inputs, &f, 1e-5);
}

#[test]
fn contrastive_loss_gradient_multiple_choice() {
    contrastive_case("L_con B=3, 5 options", 3, 5, 10);
}

#[test]
fn contrastive_loss_gradient_open_ended() {
    contrastive_case("L_con B=2, no options", 2, 0, 20);
}

#[test]
fn contrastive_loss_gradient_single_sample() {
    contrastive_case("L_con B=1, 3 options", 1, 3, 30);
    contrastive_case("L_con B=1, no options", 1, 0, 40);
}

#[test]
fn contrastive_loss_value_single_sample_without_options() {
    // B = 1, no options: logits [pos_k·ans, intra·ans] / temperature only; computed here by hand.
    let c = cfg();
    let g = random_grounding(&c, 50);
    let (t, k, d) = (c.frames, c.moments, c.dim);
    let frames = randn(&[1, t, d], 51, 1.0);
    let answer = randn(&[1, d], 52, 1.0);
    let pos_sel = randn_mean(&[1, k, t], 53, 0.5, 0.2);
    let neg_sel = randn_mean(&[1, t - k, t], 54, 0.5, 0.2);
    let got = scalar(
        &contrastive_loss(
            &g.proj_head,
            &ContrastiveInputs {
                frames: &frames,
                answer: &answer,
                options: None,
                positive_selection: &pos_sel,
                negative_selection: &neg_sel,
            },
            c.temperature,
            Ctx::eval(),
        )
        .unwrap(),
    );
    let proj = |x: &Tensor| -> Vec<Vec<f64>> {
        let y = g.proj_head.forward(x, Ctx::eval()).unwrap();
        let rows = y.flatten_to(y.rank() - 2).unwrap().to_vec2::<f64>().unwrap();
        rows.into_iter()
            .map(|r| {
                let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
                r.into_iter().map(|v| v / n).collect()
            })
            .collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let pos = proj(&pos_sel.matmul(&frames).unwrap());
    let neg = proj(&neg_sel.matmul(&frames).unwrap());
    let ans = proj(&answer)[0].clone();
    let mut want = 0.0;
    for p in &pos {
        let mut logits = vec![dot(p, &ans) / c.temperature];
        logits.extend(neg.iter().map(|n| dot(n, &ans) / c.temperature));
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        want += (lse - logits[0]) / k as f64;
    }
    assert!((got - want).abs() < 1e-10, "L_con {got} vs {want}");
}

/// The whole objective with fixed noise: L_reg + L_con(TopK_σ(p), TopK_σ(1 − p)) + Σ TopK_σ(p)·R.
/// Perturbing a parameter by ±h does not change any sample's top-k here, so the finite differences
/// equal the gradient with the selections held constant (detached) — which is what autograd gives
/// when the selections are computed from detach(p).
#[test]
fn whole_objective_with_fixed_noise_gradient() {
    let c = cfg();
    let g = random_grounding(&c, 60);
    let (b, t, k, d, n) = (2, c.frames, c.moments, c.dim, 16);
    let answer_ids = vec![1usize, 3];
    let noise_pos = randn(&[b, n, t], 61, 1.0);
    let noise_neg = randn(&[b, n, t], 62, 1.0);
    let noise_sel = randn(&[b, n, t], 63, 1.0);
    let r = randn(&[b, k, t], 64, 1.0);
    let scores = randn(&[b, t], 65, 1.0);
    let inputs = vec![
        randn(&[b, t, d], 66, 1.0),
        randn(&[b, d], 67, 1.0),
        randn(&[b, 4, d], 68, 1.0),
        randn(&[b, d], 69, 1.0),
    ];
    let mut topk = c.topk;
    topk.gradient = TopkGradient::Full;
    let f = |m: &Grounding, x: &[Tensor]| {
        let text = Tensor::cat(&[&x[1].unsqueeze(1).unwrap(), &x[2]], 1).unwrap();
        let out = m.generate(&x[0], &text, Ctx::eval()).unwrap();
        let p = out.frame_scores.detach();
        let pos = perturbed_topk(&p, k, &topk, Noise::Given(&noise_pos)).unwrap();
        let neg = perturbed_topk(&p.affine(-1.0, 1.0).unwrap(), t - k, &topk, Noise::Given(&noise_neg)).unwrap();
        let sel = perturbed_topk(&p, k, &topk, Noise::Given(&noise_sel)).unwrap();
        let reg = regression_loss(&out.gaussian_centres, &scores).unwrap().total().unwrap();
        let con = contrastive_loss(
            &m.proj_head,
            &ContrastiveInputs {
                frames: &x[0],
                answer: &x[3],
                options: Some((&x[2], answer_ids.as_slice())),
                positive_selection: &pos,
                negative_selection: &neg,
            },
            c.temperature,
            Ctx::eval(),
        )
        .unwrap();
        // Σ sel·R is constant here; it checks that nothing else leaks through the selection.
        let mix = (sel * &r).unwrap().sum_all().unwrap();
        ((reg + con).unwrap() + mix).unwrap()
    };
    check("whole objective (fixed noise)", &g, &inputs, &f, 1e-5);
}

#[test]
fn dropout_only_in_training_and_inputs_are_checked() {
    let c = GroundingConfig::tiny();
    let lb = Loader::random(&Device::Cpu, DType::F32, 3);
    let g = Grounding::load(&lb.pp("grounding"), &c).unwrap();
    let frames = randn(&[2, c.frames, c.dim], 1, 1.0).to_dtype(DType::F32).unwrap();
    let q = randn(&[2, c.dim], 2, 1.0).to_dtype(DType::F32).unwrap();
    let a = g.predict(&frames, &q, None).unwrap();
    let b = g.predict(&frames, &q, None).unwrap();
    assert_eq!(a.frame_scores.to_vec2::<f32>().unwrap(), b.frame_scores.to_vec2::<f32>().unwrap());
    assert_eq!(a.moments.len(), 2);
    assert!(a.moments.iter().all(|m| m.len() == c.moments && m.windows(2).all(|w| w[0] < w[1])));
    let rng = std::cell::RefCell::new(SeededRng::new(9));
    let text = q.unsqueeze(1).unwrap();
    let t1 = g
        .generate(&frames, &text, Ctx::train(&rng))
        .unwrap()
        .gaussian_centres
        .to_vec2::<f32>()
        .unwrap();
    let t2 = g
        .generate(&frames, &text, Ctx::train(&rng))
        .unwrap()
        .gaussian_centres
        .to_vec2::<f32>()
        .unwrap();
    assert_ne!(t1, t2, "dropout draws new masks in training");
    // Wrong frame count / width give errors that name the problem.
    let e = format!("{:#}", g.predict(&frames.narrow(1, 0, 5).unwrap(), &q, None).unwrap_err());
    assert!(e.contains("5 frames") && e.contains(&c.frames.to_string()), "{e}");
    let e = format!("{:#}", g.predict(&frames, &q.narrow(1, 0, 8).unwrap(), None).unwrap_err());
    assert!(e.contains("width"), "{e}");
    // Fresh module: zero modality embedding, sinusoidal positions (official initialisation).
    assert_eq!(
        g.generator
            .modality_embedding
            .weight
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let pos = g.generator.frame_positions.to_vec2::<f32>().unwrap();
    assert_eq!(pos[0][0], 0.0);
    assert_eq!(pos[0][1], 1.0);
    assert!((pos[1][0] - 1f32.sin()).abs() < 1e-7);
}
