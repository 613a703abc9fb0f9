//! The video LMM against the GCG-style composition of the HF InstructBLIP modules
//! (tools/fixtures/parity_lmm.py): visual tokens with soft frame selection, frame positions and
//! the spatial pass; L_vqa and its gradients w.r.t. the Q-Former, query tokens, projection, frame
//! positions and the selection; greedy and beam decoding; option scores; the single-image path.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{assert_close, get, load_io};
use gcg::models::checkpoint::open_hf_snapshot;
use gcg::models::lmm::{is_trainable, VideoLmm};
use gcg::models::t5::GenerateConfig;
use gcg::nn::Ctx;
use gcg::weights::checkpoints::is_buffer;
use gcg::weights::Loader;

#[test]
fn video_lmm_matches_reference() {
    for dir in common::parity_dirs() {
        let io = load_io(&dir.join("io/lmm.safetensors")).unwrap();
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("io/lmm.json")).unwrap()).unwrap();
        let (src, mut cfg) = open_hf_snapshot(&dir.join("hf")).unwrap();
        let t = meta["frames"].as_u64().unwrap() as usize;
        cfg.max_frames = t;
        let lb = Loader::from_source(src, &common::device(), DType::F32)
            .with_trainable(is_trainable)
            .with_ignored(is_buffer);
        let mut model = VideoLmm::load(&lb, &cfg, true).unwrap();
        lb.finish().unwrap();
        let vars = lb.vars();
        vars.get("frame_embeds.weight")
            .unwrap()
            .set(get(&io, "frame_pos").unwrap())
            .unwrap();

        let feats = get(&io, "features").unwrap();
        let (b, t, n, dv) = feats.dims4().unwrap();
        let sel = Var::from_tensor(get(&io, "selection").unwrap()).unwrap();
        let k = sel.dim(1).unwrap();
        let qids = get(&io, "qformer_ids").unwrap();
        let qmask = get(&io, "qformer_mask").unwrap();
        let ids = get(&io, "input_ids").unwrap();
        let mask = get(&io, "attention_mask").unwrap();
        let labels = get(&io, "labels").unwrap();

        for (tag, spatial) in [("plain", false), ("spatial", true)] {
            let what = format!("{} {tag}", dir.display());
            model.cfg.spatial = spatial;
            let normed = model.normalize_features(feats).unwrap(); // [B, T, N, Dv]
            let mixed = sel
                .as_tensor()
                .matmul(&normed.reshape((b, t, n * dv)).unwrap())
                .unwrap()
                .reshape((b, k, n, dv))
                .unwrap();
            let visual = model.visual_tokens(&mixed, Some(&normed), qids, qmask, Ctx::eval()).unwrap();
            assert_close(
                &format!("{what} visual tokens"),
                &visual,
                get(&io, &format!("{tag}.visual_tokens")).unwrap(),
                1e-4,
            );
            let inputs = model.llm_inputs(&visual, ids, mask).unwrap();
            let loss = model.loss(&inputs, labels, Ctx::eval()).unwrap();
            assert_close(&format!("{what} loss"), &loss, get(&io, &format!("{tag}.loss")).unwrap(), 1e-4);
            let grads = loss.backward().unwrap();
            let g = |v: &Var| grads.get(v).cloned().unwrap_or_else(|| v.zeros_like().unwrap());
            assert_close(
                &format!("{what} grad selection"),
                &g(&sel),
                get(&io, &format!("{tag}.grad.selection")).unwrap(),
                1e-3,
            );
            assert_close(
                &format!("{what} grad frame_pos"),
                &g(vars.get("frame_embeds.weight").unwrap()).narrow(0, 0, t).unwrap(),
                get(&io, &format!("{tag}.grad.frame_pos")).unwrap(),
                1e-3,
            );
            let mut checked = 0;
            for (key, want) in io.iter() {
                let Some(name) = key.strip_prefix(&format!("{tag}.grad.")) else {
                    continue;
                };
                if name == "selection" || name == "frame_pos" {
                    continue;
                }
                let var = vars.get(name).unwrap_or_else(|| panic!("{what}: no trainable variable {name}"));
                assert_close(&format!("{what} grad {name}"), &g(var), want, 1e-3);
                checked += 1;
            }
            assert!(checked >= 5, "{what}: only {checked} parameter gradients in the fixture");

            let m = &meta[tag];
            let max_new = m["max_new_tokens"].as_u64().unwrap() as usize;
            let ids_of = |v: &serde_json::Value| -> Vec<Vec<u32>> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
                    .collect()
            };
            let inputs = model.llm_inputs(&visual.detach(), ids, mask).unwrap();
            let greedy = model
                .generate(
                    &inputs,
                    &GenerateConfig {
                        max_new_tokens: max_new,
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(greedy, ids_of(&m["greedy"]), "{what}: greedy ids");
            let beam = model
                .generate(
                    &inputs,
                    &GenerateConfig {
                        max_new_tokens: max_new,
                        num_beams: 3,
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(beam, ids_of(&m["beam3"]), "{what}: beam ids");
            let options: Vec<Vec<Vec<u32>>> = m["options"].as_array().unwrap().iter().map(ids_of).collect();
            let scores = model.score_options(&inputs, &options).unwrap();
            let scores = Tensor::new(scores, &common::device()).unwrap();
            assert_close(
                &format!("{what} option scores"),
                &scores,
                get(&io, &format!("{tag}.option_scores")).unwrap(),
                1e-4,
            );
        }

        let img = model
            .image_language_inputs(get(&io, "image.pixel_values").unwrap(), qids, qmask)
            .unwrap();
        assert_close(
            &format!("{} image path", dir.display()),
            &img,
            get(&io, "image.language_inputs").unwrap(),
            1e-4,
        );
    }
}
