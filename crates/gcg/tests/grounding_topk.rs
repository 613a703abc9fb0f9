//! The perturbed top-k: forward against a brute-force count, both backward estimators against their
//! closed forms (computed here independently, per sample), the full estimator against Monte-Carlo
//! finite differences of the smoothed objective (a statistical test), and an analytic two-frame case.

use candle_core::{DType, Device, Tensor, Var};
use gcg::grounding::{hard_selection, hard_topk, perturbed_topk, Noise, PerturbedTopK, TopkGradient};
use gcg::SeededRng;
use std::cell::RefCell;

fn normals(n: usize, seed: u64) -> Vec<f64> {
    let mut r = SeededRng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn cfg(sigma: f64, gradient: TopkGradient) -> PerturbedTopK {
    PerturbedTopK {
        num_samples: 0, // taken from the given noise
        sigma,
        gradient,
    }
}

/// Independent selection rule: frame i is among the top k when fewer than k frames beat it (a frame
/// beats i when its value is larger, or equal with a lower index); the selected frames in time order.
fn selected(v: &[f64], k: usize) -> Vec<usize> {
    (0..v.len())
        .filter(|&i| (0..v.len()).filter(|&j| v[j] > v[i] || (v[j] == v[i] && j < i)).count() < k)
        .collect()
}

/// ⟨R, one_hot(selected(v))⟩ with R [K, T] row-major.
fn objective(r: &[f64], t: usize, v: &[f64], k: usize) -> f64 {
    selected(v, k).iter().enumerate().map(|(kk, &d)| r[kk * t + d]).sum()
}

fn perturbed(x: &[f64], z: &[f64], sigma: f64) -> Vec<f64> {
    x.iter().zip(z).map(|(a, b)| a + b * sigma).collect()
}

fn vec_of(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

#[test]
fn forward_is_the_mean_one_hot_of_sorted_topk() {
    let (b, n, t, sigma) = (3, 50, 7, 0.3);
    let x = normals(b * t, 1);
    let z = normals(b * n * t, 2);
    let xt = Tensor::from_vec(x.clone(), (b, t), &Device::Cpu).unwrap();
    let zt = Tensor::from_vec(z.clone(), (b, n, t), &Device::Cpu).unwrap();
    for k in [1, 3, 6, 7] {
        let y = vec_of(&perturbed_topk(&xt, k, &cfg(sigma, TopkGradient::Full), Noise::Given(&zt)).unwrap());
        let mut want = vec![0f64; b * k * t];
        for bi in 0..b {
            for s in 0..n {
                let v = perturbed(&x[bi * t..(bi + 1) * t], &z[(bi * n + s) * t..(bi * n + s + 1) * t], sigma);
                for (kk, d) in selected(&v, k).into_iter().enumerate() {
                    want[(bi * k + kk) * t + d] += 1.0 / n as f64;
                }
            }
        }
        let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        assert!(err < 1e-12, "k = {k}: max error {err}");
        // Each row is a distribution over frames; the K rows select K different frames per sample.
        for row in y.chunks(t) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }
    // f32 input: same selections (the noise values are f32-exact), output in f32.
    let y32 = perturbed_topk(
        &xt.to_dtype(DType::F32).unwrap(),
        3,
        &cfg(sigma, TopkGradient::Full),
        Noise::Given(&zt.to_dtype(DType::F32).unwrap()),
    )
    .unwrap();
    assert_eq!(y32.dtype(), DType::F32);
    assert_eq!(y32.dims(), &[b, 3, t]);
}

/// Autograd gradient of Σ R·TopK_σ(x) for the given estimator.
fn autograd(x: &[f64], b: usize, t: usize, k: usize, z: &Tensor, r: &[f64], c: &PerturbedTopK) -> Vec<f64> {
    let xv = Var::from_tensor(&Tensor::from_vec(x.to_vec(), (b, t), &Device::Cpu).unwrap()).unwrap();
    let rt = Tensor::from_vec(r.to_vec(), (b, k, t), &Device::Cpu).unwrap();
    let y = perturbed_topk(xv.as_tensor(), k, c, Noise::Given(z)).unwrap();
    let g = (y * rt).unwrap().sum_all().unwrap().backward().unwrap();
    vec_of(g.get(xv.as_tensor()).expect("gradient of x"))
}

#[test]
fn backward_estimators_have_their_closed_forms() {
    let (b, n, t, k, sigma) = (2, 40, 6, 3, 0.1);
    let x = normals(b * t, 3).iter().map(|v| v * 0.1).collect::<Vec<_>>();
    let z = normals(b * n * t, 4);
    let r = normals(b * k * t, 5);
    let zt = Tensor::from_vec(z.clone(), (b, n, t), &Device::Cpu).unwrap();
    let full = autograd(&x, b, t, k, &zt, &r, &cfg(sigma, TopkGradient::Full));
    let diag = autograd(&x, b, t, k, &zt, &r, &cfg(sigma, TopkGradient::Diagonal));
    let (mut want_full, mut want_diag) = (vec![0f64; b * t], vec![0f64; b * t]);
    for bi in 0..b {
        let rb = &r[bi * k * t..(bi + 1) * k * t];
        for s in 0..n {
            let zs = &z[(bi * n + s) * t..(bi * n + s + 1) * t];
            let v = perturbed(&x[bi * t..(bi + 1) * t], zs, sigma);
            // Full (Berthet et al.): (1/(nσ)) Σ_s ⟨R, Y_s⟩ Z_s
            let f = objective(rb, t, &v, k);
            for e in 0..t {
                want_full[bi * t + e] += f * zs[e] / (n as f64 * sigma);
            }
            // Official diagonal: Σ_k R[k, d] · (1/n) Σ_s one_hot_s[k, d] Z_s[d] / σ
            for (kk, d) in selected(&v, k).into_iter().enumerate() {
                want_diag[bi * t + d] += rb[kk * t + d] * zs[d] / n as f64 / sigma;
            }
        }
    }
    for (name, got, want) in [("full", &full, &want_full), ("diagonal", &diag, &want_diag)] {
        let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        eprintln!("{name}: max |autograd - closed form| = {err:.2e}");
        assert!(err < 1e-10, "{name} estimator: max error {err}");
    }
    let diff = full.iter().zip(&diag).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    assert!(diff > 1e-2, "full and diagonal estimators coincide ({diff})");
}

#[test]
fn diagonal_backward_reproduces_the_official_formula_in_f32() {
    // Same computation in f32 (as the official code runs it): the diagonal gradient equals
    // einsum("bkd,bkd->bd", g, einsum("bnkd,bnd->bkd", one_hot, noise) / n / σ).
    let (b, n, t, k, sigma) = (2, 500, 8, 4, 0.05f32);
    let x: Vec<f32> = normals(b * t, 6).iter().map(|v| (0.5 + 0.1 * v) as f32).collect();
    let z: Vec<f32> = normals(b * n * t, 7).iter().map(|&v| v as f32).collect();
    let g: Vec<f32> = normals(b * k * t, 8).iter().map(|&v| v as f32).collect();
    let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), (b, t), &Device::Cpu).unwrap()).unwrap();
    let zt = Tensor::from_vec(z.clone(), (b, n, t), &Device::Cpu).unwrap();
    let gt = Tensor::from_vec(g.clone(), (b, k, t), &Device::Cpu).unwrap();
    let y = perturbed_topk(xv.as_tensor(), k, &cfg(sigma as f64, TopkGradient::Diagonal), Noise::Given(&zt)).unwrap();
    let got = vec_of(
        y.mul(&gt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .unwrap(),
    );
    let mut expected = vec![0f32; b * k * t];
    for bi in 0..b {
        for s in 0..n {
            let zs = &z[(bi * n + s) * t..(bi * n + s + 1) * t];
            let v: Vec<f64> = (0..t).map(|j| (x[bi * t + j] + zs[j] * sigma) as f64).collect();
            for (kk, d) in selected(&v, k).into_iter().enumerate() {
                expected[(bi * k + kk) * t + d] += zs[d];
            }
        }
    }
    let mut want = vec![0f32; b * t];
    for bi in 0..b {
        for kk in 0..k {
            for d in 0..t {
                want[bi * t + d] += g[(bi * k + kk) * t + d] * (expected[(bi * k + kk) * t + d] / n as f32 / sigma);
            }
        }
    }
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max) as f64;
    let err = got.iter().zip(&want).map(|(a, &b)| (a - b as f64).abs()).fold(0f64, f64::max);
    eprintln!("diagonal f32: max error {err:.2e} (scale {scale:.2e})");
    assert!(err <= 1e-5 * scale, "diagonal estimator differs from the official formula: {err}");
}

/// The statistical test of the full estimator.
///
/// F(x) = E_Z[f(x + σZ)], f(v) = ⟨R, one_hot(sorted topk(v))⟩. For Gaussian Z, ∂_j F(x) =
/// E[f(x + σZ) Z_j]/σ, so with the same n samples the per-sample terms
///   a_s = f(x + σZ_s) Z_{s,j} / σ                                  (the estimator's terms)
///   b_s = (f(x + h e_j + σZ_s) − f(x − h e_j + σZ_s)) / (2h)        (finite differences, common Z_s)
/// satisfy E[a_s] = ∂_j F and E[b_s] = (F(x + h e_j) − F(x − h e_j))/(2h) = ∂_j F + (h²/6) ∂_j³F(ξ).
/// ∂_j³F = E[f(x + σZ) He₃(Z_j)]/σ³ with He₃(z) = z³ − 3z, E[He₃²] = 3! = 6, so
/// |∂_j³F| ≤ M·√6/σ³ where M = sup|f| ≤ Σ_k max_d |R[k, d]|. Hence mean(a − b) has mean within
/// bias = (h²/6)·M·√6/σ³ of 0 and standard error se = sd(a − b)/√n (n i.i.d. pairs): we require
/// |mean(a − b)| ≤ 5·se + bias for every coordinate (false alarm < 1e-5 over the coordinates).
/// The diagonal estimator misses the off-diagonal terms and must fail the same test.
#[test]
fn full_estimator_agrees_with_monte_carlo_finite_differences() {
    let (t, k, sigma, n, h) = (6usize, 2usize, 0.05, 200_000usize, 0.002);
    let x = vec![0.50, 0.53, 0.47, 0.55, 0.40, 0.52];
    let r: Vec<f64> = normals(k * t, 11);
    let z = normals(n * t, 12);
    let zt = Tensor::from_vec(z.clone(), (1, n, t), &Device::Cpu).unwrap();
    let full = autograd(&x, 1, t, k, &zt, &r, &cfg(sigma, TopkGradient::Full));
    let diag = autograd(&x, 1, t, k, &zt, &r, &cfg(sigma, TopkGradient::Diagonal));
    let m: f64 = r.chunks(t).map(|row| row.iter().map(|v| v.abs()).fold(0f64, f64::max)).sum();
    let bias = h * h / 6.0 * m * 6f64.sqrt() / sigma.powi(3);

    // The op's own forward, finite-differenced with the same noise.
    let smoothed = |xs: &[f64]| -> f64 {
        let xt = Tensor::from_vec(xs.to_vec(), (1, t), &Device::Cpu).unwrap();
        let y = vec_of(&perturbed_topk(&xt, k, &cfg(sigma, TopkGradient::Full), Noise::Given(&zt)).unwrap());
        y.iter().zip(&r).map(|(a, b)| a * b).sum()
    };

    let mut max_z_diag = 0f64;
    for j in 0..t {
        let (mut sum_d, mut sum_d2, mut sum_a, mut sum_b) = (0f64, 0f64, 0f64, 0f64);
        let (mut sum_dd, mut sum_dd2) = (0f64, 0f64);
        let mut xp = x.clone();
        xp[j] += h;
        let mut xm = x.clone();
        xm[j] -= h;
        for s in 0..n {
            let zs = &z[s * t..(s + 1) * t];
            let v = perturbed(&x, zs, sigma);
            let a = objective(&r, t, &v, k) * zs[j] / sigma;
            let bd = (objective(&r, t, &perturbed(&xp, zs, sigma), k) - objective(&r, t, &perturbed(&xm, zs, sigma), k)) / (2.0 * h);
            let a_diag: f64 = selected(&v, k)
                .into_iter()
                .enumerate()
                .filter(|&(_, d)| d == j)
                .map(|(kk, _)| r[kk * t + j] * zs[j] / sigma)
                .sum();
            sum_a += a;
            sum_b += bd;
            sum_d += a - bd;
            sum_d2 += (a - bd) * (a - bd);
            sum_dd += a_diag - bd;
            sum_dd2 += (a_diag - bd) * (a_diag - bd);
        }
        let nf = n as f64;
        // The estimator and the forward agree with the per-sample sums computed here.
        assert!(
            (full[j] - sum_a / nf).abs() < 1e-8 * (1.0 + full[j].abs()),
            "coordinate {j}: estimator {} vs {}",
            full[j],
            sum_a / nf
        );
        let fd_op = (smoothed(&xp) - smoothed(&xm)) / (2.0 * h);
        assert!(
            (fd_op - sum_b / nf).abs() < 1e-6 * (1.0 + fd_op.abs()),
            "coordinate {j}: FD {fd_op} vs {}",
            sum_b / nf
        );

        let mean = sum_d / nf;
        let se = ((sum_d2 / nf - mean * mean).max(0.0) / nf).sqrt();
        let tol = 5.0 * se + bias;
        eprintln!(
            "x[{j}]: full {:+.4} MC-FD {:+.4} diag {:+.4} | diff {:+.4} se {:.4} bias bound {:.4} (z = {:.2})",
            full[j],
            fd_op,
            diag[j],
            mean,
            se,
            bias,
            mean / se
        );
        assert!(
            mean.abs() <= tol,
            "coordinate {j}: full estimator {} vs MC finite difference {fd_op}: |diff| {} > {tol}",
            full[j],
            mean.abs()
        );

        let mean_d = sum_dd / nf;
        let se_d = ((sum_dd2 / nf - mean_d * mean_d).max(0.0) / nf).sqrt();
        max_z_diag = max_z_diag.max((mean_d.abs() - bias) / se_d);
    }
    eprintln!("diagonal estimator: largest z = {max_z_diag:.1}");
    assert!(
        max_z_diag > 10.0,
        "the test cannot tell the diagonal estimator from the full one (z {max_z_diag})"
    );
}

/// Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
fn erf(x: f64) -> f64 {
    let s = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * (-x * x).exp();
    s * y
}

#[test]
fn two_frames_match_the_analytic_smoothed_selection() {
    // T = 2, K = 1: P(frame 0) = Φ(δ/(σ√2)), δ = x0 − x1; ∂P/∂x0 = −∂P/∂x1 = φ(δ/(σ√2))/(σ√2).
    let (sigma, n) = (0.05, 400_000usize);
    let x = [0.52, 0.50];
    let rng = RefCell::new(SeededRng::new(21));
    let xv = Var::from_tensor(&Tensor::new(&[x], &Device::Cpu).unwrap()).unwrap();
    let c = PerturbedTopK {
        num_samples: n,
        sigma,
        gradient: TopkGradient::Full,
    };
    let y = perturbed_topk(xv.as_tensor(), 1, &c, Noise::Rng(&rng)).unwrap(); // [1, 1, 2]
    let u = (x[0] - x[1]) / (sigma * 2f64.sqrt());
    let p0 = 0.5 * (1.0 + erf(u / 2f64.sqrt()));
    let dens = (-u * u / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() / (sigma * 2f64.sqrt());
    let yv = vec_of(&y);
    let se_p = (p0 * (1.0 - p0) / n as f64).sqrt();
    eprintln!("P(frame 0) = {:.5} (analytic {p0:.5}, se {se_p:.5})", yv[0]);
    assert!((yv[0] - p0).abs() < 5.0 * se_p);
    // Gradient of Y[0, 0]: each per-sample term 1{0 selected}·Z_e/σ has variance ≤ 1/σ².
    let r = Tensor::new(&[[[1.0f64, 0.0]]], &Device::Cpu).unwrap();
    let g = vec_of(
        y.mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .unwrap(),
    );
    let se_g = 1.0 / (sigma * (n as f64).sqrt());
    eprintln!("∂P/∂x = [{:.3}, {:.3}] (analytic ±{dens:.3}, se ≤ {se_g:.3})", g[0], g[1]);
    assert!((g[0] - dens).abs() < 5.0 * se_g && (g[1] + dens).abs() < 5.0 * se_g);

    // The official diagonal estimator has no cross term: ∂Y[0,0]/∂x1 is 0 instead of −dens.
    let rng = RefCell::new(SeededRng::new(21));
    let xv = Var::from_tensor(&Tensor::new(&[x], &Device::Cpu).unwrap()).unwrap();
    let c = PerturbedTopK {
        gradient: TopkGradient::Diagonal,
        ..c
    };
    let y = perturbed_topk(xv.as_tensor(), 1, &c, Noise::Rng(&rng)).unwrap();
    let g = vec_of(
        y.mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .unwrap(),
    );
    assert!((g[0] - dens).abs() < 5.0 * se_g && g[1] == 0.0, "diagonal: {g:?}");
}

#[test]
fn seeded_noise_is_reproducible() {
    let x = Tensor::new(&[[0.1f32, 0.5, 0.3, 0.45, 0.2], [0.9, 0.1, 0.4, 0.42, 0.41]], &Device::Cpu).unwrap();
    let c = PerturbedTopK::default();
    let run = |seed| {
        let rng = RefCell::new(SeededRng::new(seed));
        let y = vec_of(&perturbed_topk(&x, 2, &c, Noise::Rng(&rng)).unwrap());
        (y, rng.into_inner())
    };
    let (a, ra) = run(5);
    let (b, _) = run(5);
    let (d, _) = run(6);
    assert_eq!(a, b);
    assert_ne!(a, d);
    // The generator advanced by exactly B·n·T normals.
    let mut r = SeededRng::new(5);
    (0..2 * 500 * 5).for_each(|_| {
        r.normal();
    });
    assert_eq!(ra, r);
}

#[test]
fn well_separated_scores_select_like_hard_topk_and_sigma_zero_has_no_gradient() {
    let x = Tensor::new(&[[0.1f32, 0.9, 0.3, 0.8, 0.05, 0.7]], &Device::Cpu).unwrap();
    let (idx, onehot) = hard_selection(&x, 3).unwrap();
    assert_eq!(idx, vec![vec![1, 3, 5]]);
    let rng = RefCell::new(SeededRng::new(1));
    let soft = perturbed_topk(&x, 3, &PerturbedTopK::default(), Noise::Rng(&rng)).unwrap();
    assert_eq!(vec_of(&soft), vec_of(&onehot));

    let xv = Var::from_tensor(&x).unwrap();
    let c = PerturbedTopK {
        sigma: 0.0,
        ..PerturbedTopK::default()
    };
    let y = perturbed_topk(xv.as_tensor(), 3, &c, Noise::Rng(&rng)).unwrap();
    assert_eq!(vec_of(&y), vec_of(&onehot));
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(xv.as_tensor()).is_none());
}

#[test]
fn hard_topk_sorts_by_time_and_reports_bad_input() {
    let x = Tensor::new(&[[0.3f32, 0.1, 0.9, 0.9, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0]], &Device::Cpu).unwrap();
    assert_eq!(hard_topk(&x, 3).unwrap(), vec![vec![0, 2, 3], vec![0, 1, 2]]);
    // Ties go to the earlier frame.
    assert_eq!(hard_topk(&x, 1).unwrap(), vec![vec![2], vec![0]]);
    let e = hard_topk(&x, 6).unwrap_err().to_string();
    assert!(e.contains("k = 6"), "{e}");
    let nan = Tensor::new(&[[0.3f32, f32::NAN, 0.2]], &Device::Cpu).unwrap();
    let e = format!("{:#}", hard_topk(&nan, 1).unwrap_err());
    assert!(e.contains("row 0") && e.contains("NaN"), "{e}");
    let z = Tensor::zeros((1, 4, 2), DType::F32, &Device::Cpu).unwrap();
    let e = perturbed_topk(&nan, 1, &PerturbedTopK::default(), Noise::Given(&z))
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN"), "{e}");
    let ok = Tensor::new(&[[0.3f32, 0.1, 0.2]], &Device::Cpu).unwrap();
    let e = perturbed_topk(&ok, 1, &PerturbedTopK::default(), Noise::Given(&z))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[1, 4, 2]"), "{e}");
}
