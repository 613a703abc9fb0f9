//! `gcg check-weights` on the tiny HF InstructBLIP snapshot: a clean copy passes; NaN-filled and
//! integer weights are each named, with the file, and the command fails.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn snapshot() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/tiny-s0/hf")
}

fn check_weights(dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gcg"))
        .args(["check-weights", "--weights"])
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn check_weights_names_non_finite_and_integer_tensors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("hf");
    std::fs::create_dir(&dir)?;
    for e in std::fs::read_dir(snapshot())? {
        let e = e?;
        std::fs::copy(e.path(), dir.join(e.file_name()))?;
    }
    let o = check_weights(&dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(
        (v["ok"].as_bool(), v["problems"].as_array().map(Vec::len)),
        (Some(true), Some(0)),
        "{v}"
    );

    // One weight gets a NaN and an ∞, another becomes an integer tensor.
    let shard = dir.join("model-00001-of-00002.safetensors");
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&shard, &Device::Cpu)?;
    let mut names: Vec<String> = tensors
        .iter()
        .filter(|(n, t)| n.ends_with(".weight") && t.rank() == 2 && t.dtype().is_float())
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    let (nan_name, int_name) = (names[0].clone(), names[1].clone());
    let t = &tensors[&nan_name];
    let (rows, cols) = t.dims2()?;
    let mut vals = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    vals[cols + 2] = f32::NAN;
    vals[rows * cols - 1] = f32::INFINITY;
    tensors.insert(
        nan_name.clone(),
        Tensor::from_vec(vals, (rows, cols), &Device::Cpu)?.to_dtype(t.dtype())?,
    );
    let int = tensors[&int_name].to_dtype(DType::I64)?;
    tensors.insert(int_name.clone(), int);
    candle_core::safetensors::save(&tensors, &shard)?;

    let o = check_weights(&dir);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let problems: Vec<String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    let nan = problems
        .iter()
        .find(|p| p.contains(&format!("'{nan_name}'")))
        .expect("the NaN tensor is named");
    assert!(
        nan.contains("model-00001-of-00002.safetensors") && nan.contains("2 non-finite values (the first at [1, 2])"),
        "{nan}"
    );
    let int = problems
        .iter()
        .find(|p| p.contains(&format!("'{int_name}'")))
        .expect("the integer tensor is named");
    assert!(int.contains("stored as I64"), "{int}");
    assert!(err.contains("2 of the checkpoint's tensors are unusable"), "{err}");
    Ok(())
}
