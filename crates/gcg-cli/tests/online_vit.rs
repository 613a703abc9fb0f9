//! The online ViT (`gcg features --embeddings-only` + `[data] online_vit`): a run that decodes
//! its frames and runs the frozen ViT in the loop trains and predicts exactly as the run on the
//! stored features — the same losses at every step and the same predictions — and its store is a
//! fraction of the size. Wrong ViTs, moved videos and stores without features are refused by name.

use candle_core::{Device, Tensor};
use gcg::SeededRng;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

fn gcg(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gcg"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn ok(o: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{what} failed:\n{}\n{err}", String::from_utf8_lossy(&o.stdout));
    err
}

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A decoded video: 8 random frames of the tiny ViT's 42×42 input, with their times.
fn write_video(dir: &Path, id: &str, seed: u64) {
    let mut rng = SeededRng::new(seed);
    let n = 8;
    let pixels = Tensor::from_vec(rng.normal_vec(n * 3 * 42 * 42, 0.0, 1.0), (n, 3, 42, 42), &Device::Cpu).unwrap();
    let ts: Vec<f64> = (0..n).map(|i| (i as f64 + 0.5) * 2.0).collect();
    let map: HashMap<String, Tensor> = [
        ("pixel_values".to_string(), pixels),
        ("timestamps".to_string(), Tensor::new(ts, &Device::Cpu).unwrap()),
    ]
    .into();
    candle_core::safetensors::save(&map, dir.join(format!("{id}.safetensors"))).unwrap();
}

/// NExT-QA CSV rows: two questions per video.
fn write_split(path: &Path, videos: &[String]) {
    let mut text = String::from("video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n");
    for (i, v) in videos.iter().enumerate() {
        for q in 0..2 {
            let answer = (i + q) % 5;
            text.push_str(&format!(
                "{v},8,42,42,what colour is the shape number {q},{answer},{q},CW,red,green,blue,yellow,purple\n"
            ));
        }
    }
    std::fs::write(path, text).unwrap();
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                dir_bytes(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

fn losses(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|mut r| {
            // Times differ run to run; everything else must not.
            if let Some(o) = r.as_object_mut() {
                o.retain(|k, _| !k.contains("seconds") && !k.contains("time") && !k.contains("per_s") && k != "elapsed");
            }
            r
        })
        .collect()
}

#[test]
fn the_online_vit_trains_and_predicts_exactly_as_the_stored_features() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let videos = root.join("videos");
    std::fs::create_dir(&videos).unwrap();
    let ids: Vec<String> = (0..8).map(|i| format!("vid{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        write_video(&videos, id, 100 + i as u64);
    }
    write_split(&root.join("train.csv"), &ids[..4]);
    write_split(&root.join("val.csv"), &ids[4..6]);
    write_split(&root.join("test.csv"), &ids[6..]);
    let bpe = fixtures().join("tokenizers/clip/bpe_first3000.txt.gz");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (store, extra) in [("store-full", None), ("store-online", Some("--embeddings-only"))] {
        let mut args = vec![
            "features".to_string(),
            "--videos".into(),
            s(&videos),
            "--store".into(),
            store.into(),
            "--preset".into(),
            "tiny".into(),
            "--random-weights".into(),
            "--seed".into(),
            "1".into(),
            "--num-frames".into(),
            "4".into(),
        ];
        args.extend(extra.map(String::from));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&gcg(&a, root), "gcg features");
        for split in ["train.csv", "val.csv", "test.csv"] {
            ok(
                &gcg(
                    &[
                        "labels",
                        "--store",
                        store,
                        "--annotations",
                        split,
                        "--dataset",
                        "nextqa",
                        "--preset",
                        "tiny",
                        "--random-weights",
                        "--seed",
                        "2",
                        "--top-k",
                        "2",
                        "--clip-tokenizer",
                        &s(&bpe),
                    ],
                    root,
                ),
                "gcg labels",
            );
        }
    }
    let (full, online) = (dir_bytes(&root.join("store-full")), dir_bytes(&root.join("store-online")));
    // The difference is the features: 8 videos × T × tokens × width f16 values.
    let index: Value = serde_json::from_slice(&std::fs::read(root.join("store-full/index.json")).unwrap()).unwrap();
    let (tokens, width) = (index["meta"]["tokens"].as_u64().unwrap(), index["meta"]["width"].as_u64().unwrap());
    let features = 8 * 4 * tokens * width * 2;
    assert!(
        full - online >= features && full - online < features + features / 10,
        "the store without features is {online} bytes, with them {full} (features: {features})"
    );

    let config = |name: &str, store: &str, extra: &str| {
        let p = root.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "run_dir = \"runs/{name}\"\n\
                 [weights]\npreset = \"tiny\"\ntokenizers = \"{}\"\nseed = 3\n{extra}\
                 [model]\nmode = \"grounding\"\n[model.grounding]\nframes = 4\nmoments = 2\nheads = 2\n\
                 [data]\ndataset = \"nextqa\"\nstore = \"{store}\"\ntrain = \"train.csv\"\nval = \"val.csv\"\n\
                 test = \"test.csv\"\nworkers = 1\n{}\
                 [train]\nepochs = 2\nbatch_size = 2\ngrad_accum = 1\nlr = 1e-4\ngrounding_lr = 1e-3\n",
                fixtures().join("tokenizers/snapshot").display(),
                if store == "store-online" { "online_vit = true\n" } else { "" }
            ),
        )
        .unwrap();
        p
    };
    let cached = config("cached", "store-full", "");
    let live = config("live", "store-online", "vit_random_seed = 1\n");
    ok(
        &gcg(&["train", "--config", &s(&cached), "--quiet"], root),
        "gcg train (stored features)",
    );
    ok(&gcg(&["train", "--config", &s(&live), "--quiet"], root), "gcg train (online ViT)");
    let (a, b) = (losses(&root.join("runs/cached")), losses(&root.join("runs/live")));
    assert!(a.iter().filter(|r| r.get("loss").is_some()).count() >= 8, "{a:?}");
    assert!(a.iter().any(|r| r["split"] == "val"), "validated: {a:?}");
    assert_eq!(a, b, "the online ViT's training differs from the stored features'");
    for split in ["test"] {
        let pa = std::fs::read_to_string(root.join(format!("runs/cached/predictions-{split}.jsonl"))).unwrap();
        let pb = std::fs::read_to_string(root.join(format!("runs/live/predictions-{split}.jsonl"))).unwrap();
        assert!(!pa.is_empty());
        assert_eq!(pa, pb, "{split} predictions differ");
    }

    // Refused by name: the stored-features run on the store without them; a ViT that did not
    // make the store; videos that moved (and found again with data.video_dir).
    let o = gcg(
        &[
            "train",
            "--config",
            &s(&cached),
            "--quiet",
            "--set",
            "data.store=store-online",
            "--set",
            "run_dir=runs/x",
        ],
        root,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("without their ViT features") && err.contains("online_vit"), "{err}");
    let o = gcg(
        &[
            "train",
            "--config",
            &s(&live),
            "--quiet",
            "--set",
            "weights.vit_random_seed=5",
            "--set",
            "run_dir=runs/y",
        ],
        root,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("random tiny seed 1") && err.contains("random tiny seed 5"), "{err}");
    std::fs::rename(&videos, root.join("moved")).unwrap();
    let o = gcg(&["train", "--config", &s(&live), "--quiet", "--set", "run_dir=runs/z"], root);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not exist") && err.contains("video_dir"), "{err}");
    ok(
        &gcg(
            &[
                "train",
                "--config",
                &s(&live),
                "--quiet",
                "--set",
                "run_dir=runs/z2",
                "--set",
                "data.video_dir=moved",
            ],
            root,
        ),
        "gcg train with data.video_dir",
    );
    assert_eq!(losses(&root.join("runs/z2")), a, "found again, the same training");
    // Another file under a stored video's name: refused by name (its ViT features would have
    // been trained beside the old file's CLIP embeddings and pseudo-labels).
    write_video(&root.join("moved"), "vid2", 999);
    let o = gcg(
        &[
            "train",
            "--config",
            &s(&live),
            "--quiet",
            "--set",
            "run_dir=runs/z3",
            "--set",
            "data.video_dir=moved",
        ],
        root,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("video vid2") && err.contains("is not the file its stored features were made from"),
        "{err}"
    );
}
