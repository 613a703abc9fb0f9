//! Flan-T5 against HF transformers (tools/fixtures/parity_t5.py): encoder output, logits, loss and
//! its gradient w.r.t. the soft prompts, greedy and beam-search ids, option scores, relative
//! position buckets — loaded from the InstructBLIP snapshot (`language_model.` prefix) and from
//! the plain Flan-T5 snapshot of the GCG layout (no prefix). Plus checks independent of torch:
//! finite-difference gradients (f64) and KV-cached decoding against uncached forwards.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{assert_close, get, load_io, randn_f32};
use gcg::models::t5::{relative_position_bucket, EarlyStopping, GenerateConfig, SelfKvCache, T5Config, T5Model};
use gcg::nn::{Activation, Ctx, Linear};
use gcg::weights::checkpoints::read_json;
use gcg::weights::{Loader, SafetensorsSource};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The T5 of a snapshot directory: `hf/` (InstructBLIP, prefix `language_model`) or
/// `gcg/flan-t5/` (plain Flan-T5, no prefix). Checks that every T5 tensor is used.
fn load_t5(dir: &Path, prefix: &str) -> T5Model {
    let cfg = T5Config::from_hf_config(&read_json(&dir.join("config.json")).unwrap()).unwrap();
    let src = SafetensorsSource::open_dir(dir).unwrap();
    let owned = format!("{prefix}.");
    let lb = if prefix.is_empty() {
        Loader::from_source(Arc::new(src), &common::device(), DType::F32)
    } else {
        Loader::from_source(Arc::new(src), &common::device(), DType::F32).with_ignored(move |n| !n.starts_with(&owned))
    };
    let model = T5Model::load(&lb.pp(prefix), &cfg).unwrap();
    lb.finish().unwrap();
    model
}

struct Fixture {
    io: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn fixture(dir: &Path) -> Fixture {
    Fixture {
        io: load_io(&dir.join("io/t5.safetensors")).unwrap(),
        meta: read_json(&dir.join("io/t5.json")).unwrap(),
    }
}

/// The snapshots of one fixture directory that hold the same T5.
fn models(dir: &Path) -> Vec<(String, T5Model)> {
    let plain = dir.join("gcg/flan-t5");
    assert!(
        plain.join("config.json").exists(),
        "{} has no plain Flan-T5 snapshot",
        plain.display()
    );
    vec![
        (format!("{} [hf]", dir.display()), load_t5(&dir.join("hf"), "language_model")),
        (format!("{} [gcg/flan-t5]", dir.display()), load_t5(&plain, "")),
    ]
}

#[test]
fn config_matches_the_reference_model() {
    for dir in common::parity_dirs() {
        let fx = fixture(&dir);
        for (tag, m) in models(&dir) {
            let expected = match fx.meta["act_class"].as_str().unwrap() {
                "NewGELUActivation" | "GELUTanh" | "PytorchGELUTanh" => Activation::GeluTanh,
                "GELUActivation" => Activation::Gelu,
                other => panic!("{tag}: unexpected activation class {other}"),
            };
            assert_eq!(m.cfg.dense_act_fn, expected, "{tag}: activation");
            assert_eq!(
                m.cfg.scale_decoder_outputs,
                fx.meta["scale_decoder_outputs"].as_bool().unwrap(),
                "{tag}"
            );
            // Flan-T5's lm_head is its own table.
            assert!(!fx.meta["lm_head_tied"].as_bool().unwrap());
            let diff = (&m.lm_head.weight - &m.shared.weight)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff > 0.0, "{tag}: lm_head should not be the embedding");
        }
    }
}

#[test]
fn relative_position_buckets_match_hf() {
    for dir in common::parity_dirs() {
        let fx = fixture(&dir);
        let rel = get(&fx.io, "bucket_rel").unwrap().to_vec1::<i64>().unwrap();
        let cfg = T5Config::from_hf_config(&read_json(&dir.join("hf/config.json")).unwrap()).unwrap();
        for (key, bidir) in [("bucket_bidirectional", true), ("bucket_causal", false)] {
            let want = get(&fx.io, key).unwrap().to_vec1::<i64>().unwrap();
            for (r, w) in rel.iter().zip(&want) {
                let got = relative_position_bucket(*r, bidir, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance);
                assert_eq!(got as i64, *w, "{key}: relative position {r}");
            }
        }
    }
}

#[test]
fn encoder_logits_loss_and_gradient_match_hf() {
    for dir in common::parity_dirs() {
        let fx = fixture(&dir);
        let io = &fx.io;
        let mask = get(io, "attention_mask").unwrap();
        let labels = get(io, "labels").unwrap();
        for (tag, m) in models(&dir) {
            let x = Var::from_tensor(get(io, "inputs_embeds").unwrap()).unwrap();
            let enc = m.encode(x.as_tensor(), mask, Ctx::eval()).unwrap();
            assert_close(&format!("{tag} encoder_hidden"), &enc, get(io, "encoder_hidden").unwrap(), 1e-4);

            let dec_ids = m.shift_right(labels).unwrap();
            let want_ids = get(io, "decoder_input_ids").unwrap().to_dtype(DType::U32).unwrap();
            assert_eq!(
                dec_ids.to_vec2::<u32>().unwrap(),
                want_ids.to_vec2::<u32>().unwrap(),
                "{tag}: shifted labels"
            );
            let logits = m.forward_logits(&enc, mask, &dec_ids).unwrap();
            assert_close(&format!("{tag} logits"), &logits, get(io, "logits").unwrap(), 1e-4);

            let loss = m.loss(&enc, mask, labels, Ctx::eval()).unwrap();
            assert_close(&format!("{tag} loss"), &loss.reshape(1).unwrap(), get(io, "loss").unwrap(), 1e-4);
            let grads = loss.backward().unwrap();
            let g = grads.get(x.as_tensor()).expect("the loss must reach inputs_embeds");
            assert_close(
                &format!("{tag} grad_inputs_embeds"),
                g,
                get(io, "grad_inputs_embeds").unwrap(),
                1e-3,
            );
        }
    }
}

fn generate_config(settings: &serde_json::Value) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens: settings["max_new_tokens"].as_u64().unwrap() as usize,
        num_beams: settings["num_beams"].as_u64().unwrap() as usize,
        length_penalty: settings.get("length_penalty").and_then(|v| v.as_f64()).unwrap_or(1.0),
        early_stopping: EarlyStopping::from_hf(settings.get("early_stopping").unwrap_or(&serde_json::Value::Bool(false))).unwrap(),
        min_new_tokens: settings.get("min_new_tokens").and_then(|v| v.as_u64()).unwrap_or(0) as usize,
    }
}

/// `got` (generated ids without start token, up to eos) must be exactly HF's row
/// `[start, got..., fill...]`, and end with eos or have max_new_tokens tokens. HF fills greedy
/// rows with pad, beam-search rows with `pad_token_id or eos_token_id` (eos for T5, whose pad is 0).
fn check_ids(what: &str, got: &[u32], hf_row: &[i64], cfg: &T5Config, max_new: usize, beams: bool) {
    let fill = if beams && cfg.pad_token_id == 0 {
        cfg.eos_token_id
    } else {
        cfg.pad_token_id
    } as i64;
    assert_eq!(
        hf_row[0], cfg.decoder_start_token_id as i64,
        "{what}: HF row starts with the decoder start"
    );
    let body = &hf_row[1..];
    assert!(got.len() <= body.len(), "{what}: {got:?} longer than HF's {hf_row:?}");
    let same = got.iter().zip(body).all(|(a, b)| *a as i64 == *b);
    let rest_pad = body[got.len()..].iter().all(|&t| t == fill);
    assert!(same && rest_pad, "{what}: got {got:?}, HF {hf_row:?}");
    assert!(
        got.last() == Some(&cfg.eos_token_id) || got.len() == max_new,
        "{what}: {got:?} neither ends with eos nor has {max_new} tokens"
    );
}

#[test]
fn greedy_and_beam_search_ids_match_hf() {
    for dir in common::parity_dirs() {
        let fx = fixture(&dir);
        let io = &fx.io;
        let mask = get(io, "gen_attention_mask").unwrap();
        // The committed fixtures must exercise every stopping rule (the fixture module checked, by
        // altering transformers' beam search, that these decodes depend on each rule, so a port
        // that gets one wrong fails here). Extra directories from GCG_PARITY_DIRS made with other
        // seeds may not: their ids are still compared, with a note.
        let committed = dir.starts_with(common::fixtures_dir());
        let mut coverage = vec![("nontrivial decodes".to_string(), fx.meta["decodes_nontrivial"].as_bool().unwrap())];
        for (rule, hit) in fx.meta["beam_rules_exercised"].as_object().unwrap() {
            coverage.push((format!("beam rule {rule}"), hit.as_bool().unwrap()));
        }
        for (what, ok) in coverage {
            if committed {
                assert!(ok, "{}: the reference decodes do not exercise {what}", dir.display());
            } else if !ok {
                eprintln!("note: {}: the reference decodes do not exercise {what}", dir.display());
            }
        }
        for (tag, mut m) in models(&dir) {
            let natural_head = m.lm_head.clone();
            // natural weights, then eos made competitive mid-sequence (the stopping rules matter)
            for (group, key, head) in [
                ("generation", "gen", natural_head),
                (
                    "generation_boosted_eos",
                    "gen_boost",
                    Linear::new(get(io, "gen_boost_lm_head").unwrap().clone(), None),
                ),
            ] {
                m.lm_head = head;
                let enc = m.encode(get(io, "gen_inputs_embeds").unwrap(), mask, Ctx::eval()).unwrap();
                let gens = fx.meta[group].as_object().unwrap();
                assert!(gens.len() >= 8, "expected greedy and several beam-search cases");
                for (name, case) in gens {
                    let gc = generate_config(&case["settings"]);
                    let got = m.generate(&enc, mask, &gc).unwrap();
                    let hf = get(io, &format!("{key}.{name}")).unwrap().to_vec2::<i64>().unwrap();
                    assert_eq!(got.len(), hf.len(), "{tag} {key}.{name}: rows");
                    for (r, (g, h)) in got.iter().zip(&hf).enumerate() {
                        check_ids(
                            &format!("{tag} {key}.{name} row {r}"),
                            g,
                            h,
                            &m.cfg,
                            gc.max_new_tokens,
                            gc.num_beams > 1,
                        );
                    }
                    let lens: Vec<usize> = got.iter().map(|g| g.len()).collect();
                    eprintln!("{tag} {key}.{name}: lengths {lens:?}");
                }
            }
        }
    }
}

#[test]
fn option_scores_match_hf() {
    for dir in common::parity_dirs() {
        let fx = fixture(&dir);
        let io = &fx.io;
        let mask = get(io, "attention_mask").unwrap();
        let options: Vec<Vec<Vec<u32>>> = serde_json::from_value(fx.meta["options"].clone()).unwrap();
        for (tag, m) in models(&dir) {
            let enc = m.encode(get(io, "inputs_embeds").unwrap(), mask, Ctx::eval()).unwrap();
            let sums = m.score_options(&enc, mask, &options).unwrap();
            let means = m.score_options_mean(&enc, mask, &options).unwrap();
            let to_t = |v: Vec<Vec<f32>>| Tensor::new(v, &common::device()).unwrap();
            assert_close(&format!("{tag} option sums"), &to_t(sums), get(io, "option_sums").unwrap(), 1e-4);
            assert_close(&format!("{tag} option means"), &to_t(means), get(io, "option_means").unwrap(), 1e-4);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Independent of torch
// ----------------------------------------------------------------------------------------------

fn random_t5(dtype: DType, seed: u64, act: Activation) -> T5Model {
    let cfg = T5Config::tiny().with_activation(act);
    let lb = Loader::random(&common::device(), dtype, seed);
    T5Model::load(&lb, &cfg).unwrap()
}

#[test]
fn loss_gradient_matches_finite_differences_f64() {
    for act in [Activation::GeluTanh, Activation::Gelu] {
        let m = random_t5(DType::F64, 7, act);
        let (b, l, d) = (2, 6, m.cfg.d_model);
        let x0 = randn_f32(&[b, l, d], 11).to_dtype(DType::F64).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &common::device()).unwrap();
        let labels = Tensor::new(&[[5i64, 17, 42, 1], [33, 1, -100, -100]], &common::device()).unwrap();
        let loss_of = |x: &Tensor| -> Tensor {
            let enc = m.encode(x, &mask, Ctx::eval()).unwrap();
            m.loss(&enc, &mask, &labels, Ctx::eval()).unwrap()
        };
        let xv = Var::from_tensor(&x0).unwrap();
        let loss = loss_of(xv.as_tensor());
        let grad = loss
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-5;
        let mut max_err = 0f64;
        let mut max_g = 0f64;
        // every 7th coordinate, including the padded positions (their gradient must be ~0)
        for i in (0..base.len()).step_by(7) {
            let mut p = base.clone();
            p[i] += eps;
            let lp = loss_of(&Tensor::from_vec(p.clone(), (b, l, d), &common::device()).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            p[i] -= 2.0 * eps;
            let lm = loss_of(&Tensor::from_vec(p, (b, l, d), &common::device()).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            let fd = (lp - lm) / (2.0 * eps);
            max_err = max_err.max((fd - grad[i]).abs());
            max_g = max_g.max(fd.abs());
        }
        let rel = max_err / max_g;
        eprintln!("{act:?}: finite differences vs backward: max |diff| {max_err:.3e}, rel {rel:.3e}");
        assert!(max_g > 1e-3, "the gradient should not vanish");
        assert!(rel < 1e-6, "{act:?}: gradient relative error {rel:.3e}");
        // padded encoder positions do not influence the loss
        let pad_grad: f64 = (0..d).map(|k| grad[(l + 4) * d + k].abs() + grad[(l + 5) * d + k].abs()).sum();
        assert!(pad_grad < 1e-12, "padded positions got gradient {pad_grad}");
    }
}

#[test]
fn cached_decoding_equals_uncached_forwards() {
    let m = random_t5(DType::F32, 3, Activation::Gelu);
    let (b, l) = (3, 7);
    let x = randn_f32(&[b, l, m.cfg.d_model], 5);
    let mask = Tensor::new(
        &[[1u8, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]],
        &common::device(),
    )
    .unwrap();
    let enc = m.encode(&x, &mask, Ctx::eval()).unwrap();

    // Step-by-step hidden states through the cache equal one causal pass over the same ids.
    let ids: Vec<u32> = vec![0, 17, 4, 88, 23, 9, 61, 2, 0, 35, 12, 70, 5, 44, 0, 0, 93, 8, 27, 66, 31];
    let ids = Tensor::from_vec(ids, (b, 7), &common::device()).unwrap();
    let cross = m.cross_kv(&enc).unwrap();
    let bias = gcg::nn::padding_bias(&mask, DType::F32).unwrap();
    let full = m.run_decoder(&ids, &cross, &bias, None, Ctx::eval()).unwrap();
    let mut cache = SelfKvCache::new(m.decoder.blocks.len());
    let mut steps = Vec::new();
    for t in 0..7 {
        let h = m
            .run_decoder(&ids.narrow(1, t, 1).unwrap(), &cross, &bias, Some(&mut cache), Ctx::eval())
            .unwrap();
        steps.push(h);
    }
    // and a two-token prefill followed by single steps
    let mut cache2 = SelfKvCache::new(m.decoder.blocks.len());
    let mut mixed = vec![m
        .run_decoder(&ids.narrow(1, 0, 3).unwrap(), &cross, &bias, Some(&mut cache2), Ctx::eval())
        .unwrap()];
    for t in 3..7 {
        mixed.push(
            m.run_decoder(&ids.narrow(1, t, 1).unwrap(), &cross, &bias, Some(&mut cache2), Ctx::eval())
                .unwrap(),
        );
    }
    assert_close("cached steps vs full pass", &Tensor::cat(&steps, 1).unwrap(), &full, 1e-5);
    assert_close("prefill + steps vs full pass", &Tensor::cat(&mixed, 1).unwrap(), &full, 1e-5);

    // Greedy generation (cached) equals the argmax of uncached teacher-forced logits.
    let gc = GenerateConfig {
        max_new_tokens: 9,
        ..Default::default()
    };
    let out = m.generate(&enc, &mask, &gc).unwrap();
    for (r, seq) in out.iter().enumerate() {
        assert!(!seq.is_empty());
        let er = enc.narrow(0, r, 1).unwrap();
        let mr = mask.narrow(0, r, 1).unwrap();
        let mut prefix = vec![m.cfg.decoder_start_token_id];
        prefix.extend_from_slice(&seq[..seq.len() - 1]);
        let n = prefix.len();
        let logits = m
            .forward_logits(&er, &mr, &Tensor::from_vec(prefix, (1, n), &common::device()).unwrap())
            .unwrap();
        let argmax = logits.squeeze(0).unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(&argmax, seq, "row {r}: cached greedy vs uncached argmax");
        assert!(seq.last() == Some(&m.cfg.eos_token_id) || seq.len() == gc.max_new_tokens);
    }
}

#[test]
fn checkpoint_aliases_and_tied_head() {
    // A checkpoint holding the embedding only as encoder.embed_tokens (plus a decoder copy) and
    // no lm_head: with tie_word_embeddings the head is the embedding, and every tensor is used.
    let m = random_t5(DType::F32, 9, Activation::GeluTanh);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut push = |n: String, t: &Tensor| tensors.push((n, t.clone()));
    push("encoder.embed_tokens.weight".into(), &m.shared.weight);
    push("decoder.embed_tokens.weight".into(), &m.shared.weight);
    for (sname, st) in [("encoder", &m.encoder), ("decoder", &m.decoder)] {
        push(
            format!("{sname}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            &st.relative_attention_bias,
        );
        push(format!("{sname}.final_layer_norm.weight"), &st.final_layer_norm.weight);
        for (i, blk) in st.blocks.iter().enumerate() {
            let p = format!("{sname}.block.{i}.layer");
            for (n, lin) in [
                ("q", &blk.self_attn.q),
                ("k", &blk.self_attn.k),
                ("v", &blk.self_attn.v),
                ("o", &blk.self_attn.o),
            ] {
                push(format!("{p}.0.SelfAttention.{n}.weight"), &lin.weight);
            }
            push(format!("{p}.0.layer_norm.weight"), &blk.self_attn_norm.weight);
            let ff = if let Some((ca, norm)) = &blk.cross_attn {
                for (n, lin) in [("q", &ca.q), ("k", &ca.k), ("v", &ca.v), ("o", &ca.o)] {
                    push(format!("{p}.1.EncDecAttention.{n}.weight"), &lin.weight);
                }
                push(format!("{p}.1.layer_norm.weight"), &norm.weight);
                2
            } else {
                1
            };
            push(format!("{p}.{ff}.DenseReluDense.wi_0.weight"), &blk.ff.wi_0.weight);
            push(
                format!("{p}.{ff}.DenseReluDense.wi_1.weight"),
                &blk.ff.wi_1.as_ref().unwrap().weight,
            );
            push(format!("{p}.{ff}.DenseReluDense.wo.weight"), &blk.ff.wo.weight);
            push(format!("{p}.{ff}.layer_norm.weight"), &blk.ff_norm.weight);
        }
    }
    let src = Arc::new(gcg::weights::MapSource::new(tensors, "aliases"));
    let mut cfg = T5Config::tiny();
    // untied config: the missing lm_head is an error naming it
    let lb = Loader::from_source(src.clone(), &common::device(), DType::F32);
    let err = T5Model::load(&lb, &cfg).unwrap_err().to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
    cfg.tie_word_embeddings = true;
    let lb = Loader::from_source(src, &common::device(), DType::F32);
    let tied = T5Model::load(&lb, &cfg).unwrap();
    lb.finish().unwrap();
    let x = randn_f32(&[1, 4, cfg.d_model], 1);
    let mask = Tensor::ones((1, 4), DType::U32, &common::device()).unwrap();
    let enc_a = m.encode(&x, &mask, Ctx::eval()).unwrap();
    let enc_b = tied.encode(&x, &mask, Ctx::eval()).unwrap();
    assert_close("aliased encoder", &enc_b, &enc_a, 0.0);
    let ids = Tensor::new(&[[0u32, 5, 9]], &common::device()).unwrap();
    let lt = tied.forward_logits(&enc_b, &mask, &ids).unwrap();
    let h = tied
        .run_decoder(
            &ids,
            &tied.cross_kv(&enc_b).unwrap(),
            &gcg::nn::padding_bias(&mask, DType::F32).unwrap(),
            None,
            Ctx::eval(),
        )
        .unwrap();
    let want = h.broadcast_matmul(&m.shared.weight.t().unwrap()).unwrap();
    assert_close("tied head = embedding", &lt, &want, 1e-6);
}

#[test]
fn dropout_only_in_training() {
    let x = randn_f32(&[2, 5, 32], 21);
    let mask = Tensor::ones((2, 5), DType::U32, &common::device()).unwrap();
    let labels = Tensor::new(&[[4i64, 9, 1], [7, 1, -100]], &common::device()).unwrap();
    let loss = |m: &T5Model, ctx: Ctx| -> f32 {
        let enc = m.encode(&x, &mask, ctx).unwrap();
        m.loss(&enc, &mask, &labels, ctx).unwrap().to_scalar::<f32>().unwrap()
    };
    let rng = std::cell::RefCell::new(gcg::SeededRng::new(1));
    let m = random_t5(DType::F32, 4, Activation::Gelu);
    let eval = loss(&m, Ctx::eval());
    let train = loss(&m, Ctx::train(&rng));
    assert!(
        train.is_finite() && (train - eval).abs() > 1e-4,
        "dropout 0.1 should change the loss: {train} vs {eval}"
    );
    let mut cfg = T5Config::tiny_gelu();
    cfg.dropout_rate = 0.0;
    let m0 = T5Model::load(&Loader::random(&common::device(), DType::F32, 4), &cfg).unwrap();
    assert_eq!(loss(&m0, Ctx::train(&rng)), loss(&m0, Ctx::eval()));
    assert_eq!(loss(&m0, Ctx::eval()), eval, "same weights, same loss");
}
