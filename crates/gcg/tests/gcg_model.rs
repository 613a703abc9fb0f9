//! The whole GCG model on tiny random networks: the three modes' losses and gradients, the
//! deterministic answers, learning on a synthetic task whose answer depends on which frames are
//! chosen, and resume to the identical loss sequence.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gcg::data::{Answer, Dataset, QaSample};
use gcg::data::{AnswerFormat, Batch, PromptEncoder};
use gcg::grounding::hard_topk;
use gcg::grounding::GroundingConfig;
use gcg::model::{is_trainable, AnswerMethod, GcgConfig, GcgModel, Mode, TextTokenizers, UniformRule};
use gcg::models::lmm::LmmConfig;
use gcg::text::vocab::closed_vocab_tokenizers;
use gcg::train::trainer::{self, BatchSource, Event, RunDir, TrainConfig, TrainJob};
use gcg::weights::Loader;
use gcg::SeededRng;
use std::cell::RefCell;

const T: usize = 16;
const K: usize = 4;
const COLOURS: [&str; 5] = ["red", "green", "blue", "yellow", "purple"];

fn tokenizers(dir: &std::path::Path) -> TextTokenizers {
    let q = "Question: what colour was the shape that appeared?\nOptions: \nA: red \nB: green \nC: blue \nD: yellow \nE: purple\nAnswer: ";
    let (qformer, t5) = closed_vocab_tokenizers(&[q, "A B C D E"], dir).unwrap();
    TextTokenizers { qformer, t5 }
}

fn config(mode: Mode, k: usize) -> GcgConfig {
    config_d(mode, k, 24)
}

/// The tiny LMM sized to the test tokenizers.
fn lmm_config(tok: &TextTokenizers) -> LmmConfig {
    let mut lmm = LmmConfig::tiny();
    lmm.qformer.vocab_size = tok.qformer.vocab_size();
    lmm.t5.vocab_size = tok.t5.vocab_size();
    lmm.max_frames = T;
    lmm
}

fn config_d(mode: Mode, k: usize, d: usize) -> GcgConfig {
    let mut grounding = GroundingConfig::tiny();
    grounding.dim = d;
    grounding.frames = T;
    grounding.moments = k;
    grounding.dropout = 0.0;
    grounding.topk.num_samples = 100;
    GcgConfig {
        grounding,
        mode,
        alpha_reg: 1.0,
        alpha_con: 1.0,
        uniform_rule: UniformRule::Round,
        answer: AnswerMethod::OptionScoring,
        ..GcgConfig::default()
    }
}

/// A synthetic world in the tiny model's spaces: each video has one 2-frame event whose frames
/// carry the answer (in the ViT features and along the answer's CLIP text direction); the other
/// frames are noise. Pseudo-label scores are the cosine of frames and answer text.
struct World {
    samples: Vec<QaSample>,
    events: Vec<usize>,
    features: Vec<Tensor>,    // [T, N, Dv]
    clip_frames: Vec<Tensor>, // [T, d]
    colour_text: Tensor,      // [5, d]
    colour_code: Tensor,      // [5, Dv]
    question: Tensor,         // [d]
    /// The test tokenizers (as the models') with the official answer format, as the batch
    /// loader tokenizes.
    prompts: PromptEncoder,
}

fn unit_rows(t: Tensor) -> Tensor {
    let n = t.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    t.broadcast_div(&n).unwrap()
}

fn world(n: usize, seed: u64) -> World {
    world_d(n, seed, 24)
}

fn world_d(n: usize, seed: u64, d: usize) -> World {
    let dev = Device::Cpu;
    let mut r = SeededRng::new(seed);
    let (nt, dv) = (10usize, 48usize);
    let mut randn = |shape: &[usize], std: f64| Tensor::from_vec(r.normal_vec(shape.iter().product(), 0.0, std), shape, &dev).unwrap();
    let colour_text = unit_rows(randn(&[5, d], 1.0));
    let colour_code = randn(&[5, dv], 3.0);
    let question = unit_rows(randn(&[1, d], 1.0)).squeeze(0).unwrap();
    let tok_dir = tempfile::tempdir().unwrap();
    let prompts = PromptEncoder {
        tokenizers: std::sync::Arc::new(tokenizers(tok_dir.path())),
        answer_format: AnswerFormat::Letter,
    };
    let mut w = World {
        prompts,
        samples: vec![],
        events: vec![],
        features: vec![],
        clip_frames: vec![],
        colour_text,
        colour_code,
        question,
    };
    let mut r2 = SeededRng::new(seed + 100);
    for i in 0..n {
        let answer = r2.below(5);
        let e = r2.below(T - 1);
        let mut feats = randn(&[T, nt, dv], 1.0);
        let mut frames = unit_rows(randn(&[T, d], 1.0));
        let code = w
            .colour_code
            .get(answer)
            .unwrap()
            .reshape((1, 1, dv))
            .unwrap()
            .broadcast_as((2, nt, dv))
            .unwrap();
        let ev = (feats.narrow(0, e, 2).unwrap() + code).unwrap();
        feats = feats.slice_assign(&[e..e + 2, 0..nt, 0..dv], &ev).unwrap();
        let dir = w
            .colour_text
            .get(answer)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((2, d))
            .unwrap();
        let evf = unit_rows((frames.narrow(0, e, 2).unwrap() * 0.5).unwrap().add(&(dir * 2.0).unwrap()).unwrap());
        frames = frames.slice_assign(&[e..e + 2, 0..d], &evf).unwrap();
        w.samples.push(QaSample {
            dataset: Dataset::NextQa,
            key: format!("v{i}_0"),
            qid: "0".into(),
            video: format!("v{i}"),
            question: "what colour was the shape that appeared".into(),
            options: COLOURS.iter().map(|s| s.to_string()).collect(),
            answer: Answer::Choice(answer),
            qtype: "DO".into(),
            extra: Default::default(),
        });
        w.events.push(e);
        w.features.push(feats);
        w.clip_frames.push(frames);
    }
    w
}

impl World {
    fn batch(&self, idx: &[usize]) -> Batch {
        let samples: Vec<QaSample> = idx.iter().map(|&i| self.samples[i].clone()).collect();
        let features = Tensor::stack(&idx.iter().map(|&i| self.features[i].clone()).collect::<Vec<_>>(), 0).unwrap();
        let clip_frames = Tensor::stack(&idx.iter().map(|&i| self.clip_frames[i].clone()).collect::<Vec<_>>(), 0).unwrap();
        let b = idx.len();
        let answers: Vec<usize> = samples
            .iter()
            .map(|s| if let Answer::Choice(a) = s.answer { a } else { 0 })
            .collect();
        let ids: Vec<u32> = answers.iter().map(|&a| a as u32).collect();
        let clip_event = self
            .colour_text
            .index_select(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), 0)
            .unwrap();
        let scores = clip_frames.matmul(&clip_event.unsqueeze(2).unwrap()).unwrap().squeeze(2).unwrap(); // [B, T]
        Batch {
            index: 0,
            samples,
            frame_features: Some(features),
            pixel_values: None,
            clip_frames,
            clip_question: self
                .question
                .unsqueeze(0)
                .unwrap()
                .broadcast_as((b, self.question.dim(0).unwrap()))
                .unwrap()
                .contiguous()
                .unwrap(),
            clip_options: Some(
                self.colour_text
                    .unsqueeze(0)
                    .unwrap()
                    .broadcast_as((b, 5, self.question.dim(0).unwrap()))
                    .unwrap()
                    .contiguous()
                    .unwrap(),
            ),
            clip_answer: clip_event.clone(),
            clip_event,
            pseudo_labels: hard_topk(&scores, K).unwrap(),
            pseudo_label_scores: scores,
            answer_indices: Some(answers),
            timestamps: (0..b).map(|_| (0..T).map(|t| t as f64 * 0.5).collect()).collect(),
            prompts: None,
        }
        .with_prompts(&self.prompts)
        .unwrap()
    }
}

struct Source<'a> {
    world: &'a World,
    batch_size: usize,
    seed: u64,
}

impl BatchSource for Source<'_> {
    fn num_batches(&self) -> usize {
        self.world.samples.len().div_ceil(self.batch_size)
    }
    fn batches(&self, epoch: u64, skip: usize) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        let mut order: Vec<usize> = (0..self.world.samples.len()).collect();
        SeededRng::new(self.seed ^ (epoch + 1).wrapping_mul(0x9E37)).shuffle(&mut order);
        let chunks: Vec<Vec<usize>> = order.chunks(self.batch_size).map(|c| c.to_vec()).skip(skip).collect();
        Ok(Box::new(chunks.into_iter().map(move |c| Ok(self.world.batch(&c)))))
    }
}

fn build(mode: Mode, tok_dir: &std::path::Path, seed: u64) -> (GcgModel, gcg::weights::VarStore) {
    build_k(mode, tok_dir, seed, K)
}

fn build_k(mode: Mode, tok_dir: &std::path::Path, seed: u64, k: usize) -> (GcgModel, gcg::weights::VarStore) {
    build_cfg(tok_dir, seed, || config(mode, k))
}

fn build_cfg(tok_dir: &std::path::Path, seed: u64, cfg: impl Fn() -> GcgConfig) -> (GcgModel, gcg::weights::VarStore) {
    let tok = tokenizers(tok_dir);
    let lmm = lmm_config(&tok);
    let lb = Loader::random(&Device::Cpu, DType::F32, seed).with_trainable(is_trainable);
    let model = GcgModel::load(&lb, &lmm, &cfg(), tok, false).unwrap();
    (model, lb.vars())
}

#[test]
fn every_mode_trains_and_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(6, 1);
    let batch = w.batch(&[0, 1, 2]);
    for mode in [Mode::Uniform, Mode::Oracle, Mode::Grounding] {
        let (model, vars) = build(mode, tmp.path(), 2);
        let rng = RefCell::new(SeededRng::new(3));
        let losses = model.forward_train(&batch, &rng).unwrap();
        let total = losses.total.to_scalar::<f32>().unwrap();
        assert!(total.is_finite(), "{mode}: loss {total}");
        assert_eq!(losses.reg.is_some(), mode == Mode::Grounding);
        assert_eq!(losses.con.is_some(), mode == Mode::Grounding);
        let grads = losses.total.backward().unwrap();
        let last = model.lmm.cfg.qformer.num_hidden_layers - 1;
        for (name, var) in vars.iter() {
            // The text positions' feed-forward of the last Q-Former layer feeds nothing the LLM
            // sees (only the query outputs are kept): no gradient there, as in PyTorch.
            if name.starts_with(&format!("qformer.encoder.layer.{last}.intermediate."))
                || name.starts_with(&format!("qformer.encoder.layer.{last}.output."))
            {
                assert!(grads
                    .get(var.as_tensor())
                    .is_none_or(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() == 0.0));
                continue;
            }
            let has = grads
                .get(var.as_tensor())
                .is_some_and(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
            // Frame positions are only in oracle/grounding; rows beyond K get no gradient, the
            // table as a whole does.
            assert!(has, "{mode}: no gradient reaches {name}");
        }
        if mode == Mode::Grounding {
            assert!(vars.iter().any(|(n, _)| n.starts_with("grounding.")));
        } else {
            assert!(!vars.iter().any(|(n, _)| n.starts_with("grounding.")));
        }
        let answers = model.answer(&batch).unwrap();
        assert_eq!(answers.len(), 3);
        for (a, s) in answers.iter().zip(&batch.samples) {
            assert_eq!(a.key, s.key);
            assert_eq!(a.frames.len(), K);
            assert!(a.frames.windows(2).all(|p| p[0] < p[1]), "{mode}: frames not sorted {:?}", a.frames);
            assert_eq!(a.seconds, a.frames.iter().map(|&f| f as f64 * 0.5).collect::<Vec<_>>());
            assert!(matches!(a.prediction, Answer::Choice(i) if i < 5));
            assert_eq!(a.option_scores.as_ref().unwrap().len(), 5);
            assert_eq!(a.curve.is_some(), mode != Mode::Uniform, "{mode}");
        }
        if mode == Mode::Uniform {
            assert_eq!(answers[0].frames, vec![0, 5, 10, 15]);
        }
        if mode == Mode::Oracle {
            // The oracle's frames sit on the pseudo-labelled event.
            for (a, &e) in answers.iter().zip(&w.events) {
                assert!(
                    a.frames.contains(&e) || a.frames.contains(&(e + 1)),
                    "oracle missed event {e}: {:?}",
                    a.frames
                );
            }
        }
        // Deterministic.
        assert_eq!(model.answer(&batch).unwrap(), answers);
    }
}

/// The rows of a run's metrics log.
fn read_rows(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect()
}

/// The training loss of every logged step.
fn read_losses(run: &std::path::Path) -> Vec<f64> {
    read_rows(run)
        .iter()
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

#[test]
fn resume_gives_the_identical_loss_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(12, 4);
    let src = Source {
        world: &w,
        batch_size: 2,
        seed: 9,
    };
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 2,
        grad_accum: 2,
        lr: 1e-3,
        grounding_lr: 3e-3,
        checkpoint_every: 2,
        max_grad_norm: Some(1.0),
        schedule: gcg::train::LrSchedule::WarmupCosine,
        ..Default::default()
    };
    let run_cfg = serde_json::json!({"test": true});
    // Trains (or resumes) the run in `dir` with `cfg` on a freshly built model (same frozen
    // weights, as from the same pretrained checkpoint: a checkpoint restores the trained
    // weights, the optimiser and the generator); its logged losses.
    let train = |dir: &str, cfg: &TrainConfig, resume: bool| {
        let run = RunDir::new(tmp.path().join(dir)).unwrap();
        let (model, vars) = build(Mode::Grounding, &tmp.path().join("tok"), 7);
        let job = TrainJob {
            model: &model,
            vars: &vars,
            cfg,
            run: &run,
            train_set: &src,
            val_set: None,
            val_grounding: None,
            run_config: &run_cfg,
        };
        trainer::train(&job, resume, &mut |_| {}).unwrap();
        read_losses(&run.root)
    };
    // Uninterrupted: 2 epochs of 6 micro-batches, 3 steps each.
    let want = train("full", &cfg, false);
    assert_eq!(want.len(), 6);
    // Interrupted after 3 steps (the end of epoch 1: its checkpoint is the one an epoch's end
    // writes, which must hold every draw of the generator made before epoch 2's first group)
    // and after 4 (mid-epoch 2), then resumed by a fresh process-like rebuild.
    for stop in [3, 4] {
        let part = format!("part{stop}");
        let stopped = TrainConfig {
            max_steps: Some(stop),
            ..cfg.clone()
        };
        train(&part, &stopped, false);
        let got = train(&part, &cfg, true);
        assert_eq!(got, want, "resumed after {stop} steps: the loss sequence differs");
    }
    // A run of 1 epoch, its end-of-epoch checkpoint resumed for a second epoch (as a kill right
    // after that checkpoint, or `--resume --set train.epochs=2`): the same as 2 epochs straight,
    // with the constant learning rate that makes the two plans the same.
    let epochs = |epochs: u64| TrainConfig {
        epochs,
        schedule: gcg::train::LrSchedule::Constant,
        ..cfg.clone()
    };
    let want = train("straight", &epochs(2), false);
    assert_eq!(want.len(), 6);
    assert_eq!(train("epoch", &epochs(1), false).len(), 3);
    assert_eq!(
        train("epoch", &epochs(2), true),
        want,
        "resumed at an epoch's end: the loss sequence differs"
    );
}

#[test]
fn grounding_learns_to_find_the_event() {
    let tmp = tempfile::tempdir().unwrap();
    // A 64-d CLIP space (the tiny 24-d one leaves the generator too narrow to learn this), K = 2
    // moments for 2-frame events, and α2 = 0.1: at α2 = 1 the contrastive gradient through the
    // perturbed top-k (scaled by 1/σ = 20) dominates Adam's second moments and slows the
    // regression by an order of magnitude on this toy task.
    let w = world_d(48, 11, 64);
    let src = Source {
        world: &w,
        batch_size: 8,
        seed: 5,
    };
    let val: Vec<usize> = (0..48).collect();
    let (model, vars) = build_cfg(tmp.path(), 13, || GcgConfig {
        alpha_con: 0.1,
        ..config_d(Mode::Grounding, 2, 64)
    });
    let hits = |model: &GcgModel| -> f64 {
        let answers = model.answer(&w.batch(&val)).unwrap();
        let mut h = 0;
        for (a, &e) in answers.iter().zip(&w.events) {
            h += usize::from(a.frames.contains(&e) || a.frames.contains(&(e + 1)));
        }
        h as f64 / val.len() as f64
    };
    let uniform_hits = {
        let u = gcg::model::uniform_indices(T, 2, UniformRule::Round);
        w.events.iter().filter(|&&e| u.contains(&e) || u.contains(&(e + 1))).count() as f64 / w.events.len() as f64
    };
    let before = hits(&model);
    let cfg = TrainConfig {
        epochs: 70,
        batch_size: 8,
        grad_accum: 1,
        lr: 1e-4,
        grounding_lr: 1e-3,
        checkpoint_every: 1000,
        ..Default::default()
    };
    let run = RunDir::new(tmp.path().join("run")).unwrap();
    let mut rows = vec![];
    trainer::train(
        &TrainJob {
            model: &model,
            vars: &vars,
            cfg: &cfg,
            run: &run,
            train_set: &src,
            val_set: None,
            val_grounding: None,
            run_config: &serde_json::json!({}),
        },
        false,
        &mut |e| {
            if let Event::Step(m) = e {
                rows.push((m.reg.unwrap(), m.con.unwrap()));
            }
        },
    )
    .unwrap();
    let after = hits(&model);
    let n = rows.len();
    let avg = |r: &[(f64, f64)]| {
        (
            r.iter().map(|x| x.0).sum::<f64>() / r.len() as f64,
            r.iter().map(|x| x.1).sum::<f64>() / r.len() as f64,
        )
    };
    let (reg0, con0) = avg(&rows[..n / 5]);
    let (reg1, con1) = avg(&rows[n - n / 5..]);
    eprintln!("event hit rate: uniform {uniform_hits:.2}, grounding before {before:.2}, after {after:.2}; L_reg {reg0:.3} -> {reg1:.3}, L_con {con0:.3} -> {con1:.3}");
    assert!(reg1 < 0.7 * reg0, "L_reg did not fall: {reg0} -> {reg1}");
    assert!(con1 < con0, "L_con did not fall: {con0} -> {con1}");
    assert!(
        after >= uniform_hits + 0.3,
        "grounding hit rate {after:.2} is not clearly above uniform's {uniform_hits:.2}"
    );
}

fn values(vars: &gcg::weights::VarStore) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = vars
        .iter()
        .map(|(n, var)| (n.clone(), var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn grounding_warmup_trains_the_grounding_module_alone_then_the_joint_objective() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(12, 4);
    let src = Source {
        world: &w,
        batch_size: 4,
        seed: 9,
    };
    let val = Source {
        world: &w,
        batch_size: 6,
        seed: 1,
    };
    let cfg = TrainConfig {
        epochs: 0,
        grounding_warmup_epochs: 2,
        batch_size: 4,
        grad_accum: 1,
        lr: 1e-3,
        grounding_lr: 3e-3,
        checkpoint_every: 2,
        schedule: gcg::train::LrSchedule::WarmupCosine,
        warmup_fraction: 0.4,
        ..Default::default()
    };
    let run_cfg = serde_json::json!({});
    // Warm-up only: the grounding module changes, nothing else does; validated at its end.
    let (model, vars) = build(Mode::Grounding, &tmp.path().join("tok"), 7);
    let before = values(&vars);
    let run = RunDir::new(tmp.path().join("warm")).unwrap();
    let mut validations = 0;
    let mut steps = vec![];
    trainer::train(
        &TrainJob {
            model: &model,
            vars: &vars,
            cfg: &cfg,
            run: &run,
            train_set: &src,
            val_set: Some(&val),
            val_grounding: None,
            run_config: &run_cfg,
        },
        false,
        &mut |e| match e {
            Event::Validation { .. } => validations += 1,
            Event::Step(m) => steps.push((m.warmup, m.vqa, m.loss, m.reg.unwrap(), m.con.unwrap())),
            _ => {}
        },
    )
    .unwrap();
    assert_eq!(validations, 1);
    assert_eq!(steps.len(), 6, "2 warm-up epochs of 3 batches");
    for (warm, vqa, loss, reg, con) in &steps {
        assert!(*warm);
        assert_eq!(*vqa, 0.0);
        // α_reg = α_con = 1.
        assert!((loss - (reg + con)).abs() < 1e-4 * loss.abs().max(1.0), "{loss} vs {reg} + {con}");
    }
    let after = values(&vars);
    let mut changed_grounding = 0;
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        if n.starts_with("grounding.") {
            changed_grounding += usize::from(a != b);
        } else {
            assert_eq!(a, b, "{n} changed during the grounding warm-up");
        }
    }
    assert!(changed_grounding > 10, "only {changed_grounding} grounding tensors changed");
    let rows = read_rows(&run.root);
    let (steps_rows, val_rows): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.get("loss").is_some());
    assert_eq!(steps_rows.len(), 6);
    assert!(steps_rows.iter().all(|r| r["warmup"] == serde_json::json!(true)));
    assert_eq!(val_rows.len(), 1);
    assert_eq!(val_rows[0]["epoch"], serde_json::json!(1));

    // Warm-up then one joint epoch: 9 steps, the last 3 joint (L_vqa > 0); validated after
    // the warm-up and after the joint epoch.
    let cfg = TrainConfig { epochs: 1, ..cfg };
    let full = RunDir::new(tmp.path().join("full")).unwrap();
    let (model, vars) = build(Mode::Grounding, &tmp.path().join("tok"), 7);
    let mut validations = vec![];
    trainer::train(
        &TrainJob {
            model: &model,
            vars: &vars,
            cfg: &cfg,
            run: &full,
            train_set: &src,
            val_set: Some(&val),
            val_grounding: None,
            run_config: &run_cfg,
        },
        false,
        &mut |e| {
            if let Event::Validation { epoch, .. } = e {
                validations.push(epoch)
            }
        },
    )
    .unwrap();
    assert_eq!(validations, vec![1, 2]);
    let rows: Vec<_> = read_rows(&full.root).into_iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(rows.len(), 9);
    for (i, r) in rows.iter().enumerate() {
        let warm = r.get("warmup").is_some_and(|w| w == &serde_json::json!(true));
        assert_eq!(warm, i < 6, "row {i}: {r}");
        assert_eq!(r["vqa"].as_f64().unwrap() > 0.0, i >= 6, "row {i}: {r}");
    }
    // The warm-up runs at the constant base rates; the joint epochs run the warmup-cosine
    // schedule from its start.
    let lr = |i: usize| rows[i]["lr"].as_f64().unwrap();
    assert!((0..6).all(|i| lr(i) == 1e-3), "{:?}", (0..6).map(lr).collect::<Vec<_>>());
    assert!(lr(6) < 1e-5 && lr(7) > 1e-4, "{} {}", lr(6), lr(7));

    // Killed inside the warm-up and resumed: the identical loss sequence.
    let want = read_losses(&full.root);
    let part = RunDir::new(tmp.path().join("part")).unwrap();
    let (model, vars) = build(Mode::Grounding, &tmp.path().join("tok"), 7);
    let killed = TrainConfig {
        max_steps: Some(4),
        ..cfg.clone()
    };
    trainer::train(
        &TrainJob {
            model: &model,
            vars: &vars,
            cfg: &killed,
            run: &part,
            train_set: &src,
            val_set: None,
            val_grounding: None,
            run_config: &run_cfg,
        },
        false,
        &mut |_| {},
    )
    .unwrap();
    let (model, vars) = build(Mode::Grounding, &tmp.path().join("tok"), 7);
    trainer::train(
        &TrainJob {
            model: &model,
            vars: &vars,
            cfg: &cfg,
            run: &part,
            train_set: &src,
            val_set: Some(&val),
            val_grounding: None,
            run_config: &run_cfg,
        },
        true,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(read_losses(&part.root), want, "resumed loss sequence differs");

    // Other modes ignore the warm-up.
    let (model, vars) = build(Mode::Uniform, &tmp.path().join("tok"), 7);
    let uni = RunDir::new(tmp.path().join("uni")).unwrap();
    let mut n = 0;
    trainer::train(
        &TrainJob {
            model: &model,
            vars: &vars,
            cfg: &cfg,
            run: &uni,
            train_set: &src,
            val_set: None,
            val_grounding: None,
            run_config: &run_cfg,
        },
        false,
        &mut |e| {
            if let Event::Step(m) = e {
                assert!(!m.warmup);
                n += 1;
            }
        },
    )
    .unwrap();
    assert_eq!(n, 3);
}

/// What the batch carries is what the model uses: the store's pseudo-labels are the oracle's
/// frames and the targets of L_reg (not a top-K recomputed from the scores).
#[test]
fn the_batch_pseudo_labels_are_the_oracle_frames_and_the_regression_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(4, 2);
    let mut batch = w.batch(&[0, 1]);
    let from_scores = batch.pseudo_labels.clone();
    let chosen = vec![vec![1, 5, 9, 13], vec![2, 6, 10, 14]];
    assert_ne!(from_scores, chosen);
    batch.pseudo_labels = chosen.clone();

    let (oracle, _) = build_k(Mode::Oracle, tmp.path(), 3, K);
    let frames: Vec<Vec<usize>> = oracle.answer(&batch).unwrap().into_iter().map(|a| a.frames).collect();
    assert_eq!(frames, chosen);

    let (model, _) = build_k(Mode::Grounding, tmp.path(), 3, K);
    let g = model.grounding.as_ref().unwrap();
    let text = gcg::grounding::text_tokens(&batch.clip_question, batch.clip_options.as_ref()).unwrap();
    // Grounding dropout is 0 in these tests: the training forward's centres are the eval ones.
    let centres = g
        .generate(&batch.clip_frames, &text, gcg::nn::Ctx::eval())
        .unwrap()
        .gaussian_centres;
    let reg_to = |labels: &[Vec<usize>]| -> f32 {
        gcg::grounding::regression_loss_to(&centres, labels, T)
            .unwrap()
            .total()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let reg = |b: &Batch| -> f32 {
        let rng = RefCell::new(SeededRng::new(1));
        model.forward_grounding(b, &rng).unwrap().reg.unwrap().to_scalar::<f32>().unwrap()
    };
    assert!((reg(&batch) - reg_to(&chosen)).abs() <= 1e-6 * reg_to(&chosen).abs().max(1.0));
    batch.pseudo_labels = from_scores.clone();
    assert!((reg(&batch) - reg_to(&from_scores)).abs() <= 1e-6 * reg_to(&from_scores).abs().max(1.0));
    assert!(
        (reg_to(&chosen) - reg_to(&from_scores)).abs() > 1e-3,
        "the two target sets must give different losses"
    );
}

/// Batch `poisoned` of every epoch carries NaN frame features (as a corrupt input would).
struct Poisoned<'a> {
    inner: Source<'a>,
    poisoned: usize,
}

impl BatchSource for Poisoned<'_> {
    fn num_batches(&self) -> usize {
        self.inner.num_batches()
    }
    fn batches(&self, epoch: u64, skip: usize) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        let poisoned = self.poisoned;
        let it = self.inner.batches(epoch, skip)?.enumerate().map(move |(i, b)| {
            let mut b = b?;
            if i + skip == poisoned {
                let f = b.frame_features.as_ref().unwrap();
                b.frame_features = Some(Tensor::full(f32::NAN, f.dims(), &Device::Cpu)?);
            }
            Ok(b)
        });
        Ok(Box::new(it))
    }
}

#[test]
fn non_finite_losses_are_skipped_and_counted_and_diverged_weights_stop_training_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(6, 5);
    let src = Poisoned {
        inner: Source {
            world: &w,
            batch_size: 2,
            seed: 1,
        },
        poisoned: 1,
    };
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 2,
        grad_accum: 1,
        lr: 1e-3,
        grounding_lr: 1e-3,
        skip_nonfinite: true,
        ..Default::default()
    };
    let run_cfg = serde_json::json!({"test": true});
    let job = |model, vars, cfg, run| TrainJob {
        model,
        vars,
        cfg,
        run,
        train_set: &src,
        val_set: None,
        val_grounding: None,
        run_config: &run_cfg,
    };

    // With --skip-nonfinite: batch 1 is skipped, said, counted and logged; 2 steps are taken.
    let run = RunDir::new(tmp.path().join("skip")).unwrap();
    let (model, vars) = build(Mode::Uniform, &tmp.path().join("tok"), 3);
    let mut skipped = Vec::new();
    let state = trainer::train(&job(&model, &vars, &cfg, &run), false, &mut |e| {
        if let Event::SkippedNonFinite { epoch, batch, .. } = e {
            skipped.push((epoch, batch));
        }
    })
    .unwrap();
    assert_eq!(skipped, [(0, 1)]);
    assert_eq!((state.skipped_nonfinite, state.step), (1, 2));
    let rows = read_rows(&run.root);
    let skip_rows: Vec<_> = rows.iter().filter(|r| r.get("skipped_nonfinite").is_some()).collect();
    assert_eq!(skip_rows.len(), 1, "{rows:?}");
    assert_eq!((skip_rows[0]["epoch"].as_u64(), skip_rows[0]["batch"].as_u64()), (Some(0), Some(1)));

    // With 3 micro-batches a step and the epoch's last one skipped, the two gathered before it
    // still make their step (it used to be dropped at the epoch's end).
    let run = RunDir::new(tmp.path().join("skip-last")).unwrap();
    let (model, vars) = build(Mode::Uniform, &tmp.path().join("tok"), 3);
    let last = Poisoned {
        inner: Source {
            world: &w,
            batch_size: 2,
            seed: 1,
        },
        poisoned: 2,
    };
    let grouped = TrainConfig {
        grad_accum: 3,
        ..cfg.clone()
    };
    let job3 = TrainJob {
        model: &model,
        vars: &vars,
        cfg: &grouped,
        run: &run,
        train_set: &last,
        val_set: None,
        val_grounding: None,
        run_config: &run_cfg,
    };
    let state = trainer::train(&job3, false, &mut |_| {}).unwrap();
    assert_eq!((state.skipped_nonfinite, state.step), (1, 1));

    // Without it: an error that says where and what to do.
    let run = RunDir::new(tmp.path().join("stop")).unwrap();
    let (model, vars) = build(Mode::Uniform, &tmp.path().join("tok"), 3);
    let strict = TrainConfig {
        skip_nonfinite: false,
        ..cfg.clone()
    };
    let e = trainer::train(&job(&model, &vars, &strict, &run), false, &mut |_| {}).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("non-finite loss NaN at step 2 (epoch 0, batch 1)") && msg.contains("--skip-nonfinite"),
        "{msg}"
    );

    // Weights that are no longer finite (a diverged run): skipping cannot help; the error names
    // the questions whose grounding failed and a non-finite tensor, and no checkpoint is written.
    let run = RunDir::new(tmp.path().join("diverged")).unwrap();
    let (model, vars) = build(Mode::Grounding, &tmp.path().join("tok"), 3);
    let (name, var) = vars.iter().find(|(n, _)| n.starts_with("grounding.")).unwrap();
    var.set(&Tensor::full(f32::NAN, var.dims(), &Device::Cpu).unwrap()).unwrap();
    let e = trainer::train(&job(&model, &vars, &cfg, &run), false, &mut |_| {}).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("training step 1 (epoch 0, batch 0): training diverged")
            && msg.contains(&format!("{name}: "))
            && msg.contains("Gaussian centres")
            && msg.contains("for question v")
            && msg.contains("(video v")
            && msg.contains("no checkpoint was written"),
        "{msg}"
    );
    assert!(!run.last().exists());

    // Answering with such weights is an error naming the questions, not a confident answer.
    let (model, vars) = build(Mode::Uniform, &tmp.path().join("tok"), 3);
    for (_, var) in vars.iter() {
        var.set(&Tensor::full(f32::NAN, var.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    let e = model.answer(&w.batch(&[0, 1])).unwrap_err().to_string();
    let (q0, q1) = (&w.samples[0].key, &w.samples[1].key);
    assert!(
        e.contains("the option scores") && e.contains(&format!("question {q0}")) && e.contains(&format!("question {q1}")),
        "{e}"
    );
}

#[test]
fn micro_batches_side_by_side_give_the_same_run() {
    // Grounding mode draws randomness (the perturbed top-k's noise) in every micro-batch. 14
    // questions in micro-batches of 2 with 4 per step: steps of 4 and 3 micro-batches an epoch.
    // One, two (waves of 2 + 2, then 2 + 1) or four at a time: the same losses, the same weights.
    let tmp = tempfile::tempdir().unwrap();
    let w = world(14, 5);
    let src = Source {
        world: &w,
        batch_size: 2,
        seed: 3,
    };
    let run_cfg = serde_json::json!({});
    let run = |data_parallel: usize| -> (Vec<f64>, Vec<(String, Vec<f32>)>) {
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 2,
            grad_accum: 4,
            data_parallel,
            lr: 1e-3,
            grounding_lr: 3e-3,
            max_grad_norm: Some(1.0),
            ..Default::default()
        };
        let dir = RunDir::new(tmp.path().join(format!("dp{data_parallel}"))).unwrap();
        let (model, vars) = build(Mode::Grounding, &tmp.path().join("tok"), 7);
        let job = TrainJob {
            model: &model,
            vars: &vars,
            cfg: &cfg,
            run: &dir,
            train_set: &src,
            val_set: None,
            val_grounding: None,
            run_config: &run_cfg,
        };
        trainer::train(&job, false, &mut |_| {}).unwrap();
        (read_losses(&dir.root), values(&vars))
    };
    let (losses, weights) = run(1);
    assert_eq!(losses.len(), 4, "two steps an epoch");
    for dp in [2, 4] {
        let (l, wts) = run(dp);
        assert_eq!(l, losses, "data_parallel = {dp}: the loss sequence");
        assert_eq!(wts.len(), weights.len());
        for ((name, a), (_, b)) in wts.iter().zip(&weights) {
            assert_eq!(a, b, "data_parallel = {dp}: {name}");
        }
    }
    // The weights did move (the comparison is not of untouched weights).
    let (_, vars) = build(Mode::Grounding, &tmp.path().join("tok"), 7);
    assert_ne!(values(&vars), weights, "training changed the weights");
    // 0 is refused with the setting's name.
    let err = TrainConfig {
        data_parallel: 0,
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert!(err.to_string().contains("data_parallel"), "{err}");
}

#[test]
fn a_short_last_accumulation_group_is_the_mean_over_its_own_questions() {
    // 10 questions in micro-batches of 2: with 4 micro-batches per step, an epoch is a step of 8
    // questions and a step of the last 2. With a learning rate too small to move any weight and
    // no dropout (uniform mode then draws nothing random), the 5th micro-batch meets the same
    // weights whatever the grouping, so the second step's gradient must be exactly that
    // micro-batch's own (as a step of one micro-batch gives it), not a quarter of it.
    let tmp = tempfile::tempdir().unwrap();
    let w = world(10, 8);
    let src = Source {
        world: &w,
        batch_size: 2,
        seed: 4,
    };
    let run_cfg = serde_json::json!({});
    let norms = |grad_accum: usize, name: &str| -> Vec<f64> {
        let cfg = TrainConfig {
            epochs: 1,
            batch_size: 2,
            grad_accum,
            lr: 1e-30,
            grounding_lr: 1e-30,
            max_grad_norm: Some(1e30),
            ..Default::default()
        };
        let run = RunDir::new(tmp.path().join(name)).unwrap();
        let tok = tokenizers(&tmp.path().join("tok"));
        let mut lmm = lmm_config(&tok);
        lmm.qformer.hidden_dropout_prob = 0.0;
        lmm.qformer.attention_probs_dropout_prob = 0.0;
        lmm.t5.dropout_rate = 0.0;
        let lb = Loader::random(&Device::Cpu, DType::F32, 6).with_trainable(is_trainable);
        let model = GcgModel::load(&lb, &lmm, &config(Mode::Uniform, K), tok, false).unwrap();
        let vars = lb.vars();
        let job = TrainJob {
            model: &model,
            vars: &vars,
            cfg: &cfg,
            run: &run,
            train_set: &src,
            val_set: None,
            val_grounding: None,
            run_config: &run_cfg,
        };
        trainer::train(&job, false, &mut |_| {}).unwrap();
        read_rows(&run.root).iter().filter_map(|r| r["grad_norm"].as_f64()).collect()
    };
    let single = norms(1, "g1");
    let grouped = norms(4, "g4");
    assert_eq!((single.len(), grouped.len()), (5, 2));
    assert_eq!(grouped[1], single[4], "the short group's gradient norm");
    assert!(
        grouped[0] < single[..4].iter().cloned().fold(0.0, f64::max),
        "a full group averages its 4 micro-batches"
    );
}

#[test]
fn uniform_mode_may_take_every_frame_but_grounding_may_not() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(4, 9);
    let (model, _) = build_k(Mode::Uniform, &tmp.path().join("tok"), 2, T);
    let answered = model.answer(&w.batch(&[0, 1])).unwrap();
    for a in &answered {
        assert_eq!(a.frames, (0..T).collect::<Vec<_>>());
    }
    let e = config(Mode::Grounding, T).validate().unwrap_err().to_string();
    assert!(e.contains("fewer than the 16 frames") && e.contains("L_con"), "{e}");
    config(Mode::Uniform, T).validate().unwrap();
    assert!(config(Mode::Uniform, T + 1).validate().is_err());
}

#[test]
fn mid_epoch_validation_keeps_best_and_is_logged_once_across_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(12, 10);
    let v = world(4, 11);
    let src = Source {
        world: &w,
        batch_size: 2,
        seed: 2,
    };
    let val = Source {
        world: &v,
        batch_size: 2,
        seed: 0,
    };
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 2,
        grad_accum: 1,
        lr: 1e-3,
        grounding_lr: 1e-3,
        validate_every: Some(4),
        checkpoint_every: 1,
        ..Default::default()
    };
    let run_cfg = serde_json::json!({});
    let train = |run: &RunDir, cfg: &TrainConfig, resume: bool| {
        let (model, vars) = build(Mode::Uniform, &tmp.path().join("tok"), 2);
        let job = TrainJob {
            model: &model,
            vars: &vars,
            cfg,
            run,
            train_set: &src,
            val_set: Some(&val),
            val_grounding: None,
            run_config: &run_cfg,
        };
        trainer::train(&job, resume, &mut |_| {}).unwrap()
    };
    let val_rows = |run: &RunDir| -> Vec<(u64, bool)> {
        read_rows(&run.root)
            .iter()
            .filter(|r| r["split"] == "val")
            .map(|r| (r["step"].as_u64().unwrap(), r.get("mid_epoch").is_some()))
            .collect()
    };
    // 6 steps per epoch: validated after steps 4 and 8 (mid-epoch) and 6 and 12 (epoch ends).
    let full = RunDir::new(tmp.path().join("full")).unwrap();
    let state = train(&full, &cfg, false);
    let want = val_rows(&full);
    assert_eq!(want, [(4, true), (6, false), (8, true), (12, false)]);
    let best_step = state.best_step.unwrap();
    assert!(full.best().exists() && want.iter().any(|&(s, _)| s == best_step));
    // Stopped after step 9 and resumed: each validation once, at the same steps, with the same
    // accuracies (the metrics rows equal the uninterrupted run's).
    let part = RunDir::new(tmp.path().join("part")).unwrap();
    train(
        &part,
        &TrainConfig {
            max_steps: Some(9),
            ..cfg.clone()
        },
        false,
    );
    train(&part, &cfg, true);
    assert_eq!(val_rows(&part), want);
    let acc = |run: &RunDir| -> Vec<f64> { read_rows(&run.root).iter().filter_map(|r| r["accuracy"].as_f64()).collect() };
    assert_eq!(acc(&part), acc(&full));
}

/// Every weight of the T5 (frozen or not), by a readable name, as values.
fn t5_weights(model: &GcgModel) -> Vec<(String, Vec<f32>)> {
    let t5 = &model.lmm.t5;
    let f = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    let mut out = vec![
        ("shared".to_string(), f(&t5.shared.weight)),
        ("lm_head".to_string(), f(&t5.lm_head.weight)),
    ];
    for (stack, s) in [("encoder", &t5.encoder), ("decoder", &t5.decoder)] {
        out.push((format!("{stack}.bias"), f(&s.relative_attention_bias)));
        out.push((format!("{stack}.final_norm"), f(&s.final_layer_norm.weight)));
        for (i, b) in s.blocks.iter().enumerate() {
            let mut attns = vec![("self", &b.self_attn)];
            if let Some((a, norm)) = &b.cross_attn {
                attns.push(("cross", a));
                out.push((format!("{stack}.{i}.cross_norm"), f(&norm.weight)));
            }
            for (kind, a) in attns {
                for (p, lin) in [("q", &a.q), ("k", &a.k), ("v", &a.v), ("o", &a.o)] {
                    out.push((format!("{stack}.{i}.{kind}.{p}"), f(&lin.weight)));
                }
            }
            let mut ff = vec![&b.ff.wi_0, &b.ff.wo];
            ff.extend(b.ff.wi_1.as_ref());
            for (j, lin) in ff.into_iter().enumerate() {
                out.push((format!("{stack}.{i}.ff{j}"), f(&lin.weight)));
            }
            out.push((
                format!("{stack}.{i}.norms"),
                [f(&b.self_attn_norm.weight), f(&b.ff_norm.weight)].concat(),
            ));
        }
    }
    out
}

#[test]
fn lora_trains_the_adapters_not_the_t5_and_its_checkpoints_hold_them_and_resume() {
    use gcg::nn::lora::{is_lora_name, LoraConfig, LoraTarget};
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok");
    let w = world(12, 4);
    let src = Source {
        world: &w,
        batch_size: 4,
        seed: 9,
    };
    let lora_config = || GcgConfig {
        lmm: gcg::models::lmm::LmmOptions {
            lora: Some(LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.05,
                targets: vec![LoraTarget::Q, LoraTarget::V],
            }),
            ..Default::default()
        },
        ..config(Mode::Grounding, K)
    };
    let (model, vars) = build_cfg(&tok, 7, lora_config);
    let (_, plain) = build(Mode::Grounding, &tok, 7);
    // The trainables: GCG's usual ones plus q/v adapters of every attention (2 encoder layers,
    // 2 decoder layers with self- and cross-attention), nothing else of the T5.
    let adapters: Vec<String> = vars
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n.starts_with("language_model."))
        .collect();
    assert_eq!(adapters.len(), 2 * 2 * (2 + 2 * 2), "{adapters:?}");
    assert!(adapters
        .iter()
        .all(|n| is_lora_name(n) && (n.contains(".q.lora_") || n.contains(".v.lora_"))));
    let usual: Vec<&String> = vars.iter().map(|(n, _)| n).filter(|n| !n.starts_with("language_model.")).collect();
    assert_eq!(usual, plain.iter().map(|(n, _)| n).collect::<Vec<_>>());

    let cfg = TrainConfig {
        epochs: 6,
        batch_size: 4,
        grad_accum: 1,
        lr: 1e-3,
        grounding_lr: 3e-3,
        checkpoint_every: 2,
        max_grad_norm: Some(1.0),
        ..Default::default()
    };
    let run_cfg = serde_json::json!({"test": "lora"});
    let t5_before = t5_weights(&model);
    let before = values(&vars);
    let full = RunDir::new(tmp.path().join("full")).unwrap();
    let job = |model, vars, cfg, run| TrainJob {
        model,
        vars,
        cfg,
        run,
        train_set: &src,
        val_set: None,
        val_grounding: None,
        run_config: &run_cfg,
    };
    trainer::train(&job(&model, &vars, &cfg, &full), false, &mut |_| {}).unwrap();
    let losses = read_losses(&full.root);
    assert_eq!(losses.len(), 18);
    // (The perturbed top-k and dropout make single steps noisy: epochs are compared.)
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[12..].iter().sum::<f64>() / 6.0;
    eprintln!("LoRA run losses {losses:?}");
    assert!(
        last < 0.85 * first,
        "the loss did not go down: first epoch {first}, last two {last}"
    );

    // Every adapter moved (B from zero), the T5's own weights are bit for bit what they were.
    let after = values(&vars);
    for ((name, v0), (_, v1)) in before.iter().zip(&after) {
        if is_lora_name(name) {
            assert_ne!(v0, v1, "{name} did not train");
        }
        if name.contains(".lora_B.") {
            assert!(v0.iter().all(|&x| x == 0.0) && v1.iter().any(|&x| x != 0.0), "{name}");
        }
    }
    let t5_after = t5_weights(&model);
    assert_eq!(t5_after.len(), t5_before.len());
    for ((name, a), (_, b)) in t5_before.iter().zip(&t5_after) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "T5 weight {name} changed");
    }

    // The checkpoint holds exactly the trainable tensors: the adapters, no T5 weight.
    let weights = gcg::weights::SafetensorsSource::open(full.last().join("weights.safetensors")).unwrap();
    use gcg::weights::TensorSource;
    let mut saved = weights.names();
    saved.sort();
    assert_eq!(saved, vars.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
    assert!(adapters.iter().all(|a| saved.contains(a)));
    assert!(saved.iter().filter(|n| n.starts_with("language_model.")).all(|n| is_lora_name(n)));

    // Loading the run for prediction (a fresh model + the checkpoint's weights) restores the
    // adapters: the same answers as the trained model; without them they differ.
    let batch = w.batch(&[0, 1, 2, 3, 4, 5]);
    let trained = model.answer(&batch).unwrap();
    let (fresh, fresh_vars) = build_cfg(&tok, 7, lora_config);
    let untrained = fresh.answer(&batch).unwrap();
    fresh_vars.load_from(&weights).unwrap();
    assert_eq!(fresh.answer(&batch).unwrap(), trained);
    assert_ne!(untrained, trained);
    // ... and the adapters alone matter: the trained weights with the adapters set back to
    // their initialisation answer differently.
    let (reset, reset_vars) = build_cfg(&tok, 7, lora_config);
    let init: std::collections::BTreeMap<String, Tensor> = reset_vars
        .iter()
        .filter(|(n, _)| is_lora_name(n))
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    reset_vars.load_from(&weights).unwrap();
    for (n, t) in &init {
        reset_vars.get(n).unwrap().set(t).unwrap();
    }
    let scores = |a: &[gcg::model::Answered]| a.iter().map(|x| x.option_scores.clone().unwrap()).collect::<Vec<_>>();
    assert_ne!(scores(&reset.answer(&batch).unwrap()), scores(&trained));

    // Resume: stopped after 5 steps, continued by a rebuilt model, the same loss sequence.
    let part = RunDir::new(tmp.path().join("part")).unwrap();
    let (model, vars) = build_cfg(&tok, 7, lora_config);
    let stop = TrainConfig {
        max_steps: Some(5),
        ..cfg.clone()
    };
    trainer::train(&job(&model, &vars, &stop, &part), false, &mut |_| {}).unwrap();
    let (model, vars) = build_cfg(&tok, 7, lora_config);
    trainer::train(&job(&model, &vars, &cfg, &part), true, &mut |_| {}).unwrap();
    assert_eq!(read_losses(&part.root), losses, "resumed loss sequence differs");
}

#[test]
fn lora_alone_fits_the_answers_through_the_frozen_t5() {
    // Only the adapters train (uniform mode, no dropout): what the loss loses, LoRA learned.
    use gcg::nn::lora::{LoraConfig, LoraTarget};
    let tmp = tempfile::tempdir().unwrap();
    let w = world(8, 21);
    let src = Source {
        world: &w,
        batch_size: 4,
        seed: 3,
    };
    let tok = tokenizers(tmp.path());
    let lmm = lmm_config(&tok);
    let cfg = GcgConfig {
        lmm: gcg::models::lmm::LmmOptions {
            dropout: Some(0.0),
            lora: Some(LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: vec![LoraTarget::Q, LoraTarget::V],
            }),
            ..Default::default()
        },
        ..config(Mode::Uniform, K)
    };
    let lb = Loader::random(&Device::Cpu, DType::F32, 5).with_trainable(gcg::models::lmm::is_t5_lora);
    let model = GcgModel::load(&lb, &lmm, &cfg, tok, false).unwrap();
    let vars = lb.vars();
    assert_eq!(vars.len(), 24);
    let train = TrainConfig {
        epochs: 8,
        batch_size: 4,
        grad_accum: 1,
        lr: 1e-2,
        weight_decay: 0.0,
        checkpoint_every: 1000,
        ..Default::default()
    };
    let run = RunDir::new(tmp.path().join("run")).unwrap();
    trainer::train(
        &TrainJob {
            model: &model,
            vars: &vars,
            cfg: &train,
            run: &run,
            train_set: &src,
            val_set: None,
            val_grounding: None,
            run_config: &serde_json::json!({}),
        },
        false,
        &mut |_| {},
    )
    .unwrap();
    let losses = read_losses(&run.root);
    eprintln!("LoRA-only losses {losses:?}");
    assert_eq!(losses.len(), 16);
    let (first, last) = ((losses[0] + losses[1]) / 2.0, (losses[14] + losses[15]) / 2.0);
    assert!(last < 0.5 * first, "LoRA alone did not fit: {first} -> {last}");
}
