//! Property tests over every reader of user files: random bytes and mutated valid files (bytes
//! replaced, inserted, deleted, cut, or syntax tokens spliced in) never panic, and every error
//! names the file it is about (and, for line-based files, a line).
//!
//! Readers: the NExT-QA / NExT-GQA / IntentQA CSVs, the Causal-VidQA QA folder, the STAR JSON,
//! the TrafficQA and VLEP JSON Lines, the open-ended JSON, NExT-GQA's gsub and frame2time JSON, prediction JSONL, run TOML, the feature store's
//! index, safetensors headers (weights and store shards) and `.pth` pickles.

use gcg::data::nextgqa::{FrameTimes, Grounding};
use gcg::data::{read_annotations, Dataset, ReadOptions};
use gcg::eval::predictions::read_predictions;
use gcg::run::RunConfig;
use gcg::store::{read_header, Store};
use gcg::weights::pth::PthSource;
use gcg::weights::SafetensorsSource;
use proptest::prelude::*;
use std::io::Read;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn gunzip_head(path: &Path, lines: usize) -> Vec<u8> {
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut s)
        .unwrap();
    let mut out: String = s.split_inclusive('\n').take(lines).collect();
    if out.is_empty() {
        out = s;
    }
    out.into_bytes()
}

/// Pieces of syntax worth splicing into text formats.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b",",
    b"\n",
    b"\r\n",
    b"\r",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b"=",
    b"-1",
    b"1e309",
    b"NaN",
    b"null",
    b"\0",
    b"\xff\xfe",
    b"\"\"",
    b",,,,",
    b"[[",
    b"\t",
    b"9999999999999999999999",
    b"0.5",
    b"true",
];

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Cut(usize),
    Token(usize, usize),
    Repeat(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Replace(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        (any::<usize>(), 1usize..16).prop_map(|(p, n)| Edit::Delete(p, n)),
        any::<usize>().prop_map(Edit::Cut),
        (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Edit::Token(p, t)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Edit::Repeat(p, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len();
        let at = |p: usize| if len == 0 { 0 } else { p % (len + 1) };
        match *e {
            Edit::Replace(p, b) if len > 0 => bytes[p % len] = b,
            Edit::Insert(p, b) => bytes.insert(at(p), b),
            Edit::Delete(p, n) if len > 0 => {
                let s = p % len;
                bytes.drain(s..(s + n).min(len));
            }
            Edit::Cut(p) => bytes.truncate(at(p)),
            Edit::Token(p, t) => {
                let tok = TOKENS[t % TOKENS.len()];
                let s = at(p);
                bytes.splice(s..s, tok.iter().copied());
            }
            Edit::Repeat(p, n) if len > 0 => {
                let s = p % len;
                let piece: Vec<u8> = bytes[s..(s + n).min(len)].to_vec();
                bytes.splice(s..s, piece);
            }
            _ => {}
        }
    }
    bytes
}

/// Mutated versions of `seed`, or (one case in eight) random bytes.
fn inputs(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        7 => prop::collection::vec(edit(), 1..6).prop_map(move |e| apply(seed.clone(), &e)),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
}

/// The error's whole chain must name `path` (its file name suffices).
fn names_file(e: &anyhow::Error, path: &Path) -> Result<(), TestCaseError> {
    let msg = format!("{e:#}");
    let name = path.file_name().unwrap().to_string_lossy();
    prop_assert!(msg.contains(name.as_ref()), "the error does not name {name}: {msg}");
    Ok(())
}

/// 96 cases per reader (CI); `PROPTEST_CASES=N` for a longer search.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(96),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn benchmark_csvs(
        nextqa in inputs(gunzip_head(&fixtures().join("data/nextqa/val.csv.gz"), 12)),
        nextgqa in inputs(gunzip_head(&fixtures().join("data/nextgqa/val.csv.gz"), 12)),
        intentqa in inputs(std::fs::read(fixtures().join("data/intentqa/sample.csv")).unwrap()),
        skip in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let opts = if skip { ReadOptions::skip_bad_rows() } else { ReadOptions::strict() };
        for (dataset, name, bytes) in [
            (Dataset::NextQa, "nextqa_val.csv", &nextqa),
            (Dataset::NextGqa, "nextgqa_val.csv", &nextgqa),
            (Dataset::IntentQa, "intentqa_train.csv", &intentqa),
        ] {
            let path = write(dir.path(), name, bytes);
            if let Err(e) = read_annotations(dataset, &path, &opts) {
                names_file(&e, &path)?;
                let msg = format!("{e:#}");
                // A row-level problem says where; whole-file problems (not UTF-8, no header,
                // empty) need not.
                if msg.contains("column") || msg.contains("field") {
                    prop_assert!(msg.contains(&format!("{name}:")), "no line in {msg}");
                }
            }
        }
    }

    #[test]
    fn causalvidqa_folders(
        text in inputs(std::fs::read(fixtures().join("data/causalvidqa/QA/vid_a/text.json")).unwrap()),
        answer in inputs(std::fs::read(fixtures().join("data/causalvidqa/QA/vid_a/answer.json")).unwrap()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let qa = dir.path().join("QA");
        for v in ["vid_a", "vid_b"] {
            std::fs::create_dir_all(qa.join(v)).unwrap();
            for f in ["text.json", "answer.json"] {
                std::fs::copy(fixtures().join("data/causalvidqa/QA").join(v).join(f), qa.join(v).join(f)).unwrap();
            }
        }
        let text_path = write(&qa.join("vid_a"), "text.json", &text);
        let answer_path = write(&qa.join("vid_a"), "answer.json", &answer);
        for opts in [ReadOptions::strict(), ReadOptions::skip_bad_rows()] {
            if let Err(e) = read_annotations(Dataset::CausalVidQa, &qa, &opts) {
                let msg = format!("{e:#}");
                prop_assert!(
                    msg.contains(&*text_path.to_string_lossy()) || msg.contains(&*answer_path.to_string_lossy())
                        || msg.contains("vid_a"),
                    "the error names neither file nor video: {msg}"
                );
            }
        }
    }

    #[test]
    fn star_trafficqa_vlep(
        star in inputs(star_head(4)),
        traffic in inputs(std::fs::read(fixtures().join("data/trafficqa/R3_test.jsonl")).unwrap()),
        vlep in inputs(std::fs::read(fixtures().join("data/vlep/vlep_dev_release.jsonl")).unwrap()),
        skip in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let opts = if skip { ReadOptions::skip_bad_rows() } else { ReadOptions::strict() };
        let path = write(dir.path(), "STAR_val.json", &star);
        if let Err(e) = read_annotations(Dataset::Star, &path, &opts) {
            names_file(&e, &path)?;
        }
        // JSON Lines: a problem in a row names its line.
        for (dataset, name, bytes) in [
            (Dataset::TrafficQa, "R3_test.jsonl", &traffic),
            (Dataset::Vlep, "vlep_dev_release.jsonl", &vlep),
        ] {
            let path = write(dir.path(), name, bytes);
            if let Err(e) = read_annotations(dataset, &path, &opts) {
                names_file(&e, &path)?;
                let msg = format!("{e:#}");
                if msg.contains("column") {
                    prop_assert!(msg.contains(&format!("{name}:")), "no line in {msg}");
                }
            }
        }
    }

    #[test]
    fn open_ended_and_nextgqa_json(
        open in inputs(std::fs::read(fixtures().join("data/open_ended/msrvtt_test_qa.json")).unwrap()),
        gsub in inputs(gunzip_head(&fixtures().join("data/nextgqa/gsub_val.json.gz"), 1).into_iter().take(1500).collect()),
        f2t in inputs(gunzip_head(&fixtures().join("data/nextgqa/frame2time_val.json.gz"), 1).into_iter().take(1500).collect()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "msrvtt_test_qa.json", &open);
        if let Err(e) = read_annotations(Dataset::OpenEnded, &path, &ReadOptions::strict()) {
            names_file(&e, &path)?;
        }
        let path = write(dir.path(), "gsub_val.json", &gsub);
        for opts in [ReadOptions::strict(), ReadOptions::skip_bad_rows()] {
            if let Err(e) = Grounding::read_with(&path, &opts) {
                names_file(&e, &path)?;
            }
        }
        let path = write(dir.path(), "frame2time_val.json", &f2t);
        if let Err(e) = FrameTimes::read(&path) {
            names_file(&e, &path)?;
        }
    }

    #[test]
    fn prediction_files(
        preds in inputs(
            b"{\"video\": \"4882821564\", \"qid\": \"1\", \"prediction\": 2, \"frames\": [1, 5, 9], \"seconds\": [0.5, 2.5, 4.5]}\n\
              {\"video\": \"2435100235\", \"qid\": \"7\", \"prediction\": 0, \"span\": [1.0, 3.5]}\n".to_vec()
        ),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "predictions-val.jsonl", &preds);
        match read_predictions(&path) {
            Err(e) => names_file(&e, &path)?,
            // Row problems are reported with their line (within the file).
            Ok(f) => {
                let lines = preds.split(|&b| b == b'\n').count() as u64;
                for p in &f.problems {
                    prop_assert!(p.line >= 1 && p.line <= lines, "line {} of {lines}", p.line);
                }
            }
        }
    }

    #[test]
    fn run_configs(
        toml in inputs(
            b"run_dir = \"runs/x\"\ndevice = \"cpu\"\n[weights]\npreset = \"tiny\"\nseed = 3\n\
              [model]\nmode = \"grounding\"\nalpha_reg = 1.0\n[model.grounding]\nwidth = 0.2\n\
              [data]\nstore = \"store\"\ndataset = \"nextqa\"\ntrain = \"train.csv\"\n\
              [train]\nepochs = 2\nlr = 1e-5\nschedule = \"warmup-cosine\"\n".to_vec()
        ),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "run.toml", &toml);
        if let Err(e) = RunConfig::load(Some(&path), &[]) {
            names_file(&e, &path)?;
        }
    }

    #[test]
    fn store_indexes(index in inputs(store_index_fixture())) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shards")).unwrap();
        let path = write(dir.path(), "index.json", &index);
        match Store::open(dir.path()) {
            Err(e) => names_file(&e, &path)?,
            // An index that parses and validates is used as far as it goes: reads of missing
            // shards are errors, never panics.
            Ok(s) => {
                let snap = s.snapshot();
                let _ = snap.verify();
                for id in snap.index().videos.keys().cloned().collect::<Vec<_>>() {
                    let _ = snap.features(&id).and_then(|f| f.to_f32());
                }
            }
        }
    }

    #[test]
    fn safetensors_headers(file in inputs(safetensors_fixture())) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "model.safetensors", &file);
        match SafetensorsSource::open(&path) {
            Err(e) => names_file(&e, &path)?,
            Ok(src) => {
                use gcg::weights::TensorSource;
                for n in src.names() {
                    if let Err(e) = src.load(&n, &candle_core::Device::Cpu) {
                        names_file(&e, &path)?;
                    }
                }
            }
        }
        if let Err(e) = read_header(&path) {
            names_file(&e, &path)?;
        }
    }

    #[test]
    fn pth_pickles(file in inputs(std::fs::read(fixtures().join("parity/tiny-s0/gcg/eva_vit_post_layernorm.pth")).unwrap())) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "weights.pth", &file);
        match PthSource::open(&path, None, "") {
            Err(e) => names_file(&e, &path)?,
            Ok(src) => {
                use gcg::weights::TensorSource;
                for n in src.names() {
                    if let Err(e) = src.load(&n, &candle_core::Device::Cpu) {
                        names_file(&e, &path)?;
                    }
                }
            }
        }
    }
}

/// A small real store's index (two videos, one question).
/// The first `n` questions of the STAR fixture, as a JSON list (a valid, small seed).
fn star_head(n: usize) -> Vec<u8> {
    let all: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("data/star/STAR_val.json")).unwrap()).unwrap();
    let head: Vec<serde_json::Value> = all.as_array().unwrap().iter().take(n).cloned().collect();
    serde_json::to_vec(&head).unwrap()
}

fn store_index_fixture() -> Vec<u8> {
    use gcg::store::{StoreWriter, VideoRecord, WriterOptions};
    let dir = tempfile::tempdir().unwrap();
    let mut w = StoreWriter::open(dir.path(), WriterOptions::default()).unwrap();
    for id in ["a", "b"] {
        w.add_video(VideoRecord {
            id: id.into(),
            features: vec![half::f16::from_f32(0.5); 2 * 3 * 4],
            features_shape: [2, 3, 4],
            frame_embeds: vec![0.25; 2 * 5],
            embed_dim: 5,
            timestamps: vec![0.5, 1.5],
            duration: Some(2.0),
            fps: Some(30.0),
            source: None,
            source_fingerprint: None,
            extractor: None,
            embeddings_only: false,
        })
        .unwrap();
    }
    w.finish().unwrap();
    std::fs::read(dir.path().join("index.json")).unwrap()
}

/// A small safetensors file with three tensors of different dtypes.
fn safetensors_fixture() -> Vec<u8> {
    use candle_core::{DType, Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let dev = Device::Cpu;
    let tensors: std::collections::HashMap<String, Tensor> = [
        ("a.weight".to_string(), Tensor::ones((3, 4), DType::F32, &dev).unwrap()),
        ("b.bias".to_string(), Tensor::zeros(4, DType::F16, &dev).unwrap()),
        ("c.ids".to_string(), Tensor::zeros(2, DType::I64, &dev).unwrap()),
    ]
    .into();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    std::fs::read(path).unwrap()
}
