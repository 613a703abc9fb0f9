//! Tokenizers for a closed vocabulary: a WordPiece (Q-Former) and a SentencePiece-style unigram
//! (T5) `tokenizer.json` built from a word list. Used by the synthetic demo world, whose tiny
//! language models have no published tokenizer, and by tests. The files are ordinary
//! `tokenizer.json`s, loaded back through [`QFormerTokenizer`] and [`T5Tokenizer`].

use super::tokenizers::{QFormerTokenizer, T5Tokenizer};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::NormalizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// Punctuation the prompts use.
const PUNCT: [&str; 6] = ["?", ":", ",", ".", "'", "-"];

fn words_of(texts: &[&str]) -> BTreeSet<String> {
    let mut w = BTreeSet::new();
    for t in texts {
        for tok in t.split(|c: char| c.is_whitespace() || PUNCT.contains(&c.to_string().as_str())) {
            if !tok.is_empty() {
                w.insert(tok.to_string());
            }
        }
    }
    w
}

/// Write `qformer_tokenizer/tokenizer.json` and `tokenizer.json` under `dir` (the layout of an
/// HF InstructBLIP snapshot) covering every word of `texts`, and load them. Returns the
/// tokenizers and their vocabulary sizes (Q-Former incl. `[DEC]`, T5).
pub fn closed_vocab_tokenizers(texts: &[&str], dir: &Path) -> Result<(QFormerTokenizer, T5Tokenizer)> {
    let words = words_of(texts);
    if words.is_empty() {
        bail!("closed_vocab_tokenizers: no words in the given texts");
    }
    // Q-Former: BERT-style lower-casing WordPiece over whole words.
    let mut bert: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let lower: BTreeSet<String> = words.iter().map(|w| w.to_lowercase()).collect();
    bert.extend(PUNCT.iter().map(|s| s.to_string()));
    bert.extend(lower.into_iter().filter(|w| !PUNCT.contains(&w.as_str())));
    let qdir = dir.join("qformer_tokenizer");
    std::fs::create_dir_all(&qdir).with_context(|| format!("creating {}", qdir.display()))?;
    let vocab_txt = qdir.join("vocab.txt");
    std::fs::write(&vocab_txt, bert.join("\n") + "\n").with_context(|| format!("writing {}", vocab_txt.display()))?;
    let wp = WordPiece::from_file(&vocab_txt.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow!("building the WordPiece model from {}: {e}", vocab_txt.display()))?;
    let mut qtok = Tokenizer::new(wp);
    qtok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .map_err(|e| anyhow!("{e}"))?;
    qtok.with_pre_tokenizer(Some(BertPreTokenizer));
    qtok.with_decoder(Some(WordPieceDecoder::default()));
    qtok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(|t| AddedToken::from(t, true)))
        .map_err(|e| anyhow!("adding the BERT special tokens: {e}"))?;
    qtok.save(qdir.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("writing {}: {e}", qdir.display()))?;

    // T5: unigram over "▁word" pieces (+ punctuation); ids 0, 1, 2 are <pad>, </s>, <unk>.
    let mut pieces: Vec<(String, f64)> = vec![("<pad>".into(), 0.0), ("</s>".into(), 0.0), ("<unk>".into(), 0.0)];
    for w in &words {
        pieces.push((format!("\u{2581}{w}"), -1.0));
    }
    for p in PUNCT {
        pieces.push((p.to_string(), -2.0));
        pieces.push((format!("\u{2581}{p}"), -2.5));
    }
    pieces.push(("\u{2581}".to_string(), -3.0));
    let uni = Unigram::from(pieces, Some(2), false).map_err(|e| anyhow!("building the unigram model: {e}"))?;
    let mut ttok = Tokenizer::new(uni);
    // As SentencePiece's nmt normalisation: line breaks and tabs are spaces, runs of spaces one.
    let ws = |from: ReplacePattern| -> Result<NormalizerWrapper> { Ok(Replace::new(from, " ").map_err(|e| anyhow!("{e}"))?.into()) };
    ttok.with_normalizer(Some(NormalizerSequence::new(vec![
        ws(ReplacePattern::Regex("[\\n\\t\\r]".into()))?,
        ws(ReplacePattern::Regex(" {2,}".into()))?,
    ])))
    .map_err(|e| anyhow!("{e}"))?;
    ttok.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', PrependScheme::Always, true)));
    ttok.with_decoder(Some(MetaspaceDecoder::new('\u{2581}', PrependScheme::Always, true)));
    ttok.add_special_tokens(["<pad>", "</s>", "<unk>"].map(|t| AddedToken::from(t, true)))
        .map_err(|e| anyhow!("adding the T5 special tokens: {e}"))?;
    ttok.save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("writing {}: {e}", dir.join("tokenizer.json").display()))?;

    Ok((
        QFormerTokenizer::from_file(qdir.join("tokenizer.json"))?,
        T5Tokenizer::from_file(dir.join("tokenizer.json"))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_of_a_closed_vocabulary() {
        let tmp = tempfile::tempdir().unwrap();
        let texts = [
            "Question: what colour was the square that appeared?\nOptions: \nA: red \nB: blue\nAnswer: ",
            "A",
            "B",
        ];
        let (q, t) = closed_vocab_tokenizers(&texts, tmp.path()).unwrap();
        let ids = t.encode_inputs(&texts[..1]).unwrap();
        let row = &ids.input_ids[0];
        assert!(!row.contains(&t.unk_id()), "{row:?}");
        assert_eq!(*row.last().unwrap(), t.eos_id());
        let letter = t.encode_targets(&["B"]).unwrap().input_ids[0].clone();
        assert_eq!(letter.len(), 2);
        assert_eq!(t.decode(&letter, true).unwrap(), "B");
        let qi = q.encode(texts[0]).unwrap();
        assert_eq!(qi[0], q.cls_id());
        assert!(!qi.contains(&1), "unknown word in {qi:?}");
        assert!(q.vocab_size() < 60 && t.vocab_size() < 60);
    }
}
