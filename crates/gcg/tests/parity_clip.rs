//! GCG's CLIP branch (EVA-CLIP text tower + last vision block head) against the PyTorch reference
//! of `tools/fixtures/parity_clip.py`, loaded from the four GCG release `.pth` files.

mod common;

use anyhow::{Context, Result};
use candle_core::DType;
use common::{assert_close, get, load_io, parity_dirs};
use gcg::models::clip_branch::{ClipBranch, ClipConfig};

const TOL: f64 = 1e-4;

#[test]
fn clip_branch_matches_pytorch() -> Result<()> {
    for dir in parity_dirs() {
        let io = load_io(&dir.join("io/clip.safetensors"))?;
        let json = dir.join("io/clip.json");
        let cfg: ClipConfig = serde_json::from_str(&std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?)
            .with_context(|| format!("{} is not a ClipConfig", json.display()))?;
        if dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tiny")) {
            assert_eq!(cfg, ClipConfig::tiny(), "the tiny preset must equal the fixture's CLIP sizes");
        }
        let branch = ClipBranch::load_gcg_dir(&dir.join("gcg"), &cfg, &common::device(), DType::F32)?;

        let text = branch.encode_text(get(&io, "text_ids")?)?;
        assert_close(&format!("{}: text_embeds", dir.display()), &text, get(&io, "text_embeds")?, TOL);

        let image = branch.encode_image(get(&io, "frame_features")?)?;
        assert_close(&format!("{}: image_embeds", dir.display()), &image, get(&io, "image_embeds")?, TOL);

        // One row at a time (other padding lengths) gives the same embeddings.
        let ids = get(&io, "text_ids")?;
        for r in 0..ids.dim(0)? {
            let one = branch.encode_text(&ids.narrow(0, r, 1)?)?;
            assert_close(
                &format!("{}: text row {r}", dir.display()),
                &one,
                &get(&io, "text_embeds")?.narrow(0, r, 1)?,
                TOL,
            );
        }
    }
    Ok(())
}
