//! Shared helpers for the integration tests: fixture discovery, numeric comparison and seeded
//! random tensors.
#![allow(dead_code)]

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The repository root (tests run with the crate directory as working directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Parity fixture directories: every committed `tests/fixtures/parity/*` plus the
/// colon-separated directories in the environment variable `GCG_PARITY_DIRS`.
pub fn parity_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let base = fixtures_dir().join("parity");
    if let Ok(rd) = std::fs::read_dir(&base) {
        let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
        v.sort();
        dirs.extend(v);
    }
    if let Ok(extra) = std::env::var("GCG_PARITY_DIRS") {
        for d in extra.split(':').filter(|s| !s.is_empty()) {
            dirs.push(PathBuf::from(d));
        }
    }
    assert!(!dirs.is_empty(), "no parity fixture directories found under {}", base.display());
    dirs
}

/// Read all tensors of a safetensors file.
pub fn load_io(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &device()).with_context(|| format!("reading {}", path.display()))
}

pub fn get<'a>(io: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    io.get(name).ok_or_else(|| anyhow!("fixture has no tensor '{name}'"))
}

/// Max |a-b| / max(max|b|, 1e-6): the relative error the standards bound (1e-4 in f32).
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    anyhow::ensure!(
        actual.dims() == expected.dims(),
        "shape mismatch: actual {:?} vs expected {:?}",
        actual.dims(),
        expected.dims()
    );
    let a = actual.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = expected.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut max_diff = 0f64;
    let mut max_ref = 0f64;
    for (x, y) in a.iter().zip(&b) {
        anyhow::ensure!(x.is_finite() == y.is_finite(), "finite mismatch: {x} vs {y}");
        max_diff = max_diff.max((x - y).abs());
        max_ref = max_ref.max(y.abs());
    }
    Ok(max_diff / max_ref.max(1e-6))
}

/// Assert `rel_err(actual, expected) <= tol`, printing the measured error.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let e = rel_err(actual, expected).unwrap_or_else(|err| panic!("{what}: {err:#}"));
    eprintln!("{what}: relative error {e:.3e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} exceeds {tol:.1e}");
}

/// An f64 tensor of `std`·N(0, 1) values from `SeededRng::new(seed)` (CPU).
pub fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
    randn_mean(shape, seed, std, 0.0)
}

/// An f64 tensor of `mean + std`·N(0, 1) values from `SeededRng::new(seed)` (CPU).
pub fn randn_mean(shape: &[usize], seed: u64, std: f64, mean: f64) -> Tensor {
    let mut r = gcg::SeededRng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| mean + std * r.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("randn: shape and values agree")
}

/// Standard normals rounded to f32 (`SeededRng::normal_vec`), as an f32 tensor (CPU).
pub fn randn_f32(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v = gcg::SeededRng::new(seed).normal_vec(n, 0.0, 1.0);
    Tensor::from_vec(v, shape, &Device::Cpu).expect("randn_f32: shape and values agree")
}

/// The device the parity suites run on: the CPU, or CUDA device 0 with `GCG_TEST_DEVICE=cuda` in
/// a build with `--features cuda` (`tools/gpu-check.sh` runs them so on a GPU machine).
pub fn device() -> Device {
    match std::env::var("GCG_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).unwrap_or_else(|e| panic!("GCG_TEST_DEVICE=cuda: cannot open CUDA device 0: {e}")),
        Ok(other) => panic!("GCG_TEST_DEVICE={other:?}: expected cpu or cuda"),
    }
}
