//! A run config's `[weights]` by Hugging Face model id: the names survive loading the config (an
//! existing path of that name wins), and the model of the run is built through a fake HF cache
//! (`models--Org--Name/refs/main` + `snapshots/<hash>/`) exactly as from the directories.
//! One test in this binary: it sets the process's HF environment.

use gcg::run::{build_model, RunConfig};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Copy the files of `src` (recursively) into the cache as model `id`.
fn cache_repo(cache: &Path, id: &str, src: &Path) -> PathBuf {
    const HASH: &str = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join(HASH);
    fn copy(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &dst.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
            }
        }
    }
    copy(src, &snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    // With a trailing newline, as a ref written by hand may have it.
    std::fs::write(repo.join("refs/main"), format!("{HASH}\n")).unwrap();
    snap
}

fn load(dir: &Path, text: &str) -> RunConfig {
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    RunConfig::load(Some(&p), &[]).unwrap()
}

#[test]
fn weights_by_name_in_a_run_config() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg_dir = tmp.path().join("cfg");
    std::fs::create_dir_all(cfg_dir.join("Local/Snap")).unwrap();
    let cfg = load(
        &cfg_dir,
        "[weights]\npretrained = \"Org/Name\"\nt5 = \"google/flan-t5-xl\"\ntokenizers = \"Local/Snap\"\n",
    );
    let w = &cfg.weights;
    assert_eq!(w.pretrained.as_deref(), Some(Path::new("Org/Name")), "an id stays a name");
    assert_eq!(w.t5.as_deref(), Some(Path::new("google/flan-t5-xl")));
    assert_eq!(
        w.tokenizers.as_deref(),
        Some(cfg_dir.join("Local/Snap").as_path()),
        "an existing path beside the config wins over the id of the same spelling"
    );
    // Not an id, not a path: resolved against the config's directory as before.
    let cfg = load(&cfg_dir, "[weights]\npretrained = \"weights/xl/v1\"\n");
    assert_eq!(cfg.weights.pretrained, Some(cfg_dir.join("weights/xl/v1")));
    // The config a run directory stores keeps the name.
    let json = serde_json::to_string(&load(&cfg_dir, "[weights]\npretrained = \"Org/Name\"\n").absolute().unwrap()).unwrap();
    let back: RunConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.weights.pretrained.as_deref(), Some(Path::new("Org/Name")));

    // The model built from the names through the cache equals the one built from the directories.
    let cache = tmp.path().join("hub");
    cache_repo(&cache, "Org/Name", &fixtures().join("parity/tiny-s0/hf"));
    // Tokenizers that fit the tiny checkpoint's 120-row embedding tables (a closed vocabulary).
    let tok_dir = tmp.path().join("tok");
    gcg::text::vocab::closed_vocab_tokenizers(&["what is the man doing? he rolls the red ball"], &tok_dir).unwrap();
    cache_repo(&cache, "Org/Tok", &tok_dir);
    // SAFETY: the only test of this binary; nothing else reads the environment meanwhile.
    unsafe {
        std::env::set_var("HF_HUB_CACHE", &cache);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let built = |pretrained: &Path, tokenizers: &Path| {
        let mut cfg = load(
            &cfg_dir,
            "[model]\nmode = \"uniform\"\n[model.grounding]\nframes = 4\nmoments = 2\n",
        );
        cfg.weights.preset = gcg::models::Preset::Tiny;
        cfg.weights.pretrained = Some(pretrained.to_path_buf());
        cfg.weights.tokenizers = Some(tokenizers.to_path_buf());
        build_model(&cfg, 16)
    };
    let by_path = built(&fixtures().join("parity/tiny-s0/hf"), &tok_dir).unwrap();
    let by_name = built(Path::new("Org/Name"), Path::new("Org/Tok")).unwrap();
    let (a, b) = (&by_path.vars, &by_name.vars);
    assert!(a.len() > 0 && a.len() == b.len());
    let values = |v: &gcg::weights::VarStore, name: &str| -> Vec<f32> {
        let t = v.get(name).unwrap().as_tensor().to_dtype(candle_core::DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    for (name, _) in a.iter() {
        assert_eq!(values(a, name), values(b, name), "{name}");
    }
    assert_eq!(
        by_path.model.lmm.post_layernorm.weight.to_vec1::<f32>().unwrap(),
        by_name.model.lmm.post_layernorm.weight.to_vec1::<f32>().unwrap()
    );
    // A tokenizer file the cached model lacks is named with the id and the cache.
    std::fs::remove_file(
        cache.join("models--Org--Tok/snapshots/89abcdef0123456789abcdef0123456789abcdef/qformer_tokenizer/tokenizer.json"),
    )
    .unwrap();
    let err = format!("{:#}", built(Path::new("Org/Name"), Path::new("Org/Tok")).err().unwrap());
    for want in [
        "Org/Tok",
        "qformer_tokenizer/tokenizer.json",
        cache.to_str().unwrap(),
        "huggingface-cli download Org/Tok",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
}
