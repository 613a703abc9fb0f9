//! Import of the official HDF5 feature file (`--features hdf5`); the fixture is written by h5py
//! (tools/fixtures/make_h5_features.py) with the same arrays in a safetensors file.
#![cfg(feature = "hdf5")]

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gcg::features::extract::ExtractProgress;
use gcg::features::frozen;
use gcg::features::h5import::{import_official_h5, ImportOptions, VideoTimes};
use gcg::store::{Store, WriterOptions};

#[test]
fn imports_the_official_feature_file() -> Result<()> {
    let fx = common::fixtures_dir().join("store");
    let want = candle_core::safetensors::load(fx.join("feats_wo_norm_tiny.safetensors"), &Device::Cpu)?;
    let (_, clip_cfg) = frozen::preset(gcg::models::Preset::Tiny);
    let clip = frozen::random_clip_image(&clip_cfg, &Device::Cpu, DType::F32, 4)?;
    let times = VideoTimes::from_files(Some(&fx.join("frame2time_tiny.json")), Some(&fx.join("gsub_tiny.json")))?;
    let dir = tempfile::tempdir()?;
    let opts = ImportOptions {
        num_frames: 4,
        overwrite: false,
        writer: WriterOptions::default(),
        clip_models: None,
    };
    let mut failed = Vec::new();
    let report = import_official_h5(&fx.join("feats_wo_norm_tiny.h5"), dir.path(), &clip, &times, &opts, &mut |ev| {
        if let ExtractProgress::Failed { video, error } = ev {
            failed.push(format!("{video}: {error}"));
        }
    })?;
    assert_eq!((report.done, report.skipped), (3, 0));
    assert_eq!(failed.len(), 1);
    assert!(failed[0].starts_with("short: ") && failed[0].contains("2 frames"), "{failed:?}");

    let snap = Store::open(dir.path())?.snapshot();
    snap.verify()?;
    for (video, sel) in [
        ("4010069381", vec![0u32, 1, 2, 3]),
        ("2435100235", vec![0, 1, 2, 3]),
        ("10001787725", vec![0, 2, 3, 5]),
    ] {
        let expected = want[video].index_select(&Tensor::new(sel.as_slice(), &Device::Cpu)?, 0)?;
        let got = snap.features_tensor(video, DType::F16, &Device::Cpu)?;
        let bits = |t: &Tensor| -> Result<Vec<u16>> { Ok(t.flatten_all()?.to_vec1::<half::f16>()?.iter().map(|x| x.to_bits()).collect()) };
        assert_eq!(bits(&got)?, bits(&expected)?, "{video}");
        let emb = clip.forward(&expected.to_dtype(DType::F32)?)?;
        let stored = Tensor::from_vec(snap.frame_embeds(video)?.to_f32()?, emb.dims(), &Device::Cpu)?;
        assert!(common::rel_err(&stored, &emb)? <= 1e-6);
        let v = snap.video(video)?;
        let all = &times.timestamps[video];
        assert_eq!(v.timestamps, sel.iter().map(|&i| all[i as usize]).collect::<Vec<_>>());
        assert_eq!(v.fps, Some(29.97));
        assert_eq!(v.duration, Some(1.5 * all.len() as f64));
    }
    let again = import_official_h5(&fx.join("feats_wo_norm_tiny.h5"), dir.path(), &clip, &times, &opts, &mut |_| {})?;
    assert_eq!((again.done, again.skipped, again.failed.len()), (0, 3, 1));
    Ok(())
}
