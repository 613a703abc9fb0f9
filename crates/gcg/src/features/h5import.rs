//! Import of the official feature file (`utils/extract_features.py` of the GCG code:
//! `feats_wo_norm_32.h5`, one f16 dataset [257, 1408] per frame named `{video}_frame_{i}` at the
//! root) into the store, with the CLIP frame embeddings computed from the imported features.
//!
//! The file knows no frame times; NExT-GQA's `frame2time_*.json` ({video: [seconds, …]}) and
//! `gsub_*.json` ({video: {duration, fps, …}}) provide them when given ([`VideoTimes`]).
//! The HDF5 reading itself needs the cargo feature `hdf5` (and libhdf5).

#[cfg(feature = "hdf5")]
use super::extract::{ExtractProgress, ExtractReport};
use crate::store::WriterOptions;
use crate::video::{uniform_indices, UniformRule};
use anyhow::{anyhow, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Frame times and video metadata from the NExT-GQA files.
#[derive(Debug, Clone, Default)]
pub struct VideoTimes {
    pub timestamps: HashMap<String, Vec<f64>>,
    pub duration: HashMap<String, f64>,
    pub fps: HashMap<String, f64>,
}

impl VideoTimes {
    pub fn from_files(frame2time: Option<&Path>, gsub: Option<&Path>) -> Result<Self> {
        let mut out = Self::default();
        let read = |p: &Path| -> Result<serde_json::Value> {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))
        };
        if let Some(p) = frame2time {
            out.timestamps =
                serde_json::from_value(read(p)?).with_context(|| format!("{} should map video ids to lists of seconds", p.display()))?;
        }
        if let Some(p) = gsub {
            let v = read(p)?;
            let obj = v
                .as_object()
                .ok_or_else(|| anyhow!("{} should map video ids to objects", p.display()))?;
            for (id, m) in obj {
                if let Some(d) = m.get("duration").and_then(|x| x.as_f64()) {
                    out.duration.insert(id.clone(), d);
                }
                if let Some(f) = m.get("fps").and_then(|x| x.as_f64()) {
                    out.fps.insert(id.clone(), f);
                }
            }
        }
        Ok(out)
    }
}

/// Groups dataset names `{video}_frame_{i}` by video, each video's frames sorted by i.
/// Other names are an error.
pub fn group_frame_datasets<I: IntoIterator<Item = String>>(names: I) -> Result<BTreeMap<String, Vec<(usize, String)>>> {
    let mut out: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for name in names {
        let (video, i) = name
            .rsplit_once("_frame_")
            .and_then(|(v, i)| i.parse::<usize>().ok().map(|i| (v.to_string(), i)))
            .ok_or_else(|| anyhow!("dataset {name:?} is not named {{video}}_frame_{{i}}"))?;
        out.entry(video).or_default().push((i, name));
    }
    for (video, frames) in &mut out {
        frames.sort();
        for w in frames.windows(2) {
            ensure!(w[0].0 != w[1].0, "video {video}: frame {} appears twice", w[0].0);
        }
    }
    Ok(out)
}

/// The frames to take out of a video's stored ones: all when there are exactly T, else
/// `round(linspace(0, n - 1, T))` of the sorted frames (an error when there are fewer than T).
pub fn select_frames(video: &str, frames: &[(usize, String)], t: usize) -> Result<Vec<usize>> {
    ensure!(
        frames.len() >= t,
        "video {video} has {} frames in the file, fewer than the {t} asked for",
        frames.len()
    );
    Ok(uniform_indices(frames.len(), t, UniformRule::RoundExact))
}

/// Settings of [`import_official_h5`].
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub num_frames: usize,
    pub overwrite: bool,
    pub writer: WriterOptions,
    /// The CLIP image head's identity ([`crate::features::provenance::image_models`] style);
    /// each video records `h5:<file fingerprint>` as its sampling and this as its networks.
    pub clip_models: Option<String>,
}

/// Imports every video of the official feature file into the store (skipping stored ones unless
/// `overwrite`); a video that fails is reported and the others go on.
#[cfg(feature = "hdf5")]
pub fn import_official_h5(
    h5_path: &Path,
    store_dir: &Path,
    clip: &crate::models::clip_branch::ClipImageHead,
    times: &VideoTimes,
    opts: &ImportOptions,
    progress: &mut dyn FnMut(ExtractProgress<'_>),
) -> Result<ExtractReport> {
    use crate::store::{StoreWriter, VideoRecord};
    use candle_core::{DType, Tensor};
    use half::f16;

    let file = hdf5::File::open(h5_path).with_context(|| format!("opening the HDF5 file {}", h5_path.display()))?;
    let names = file
        .member_names()
        .with_context(|| format!("listing the datasets of {}", h5_path.display()))?;
    let videos = group_frame_datasets(names).with_context(|| format!("reading {}", h5_path.display()))?;
    let mut writer = StoreWriter::open(store_dir, opts.writer.clone())?;
    let extractor = match &opts.clip_models {
        Some(m) => Some(crate::features::provenance::extractor(
            format!("h5:{}", crate::features::provenance::files_fingerprint(&[h5_path.to_path_buf()])?),
            m.clone(),
        )),
        None => None,
    };
    let jobs: Vec<crate::features::extract::VideoJob> = videos
        .keys()
        .map(|id| crate::features::extract::VideoJob {
            id: id.clone(),
            path: h5_path.to_path_buf(),
        })
        .collect();
    let planned = crate::features::extract::plan_videos(
        writer.index(),
        store_dir,
        &jobs,
        opts.num_frames,
        extractor.as_ref(),
        opts.overwrite,
    )?;
    let planned: std::collections::HashSet<&str> = planned.iter().map(|j| j.id.as_str()).collect();
    let todo: Vec<(&String, &Vec<(usize, String)>)> = videos.iter().filter(|(id, _)| planned.contains(id.as_str())).collect();
    let mut report = ExtractReport {
        skipped: videos.len() - todo.len(),
        ..Default::default()
    };
    progress(ExtractProgress::Start {
        total: videos.len(),
        skipped: report.skipped,
    });
    let dev = clip.head.weight.device().clone();
    let dtype = clip.head.weight.dtype();
    for (id, frames) in todo {
        let rec = (|| -> Result<VideoRecord> {
            let sel = select_frames(id, frames, opts.num_frames)?;
            let mut data: Vec<f16> = Vec::new();
            let mut shape: Option<Vec<usize>> = None;
            for &s in &sel {
                let name = &frames[s].1;
                let ds = file.dataset(name).with_context(|| format!("opening dataset {name}"))?;
                let dims = ds.shape();
                ensure!(dims.len() == 2, "dataset {name}: shape {dims:?}, expected [tokens, width]");
                match &shape {
                    None => shape = Some(dims.clone()),
                    Some(s0) => ensure!(*s0 == dims, "dataset {name}: shape {dims:?}, other frames have {s0:?}"),
                }
                let v: Vec<f16> = ds.read_raw::<f16>().with_context(|| format!("reading dataset {name} as float16"))?;
                ensure!(
                    v.len() == dims[0] * dims[1],
                    "dataset {name}: {} values for shape {dims:?}",
                    v.len()
                );
                data.extend(v);
            }
            let shape = shape.ok_or_else(|| anyhow!("video {id} has no frames"))?;
            let (t, n, d) = (sel.len(), shape[0], shape[1]);
            let features = Tensor::from_vec(data, (t, n, d), &candle_core::Device::Cpu)?;
            let embeds = clip.forward(&features.to_device(&dev)?.to_dtype(dtype)?)?;
            let ts = match times.timestamps.get(id.as_str()) {
                Some(all) if all.len() == frames.len() => sel.iter().map(|&i| all[i]).collect(),
                Some(all) => anyhow::bail!(
                    "video {id}: frame2time lists {} times for {} frames in the file",
                    all.len(),
                    frames.len()
                ),
                None => Vec::new(),
            };
            let mut rec = VideoRecord::from_tensors(id.clone(), &features, &embeds.to_dtype(DType::F32)?, ts)?;
            rec.duration = times.duration.get(id.as_str()).copied();
            rec.fps = times.fps.get(id.as_str()).copied();
            rec.source = Some(format!("{}:{id}", h5_path.display()));
            rec.extractor = extractor.clone();
            Ok(rec)
        })();
        match rec.and_then(|r| {
            let frames = r.num_frames();
            writer.add_video(r).map(|_| frames)
        }) {
            Ok(frames) => {
                report.done += 1;
                progress(ExtractProgress::Done { video: id, frames });
            }
            Err(e) => {
                let err = format!("{e:#}");
                progress(ExtractProgress::Failed { video: id, error: &err });
                report.failed.push((id.clone(), err));
            }
        }
    }
    writer.finish()?;
    Ok(report)
}
