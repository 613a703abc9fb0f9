//! NExT-QA (multiple choice): `video,frame_count,width,height,question,answer,qid,type,a0..a4`
//! with the answer as an option index, and `map_vid_vidorID.json` (video id → mp4 path in the
//! release, without extension).

use super::mc_csv::{read_mc_csv, AnswerColumn, McCsvFormat, NEXTQA_TYPES};
use super::read::{read_json_file, Annotations, BadRow, OJson, ReadOptions, RowSink};
use super::{Dataset, QaSample};
use anyhow::{anyhow, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FORMAT: McCsvFormat = McCsvFormat {
    dataset: Dataset::NextQa,
    video_columns: &["video"],
    answer: AnswerColumn::Index,
    extra_required: &[],
    extra_optional: &[],
    types: &NEXTQA_TYPES,
};

/// Read a NExT-QA split (`train.csv`, `val.csv`, `test.csv`); the first malformed row is an error.
pub fn read(path: &Path) -> Result<Vec<QaSample>> {
    Ok(read_with(path, &ReadOptions::strict())?.samples)
}

/// Read a NExT-QA split with options (skip and report bad rows).
pub fn read_with(path: &Path, opts: &ReadOptions) -> Result<Annotations> {
    read_mc_csv(path, &FORMAT, opts)
}

/// `map_vid_vidorID.json`: video id → relative path of its mp4 (without `.mp4`), e.g.
/// `"2909445186": "0101/2909445186"`.
#[derive(Debug, Clone, Default)]
pub struct VideoPaths {
    map: HashMap<String, String>,
}

impl VideoPaths {
    pub fn read(path: &Path) -> Result<Self> {
        let json = read_json_file(path)?;
        let OJson::Obj(entries) = json else {
            return Err(anyhow!(BadRow::new(
                path,
                format!("expected an object {{video id: path}}, found {}", json.kind())
            )));
        };
        let mut sink = RowSink::new(&ReadOptions::strict());
        let mut map = HashMap::with_capacity(entries.len());
        for (video, rel) in entries {
            match rel.as_str() {
                Some(r) if !r.is_empty() => {
                    map.insert(video, r.to_string());
                }
                _ => sink.reject(
                    BadRow::new(path, format!("expected a relative video path, found {}", rel.preview())).entry(format!("video {video}")),
                )?,
            }
        }
        Ok(Self { map })
    }

    pub fn from_map(map: HashMap<String, String>) -> Self {
        Self { map }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The relative path (without extension) of a video.
    pub fn get(&self, video: &str) -> Option<&str> {
        self.map.get(video).map(String::as_str)
    }

    /// `root/{relative path}.mp4`.
    pub fn video_file(&self, root: &Path, video: &str) -> Result<PathBuf> {
        let rel = self
            .get(video)
            .ok_or_else(|| anyhow!("video {video} is not in the video map ({} videos)", self.map.len()))?;
        Ok(root.join(format!("{rel}.mp4")))
    }
}
