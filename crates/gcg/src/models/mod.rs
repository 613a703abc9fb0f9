//! One file per network, and the one [`Preset`] enum that names their published sizes.

pub mod checkpoint;
pub mod clip_branch;
pub mod clip_text;
pub mod lmm;
pub mod qformer;
pub mod t5;
pub mod vit;

use serde::{Deserialize, Serialize};

/// The sizes of every network of GCG, by name: `tiny` (tests and the demo) or the real thing,
/// `instructblip-flan-t5-xl` (EVA ViT-g, InstructBLIP's Q-Former, Flan-T5-XL, EVA-CLIP-g).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    Tiny,
    #[default]
    #[serde(alias = "instructblip_flan_t5_xl")]
    InstructblipFlanT5Xl,
}

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::Tiny, Preset::InstructblipFlanT5Xl];

    /// The frozen ViT and CLIP branch of this preset.
    pub fn frozen(self) -> (vit::VitConfig, clip_branch::ClipConfig) {
        match self {
            Preset::Tiny => (vit::VitConfig::tiny(), clip_branch::ClipConfig::tiny()),
            Preset::InstructblipFlanT5Xl => (vit::VitConfig::eva_vit_g(), clip_branch::ClipConfig::eva_clip_g()),
        }
    }
}

crate::choice_names!(Preset, "preset", {
    Tiny => "tiny",
    InstructblipFlanT5Xl => "instructblip-flan-t5-xl" | "instructblip_flan_t5_xl" | "eva-vit-g",
});
