//! Checkpoint loading: both published layouts load completely and agree; bad checkpoints give
//! errors that name the tensor, the file, and the expected and actual shapes.

mod common;

use candle_core::{DType, Device, Tensor};
use gcg::models::checkpoint::{open_hf_snapshot, release_t5_config};
use gcg::models::lmm::{is_trainable, LmmConfig, VideoLmm};
use gcg::weights::checkpoints::{is_buffer, GcgRelease};
use gcg::weights::pth::PthSource;
use gcg::weights::{Loader, SafetensorsSource, TensorSource};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn load_hf(dir: &Path) -> anyhow::Result<()> {
    let (src, cfg) = open_hf_snapshot(dir)?;
    let lb = Loader::from_source(src, &Device::Cpu, DType::F32)
        .with_trainable(is_trainable)
        .with_ignored(is_buffer);
    VideoLmm::load(&lb, &cfg, true)?;
    lb.finish()
}

/// Rewrite one shard of a copied snapshot with `edit` applied to its tensors.
fn edit_shard(dir: &Path, shard: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join(shard);
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

fn first_dir() -> PathBuf {
    common::parity_dirs().into_iter().next().unwrap()
}

#[test]
fn both_layouts_load_completely_and_agree() {
    for dir in common::parity_dirs() {
        let (hf, cfg) = open_hf_snapshot(&dir.join("hf")).unwrap();
        load_hf(&dir.join("hf")).unwrap();
        let rel = GcgRelease::new(dir.join("gcg"), dir.join("gcg/flan-t5"));
        let gcg = rel.open().unwrap();
        let lb = Loader::from_source(gcg.clone(), &Device::Cpu, DType::F32).with_ignored(is_buffer);
        let mut gcfg = cfg.clone();
        gcfg.t5 = release_t5_config(&rel).unwrap();
        VideoLmm::load(&lb, &gcfg, true).unwrap();
        lb.finish().unwrap();
        // Every canonical tensor of the GCG layout equals the HF one (both were written from one model).
        for name in gcg.names() {
            let a = gcg.load(&name, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let canonical = if hf.contains(&name) {
                name.clone()
            } else {
                name.replace("language_model.encoder.embed_tokens", "language_model.shared")
            };
            let b = hf.load(&canonical, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "{}: GCG and HF layouts differ for {name}", dir.display());
        }
    }
}

#[test]
fn renamed_tensor_is_reported_as_missing_and_unused() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&first_dir().join("hf"), tmp.path());
    let shard = "model-00001-of-00002.safetensors";
    let old = "qformer.encoder.layer.1.attention.output.dense.weight";
    let new = "qformer.encoder.layer.1.attention.output.dense.weights";
    edit_shard(tmp.path(), shard, |t| {
        let v = t.remove(old).unwrap();
        t.insert(new.to_string(), v);
    });
    // The index must follow, or the index check (correctly) complains first.
    let idx = tmp.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&idx)
        .unwrap()
        .replace(&format!("\"{old}\""), &format!("\"{new}\""));
    std::fs::write(&idx, text).unwrap();
    let err = format!("{:#}", load_hf(tmp.path()).unwrap_err());
    assert!(err.contains(old) && err.contains("missing"), "{err}");
}

#[test]
fn extra_tensor_is_reported_as_unused_with_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&first_dir().join("hf"), tmp.path());
    let shard = "model-00001-of-00002.safetensors";
    let extra = "qformer.encoder.layer.0.attention.output.dense.extra";
    edit_shard(tmp.path(), shard, |t| {
        let v = t["language_projection.bias"].clone();
        t.insert(extra.to_string(), v);
    });
    let idx = tmp.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&idx).unwrap().replacen(
        "\"weight_map\": {",
        &format!("\"weight_map\": {{\n  \"{extra}\": \"{shard}\","),
        1,
    );
    std::fs::write(&idx, text).unwrap();
    let err = format!("{:#}", load_hf(tmp.path()).unwrap_err());
    assert!(
        err.contains(extra) && err.contains(shard) && err.contains("not used") && err.starts_with("1 tensor"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_file_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&first_dir().join("hf"), tmp.path());
    let shard = "model-00001-of-00002.safetensors";
    let name = "language_projection.weight";
    let mut want = vec![];
    edit_shard(tmp.path(), shard, |t| {
        let v = t.remove(name).unwrap();
        want = v.dims().to_vec();
        let bad = v.narrow(1, 0, v.dim(1).unwrap() - 1).unwrap().contiguous().unwrap();
        t.insert(name.to_string(), bad);
    });
    let err = format!("{:#}", load_hf(tmp.path()).unwrap_err());
    let actual = format!("[{}, {}]", want[0], want[1] - 1);
    let expected = format!("[{}, {}]", want[0], want[1]);
    assert!(
        err.contains(name) && err.contains(shard) && err.contains(&actual) && err.contains(&expected),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_names_the_file_and_both_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&first_dir().join("hf"), tmp.path());
    let shard = tmp.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    let full = bytes.len();
    std::fs::write(&shard, &bytes[..full - 100]).unwrap();
    let err = format!("{:#}", load_hf(tmp.path()).unwrap_err());
    // The header describes the whole file (the test knows its length): both sizes are named.
    assert!(
        err.contains("model-00002-of-00002.safetensors")
            && err.contains("truncated")
            && err.contains(&format!("{full} bytes"))
            && err.contains(&format!("{} bytes", full - 100)),
        "{err}"
    );
    // Cut inside the JSON header: the header length the first 8 bytes announce is named.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    std::fs::write(&shard, &bytes[..20]).unwrap();
    let err = format!("{:#}", SafetensorsSource::open(&shard).err().unwrap());
    assert!(
        err.contains("model-00002-of-00002.safetensors")
            && err.contains("truncated")
            && err.contains(&format!("header of {header_len} bytes"))
            && err.contains("20 bytes"),
        "{err}"
    );
    // A file that is not safetensors at all.
    std::fs::write(&shard, b"hello, this is not a checkpoint").unwrap();
    let err = format!("{:#}", SafetensorsSource::open(&shard).err().unwrap());
    assert!(
        err.contains("model-00002-of-00002.safetensors") && !err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn index_naming_a_missing_shard_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&first_dir().join("hf"), tmp.path());
    std::fs::remove_file(tmp.path().join("model-00001-of-00002.safetensors")).unwrap();
    let err = format!("{:#}", load_hf(tmp.path()).unwrap_err());
    assert!(
        err.contains("model-00001-of-00002.safetensors") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn broken_pth_files_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&first_dir().join("gcg"), tmp.path());
    let p = tmp.path().join("qformer_t5.pth");
    let bytes = std::fs::read(&p).unwrap();
    let half = bytes.len() / 2;
    std::fs::write(&p, &bytes[..half]).unwrap();
    let err = format!(
        "{:#}",
        GcgRelease::new(tmp.path(), tmp.path().join("flan-t5")).open().err().unwrap()
    );
    // A truncated zip checkpoint says so (with the size it has), not that it is a legacy file.
    assert!(
        err.contains("qformer_t5.pth") && err.contains("truncated") && err.contains(&format!("{half} bytes")),
        "{err}"
    );
    assert!(!err.contains("legacy") && !err.contains("re-save"), "{err}");
    // Cut a few bytes short (inside the zip's end record): still truncated, not legacy.
    std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
    let err = format!("{:#}", PthSource::open(&p, None, "qformer").err().unwrap());
    assert!(
        err.contains("qformer_t5.pth") && err.contains("truncated") && err.contains(&format!("{} bytes", bytes.len() - 5)),
        "{err}"
    );
    assert!(!err.contains("re-save"), "{err}");
    // A legacy (pre-1.6, non-zip) torch.save file: a pickle stream that starts with the legacy
    // magic number. Only this one gets the re-save hint.
    let legacy = tmp.path().join("legacy.pth");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.").unwrap();
    let err = format!("{:#}", PthSource::open(&legacy, None, "x").err().unwrap());
    assert!(
        err.contains("legacy.pth") && err.contains("legacy") && err.contains("re-save"),
        "{err}"
    );
    // Neither zip nor pickle.
    let junk = tmp.path().join("junk.pth");
    std::fs::write(&junk, b"hello, this is not a checkpoint").unwrap();
    let err = format!("{:#}", PthSource::open(&junk, None, "x").err().unwrap());
    assert!(
        err.contains("junk.pth") && !err.contains("re-save") && !err.contains("truncated"),
        "{err}"
    );

    std::fs::remove_file(tmp.path().join("llm_proj_t5.pth")).unwrap();
    std::fs::write(tmp.path().join("qformer_t5.pth"), &bytes).unwrap();
    let err = format!(
        "{:#}",
        GcgRelease::new(tmp.path(), tmp.path().join("flan-t5")).open().err().unwrap()
    );
    assert!(err.contains("llm_proj_t5.pth") && err.contains("missing"), "{err}");
}

#[test]
fn half_precision_checkpoints_load_exactly() {
    // The tiny-gelu fixture stores its HF snapshot in bf16 and its GCG files in f16, with weights
    // rounded so both hold them exactly: they must load to the same f32 values.
    let mut seen = false;
    for dir in common::parity_dirs() {
        let (hf, _) = open_hf_snapshot(&dir.join("hf")).unwrap();
        let name = "language_projection.weight";
        if hf.meta(name).unwrap().dtype != DType::BF16 {
            continue;
        }
        seen = true;
        let gcg = GcgRelease::new(dir.join("gcg"), dir.join("gcg/flan-t5")).open().unwrap();
        assert_eq!(gcg.meta(name).unwrap().dtype, DType::F16);
        let a = hf.load(name, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let b = gcg.load(name, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    assert!(seen, "no bf16 fixture directory found");
}

#[test]
fn trainable_parameters_are_exactly_the_gcg_set() {
    let dir = first_dir();
    let (src, cfg): (Arc<dyn TensorSource + Send + Sync>, LmmConfig) = open_hf_snapshot(&dir.join("hf")).unwrap();
    let lb = Loader::from_source(src, &Device::Cpu, DType::F32)
        .with_trainable(is_trainable)
        .with_ignored(is_buffer);
    VideoLmm::load(&lb, &cfg, false).unwrap();
    let vars = lb.vars();
    assert!(vars.get("query_tokens").is_some());
    assert!(vars.get("frame_embeds.weight").is_some());
    assert!(vars.get("language_projection.weight").is_some());
    assert!(vars.iter().all(|(n, _)| is_trainable(n)));
    assert!(vars.iter().any(|(n, _)| n.starts_with("qformer.")));
    assert!(!vars
        .iter()
        .any(|(n, _)| n.starts_with("language_model.") || n.starts_with("vision_model.")));
}
