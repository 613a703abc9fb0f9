//! The run config: each TOML table deserializes straight into its concept's config, with the
//! defaults on the structs and unknown keys rejected by name; the README's example is a valid
//! config.

use gcg::grounding::{GroundingConfig, TopkGradient};
use gcg::model::{GcgConfig, Mode};
use gcg::models::Preset;
use gcg::run::{DeviceKind, Precision, RunConfig};
use gcg::train::LrSchedule;
use std::path::{Path, PathBuf};

fn parse(text: &str) -> anyhow::Result<RunConfig> {
    let tmp = tempfile::tempdir()?;
    let p = tmp.path().join("run.toml");
    std::fs::write(&p, text)?;
    RunConfig::load(Some(&p), &[])
}

fn chain(e: &anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

#[test]
fn the_readme_run_config_parses() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).unwrap();
    let start = readme.find("```toml\nrun_dir = ").expect("README has a run.toml example") + "```toml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let cfg = parse(&readme[start..end]).unwrap();
    let pretrained = cfg.weights.pretrained.unwrap();
    assert!(
        pretrained.is_absolute() && pretrained.ends_with("instructblip-flan-t5-xl"),
        "{pretrained:?}"
    );
    assert_eq!(cfg.model.mode, Mode::Grounding);
    assert_eq!((cfg.model.frames(), cfg.model.moments()), (32, 4));
    assert_eq!(cfg.train.grounding_lr, 7e-5);
}

#[test]
fn an_empty_config_is_the_official_setup() {
    let cfg = parse("").unwrap();
    assert_eq!(cfg.weights.preset, Preset::InstructblipFlanT5Xl);
    assert_eq!(cfg.device, DeviceKind::Cpu);
    assert_eq!(cfg.dtype, None);
    assert_eq!(cfg.model, GcgConfig::default());
    let mut official = GroundingConfig::gcg();
    official.dim = cfg.model.grounding.dim;
    assert_eq!(cfg.model.grounding, official);
    assert_eq!((cfg.model.alpha_reg, cfg.model.alpha_con), (1.0, 1.0));
    assert_eq!(cfg.model.grounding.topk.num_samples, 500);
    assert_eq!(cfg.train.schedule, LrSchedule::Constant);
    assert!(cfg.model.lmm.spatial);
}

#[test]
fn nested_tables_set_their_concepts() {
    let cfg = parse(
        r#"
device = "cuda"
dtype = "bf16"
[weights]
preset = "tiny"
[model]
mode = "oracle"
alpha_con = 0.5
[model.lmm]
spatial = false
dropout = 0.0
[model.grounding]
frames = 16
moments = 3
heads = 2
[model.grounding.topk]
num_samples = 100
gradient = "diagonal"
[train]
schedule = "warmup-cosine"
train_t5 = true
"#,
    )
    .unwrap();
    assert_eq!((cfg.device, cfg.dtype), (DeviceKind::Cuda, Some(Precision::Bf16)));
    assert_eq!(cfg.weights.preset, Preset::Tiny);
    assert_eq!(cfg.model.mode, Mode::Oracle);
    assert_eq!(cfg.model.alpha_con, 0.5);
    assert!(!cfg.model.lmm.spatial);
    assert_eq!(cfg.model.lmm.dropout, Some(0.0));
    assert_eq!((cfg.model.frames(), cfg.model.moments(), cfg.model.grounding.heads), (16, 3, 2));
    assert_eq!(cfg.model.grounding.width, 0.2, "unset keys keep their defaults");
    assert_eq!(cfg.model.grounding.topk.num_samples, 100);
    assert_eq!(cfg.model.grounding.topk.gradient, TopkGradient::Diagonal);
    assert_eq!(cfg.train.schedule, LrSchedule::WarmupCosine);
    assert!(cfg.train.train_t5);
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    for (text, needle) in [
        ("[model.grounding]\nwidht = 0.3\n", "widht"),
        ("[model.grounding]\nwidth = 0.0\n", "width 0 must be"),
        ("[model]\nfrmaes = 8\n", "frmaes"),
        ("[model.grounding.topk]\nsamples = 8\n", "samples"),
        ("[weights]\nweights = \"x\"\n", "weights"),
        ("[train]\nschedule = \"cosine\"\n", "cosine"),
        ("[weights]\npreset = \"huge\"\n", "huge"),
        ("device = \"tpu\"\n", "tpu"),
        ("[model.grounding]\nframes = 4\nmoments = 4\n", "K = 4"),
        ("[model.grounding]\ndim = 64\n", "dim"),
        ("[train]\nepochs = 0\n", "epochs"),
        (
            "[model]\nmode = \"uniform\"\n[train]\nepochs = 0\ngrounding_warmup_epochs = 2\n",
            "epochs",
        ),
        ("[train]\nwarmup_fraction = 2.0\n", "warmup_fraction"),
        ("[train]\nmin_lr_factor = -1.0\n", "min_lr_factor"),
        ("[train]\nlr = 1e30\n", "lr = 1e30: AdamW moves every weight"),
        ("[train]\ngrounding_lr = 2.0\n", "grounding_lr = 2e0"),
        ("[train]\nlr = nan\n", "learning rates must be positive"),
        ("[train]\nvalidate_every = 0\n", "validate_every"),
        ("[train]\nmax_grad_norm = -1.0\n", "max_grad_norm = -1"),
        ("[train]\nmax_grad_norm = 0.0\n", "max_grad_norm = 0"),
        ("[train]\neps = -1.0\n", "eps = -1"),
        ("[train]\nbeta1 = 1.0\n", "beta1 = 1"),
        ("[train]\nbeta2 = 1.5\n", "beta2 = 1.5"),
        ("[train]\nweight_decay = -1.0\n", "weight_decay = -1"),
        ("[model.lmm]\ndropout = 1.0\n", "model.lmm: dropout 1"),
        ("[model.grounding]\nffn_mult = 0\n", "ffn_mult 0"),
        ("[model.grounding]\nlayer_norm_eps = -1.0\n", "layer_norm_eps -1"),
        ("[data]\nmax_eval = 0\n", "data.max_eval = 0"),
        ("[train]\nmax_steps = 0\n", "train.max_steps = 0 trains nothing"),
        ("[data]\nworkers = 0\n", "data.workers"),
        ("run_dir = \"\"\n", "run_dir is empty"),
        ("run_dir = \"/\"\n", "file-system root"),
        ("[weights]\ninit = \"\"\n", "weights.init is an empty path"),
        ("[train]\nschedule = \"official\"\ncosine_epochs = 0\n", "cosine_epochs"),
        (
            "[model]\nmode = \"grounding\"\n[model.grounding]\nmoments = 32\n",
            "fewer than the 32 frames",
        ),
    ] {
        let e = parse(text).err().unwrap_or_else(|| panic!("{text:?} was accepted"));
        let msg = chain(&e);
        assert!(msg.contains(needle), "{text:?}: the error {msg:?} does not name {needle:?}");
    }
}

#[test]
fn lora_is_a_table_of_model_lmm_with_the_official_defaults_and_checked_values() {
    use gcg::nn::lora::{LoraConfig, LoraTarget};
    assert_eq!(parse("").unwrap().model.lmm.lora, None, "GCG's default: a frozen T5");
    // `lora = {}` is the official --use_lora: r 16, alpha 32, dropout 0.05 on q and v.
    let cfg = parse("[model.lmm]\nlora = {}\n").unwrap();
    assert_eq!(cfg.model.lmm.lora, Some(LoraConfig::default()));
    let l = LoraConfig::default();
    assert_eq!((l.rank, l.alpha, l.dropout), (16, 32.0, 0.05));
    assert_eq!(l.targets, vec![LoraTarget::Q, LoraTarget::V]);
    let cfg = parse("[model.lmm.lora]\nrank = 8\nalpha = 16.0\ndropout = 0.0\ntargets = [\"q\", \"k\", \"v\", \"o\"]\n").unwrap();
    let l = cfg.model.lmm.lora.unwrap();
    assert_eq!((l.rank, l.alpha, l.dropout, l.targets.len()), (8, 16.0, 0.0, 4));
    let cfg = RunConfig::load(None, &["model.lmm.lora.rank=4".into()]).unwrap();
    assert_eq!(cfg.model.lmm.lora.as_ref().map(|l| (l.rank, l.alpha)), Some((4, 32.0)));
    // The resolved LMM config carries it to the model.
    let lmm = cfg.model.lmm.apply(&gcg::models::lmm::LmmConfig::tiny(), 32, false);
    assert_eq!(lmm.lora, cfg.model.lmm.lora);
    // A run trains the adapters and none of the T5's own weights.
    let trains = gcg::run::trainable(&cfg);
    let t5 = "language_model.decoder.block.1.layer.1.EncDecAttention.v";
    assert!(trains(&format!("{t5}.lora_A.weight")) && trains(&format!("{t5}.lora_B.weight")));
    assert!(!trains(&format!("{t5}.weight")) && !trains("language_model.shared.weight"));
    assert!(trains("qformer.embeddings.layernorm.weight") && trains("grounding.x"));

    for (text, needle) in [
        ("[model.lmm.lora]\nrank = 0\n", "rank = 0 must be at least 1"),
        ("[model.lmm.lora]\nalpha = 0.0\n", "alpha = 0 must be"),
        ("[model.lmm.lora]\nalpha = -2.0\n", "alpha = -2 must be"),
        ("[model.lmm.lora]\ndropout = 1.0\n", "dropout = 1 must be in [0, 1)"),
        ("[model.lmm.lora]\ndropout = -0.5\n", "dropout = -0.5 must be"),
        ("[model.lmm.lora]\ntargets = [\"q\", \"wi_0\"]\n", "wi_0"),
        ("[model.lmm.lora]\ntargets = []\n", "targets is empty"),
        ("[model.lmm.lora]\nranks = 4\n", "ranks"),
        ("[model.lmm]\nlora = {}\n[train]\ntrain_t5 = true\n", "train_t5"),
    ] {
        let e = parse(text).err().unwrap_or_else(|| panic!("{text:?} was accepted"));
        let msg = chain(&e);
        assert!(msg.contains(needle), "{text:?}: the error {msg:?} does not name {needle:?}");
        if !needle.contains("train_t5") && !needle.contains("ranks") && !needle.contains("wi_0") {
            assert!(msg.contains("[model.lmm] lora"), "{msg:?} should name the table");
        }
    }
}

#[test]
fn overrides_reach_nested_tables_and_round_trip() {
    let cfg = RunConfig::load(None, &["model.grounding.moments=6".into(), "model.mode=\"uniform\"".into()]).unwrap();
    assert_eq!(cfg.model.moments(), 6);
    assert_eq!(cfg.model.mode, Mode::Uniform);
    let again = cfg.with_overrides(&["train.lr=2e-5".into()]).unwrap();
    assert_eq!(again.train.lr, 2e-5);
    assert_eq!(again.model, cfg.model);
    // A run directory stores the resolved config as JSON; it reads back equal.
    let json = serde_json::to_string(&again).unwrap();
    let back: RunConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, again);
}

#[test]
fn paths_are_relative_to_the_config_file_and_run_dir_is_derived_visibly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("configs");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("nextqa-small.toml");
    std::fs::write(
        &p,
        "[weights]\ntokenizers = \"../tok\"\ninit = \"/abs/weights.safetensors\"\n[data]\nstore = \"store\"\ntrain = \"ann/train.csv\"\n",
    )
    .unwrap();
    let cfg = RunConfig::load(Some(&p), &[]).unwrap();
    let base = std::path::absolute(&dir).unwrap();
    // No run_dir: runs/<file stem> beside the file, never a shared default.
    assert_eq!(cfg.run_dir.as_deref(), Some(base.join("runs/nextqa-small").as_path()));
    assert_eq!(RunConfig::default_run_dir(&p).unwrap(), base.join("runs/nextqa-small"));
    assert_eq!(cfg.weights.tokenizers, Some(base.join("../tok")));
    assert_eq!(cfg.weights.init, Some(PathBuf::from("/abs/weights.safetensors")));
    assert_eq!(cfg.data.store, base.join("store"));
    assert_eq!(cfg.data.train, Some(base.join("ann/train.csv")));
    // An explicit run_dir is relative to the file too; `--set` paths stay as given.
    std::fs::write(&p, "run_dir = \"out/a\"\n").unwrap();
    let cfg = RunConfig::load(Some(&p), &["data.test=\"t.csv\"".into()]).unwrap();
    assert_eq!(cfg.run_dir, Some(base.join("out/a")));
    assert_eq!(cfg.data.test, Some(PathBuf::from("t.csv")));
    // Without a file there is no run directory, and asking for one says how to set it.
    let cfg = RunConfig::load(None, &[]).unwrap();
    assert!(chain(&cfg.run_dir().unwrap_err()).contains("run_dir"));
}

/// An error that comes from a `--set` override names the override, not the config file; a run's
/// missing store is named with its setting.
#[test]
fn override_errors_name_the_override_and_a_missing_store_its_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("run.toml");
    std::fs::write(&p, "run_dir = \"r\"\n[model.grounding]\nframes = 8\n").unwrap();
    for (set, needle) in [("model.grounding.moments=9", "K = 9"), ("model.grounding.widht=3", "widht")] {
        let e = RunConfig::load(Some(&p), &[set.to_string()])
            .err()
            .unwrap_or_else(|| panic!("{set} accepted"));
        let msg = chain(&e);
        assert!(msg.contains(&format!("--set {set}")) && msg.contains(needle), "{set}: {msg}");
    }
    let cfg = RunConfig::load(Some(&p), &[]).unwrap();
    let e = gcg::run::open_store(&cfg).err().unwrap();
    let msg = chain(&e);
    assert!(msg.contains("[data] store") && msg.contains("does not exist"), "{msg}");
}

/// The shipped run configs (configs/*.toml) parse, hold the official recipe, and print back (as
/// `gcg train --print-config` prints them) to the same config.
#[test]
fn shipped_configs_hold_the_official_recipe() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let cfg = RunConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        cfg.validate().unwrap();
        let t = &cfg.train;
        assert_eq!(
            (t.batch_size, t.grad_accum, t.lr, t.grounding_lr, t.weight_decay, t.epochs, t.seed),
            (4, 8, 1e-5, 7e-5, 0.02, 10, 3407),
            "{}",
            path.display()
        );
        let g = &cfg.model.grounding;
        assert_eq!(
            (g.frames, g.moments, g.width, g.temperature),
            (32, 4, 0.2, 0.1),
            "{}",
            path.display()
        );
        assert_eq!(cfg.model.mode, gcg::model::Mode::Grounding);
        let printed = cfg.to_toml_with_unset().unwrap();
        let back: RunConfig = toml::from_str(&printed).unwrap();
        assert_eq!(back, cfg, "{}", path.display());
        // Every optional key left unset is named, as a comment in its table.
        let train = &printed[printed.find("\n[train]\n").unwrap()..];
        let train = &train[..train[1..].find("\n[").map_or(train.len(), |e| e + 1)];
        assert!(
            cfg.train.max_steps.is_none() && train.contains("\n# max_steps = ...  (not set)\n"),
            "{printed}"
        );
        assert!(
            cfg.data.max_eval.is_none() && printed.contains("# max_eval = ...  (not set)"),
            "{printed}"
        );
        seen.push(cfg.data.dataset.name());
    }
    seen.sort();
    assert_eq!(seen, ["causalvidqa", "intentqa", "nextgqa", "nextqa", "star"]);
}

#[test]
fn every_benchmark_can_be_named_in_the_data_table() {
    use gcg::data::Dataset;
    for (name, want) in [
        ("next-qa", Dataset::NextQa),
        ("nextqa", Dataset::NextQa),
        ("causal-vid-qa", Dataset::CausalVidQa),
        ("causalvidqa", Dataset::CausalVidQa),
        ("star", Dataset::Star),
        ("traffic-qa", Dataset::TrafficQa),
        ("trafficqa", Dataset::TrafficQa),
        ("sutd-trafficqa", Dataset::TrafficQa),
        ("vlep", Dataset::Vlep),
        ("open-ended", Dataset::OpenEnded),
    ] {
        let cfg = parse(&format!("[data]\ndataset = \"{name}\"\n")).unwrap_or_else(|e| panic!("{name}: {}", chain(&e)));
        assert_eq!(cfg.data.dataset, want, "{name}");
        // The command-line name reads back the same benchmark.
        assert_eq!(Dataset::from_name(want.name()), Some(want));
    }
    let e = parse("[data]\ndataset = \"how2qa\"\n").unwrap_err();
    assert!(chain(&e).contains("how2qa"), "{}", chain(&e));
}

/// NExT-GQA has no training split: the shipped `configs/nextgqa.toml` (the official recipe)
/// trains on NExT-QA's training questions, so its `train` is read in NExT-QA's format (an
/// answer index), which the NExT-GQA reader refuses; `train_dataset` says otherwise when needed.
#[test]
fn the_nextgqa_config_reads_its_training_questions_as_nextqa() {
    use gcg::data::{read_annotations, Dataset, ReadOptions};
    use std::io::Read;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    // Real rows of each format (the val splits' first 40, header included).
    let cut = |from: &str, to: &str| {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(root.join(from)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let p = tmp.path().join(to);
        std::fs::write(&p, text.lines().take(41).collect::<Vec<_>>().join("\n") + "\n").unwrap();
        p
    };
    let nextqa = cut("tests/fixtures/data/nextqa/val.csv.gz", "nextqa_train.csv");
    let nextgqa = cut("tests/fixtures/data/nextgqa/val.csv.gz", "nextgqa_train.csv");
    let opts = ReadOptions::default();
    let mut cfg = RunConfig::load(Some(&root.join("configs/nextgqa.toml")), &[]).unwrap();
    assert_eq!(cfg.data.dataset, Dataset::NextGqa);
    cfg.data.train = Some(nextqa.clone());
    assert_eq!(cfg.data.train_format(), Dataset::NextQa);
    assert_eq!(read_annotations(cfg.data.train_format(), &nextqa, &opts).unwrap().samples.len(), 40);
    assert!(read_annotations(Dataset::NextGqa, &nextqa, &opts).is_err());
    // A train file in NExT-GQA's own format is read as such.
    cfg.data.train = Some(nextgqa.clone());
    assert_eq!(cfg.data.train_format(), Dataset::NextGqa);
    assert_eq!(
        read_annotations(cfg.data.train_format(), &nextgqa, &opts).unwrap().samples.len(),
        40
    );
    // Set explicitly, and for the other benchmarks the dataset's own format.
    cfg.data.train = Some(nextqa);
    cfg.data.train_dataset = Some(Dataset::NextGqa);
    assert_eq!(cfg.data.train_format(), Dataset::NextGqa);
    assert_eq!(parse("[data]\ndataset = \"star\"\n").unwrap().data.train_format(), Dataset::Star);
}
