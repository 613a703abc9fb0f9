//! AdamW with parameter groups, gradient clipping and the schedule factor against
//! torch.optim.AdamW + clip_grad_norm_ (tests/fixtures/optim, from tools/fixtures/make_optim.py);
//! checkpoints round-trip the optimiser exactly.

mod common;

use candle_core::{Device, Var};
use common::{assert_close, get, load_io};
use gcg::train::checkpoint::{self, TrainState};
use gcg::train::{AdamW, AdamWConfig, Grads, GroupConfig, Schedule};
use gcg::weights::VarStore;

fn setup() -> (
    std::collections::HashMap<String, candle_core::Tensor>,
    serde_json::Value,
    VarStore,
    AdamW,
) {
    let dir = common::fixtures_dir().join("optim");
    let io = load_io(&dir.join("adamw.safetensors")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adamw.json")).unwrap()).unwrap();
    let mut vars = VarStore::default();
    for name in ["a.weight", "a.bias", "grounding.w"] {
        vars.vars.insert(
            name.to_string(),
            Var::from_tensor(get(&io, &format!("init.{name}")).unwrap()).unwrap(),
        );
    }
    let groups: Vec<GroupConfig> = serde_json::from_value(meta["groups"].clone()).unwrap();
    let opt = AdamW::new(&vars, groups, AdamWConfig::default(), |n| usize::from(n.starts_with("grounding."))).unwrap();
    (io, meta, vars, opt)
}

fn run_steps(
    io: &std::collections::HashMap<String, candle_core::Tensor>,
    meta: &serde_json::Value,
    opt: &mut AdamW,
    steps: std::ops::Range<usize>,
    vars: &VarStore,
) {
    for step in steps {
        let mut grads = Grads::new();
        for name in ["a.weight", "a.bias", "grounding.w"] {
            if let Some(g) = io.get(&format!("step{step}.grad.{name}")) {
                grads.insert(name, g.clone());
            }
        }
        let norm = grads.clip_global_norm(meta["max_norm"].as_f64().unwrap()).unwrap();
        let want_norm = meta["steps"][step]["norm"].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() <= 1e-5 * want_norm,
            "step {step}: norm {norm} vs {want_norm}"
        );
        opt.step(&grads, meta["steps"][step]["factor"].as_f64().unwrap()).unwrap();
        for name in ["a.weight", "a.bias", "grounding.w"] {
            assert_close(
                &format!("step {step} {name}"),
                vars.get(name).unwrap().as_tensor(),
                get(io, &format!("step{step}.param.{name}")).unwrap(),
                1e-5,
            );
        }
    }
}

#[test]
fn adamw_groups_clipping_and_schedule_match_torch() {
    let (io, meta, vars, mut opt) = setup();
    run_steps(&io, &meta, &mut opt, 0..6, &vars);
    // The fixture's factors are the warm-up + cosine schedule of make_optim.py.
    let s = Schedule::WarmupCosine {
        warmup_steps: 2,
        total_steps: 6,
        warmup_start_factor: 0.1,
        min_factor: 0.2,
    };
    for step in 0..6 {
        let want = meta["steps"][step]["factor"].as_f64().unwrap();
        assert!((s.factor(step as u64) - want).abs() < 1e-12);
    }
}

#[test]
fn checkpoint_resume_continues_the_same_trajectory() {
    let (io, meta, vars, mut opt) = setup();
    run_steps(&io, &meta, &mut opt, 0..3, &vars);
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("last");
    let mut state = TrainState::new(5);
    state.step = 3;
    let _ = state.rng.normal();
    checkpoint::save(&ck, &vars, &opt, &state, &serde_json::json!({"note": "test"})).unwrap();
    // Overwriting keeps exactly one complete checkpoint under the name.
    checkpoint::save(&ck, &vars, &opt, &state, &serde_json::json!({"note": "test"})).unwrap();
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");

    // A fresh optimiser and fresh (wrong) values, restored from the checkpoint.
    let (_, _, vars2, mut opt2) = setup();
    let loaded = checkpoint::load(&ck, &Device::Cpu).unwrap();
    loaded.restore(&vars2, &mut opt2).unwrap();
    assert_eq!(loaded.state, state);
    assert_eq!(opt2.step_count(), 3);
    run_steps(&io, &meta, &mut opt2, 3..6, &vars2);
}

#[test]
fn gradient_accumulation_sums_scaled_micro_batches() {
    let x = Var::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let mut vars = VarStore::default();
    vars.vars.insert("x".into(), x.clone());
    let mut grads = Grads::new();
    for k in 1..=2 {
        let loss = (x.as_tensor().sqr().unwrap() * k as f64).unwrap().sum_all().unwrap();
        grads.accumulate(&loss.backward().unwrap(), &vars, 0.5).unwrap();
    }
    // d/dx (x² + 2x²)/2 = 3x
    assert_eq!(grads.get("x").unwrap().to_vec1::<f32>().unwrap(), vec![3., 6., 9.]);
    assert!(grads.all_finite().unwrap());
}

/// `[train] schedule = "official"` against the official `LinearWarmupCosineLRScheduler` stepped as
/// `finetune_ans.py` steps it (tools/fixtures/make_official_schedule.py runs the official
/// `utils/optims.py`): each group's rate at each update, the grounding group's own rate at the
/// first update only.
#[test]
fn the_official_schedule_equals_the_official_scheduler() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/optim/official_schedule.json");
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let num = |k: &str| f[k].as_f64().unwrap();
    let cfg = gcg::train::trainer::TrainConfig {
        lr: num("lr"),
        grounding_lr: num("grounding_lr"),
        schedule: gcg::train::LrSchedule::Official,
        warmup_start_factor: num("warmup_start_lr") / num("lr"),
        min_lr_factor: num("min_lr") / num("lr"),
        cosine_epochs: f["max_T"].as_u64().unwrap(),
        ..Default::default()
    };
    let steps = f["steps_per_epoch"].as_u64().unwrap();
    let rows = f["group_lrs"].as_array().unwrap();
    let s = cfg.schedule(steps, rows.len() as u64 / steps);
    for (u, row) in rows.iter().enumerate() {
        for (g, base) in [cfg.lr, cfg.grounding_lr].into_iter().enumerate() {
            let want = row[g].as_f64().unwrap();
            let got = s.lr(u as u64, base);
            assert!((got - want).abs() <= 1e-15 * want, "update {u} group {g}: {got} vs {want}");
        }
    }
}
