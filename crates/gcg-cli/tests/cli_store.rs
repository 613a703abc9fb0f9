//! `gcg features`, `gcg labels` and `gcg bench store` end to end with the tiny random networks:
//! killed runs resume to the same store, failures are listed, labels equal a direct computation.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gcg::features::frozen;
use gcg::store::Store;
use gcg::text::tokenizers::ClipTokenizer;
use gcg::SeededRng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SEED: u64 = 9;
const FILE_FRAMES: usize = 6;
const T: usize = 4;

fn gcg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gcg"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn bpe() -> PathBuf {
    repo_root().join("tests/fixtures/tokenizers/clip/bpe_first3000.txt.gz")
}

fn pixels(i: u64) -> Tensor {
    let mut rng = SeededRng::new(100 + i);
    Tensor::from_vec(
        rng.normal_vec(FILE_FRAMES * 3 * 42 * 42, 0.0, 1.0),
        (FILE_FRAMES, 3, 42, 42),
        &Device::Cpu,
    )
    .unwrap()
}

/// Five pre-decoded videos (6 frames each) and one unreadable file.
fn videos(dir: &Path) -> Result<()> {
    for i in 0..5u64 {
        let ts = Tensor::new((0..FILE_FRAMES).map(|t| t as f64 * 0.5).collect::<Vec<f64>>(), &Device::Cpu)?;
        let map: HashMap<String, Tensor> = [("pixel_values".to_string(), pixels(i)), ("timestamps".to_string(), ts)].into();
        candle_core::safetensors::save(&map, dir.join(format!("vid{i}.safetensors")))?;
    }
    std::fs::write(dir.join("bad.safetensors"), b"not a safetensors file")?;
    Ok(())
}

fn features_cmd(videos: &Path, store: &Path) -> Command {
    features_cmd_with(videos, store, &[])
}

/// `features_cmd` with `(flag, value)` pairs replacing the defaults of `--seed`/`--num-frames`
/// or added.
fn features_cmd_with(videos: &Path, store: &Path, flags: &[(&str, &str)]) -> Command {
    let mut c = gcg();
    c.args(["features", "--videos"]).arg(videos).arg("--store").arg(store);
    c.args(["--preset", "tiny", "--random-weights", "--shard-mb", "0", "--jobs", "2"]);
    let mut all: Vec<(&str, String)> = vec![("--seed", SEED.to_string()), ("--num-frames", T.to_string())];
    for (f, v) in flags {
        all.retain(|(g, _)| g != f);
        all.push((f, v.to_string()));
    }
    for (f, v) in all {
        c.args([f, v.as_str()]);
    }
    c
}

fn run(mut c: Command) -> Output {
    c.output().expect("running gcg")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stored(store: &Path) -> Vec<String> {
    Store::open(store).unwrap().snapshot().index().videos.keys().cloned().collect()
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in [dir.to_path_buf(), dir.join("shards")] {
        for e in std::fs::read_dir(d).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            if name.contains(".tmp-") {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn features_survive_kills_and_report_failures() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let vids = tmp.path().join("videos");
    std::fs::create_dir(&vids)?;
    videos(&vids)?;
    let store = tmp.path().join("store");

    // Killed after 3 videos were computed (some may not be written yet).
    let mut c = features_cmd(&vids, &store);
    c.env("GCG_FEATURES_ABORT_AFTER", "3");
    let o = run(c);
    assert!(!o.status.success(), "{}", stderr(&o));
    #[cfg(unix)]
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(6), "{}", stderr(&o));
    let after_kill = stored(&store);
    assert!(after_kill.len() <= 3, "{after_kill:?}");

    // Killed while publishing the first new shard: the index is unchanged, a temp file stays.
    let mut c = features_cmd(&vids, &store);
    c.env("GCG_STORE_FAULT", "index-written:1:abort");
    let o = run(c);
    assert!(!o.status.success());
    assert_eq!(stored(&store), after_kill);
    assert_eq!(temp_files(&store).len(), 1, "{:?}", temp_files(&store));
    Store::open(&store)?.snapshot().verify()?;

    // The third run finishes the job; the unreadable file is listed and the exit code says so.
    let o = run(features_cmd(&vids, &store));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("1 failed") && err.contains("bad:") && err.contains("bad.safetensors"),
        "{err}"
    );
    let ids: Vec<String> = (0..5).map(|i| format!("vid{i}")).collect();
    assert_eq!(stored(&store), ids);
    assert!(temp_files(&store).is_empty(), "stale temp files: {:?}", temp_files(&store));

    // The same store as one uninterrupted run, and the same features as the model directly.
    let clean = tmp.path().join("clean");
    let o = run(features_cmd(&vids, &clean));
    assert_eq!(o.status.code(), Some(1));
    let (a, b) = (Store::open(&store)?.snapshot(), Store::open(&clean)?.snapshot());
    let (vit_cfg, clip_cfg) = frozen::preset(gcg::models::Preset::Tiny);
    let vit = frozen::random_vit(&vit_cfg, &Device::Cpu, DType::F32, SEED)?;
    let clip = frozen::random_clip_image(&clip_cfg, &Device::Cpu, DType::F32, SEED)?;
    for (i, id) in ids.iter().enumerate() {
        let fa: Vec<u16> = a.features(id)?.as_f16()?.iter().map(|x| x.to_bits()).collect();
        let fb: Vec<u16> = b.features(id)?.as_f16()?.iter().map(|x| x.to_bits()).collect();
        assert_eq!(fa, fb, "{id}");
        // Frames 0, 2, 3, 5 of 6 (round(linspace(0, 5, 4))).
        let sel = Tensor::new(&[0u32, 2, 3, 5], &Device::Cpu)?;
        let direct = vit
            .forward_wo_norm(&pixels(i as u64).index_select(&sel, 0)?)?
            .to_dtype(DType::F16)?;
        let want: Vec<u16> = direct.flatten_all()?.to_vec1::<half::f16>()?.iter().map(|x| x.to_bits()).collect();
        assert_eq!(fa, want, "{id} against the ViT");
        let emb = clip.forward(&direct.to_dtype(DType::F32)?)?.flatten_all()?.to_vec1::<f32>()?;
        let got = a.frame_embeds(id)?.to_f32()?;
        let scale = emb.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = emb.iter().zip(&got).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-6 * scale, "{id}: frame embeddings differ by {diff}");
        assert_eq!(a.video(id)?.timestamps, vec![0.0, 1.0, 1.5, 2.5]);
    }
    Ok(())
}

#[test]
fn labels_and_bench_on_a_small_store() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let vids = tmp.path().join("videos");
    std::fs::create_dir(&vids)?;
    videos(&vids)?;
    std::fs::remove_file(vids.join("bad.safetensors"))?;
    let store = tmp.path().join("store");
    let o = run(features_cmd(&vids, &store));
    assert!(o.status.success(), "{}", stderr(&o));

    // NExT-QA columns; one question's video is not in the store.
    let csv = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n\
               vid0,369,640,480,how do the two man play the instrument,2,6,CH,roll the handle,tap their feet,strum the string,hit with sticks,pat with hand\n\
               vid1,2697,640,480,why did the boy pick up one present,4,1,CW,share with the girl,approach lady,unwrap it,playing with toy train,gesture something\n\
               vid3,100,640,480,what does the dog do,0,2,TN,run away,sleep,bark,eat,jump\n\
               missing,100,640,480,what happens,1,3,TN,a,b,c,d,e\n";
    let ann = tmp.path().join("val.csv");
    std::fs::write(&ann, csv)?;
    let labels = |extra: &[&str]| {
        let mut c = gcg();
        c.args(["labels", "--store"]).arg(&store).arg("--annotations").arg(&ann);
        c.args([
            "--dataset",
            "nextqa",
            "--preset",
            "tiny",
            "--random-weights",
            "--seed",
            "3",
            "--top-k",
            "2",
        ]);
        c.arg("--clip-tokenizer").arg(bpe());
        c.args(extra);
        run(c)
    };
    let o = labels(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // Its question is counted, its video named once (not each of its questions).
    let err = stderr(&o);
    assert!(
        err.contains("1 videos are not in the store")
            && err.contains("\n  missing (1 questions)\n")
            && err.contains("3 questions done, 0 already stored, 1 failed"),
        "{err}"
    );
    assert!(!err.contains("missing_3"), "{err}");

    let tok = ClipTokenizer::from_bpe_file(bpe())?;
    let (_, mut cfg) = frozen::preset(gcg::models::Preset::Tiny);
    cfg.text.vocab_size = tok.vocab_size();
    let model = frozen::random_clip_text(&cfg, &Device::Cpu, DType::F32, 3)?;
    let snap = Store::open(&store)?.snapshot();
    assert_eq!(snap.index().questions.len(), 3);
    for (key, video, answer) in [
        ("vid0_6", "vid0", "strum the string"),
        ("vid1_1", "vid1", "gesture something"),
        ("vid3_2", "vid3", "run away"),
    ] {
        let q = snap.question(key)?;
        assert_eq!((q.event.as_str(), q.event_mode.as_str()), (answer, "answer"));
        let ids = tok.tokenize(&[answer])?.ids_tensor(&Device::Cpu)?;
        let ev = model.forward(&ids)?.to_vec2::<f32>()?.remove(0);
        let frames = snap.frame_embeds(video)?.to_f32()?;
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let s: Vec<f64> = frames
            .chunks(ev.len())
            .map(|f| f.iter().zip(&ev).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (norm(f) * norm(&ev)))
            .collect();
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap());
        let mut top = order[..2].to_vec();
        top.sort();
        assert_eq!(q.pseudo_labels, top, "{key}: s = {s:?}");
        for (a, b) in snap.curve(key)?.iter().zip(&s) {
            assert!((*a as f64 - b).abs() < 1e-5);
        }
    }
    // The same again: all skipped (the missing video still fails).
    let o = labels(&[]);
    assert!(stderr(&o).contains("3 already stored"), "{}", stderr(&o));
    // Question + answer as the event: another event text for labelled questions, so only with
    // --overwrite (without it, refused: runs trained on the old labels would change under them).
    let o = labels(&["--event", "question-answer"]);
    assert!(
        stderr(&o).contains("--event answer") && stderr(&o).contains("--overwrite"),
        "{}",
        stderr(&o)
    );
    assert_eq!(Store::open(&store)?.snapshot().question("vid0_6")?.event, "strum the string");
    let o = labels(&["--event", "question-answer", "--overwrite"]);
    assert_eq!(o.status.code(), Some(1));
    let snap = Store::open(&store)?.snapshot();
    assert_eq!(
        snap.question("vid0_6")?.event,
        "how do the two man play the instrument? strum the string"
    );

    // Bench on the store and on a synthetic one.
    let store_arg = store.to_string_lossy().to_string();
    for args in [
        vec!["bench", "store", "--store", store_arg.as_str(), "--batch", "2"],
        vec![
            "bench", "store", "--preset", "tiny", "--videos", "3", "--frames", "4", "--batch", "2", "--dtype", "bf16",
        ],
    ] {
        let mut c = gcg();
        c.args(&args);
        let o = run(c);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        assert_eq!(v["bench"], "store");
        assert!(v["read_features"]["f32"]["mb_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["batches"]["samples_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(v["batches"]["samples"], v["questions"]);
    }
    Ok(())
}

fn ffmpeg(args: &[&str]) {
    let out = Command::new(std::env::var("GCG_FFMPEG").unwrap_or_else(|_| "ffmpeg".into()))
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .output()
        .expect("ffmpeg must be installed to run this test (apt-get install ffmpeg)");
    assert!(out.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn features_from_video_files_and_frame_folders() -> Result<()> {
    use gcg::features::extract::{decoded_frames, VideoJob};
    use gcg::video::{Ffmpeg, Sampling};
    let tmp = tempfile::tempdir()?;
    let vids = tmp.path().join("videos");
    std::fs::create_dir(&vids)?;
    // Two 2-second 10 fps clips and a folder of 8 frames (frame_0.jpg ... frame_7.jpg).
    for (name, src) in [
        ("clipA.mp4", "testsrc=size=64x48:rate=10:duration=2"),
        ("clipB.mkv", "testsrc2=size=80x40:rate=10:duration=2"),
    ] {
        let out = vids.join(name);
        ffmpeg(&["-f", "lavfi", "-i", src, "-pix_fmt", "yuv420p", out.to_str().unwrap()]);
    }
    let folder = vids.join("folder9");
    std::fs::create_dir(&folder)?;
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x64:rate=4:duration=2",
        "-start_number",
        "0",
        folder.join("frame_%d.jpg").to_str().unwrap(),
    ]);
    let store = tmp.path().join("store");
    let o = run(features_cmd(&vids, &store));
    assert!(o.status.success(), "{}", stderr(&o));
    let snap = Store::open(&store)?.snapshot();
    assert_eq!(stored(&store), vec!["clipA", "clipB", "folder9"]);
    // The throughput summary counts every frame encoded: 3 videos × T.
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.starts_with("ViT: "))
        .unwrap_or_else(|| panic!("no ViT summary: {err}"));
    assert!(line.starts_with(&format!("ViT: {} frames in ", 3 * T)), "{line}");
    assert!(line.contains(" frames/s, ") && line.contains(" GFLOP/s); CLIP branch: "), "{line}");

    let (vit_cfg, _) = frozen::preset(gcg::models::Preset::Tiny);
    let vit = frozen::random_vit(&vit_cfg, &Device::Cpu, DType::F32, SEED)?;
    for (id, path) in [
        ("clipA", vids.join("clipA.mp4")),
        ("clipB", vids.join("clipB.mkv")),
        ("folder9", folder.clone()),
    ] {
        let job = VideoJob { id: id.into(), path };
        let frames = decoded_frames(&job, T, Sampling::Uniform, &Ffmpeg::from_env(), vit_cfg.image_size)?;
        let direct = vit.forward_wo_norm(&frames.pixel_values)?.to_dtype(DType::F16)?;
        let want: Vec<u16> = direct.flatten_all()?.to_vec1::<half::f16>()?.iter().map(|x| x.to_bits()).collect();
        let got: Vec<u16> = snap.features(id)?.as_f16()?.iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want, "{id}");
    }
    // Uniform sampling of 4 out of 20 frames at 10 fps: frames 2, 7, 12, 17.
    for id in ["clipA", "clipB"] {
        let v = snap.video(id)?;
        assert_eq!(v.timestamps.len(), T);
        for (t, want) in v.timestamps.iter().zip([0.2, 0.7, 1.2, 1.7]) {
            assert!((t - want).abs() < 1e-6, "{id}: {:?}", v.timestamps);
        }
        assert!(
            (v.fps.unwrap() - 10.0).abs() < 1e-6 && (v.duration.unwrap() - 2.0).abs() < 0.05,
            "{v:?}"
        );
    }

    // A file replaced under the same id (another clip, one frame of the folder redrawn) is
    // recomputed, not kept with the old file's features; the unchanged clip is kept. It was
    // kept silently before ("2 already stored").
    let before = Store::open(&store)?.snapshot();
    let feats = |snap: &gcg::store::Snapshot, id: &str| -> Result<Vec<u16>> {
        Ok(snap.features(id)?.as_f16()?.iter().map(|x| x.to_bits()).collect())
    };
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "mandelbrot=size=64x48:rate=10",
        "-t",
        "3",
        "-pix_fmt",
        "yuv420p",
        vids.join("clipA.mp4").to_str().unwrap(),
    ]);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=c=red:s=64x64",
        "-frames:v",
        "1",
        folder.join("frame_3.jpg").to_str().unwrap(),
    ]);
    let o = run(features_cmd(&vids, &store));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("2 stored videos (e.g. clipA, folder9) are not the files their features"),
        "{err}"
    );
    let after = Store::open(&store)?.snapshot();
    for (id, path) in [("clipA", vids.join("clipA.mp4")), ("folder9", folder.clone())] {
        let job = VideoJob { id: id.into(), path };
        let frames = decoded_frames(&job, T, Sampling::Uniform, &Ffmpeg::from_env(), vit_cfg.image_size)?;
        let direct = vit.forward_wo_norm(&frames.pixel_values)?.to_dtype(DType::F16)?;
        let want: Vec<u16> = direct.flatten_all()?.to_vec1::<half::f16>()?.iter().map(|x| x.to_bits()).collect();
        assert_eq!(feats(&after, id)?, want, "{id}: the new file's features");
        assert_ne!(feats(&after, id)?, feats(&before, id)?, "{id}");
    }
    assert_eq!(feats(&after, "clipB")?, feats(&before, "clipB")?);
    assert!((after.video("clipA")?.duration.unwrap() - 3.0).abs() < 0.05);
    // Now all match: nothing is recomputed.
    let o = run(features_cmd(&vids, &store));
    let err = stderr(&o);
    assert!(o.status.success() && !err.contains("are not the files"), "{err}");
    Ok(())
}

fn shard_of(store: &Path, video: &str) -> PathBuf {
    let snap = Store::open(store).unwrap().snapshot();
    store.join("shards").join(&snap.video(video).unwrap().shard)
}

fn verify(store: &Path, extra: &[&str]) -> Output {
    let mut c = gcg();
    c.args(["store", "verify", "--store"]).arg(store).args(extra);
    run(c)
}

#[test]
fn a_damaged_store_is_reported_repaired_and_recomputed_by_features_and_labels() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let vids = tmp.path().join("videos");
    std::fs::create_dir(&vids)?;
    videos(&vids)?;
    std::fs::remove_file(vids.join("bad.safetensors"))?;
    let store = tmp.path().join("store");
    assert!(run(features_cmd(&vids, &store)).status.success());
    let csv = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n\
               vid0,369,640,480,how do the two man play the instrument,2,6,CH,roll the handle,tap their feet,strum the string,hit with sticks,pat with hand\n\
               vid1,2697,640,480,why did the boy pick up one present,4,1,CW,share with the girl,approach lady,unwrap it,playing with toy train,gesture something\n";
    let ann = tmp.path().join("val.csv");
    std::fs::write(&ann, csv)?;
    let labels = || {
        let mut c = gcg();
        c.args(["labels", "--store"]).arg(&store).arg("--annotations").arg(&ann);
        c.args([
            "--dataset",
            "nextqa",
            "--preset",
            "tiny",
            "--random-weights",
            "--seed",
            "3",
            "--top-k",
            "2",
            "--shard-mb",
            "0",
        ]);
        c.arg("--clip-tokenizer").arg(bpe());
        run(c)
    };
    assert!(labels().status.success());
    let o = verify(&store, &["--checksums", "--values"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok"));
    let before = Store::open(&store)?.snapshot();
    let bits = |s: &gcg::store::Snapshot, id: &str| -> Vec<u16> {
        s.features(id).unwrap().as_f16().unwrap().iter().map(|x| x.to_bits()).collect()
    };
    let (vid1_before, curve_before) = (bits(&before, "vid1"), before.curve("vid1_1")?);

    // A shard deleted behind the store's back: verify names it and its video, exit 1.
    std::fs::remove_file(shard_of(&store, "vid1"))?;
    let o = verify(&store, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("the file is missing") && out.contains("vid1"), "{out}");
    assert!(stderr(&o).contains("--repair"), "{}", stderr(&o));
    // `gcg features` does not call it stored: it recomputes exactly that video, bit for bit.
    let o = run(features_cmd(&vids, &store));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 videos done, 4 already stored"), "{}", stderr(&o));
    // The warning says what the repair really dropped: the video and its question.
    assert!(
        stderr(&o).contains("dropped 1 videos (e.g. vid1) and 1 questions (e.g. vid1_1)") && stderr(&o).contains("`gcg labels`"),
        "{}",
        stderr(&o)
    );
    let after = Store::open(&store)?.snapshot();
    assert_eq!(bits(&after, "vid1"), vid1_before);
    // Its question went with it and `gcg labels` redoes it, the other one stays.
    assert!(!after.contains_question("vid1_1") && after.contains_question("vid0_6"));
    let o = labels();
    assert!(stderr(&o).contains("1 questions done, 1 already stored"), "{}", stderr(&o));
    assert_eq!(Store::open(&store)?.snapshot().curve("vid1_1")?, curve_before);

    // One byte changed in place: only the checksum sees it; --repair quarantines the shard.
    let path = shard_of(&store, "vid3");
    let mut bytes = std::fs::read(&path)?;
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(&path, bytes)?;
    assert!(verify(&store, &[]).status.success());
    let o = verify(&store, &["--checksums", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["clean"], false);
    assert!(v["broken"][0]["fault"].as_str().unwrap().contains("CRC-32"), "{v}");
    assert_eq!(v["lost_videos"], serde_json::json!(["vid3"]));
    let o = verify(&store, &["--checksums", "--repair"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("dropped 1 videos (e.g. vid3) and 0 questions"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(store.join("quarantine").join(path.file_name().unwrap()).exists());
    let o = run(features_cmd(&vids, &store));
    assert!(stderr(&o).contains("1 videos done, 4 already stored"), "{}", stderr(&o));
    assert!(verify(&store, &["--checksums", "--values"]).status.success());

    // A shard cut short, repaired by `verify --repair`: the report is what was dropped (opening
    // the writer drops it first; the two repairs are one report) and the file is quarantined.
    let path = shard_of(&store, "vid4");
    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
    f.set_len(f.metadata()?.len() - 7)?;
    drop(f);
    let o = verify(&store, &["--repair"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("dropped 1 videos (e.g. vid4)"), "{out}");
    assert!(!out.contains("its file was missing"), "{out}");
    assert!(store.join("quarantine").join(path.file_name().unwrap()).exists());
    Ok(())
}

#[test]
fn features_and_labels_refuse_to_reuse_records_made_otherwise() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let vids = tmp.path().join("videos");
    std::fs::create_dir(&vids)?;
    videos(&vids)?;
    std::fs::remove_file(vids.join("bad.safetensors"))?;
    let store = tmp.path().join("store");
    assert!(run(features_cmd(&vids, &store)).status.success());
    let v = Store::open(&store)?.snapshot().video("vid0")?.clone();
    assert_eq!(v.extractor.as_ref().map(|e| e.models.as_str()), Some("random tiny seed 9"));

    // Other weights, another T, another sampling: an error up front, nothing recomputed.
    for (flag, value, want) in [
        ("--seed", "10", "networks random tiny seed 9, this run uses random tiny seed 10"),
        ("--num-frames", "3", "T = 4, this run asks T = 3"),
        ("--sampling", "official", "sampling uniform, this run asks sampling official"),
    ] {
        let o = run(features_cmd_with(&vids, &store, &[(flag, value)]));
        assert_eq!(o.status.code(), Some(1), "{flag}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("5 videos in") && err.contains(want) && err.contains("--overwrite"),
            "{flag}: {err}"
        );
    }
    // One more video with another T next to them: refused (no store of mixed T).
    let more = tmp.path().join("more");
    std::fs::create_dir(&more)?;
    std::fs::copy(vids.join("vid0.safetensors"), more.join("extra.safetensors"))?;
    let o = run(features_cmd_with(&more, &store, &[("--num-frames", "3")]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("5 videos in") && stderr(&o).contains("have T = 4"),
        "{}",
        stderr(&o)
    );
    // ... and so is one made by other networks next to them (a store of one extractor).
    let o = run(features_cmd_with(&more, &store, &[("--seed", "10")]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("5 videos in") && stderr(&o).contains("random tiny seed 9") && stderr(&o).contains("would mix"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stored(&store).len(), 5);

    // Labels with another CLIP text tower: refused; the same one: skipped.
    let csv = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n\
               vid0,369,640,480,how do the two man play the instrument,2,6,CH,roll the handle,tap their feet,strum the string,hit with sticks,pat with hand\n";
    let ann = tmp.path().join("val.csv");
    std::fs::write(&ann, csv)?;
    let labels = |seed: &str| {
        let mut c = gcg();
        c.args(["labels", "--store"]).arg(&store).arg("--annotations").arg(&ann);
        c.args([
            "--dataset",
            "nextqa",
            "--preset",
            "tiny",
            "--random-weights",
            "--seed",
            seed,
            "--top-k",
            "2",
        ]);
        c.arg("--clip-tokenizer").arg(bpe());
        run(c)
    };
    assert!(labels("3").status.success());
    let o = labels("4");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 questions in") && stderr(&o).contains("random tiny seed 3") && stderr(&o).contains("--overwrite"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&labels("3")).contains("0 questions done, 1 already stored"));
    // Another K or event text: refused too (the labels under finished runs would change).
    for (flag, value, want) in [("--top-k", "3", "--top-k 2"), ("--event", "question-answer", "--event answer")] {
        let mut c = gcg();
        c.args(["labels", "--store"]).arg(&store).arg("--annotations").arg(&ann);
        c.args(["--dataset", "nextqa", "--preset", "tiny", "--random-weights", "--seed", "3"]);
        c.arg("--clip-tokenizer").arg(bpe()).args([flag, value]);
        if flag != "--top-k" {
            c.args(["--top-k", "2"]);
        }
        let o = run(c);
        assert_eq!(o.status.code(), Some(1), "{flag}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("1 questions in") && stderr(&o).contains(want) && stderr(&o).contains("--overwrite"),
            "{flag}: {}",
            stderr(&o)
        );
    }
    assert_eq!(
        Store::open(&store)?.snapshot().question("vid0_6")?.pseudo_labels.len(),
        2,
        "a refused relabelling changed the store"
    );
    // Random weights without --clip-tokenizer take the official BPE the binary carries: its
    // fingerprint is that of the file itself.
    let cache = tmp.path().join("cache");
    let mut c = gcg();
    c.env("GCG_CACHE", cache.join("ask"));
    c.args(["labels", "--store"]).arg(&store).arg("--annotations").arg(&ann);
    c.args([
        "--dataset",
        "nextqa",
        "--preset",
        "tiny",
        "--random-weights",
        "--seed",
        "3",
        "--top-k",
        "2",
        "--overwrite",
    ]);
    let o = run(c);
    assert!(o.status.success(), "{}", stderr(&o));
    let official = repo_root().join("crates/gcg/assets/bpe_simple_vocab_16e6.txt.gz");
    assert_eq!(
        std::fs::read(cache.join("ask/bpe_simple_vocab_16e6.txt.gz"))?,
        std::fs::read(&official)?
    );
    let want = gcg::features::provenance::text_encoder(gcg::models::Preset::Tiny, Some(3), None, &official)?;
    assert_eq!(
        Store::open(&store)?.snapshot().question("vid0_6")?.text_encoder.as_deref(),
        Some(want.as_str())
    );

    // verify reports a store that mixes extractors (here by hand, as an older gcg could leave it).
    let path = store.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    index["videos"]["vid2"]["extractor"]["models"] = "random tiny seed 77".into();
    std::fs::write(&path, serde_json::to_vec(&index)?)?;
    let o = verify(&store, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("videos extracted differently") && out.contains("seed 77") && !out.contains("\nok"),
        "{out}"
    );
    Ok(())
}

#[test]
fn a_bad_input_video_fails_alone_and_verify_names_a_file_store() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let vids = tmp.path().join("videos");
    std::fs::create_dir(&vids)?;
    videos(&vids)?;
    std::fs::remove_file(vids.join("bad.safetensors"))?;
    // vid1: one NaN pixel; vid2: an empty duration tensor; vid3: decreasing times.
    let mut px = pixels(1).flatten_all()?.to_vec1::<f32>()?;
    px[100] = f32::NAN;
    let px = Tensor::from_vec(px, (FILE_FRAMES, 3, 42, 42), &Device::Cpu)?;
    candle_core::safetensors::save(&HashMap::from([("pixel_values".to_string(), px)]), vids.join("vid1.safetensors"))?;
    let empty = Tensor::zeros(0, DType::F64, &Device::Cpu)?;
    candle_core::safetensors::save(
        &HashMap::from([("pixel_values".to_string(), pixels(2)), ("duration".to_string(), empty)]),
        vids.join("vid2.safetensors"),
    )?;
    let back = Tensor::new((0..FILE_FRAMES).rev().map(|t| t as f64).collect::<Vec<f64>>(), &Device::Cpu)?;
    candle_core::safetensors::save(
        &HashMap::from([("pixel_values".to_string(), pixels(3)), ("timestamps".to_string(), back)]),
        vids.join("vid3.safetensors"),
    )?;
    let store = tmp.path().join("store");
    let o = run(features_cmd(&vids, &store));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("2 videos done, 0 already stored, 3 failed"), "{err}");
    assert!(
        err.contains("vid1:") && err.contains("vid1.safetensors") && err.contains("input frames"),
        "{err}"
    );
    assert!(
        err.contains("vid2.safetensors: duration has shape [0], expected one value"),
        "{err}"
    );
    assert!(err.contains("vid3:") && err.contains("frame times decrease"), "{err}");
    assert!(!err.contains("unwritten records"), "{err}");
    assert_eq!(stored(&store), ["vid0", "vid4"]);

    let o = verify(&store.join("index.json"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is a file, not a feature-store directory"), "{}", stderr(&o));
    Ok(())
}

#[test]
fn a_frames_file_shorter_than_t_is_padded_as_a_short_video_is() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let vids = tmp.path().join("videos");
    std::fs::create_dir(&vids)?;
    videos(&vids)?;
    std::fs::remove_file(vids.join("bad.safetensors"))?;
    let store = tmp.path().join("store");
    let t = FILE_FRAMES + 2;
    let o = run(features_cmd_with(&vids, &store, &[("--num-frames", &t.to_string())]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("only {FILE_FRAMES} frames for {t} requested; padded")),
        "{}",
        stderr(&o)
    );
    let v = Store::open(&store)?.snapshot().video("vid0")?.clone();
    assert_eq!(v.num_frames, t);
    // The times repeat where frames do (uniformly over the 6: 0, 1, 1, 2, 3, 4, 4, 5 at 0.5 s each).
    assert_eq!(v.timestamps, [0.0, 0.5, 0.5, 1.0, 1.5, 2.0, 2.0, 2.5]);
    Ok(())
}

/// `gcg labels` warns when stored videos last far from what the annotations' frame_count says
/// (a wrong id → file mapping), and stays quiet when they agree.
#[test]
fn labels_warn_of_videos_that_disagree_with_the_annotated_frame_count() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let world = tmp.path().join("world");
    let o = run({
        let mut c = gcg();
        c.args(["synth", "--videos", "6", "--out"]).arg(&world);
        c
    });
    assert!(o.status.success(), "{}", stderr(&o));
    let store = tmp.path().join("store");
    let o = run({
        let mut c = gcg();
        c.args(["features", "--videos"])
            .arg(world.join("videos"))
            .arg("--store")
            .arg(&store);
        c.args(["--preset", "tiny", "--random-weights"]);
        c
    });
    assert!(o.status.success(), "{}", stderr(&o));
    let labels = |csv: &Path| {
        let mut c = gcg();
        c.args(["labels", "--store"]).arg(&store).arg("--annotations").arg(csv);
        c.args(["--dataset", "nextqa", "--preset", "tiny", "--random-weights", "--overwrite"]);
        run(c)
    };
    // The synthetic videos: 64 frames at 8 fps, as their rows say.
    let train = world.join("train.csv");
    let o = labels(&train);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("frame_count"), "{}", stderr(&o));
    // One video's rows claim 571 frames.
    let text = std::fs::read_to_string(&train)?;
    let first = text.lines().nth(1).unwrap().split(',').next().unwrap().to_string();
    let edited: String = text
        .lines()
        .map(|l| match l.split_once(',') {
            Some((v, rest)) if v == first => format!("{v},571,{}\n", rest.split_once(',').unwrap().1),
            _ => format!("{l}\n"),
        })
        .collect();
    let wrong = tmp.path().join("wrong.csv");
    std::fs::write(&wrong, edited)?;
    let o = labels(&wrong);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!("{first}: 571 frames annotated, 64 stored (8.0 s at 8.00 fps)");
    assert!(
        stderr(&o).contains("videos last far from the annotations' frame_count") && stderr(&o).contains(&want),
        "{}",
        stderr(&o)
    );
    Ok(())
}

/// `gcg labels` of NExT-QA annotations with the tiny random CLIP text tower, K = 2.
fn labels_cmd(store: &Path, ann: &Path) -> Command {
    let mut c = gcg();
    c.args(["labels", "--store"]).arg(store).arg("--annotations").arg(ann);
    for (flag, value) in [("--dataset", "nextqa"), ("--preset", "tiny"), ("--seed", "3"), ("--top-k", "2")] {
        c.args([flag, value]);
    }
    c.arg("--random-weights").arg("--clip-tokenizer").arg(bpe());
    c
}

/// A store whose `index.json` was lost: `gcg features` and the readers refuse to start a new index
/// over its shards (it silently started over, and `--repair` then deleted the shards as
/// leftovers); `gcg store verify --repair` rebuilds the index from what the shards record, the
/// latest record of a recomputed video winning and the questions labelled from its old features
/// left out. Shards no index lists are moved to quarantine/, never deleted or overwritten there.
#[test]
fn a_lost_index_is_rebuilt_from_the_shards() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let vids = tmp.path().join("videos");
    std::fs::create_dir(&vids)?;
    videos(&vids)?;
    std::fs::remove_file(vids.join("bad.safetensors"))?;
    let store = tmp.path().join("store");
    let o = run(features_cmd(&vids, &store));
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n\
               vid0,369,640,480,how do the two man play the instrument,2,6,CH,roll the handle,tap their feet,strum the string,hit with sticks,pat with hand\n\
               vid1,2697,640,480,why did the boy pick up one present,4,1,CW,share with the girl,approach lady,unwrap it,playing with toy train,gesture something\n\
               vid3,100,640,480,what does the dog do,0,2,TN,run away,sleep,bark,eat,jump\n";
    let ann = tmp.path().join("val.csv");
    std::fs::write(&ann, csv)?;
    let labels = || run(labels_cmd(&store, &ann));
    let o = labels();
    assert!(o.status.success(), "{}", stderr(&o));
    // vid1 recomputed into a newer shard (its question is dropped), then labelled again.
    let one = tmp.path().join("one");
    std::fs::create_dir(&one)?;
    std::fs::copy(vids.join("vid1.safetensors"), one.join("vid1.safetensors"))?;
    let mut c = features_cmd(&one, &store);
    c.arg("--overwrite");
    let o = run(c);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = labels();
    assert!(o.status.success(), "{}", stderr(&o));
    let index_path = store.join("index.json");
    let before: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    let vid1_shard = before["videos"]["vid1"]["shard"].as_str().unwrap().to_string();
    let shards_before = std::fs::read_dir(store.join("shards"))?.count();

    std::fs::remove_file(&index_path)?;
    // Refused by every entry point, naming the fix; nothing written.
    let o = run(features_cmd(&vids, &store));
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("no index.json") && err.contains("--repair"),
        "{err}"
    );
    let o = labels();
    assert!(!o.status.success() && stderr(&o).contains("no index.json"), "{}", stderr(&o));
    let o = verify(&store, &[]);
    assert!(!o.status.success() && stderr(&o).contains("rebuilds the index"), "{}", stderr(&o));
    assert!(!index_path.exists());
    assert_eq!(std::fs::read_dir(store.join("shards"))?.count(), shards_before);

    // A shard written before shards listed their records: the rebuild stops, nothing moved.
    let old = store.join("shards/videos-0000000000001-1-00001.safetensors");
    let map: HashMap<String, Tensor> = [("vidX/frame_embeds".to_string(), Tensor::zeros((T, 8), DType::F32, &Device::Cpu)?)].into();
    candle_core::safetensors::save(&map, &old)?;
    let o = verify(&store, &["--repair"]);
    assert!(!o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let err = stderr(&o);
    assert!(
        err.contains("from before shards listed their records") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(old.exists() && !index_path.exists() && !store.join("quarantine").exists());
    std::fs::remove_file(&old)?;
    // A shard whose header does not read is moved to quarantine/ once the index is rebuilt.
    let junk = store.join("shards/videos-0000000000002-1-00001.safetensors");
    std::fs::write(&junk, b"not a safetensors file")?;
    let o = verify(&store, &["--repair"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("rebuilt the lost index") && out.contains("5 videos, 3 questions"),
        "{out}"
    );
    assert!(
        out.contains("could not read back shard videos-0000000000002-1-00001.safetensors"),
        "{out}"
    );
    assert!(store.join("quarantine/videos-0000000000002-1-00001.safetensors").exists());
    let after: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    for key in ["meta", "videos", "questions"] {
        assert_eq!(after[key], before[key], "{key}");
    }
    assert_eq!(after["videos"]["vid1"]["shard"], vid1_shard.as_str(), "the recomputed record wins");
    for (name, info) in after["shards"].as_object().unwrap() {
        assert_eq!(&before["shards"][name], info, "{name}");
    }
    // The rebuilt store reads, checks clean and is resumed: nothing recomputed.
    let o = verify(&store, &["--checksums", "--values"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = run(features_cmd(&vids, &store));
    assert!(o.status.success() && stderr(&o).contains("5 already stored"), "{}", stderr(&o));

    // Unlisted shards of stopped writers go to quarantine/ under a free name.
    let any = std::fs::read_dir(store.join("shards"))?.next().unwrap()?.path();
    let dead = "videos-0000000000002-999999999-00001.safetensors";
    for round in 0..2 {
        std::fs::copy(&any, store.join("shards").join(dead))?;
        let o = verify(&store, &["--repair"]);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success() && out.contains("moved 1 unlisted shard files"), "{out}");
        let kept = if round == 0 { dead.to_string() } else { format!("{dead}.1") };
        assert!(store.join("quarantine").join(kept).exists(), "round {round}");
    }
    assert!(store.join("quarantine").join(dead).exists(), "the first one is not overwritten");
    Ok(())
}
