//! NExT-GQA (grounded QA): the NExT-QA val/test questions without the descriptive ones, with
//! `video_id` first and the answer written as TEXT (mapped here to the first option equal to it),
//! `gsub_{val,test}.json` (the ground-truth evidence segments in seconds) and
//! `frame2time_{val,test}.json` (timestamps of the sampled frames).

use super::mc_csv::{read_mc_csv, AnswerColumn, McCsvFormat, NEXTQA_TYPES};
use super::read::{read_json_file, Annotations, BadRow, OJson, ReadOptions, RowSink};
use super::{Dataset, QaSample};
use anyhow::{anyhow, Result};
use std::collections::HashMap;
use std::path::Path;

const FORMAT: McCsvFormat = McCsvFormat {
    dataset: Dataset::NextGqa,
    video_columns: &["video_id", "video"],
    answer: AnswerColumn::Text,
    extra_required: &[],
    extra_optional: &[],
    types: &NEXTQA_TYPES,
};

/// Read a NExT-GQA split (`val.csv`, `test.csv`; `train.csv` has the same format).
pub fn read(path: &Path) -> Result<Vec<QaSample>> {
    Ok(read_with(path, &ReadOptions::strict())?.samples)
}

pub fn read_with(path: &Path, opts: &ReadOptions) -> Result<Annotations> {
    read_mc_csv(path, &FORMAT, opts)
}

/// The ground truth of one video in `gsub_*.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundingVideo {
    pub video: String,
    /// Seconds.
    pub duration: f64,
    pub fps: f64,
    /// Question id → evidence segments `[start, end]` in seconds, in file order. Empty for a few
    /// videos.
    pub location: Vec<(String, Vec<[f64; 2]>)>,
}

/// `gsub_{val,test}.json`: `{video: {duration, fps, location: {qid: [[start, end], ...]}}}`,
/// kept in file order (the official `eval_ground.py` iterates it in that order).
#[derive(Debug, Clone, Default)]
pub struct Grounding {
    pub videos: Vec<GroundingVideo>,
    index: HashMap<String, usize>,
    /// Entries skipped with `skip_bad_rows`.
    pub bad_rows: Vec<BadRow>,
}

impl Grounding {
    /// Read strictly: any malformed entry is an error naming the file, video, qid and field.
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_with(path, &ReadOptions::strict())
    }

    pub fn read_with(path: &Path, opts: &ReadOptions) -> Result<Self> {
        let json = read_json_file(path)?;
        Self::from_json(path, json, opts)
    }

    fn from_json(path: &Path, json: OJson, opts: &ReadOptions) -> Result<Self> {
        let OJson::Obj(entries) = json else {
            return Err(anyhow!(BadRow::new(
                path,
                format!("expected an object {{video: {{duration, fps, location}}}}, found {}", json.kind())
            )));
        };
        let mut sink = RowSink::new(opts);
        let mut videos = Vec::with_capacity(entries.len());
        for (video, v) in entries {
            let entry = format!("video {video}");
            let num = |field: &str| -> Result<f64, BadRow> {
                let x = v
                    .get(field)
                    .ok_or_else(|| BadRow::new(path, "missing field").entry(&entry).column(field))?;
                match x.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 => Ok(f),
                    _ => Err(BadRow::new(path, format!("expected a non-negative number, found {}", x.preview()))
                        .entry(&entry)
                        .column(field)),
                }
            };
            let (duration, fps) = match (num("duration"), num("fps")) {
                (Ok(d), Ok(f)) => (d, f),
                (Err(b), _) | (_, Err(b)) => {
                    sink.reject(b)?;
                    continue;
                }
            };
            let location = match v.get("location") {
                Some(OJson::Obj(kv)) => kv,
                other => {
                    let found = other.map(|o| o.kind()).unwrap_or("nothing");
                    sink.reject(
                        BadRow::new(path, format!("expected an object {{qid: [[start, end], ...]}}, found {found}"))
                            .entry(&entry)
                            .column("location"),
                    )?;
                    continue;
                }
            };
            let mut loc = Vec::with_capacity(location.len());
            for (qid, segs) in location {
                match parse_segments(segs) {
                    Ok(s) => loc.push((qid.clone(), s)),
                    Err(reason) => sink.reject(BadRow::new(path, reason).entry(&entry).column(format!("location.{qid}")))?,
                }
            }
            videos.push(GroundingVideo {
                video,
                duration,
                fps,
                location: loc,
            });
        }
        let index = videos.iter().enumerate().map(|(i, v)| (v.video.clone(), i)).collect();
        Ok(Self {
            videos,
            index,
            bad_rows: sink.bad,
        })
    }

    pub fn video(&self, video: &str) -> Option<&GroundingVideo> {
        self.index.get(video).map(|&i| &self.videos[i])
    }

    /// The evidence segments of one question, if it is in the grounding subset.
    pub fn segments(&self, video: &str, qid: &str) -> Option<&[[f64; 2]]> {
        let v = self.video(video)?;
        v.location.iter().find(|(q, _)| q == qid).map(|(_, s)| s.as_slice())
    }

    /// Number of questions with a location entry.
    pub fn num_questions(&self) -> usize {
        self.videos.iter().map(|v| v.location.len()).sum()
    }
}

fn parse_segments(segs: &OJson) -> Result<Vec<[f64; 2]>, String> {
    let OJson::Arr(list) = segs else {
        return Err(format!("expected a list of [start, end] segments, found {}", segs.kind()));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let pair = match s {
            OJson::Arr(p) if p.len() == 2 => (p[0].as_f64(), p[1].as_f64()),
            _ => return Err(format!("segment {i}: expected [start, end] in seconds, found {}", s.preview())),
        };
        match pair {
            (Some(a), Some(b)) if a.is_finite() && b.is_finite() && a <= b => out.push([a, b]),
            (Some(a), Some(b)) if a.is_finite() && b.is_finite() => {
                return Err(format!("segment {i}: start {a} is after end {b}"));
            }
            _ => return Err(format!("segment {i}: expected two finite numbers, found {}", s.preview())),
        }
    }
    Ok(out)
}

/// `frame2time_{val,test}.json`: video id → the timestamps (seconds) of its sampled frames.
#[derive(Debug, Clone, Default)]
pub struct FrameTimes {
    map: HashMap<String, Vec<f64>>,
}

impl FrameTimes {
    pub fn read(path: &Path) -> Result<Self> {
        let json = read_json_file(path)?;
        let OJson::Obj(entries) = json else {
            return Err(anyhow!(BadRow::new(
                path,
                format!("expected an object {{video: [seconds, ...]}}, found {}", json.kind())
            )));
        };
        let mut map = HashMap::with_capacity(entries.len());
        for (video, times) in entries {
            let bad = |reason: String| anyhow!(BadRow::new(path, reason).entry(format!("video {video}")));
            let OJson::Arr(list) = times else {
                return Err(bad(format!("expected a list of timestamps, found {}", times.kind())));
            };
            let mut ts = Vec::with_capacity(list.len());
            for (i, t) in list.iter().enumerate() {
                match t.as_f64() {
                    Some(x) if x.is_finite() => ts.push(x),
                    _ => return Err(bad(format!("timestamp {i}: expected a number, found {}", t.preview()))),
                }
            }
            map.insert(video, ts);
        }
        Ok(Self { map })
    }

    pub fn get(&self, video: &str) -> Option<&[f64]> {
        self.map.get(video).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
