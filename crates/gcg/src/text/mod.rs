//! Text: the three tokenizers of GCG ([`tokenizers`]: Q-Former WordPiece, Flan-T5 SentencePiece,
//! CLIP BPE, with GCG's text clean-up) and closed-vocabulary tokenizers for tiny models
//! ([`vocab`]).

mod html_entities;
mod text_clean;
pub mod tokenizers;
pub mod vocab;

pub use tokenizers::{clip_clean, ftfy_fix_text, html_unescape, ClipTokenizer, QFormerTokenizer, T5Tokenizer, TokenBatch, TruncationSide};
