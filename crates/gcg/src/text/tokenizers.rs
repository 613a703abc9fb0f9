//! The three tokenizers of GCG, with ids identical to the Python code the paper ran
//! (transformers 4.37 slow tokenizers and the CLIP `simple_tokenizer`):
//!
//! * [`QFormerTokenizer`] — bert-base-uncased WordPiece plus the `[DEC]` bos token
//!   (`BertTokenizer.from_pretrained("bert-base-uncased", truncation_side="left")` +
//!   `add_special_tokens({"bos_token": "[DEC]"})`), for the Q-Former's instruction text;
//! * [`T5Tokenizer`] — Flan-T5's SentencePiece unigram tokenizer, inputs truncated on the left
//!   and targets on the right (GCG keeps two HF tokenizers for this), padding with `<pad>` = 0;
//! * [`ClipTokenizer`] — the CLIP byte-level BPE with GCG's text clean-up (ftfy, HTML entities,
//!   whitespace, lower case), 77 tokens, `<|startoftext|> … <|endoftext|>`, zero padding.
//!
//! All three run the `tokenizers` crate on a `tokenizer.json` (the files of an HF snapshot); the
//! CLIP one can also be built directly from the `bpe_simple_vocab_16e6.txt.gz` merges file the
//! GCG release ships. Batches come back as [`TokenBatch`] (ids and attention mask, padded to the
//! longest row).
//!
//! Known differences from the Python references (each pinned by a test):
//! * Q-Former: the tokenizer.json pipeline lower-cases character by character, the slow Python
//!   tokenizer with `str.lower()`, which turns a word-final `Σ` into `ς`; this module applies
//!   that final-sigma rule itself, so the ids follow the slow tokenizer.
//! * T5: ids follow the tokenizer.json (the HF "fast" pipeline). SentencePiece itself differs
//!   from it on a few control characters (e.g. U+0085 NEXT LINE is a word break in the
//!   tokenizer.json pipeline but an unknown piece for SentencePiece).
//! * CLIP: ftfy's mojibake repair is not reproduced (see [`clip_clean`]).

pub use super::text_clean::{clip_clean, ftfy_fix_text, html_unescape};

use ::tokenizers::models::bpe::{Vocab, BPE};
use ::tokenizers::models::ModelWrapper;
use ::tokenizers::pre_tokenizers::byte_level::ByteLevel;
use ::tokenizers::pre_tokenizers::sequence::Sequence;
use ::tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use ::tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Which end of an over-long sequence is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TruncationSide {
    /// Drop the first tokens (keep the end of the text).
    Left,
    /// Drop the last tokens (keep the beginning of the text).
    Right,
}

/// Token ids of a batch of texts, padded on the right to a common length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// [B][L] token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// [B][L]: 1 for a real token, 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
}

impl TokenBatch {
    /// Pads `rows` on the right with `pad_id` to `width` (the longest row when `None`).
    pub fn pad(rows: Vec<Vec<u32>>, pad_id: u32, width: Option<usize>) -> Result<Self> {
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let width = width.unwrap_or(longest);
        ensure!(longest <= width, "cannot pad a row of {longest} tokens to {width}");
        let mut input_ids = Vec::with_capacity(rows.len());
        let mut attention_mask = Vec::with_capacity(rows.len());
        for mut row in rows {
            let n = row.len();
            row.resize(width, pad_id);
            input_ids.push(row);
            let mut mask = vec![1u32; n];
            mask.resize(width, 0);
            attention_mask.push(mask);
        }
        Ok(Self { input_ids, attention_mask })
    }

    pub fn batch_size(&self) -> usize {
        self.input_ids.len()
    }

    /// L (0 for an empty batch).
    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    fn matrix(rows: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
        let (b, l) = (rows.len(), rows.first().map_or(0, Vec::len));
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (b, l), dev)?)
    }

    /// The ids as a u32 tensor [B, L].
    pub fn ids_tensor(&self, dev: &Device) -> Result<Tensor> {
        Self::matrix(&self.input_ids, dev)
    }

    /// The attention mask as a u32 tensor [B, L].
    pub fn mask_tensor(&self, dev: &Device) -> Result<Tensor> {
        Self::matrix(&self.attention_mask, dev)
    }
}

/// Reads a tokenizer.json, with errors that name the file. Truncation and padding settings
/// stored in the file are dropped: the wrappers below truncate and pad themselves.
fn load_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    ensure!(path.is_file(), "tokenizer file {} does not exist", path.display());
    let bytes = std::fs::read(path).with_context(|| format!("reading tokenizer file {}", path.display()))?;
    let mut tok =
        Tokenizer::from_bytes(&bytes).map_err(|e| anyhow!("tokenizer file {} is not a valid tokenizer.json: {e}", path.display()))?;
    tok.with_truncation(None)
        .map_err(|e| anyhow!("configuring {}: {e}", path.display()))?;
    tok.with_padding(None);
    Ok(tok)
}

fn required_id(tok: &Tokenizer, token: &str, path: &Path) -> Result<u32> {
    tok.token_to_id(token)
        .ok_or_else(|| anyhow!("tokenizer file {} has no token {token:?}", path.display()))
}

/// Keeps at most `budget` ids, cutting on `side`.
fn truncate(ids: &mut Vec<u32>, budget: usize, side: TruncationSide) {
    if ids.len() > budget {
        match side {
            TruncationSide::Left => {
                ids.drain(..ids.len() - budget);
            }
            TruncationSide::Right => ids.truncate(budget),
        }
    }
}

/// Ids of `text` through the tokenizer's normalizer, pre-tokenizer, model and added tokens,
/// without the post-processor's special tokens.
fn content_ids(tok: &Tokenizer, text: &str, path: &Path) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| anyhow!("tokenizing {text:?} with {}: {e}", path.display()))?;
    Ok(enc.get_ids().to_vec())
}

/// Python's `str.lower()` turns a word-final capital sigma into `ς` (Unicode Final_Sigma), the
/// tokenizers crate's per-character lower-casing into `σ`. Replaces every final `Σ` by `ς` so
/// that a later per-character lower-casing agrees with Python. (Rust's `str::to_lowercase`
/// implements the same rule; every other character lower-cases independently of context, so
/// the two strings can be walked side by side.)
fn python_final_sigma(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('Σ') {
        return std::borrow::Cow::Borrowed(text);
    }
    let lower = text.to_lowercase();
    let mut lower_chars = lower.chars();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let n = c.to_lowercase().count();
        let mapped: Vec<char> = lower_chars.by_ref().take(n).collect();
        if c == 'Σ' && mapped == ['ς'] {
            out.push('ς');
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

// ------------------------------------------------------------------------------------------
// Q-Former (BERT)
// ------------------------------------------------------------------------------------------

/// bert-base-uncased WordPiece with the `[DEC]` bos token, as GCG builds the Q-Former tokenizer.
/// Encodes `[CLS] … [SEP]`, truncating over-long text on the left to `max_length` (512).
#[derive(Clone)]
pub struct QFormerTokenizer {
    tok: Tokenizer,
    path: PathBuf,
    cls_id: u32,
    sep_id: u32,
    pad_id: u32,
    dec_id: u32,
    max_length: usize,
}

impl QFormerTokenizer {
    pub const MAX_LENGTH: usize = 512;
    pub const DEC_TOKEN: &'static str = "[DEC]";

    /// Loads a BERT tokenizer.json; adds `[DEC]` as a special token when the file lacks it
    /// (a plain bert-base-uncased file), as `add_special_tokens({"bos_token": "[DEC]"})` does
    /// (id 30522 for the real vocabulary).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut tok = load_tokenizer_json(&path)?;
        match tok.get_model() {
            ModelWrapper::WordPiece(_) => {}
            _ => bail!("tokenizer file {} is not a WordPiece (BERT) tokenizer", path.display()),
        }
        if tok.token_to_id(Self::DEC_TOKEN).is_none() {
            tok.add_special_tokens([AddedToken::from(Self::DEC_TOKEN, true)])
                .map_err(|e| anyhow!("adding [DEC] to {}: {e}", path.display()))?;
        }
        Ok(Self {
            cls_id: required_id(&tok, "[CLS]", &path)?,
            sep_id: required_id(&tok, "[SEP]", &path)?,
            pad_id: required_id(&tok, "[PAD]", &path)?,
            dec_id: required_id(&tok, Self::DEC_TOKEN, &path)?,
            tok,
            path,
            max_length: Self::MAX_LENGTH,
        })
    }

    /// The Q-Former tokenizer of an HF InstructBLIP snapshot: `dir/qformer_tokenizer/tokenizer.json`.
    pub fn from_snapshot(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("qformer_tokenizer").join("tokenizer.json");
        ensure!(
            path.is_file(),
            "snapshot {} has no Q-Former tokenizer: {} does not exist",
            dir.as_ref().display(),
            path.display()
        );
        Self::from_file(path)
    }

    /// Sets the maximum sequence length including `[CLS]` and `[SEP]` (at least 2).
    pub fn with_max_length(mut self, max_length: usize) -> Result<Self> {
        ensure!(
            max_length >= 2,
            "Q-Former max_length must leave room for [CLS] and [SEP], got {max_length}"
        );
        self.max_length = max_length;
        Ok(self)
    }

    /// `[CLS] ids [SEP]`, the text's ids cut on the left to fit `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = content_ids(&self.tok, &python_final_sigma(text), &self.path)?;
        truncate(&mut ids, self.max_length - 2, TruncationSide::Left);
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.push(self.cls_id);
        out.extend(ids);
        out.push(self.sep_id);
        Ok(out)
    }

    /// `padding="longest", truncation=True, max_length=512` with `[PAD]` = 0.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch> {
        let rows = texts.iter().map(|t| self.encode(t.as_ref())).collect::<Result<Vec<_>>>()?;
        TokenBatch::pad(rows, self.pad_id, None)
    }

    /// Vocabulary size including the added tokens (30523 for bert-base-uncased + `[DEC]`).
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn cls_id(&self) -> u32 {
        self.cls_id
    }
    pub fn sep_id(&self) -> u32 {
        self.sep_id
    }
    pub fn dec_id(&self) -> u32 {
        self.dec_id
    }
    /// The underlying `tokenizers` pipeline.
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }
}

// ------------------------------------------------------------------------------------------
// T5
// ------------------------------------------------------------------------------------------

/// Flan-T5's SentencePiece tokenizer: `ids </s>`, inputs cut on the left and targets on the
/// right to 512 tokens, padding with `<pad>` (0).
#[derive(Clone)]
pub struct T5Tokenizer {
    tok: Tokenizer,
    path: PathBuf,
    pad_id: u32,
    eos_id: u32,
    unk_id: u32,
    input_max_length: usize,
    target_max_length: usize,
}

impl T5Tokenizer {
    pub const MAX_LENGTH: usize = 512;

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let tok = load_tokenizer_json(&path)?;
        match tok.get_model() {
            ModelWrapper::Unigram(_) => {}
            _ => bail!("tokenizer file {} is not a SentencePiece unigram (T5) tokenizer", path.display()),
        }
        Ok(Self {
            pad_id: required_id(&tok, "<pad>", &path)?,
            eos_id: required_id(&tok, "</s>", &path)?,
            unk_id: required_id(&tok, "<unk>", &path)?,
            tok,
            path,
            input_max_length: Self::MAX_LENGTH,
            target_max_length: Self::MAX_LENGTH,
        })
    }

    /// The language-model tokenizer of an HF InstructBLIP snapshot: `dir/tokenizer.json`.
    pub fn from_snapshot(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("tokenizer.json");
        ensure!(
            path.is_file(),
            "snapshot {} has no T5 tokenizer: {} does not exist",
            dir.as_ref().display(),
            path.display()
        );
        Self::from_file(path)
    }

    /// Maximum lengths (including `</s>`, at least 1) of the inputs and of the targets.
    pub fn with_max_lengths(mut self, input: usize, target: usize) -> Result<Self> {
        ensure!(
            input >= 1 && target >= 1,
            "T5 max lengths must leave room for </s>, got {input} and {target}"
        );
        self.input_max_length = input;
        self.target_max_length = target;
        Ok(self)
    }

    /// `ids </s>`, the text's ids cut on `side` so that the whole fits `max_length` (≥ 1).
    pub fn encode(&self, text: &str, side: TruncationSide, max_length: usize) -> Result<Vec<u32>> {
        ensure!(max_length >= 1, "T5 max_length must leave room for </s>, got {max_length}");
        let mut ids = content_ids(&self.tok, text, &self.path)?;
        truncate(&mut ids, max_length - 1, side);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// The encoder inputs (`t5_tokenizer`, truncation on the left), padded to the longest.
    pub fn encode_inputs<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch> {
        self.batch(texts, TruncationSide::Left, self.input_max_length)
    }

    /// The decoder targets (`t5_output_tokenizer`, truncation on the right), padded to the
    /// longest. GCG masks the padding (id 0) to -100 for the loss.
    pub fn encode_targets<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch> {
        self.batch(texts, TruncationSide::Right, self.target_max_length)
    }

    fn batch<S: AsRef<str>>(&self, texts: &[S], side: TruncationSide, max_length: usize) -> Result<TokenBatch> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t.as_ref(), side, max_length))
            .collect::<Result<Vec<_>>>()?;
        TokenBatch::pad(rows, self.pad_id, None)
    }

    /// Text of `ids` as transformers 4.37's `T5Tokenizer.decode` gives it (what GCG uses):
    /// the pieces joined (`▁` → space) without the leading space, special tokens (`<pad>`,
    /// `</s>`, `<unk>`, `<extra_id_*>`) left out when `skip_special_tokens`, then stripped and
    /// `clean_up_tokenization` applied (" ." → ".", " ?" → "?", " 's" → "'s", …). Ids outside
    /// the vocabulary (Flan-T5's LM head has 32128 rows for 32100 tokens) are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
            bail!("token id {bad} is outside the vocabulary of {} ({n} tokens)", self.path.display());
        }
        let text = self
            .tok
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding with {}: {e}", self.path.display()))?;
        Ok(clean_up_tokenization(super::text_clean::python_strip(&text)))
    }

    pub fn decode_batch(&self, rows: &[Vec<u32>], skip_special_tokens: bool) -> Result<Vec<String>> {
        rows.iter().map(|r| self.decode(r, skip_special_tokens)).collect()
    }

    /// Vocabulary size including the added tokens (32100 for Flan-T5).
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }
    pub fn input_max_length(&self) -> usize {
        self.input_max_length
    }
    pub fn target_max_length(&self) -> usize {
        self.target_max_length
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }
    /// The underlying `tokenizers` pipeline.
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }
}

/// transformers' `clean_up_tokenization`: removes the space before punctuation and English
/// contractions.
fn clean_up_tokenization(text: &str) -> String {
    const RULES: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    RULES.iter().fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

// ------------------------------------------------------------------------------------------
// CLIP
// ------------------------------------------------------------------------------------------

/// CLIP's byte-level BPE as GCG's `utils/simple_tokenizer.py` runs it: [`clip_clean`] (ftfy,
/// HTML entities, whitespace, lower case), the CLIP split pattern, byte-to-unicode mapping,
/// BPE with `</w>` word ends; `tokenize` gives `<|startoftext|> … <|endoftext|>` in 77 slots,
/// zero padded, over-long text cut to 77 with the last token forced to `<|endoftext|>`.
///
/// Difference from the Python reference: ftfy's mojibake repair is not reproduced, so text
/// with mis-decoded UTF-8 (`"cafÃ©"`) keeps its mojibake (see [`clip_clean`]).
#[derive(Clone)]
pub struct ClipTokenizer {
    tok: Tokenizer,
    source: PathBuf,
    sot_id: u32,
    eot_id: u32,
    context_length: usize,
}

impl ClipTokenizer {
    pub const CONTEXT_LENGTH: usize = 77;
    pub const SOT: &'static str = "<|startoftext|>";
    pub const EOT: &'static str = "<|endoftext|>";
    /// `simple_tokenizer` reads `merges[1 : 49152 - 256 - 2 + 1]` of the merges file.
    pub const NUM_MERGES: usize = 49152 - 256 - 2;
    const SPLIT_PATTERN: &'static str = r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

    /// Loads the BPE model (vocabulary, merges, `</w>` suffix) of an HF CLIP tokenizer.json. Its
    /// normalizer, pre-tokenizer and post-processor are replaced by GCG's pipeline.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let tok = load_tokenizer_json(&path)?;
        match tok.get_model() {
            ModelWrapper::BPE(bpe) if bpe.end_of_word_suffix.as_deref() == Some("</w>") => {}
            _ => bail!(
                "tokenizer file {} is not a CLIP BPE tokenizer (BPE with \"</w>\" word ends)",
                path.display()
            ),
        }
        Self::finish(tok, path)
    }

    /// Builds the tokenizer from CLIP's merges file (`bpe_simple_vocab_16e6.txt.gz` of the GCG
    /// release or open_clip; gzip or plain text) exactly as `simple_tokenizer` does: the 256
    /// byte symbols, the same with `</w>`, one token per merge of lines 1..=48894, then
    /// `<|startoftext|>` and `<|endoftext|>` (ids 49406, 49407 for the official file).
    pub fn from_bpe_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        ensure!(path.is_file(), "CLIP merges file {} does not exist", path.display());
        let bytes = std::fs::read(&path).with_context(|| format!("reading CLIP merges file {}", path.display()))?;
        let text = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::GzDecoder::new(bytes.as_slice())
                .read_to_string(&mut s)
                .with_context(|| format!("decompressing CLIP merges file {}", path.display()))?;
            s
        } else {
            String::from_utf8(bytes).with_context(|| format!("CLIP merges file {} is not UTF-8", path.display()))?
        };
        let lines: Vec<&str> = text.split('\n').collect();
        let used = &lines[1.min(lines.len())..lines.len().min(Self::NUM_MERGES + 1)];
        ensure!(
            !used.is_empty(),
            "CLIP merges file {} has no merges after its header line",
            path.display()
        );

        let mut vocab_list: Vec<String> = byte_symbols().iter().map(|c| c.to_string()).collect();
        vocab_list.extend(byte_symbols().iter().map(|c| format!("{c}</w>")));
        let mut merges = Vec::with_capacity(used.len());
        for (i, line) in used.iter().enumerate() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                [a, b] => {
                    vocab_list.push(format!("{a}{b}"));
                    merges.push((a.to_string(), b.to_string()));
                }
                // Python: `tuple("".split())` is () and adds the token "" (a file shorter than
                // the merges range that ends with a newline).
                [] if i + 1 == used.len() => vocab_list.push(String::new()),
                _ => bail!(
                    "CLIP merges file {} line {}: expected two symbols, got {:?}",
                    path.display(),
                    i + 2,
                    line
                ),
            }
        }
        vocab_list.push(Self::SOT.to_string());
        vocab_list.push(Self::EOT.to_string());
        // dict(zip(vocab, range(len(vocab)))): a repeated token keeps its last id
        let mut vocab = Vocab::default();
        for (id, token) in vocab_list.into_iter().enumerate() {
            vocab.insert(token, id as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".to_string())
            .unk_token(Self::EOT.to_string())
            .build()
            .map_err(|e| anyhow!("building the BPE model from {}: {e}", path.display()))?;
        Self::finish(Tokenizer::new(bpe), path)
    }

    fn finish(mut tok: Tokenizer, source: PathBuf) -> Result<Self> {
        let split = Split::new(
            SplitPattern::Regex(Self::SPLIT_PATTERN.to_string()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| anyhow!("compiling the CLIP split pattern: {e}"))?;
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ]);
        tok.with_normalizer(None::<::tokenizers::NormalizerWrapper>)
            .map_err(|e| anyhow!("configuring {}: {e}", source.display()))?;
        tok.with_pre_tokenizer(Some(pre));
        tok.with_post_processor(None::<::tokenizers::PostProcessorWrapper>);
        let sot_id = required_id(&tok, Self::SOT, &source)?;
        let eot_id = required_id(&tok, Self::EOT, &source)?;
        // The special tokens are matched whole in the cleaned text, as simple_tokenizer's pattern does.
        tok.add_special_tokens([AddedToken::from(Self::SOT, true), AddedToken::from(Self::EOT, true)])
            .map_err(|e| anyhow!("registering CLIP special tokens of {}: {e}", source.display()))?;
        Ok(Self {
            tok,
            source,
            sot_id,
            eot_id,
            context_length: Self::CONTEXT_LENGTH,
        })
    }

    /// Sets the number of token slots (at least 2).
    pub fn with_context_length(mut self, context_length: usize) -> Result<Self> {
        ensure!(context_length >= 2, "CLIP context length must be at least 2, got {context_length}");
        self.context_length = context_length;
        Ok(self)
    }

    /// `<|startoftext|> ids <|endoftext|>` of the cleaned text, not truncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = content_ids(&self.tok, &clip_clean(text), &self.source)?;
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.push(self.sot_id);
        out.extend(ids);
        out.push(self.eot_id);
        Ok(out)
    }

    /// `simple_tokenizer.tokenize(texts, context_length)`: [B][context_length] ids, zero
    /// padded; rows longer than the context are cut and end with `<|endoftext|>`. The mask
    /// marks the real tokens.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch> {
        let rows = texts
            .iter()
            .map(|t| {
                let mut ids = self.encode(t.as_ref())?;
                if ids.len() > self.context_length {
                    ids.truncate(self.context_length);
                    ids[self.context_length - 1] = self.eot_id;
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        TokenBatch::pad(rows, 0, Some(self.context_length))
    }

    /// Vocabulary size (49408 for the official merges).
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
    pub fn sot_id(&self) -> u32 {
        self.sot_id
    }
    pub fn eot_id(&self) -> u32 {
        self.eot_id
    }
    pub fn context_length(&self) -> usize {
        self.context_length
    }
    /// The underlying `tokenizers` pipeline (fed with [`clip_clean`]ed text).
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }
}

/// GPT-2/CLIP `bytes_to_unicode` in its order: the printable bytes `!`..`~`, `¡`..`¬`, `®`..`ÿ`
/// map to themselves, the other 68 bytes to U+0100 onwards; listed by the byte order above
/// followed by the remapped bytes ascending.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut out: Vec<char> = (0..256u32).filter(|&b| printable(b)).filter_map(char::from_u32).collect();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable(b) {
            out.extend(char::from_u32(256 + n));
            n += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_symbols_match_gpt2_table() {
        let s = byte_symbols();
        assert_eq!(s.len(), 256);
        assert_eq!(s[0], '!');
        assert_eq!(s[93], '~');
        assert_eq!(s[94], '¡');
        // byte 0x00 is the first remapped one, at U+0100; space (0x20) is U+0120 'Ġ'
        assert_eq!(s[188], '\u{100}');
        assert!(s.contains(&'Ġ'));
        let mut sorted = s.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn final_sigma_follows_python_lower() {
        assert_eq!(python_final_sigma("ΟΔΟΣ ΣΟΦΟΣ,"), "ΟΔΟς ΣΟΦΟς,");
        assert_eq!(python_final_sigma("Σ ΑΣΑ"), "Σ ΑΣΑ");
        assert_eq!(python_final_sigma("İΣ"), "İς");
    }

    #[test]
    fn truncation_sides() {
        let mut a = vec![1, 2, 3, 4, 5];
        truncate(&mut a, 3, TruncationSide::Left);
        assert_eq!(a, [3, 4, 5]);
        let mut b = vec![1, 2, 3, 4, 5];
        truncate(&mut b, 3, TruncationSide::Right);
        assert_eq!(b, [1, 2, 3]);
    }
}
