//! The multiple-choice CSV format of the NExT-QA family (NExT-QA, NExT-GQA, IntentQA):
//! `video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4[,extra...]`.

use super::read::{Annotations, BadRow, ReadOptions, RowSink, UniqueSamples};
use super::{Answer, Dataset, QaSample};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Number of candidate answers in the NExT family.
pub const NUM_OPTIONS: usize = 5;

/// The question types of NExT-QA: causal why / how, temporal next / previous / present,
/// descriptive count / location / other.
pub const NEXTQA_TYPES: [&str; 8] = ["CW", "CH", "TN", "TP", "TC", "DC", "DL", "DO"];

/// How the `answer` column is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnswerColumn {
    /// The index of the correct option (NExT-QA, IntentQA).
    Index,
    /// The text of the correct option (NExT-GQA); mapped to the first option equal to it, as
    /// the official NExT-GQA loaders do (`choices.index(answer)`). In scoring, every option with
    /// that text is right ([`crate::data::QaSample::accepts`]).
    Text,
}

pub(crate) struct McCsvFormat {
    pub dataset: Dataset,
    /// The name of the video column (`video` in NExT-QA, `video_id` in NExT-GQA / IntentQA);
    /// the first one the header has is used.
    pub video_columns: &'static [&'static str],
    pub answer: AnswerColumn,
    /// More columns the format requires; copied into `QaSample::extra`.
    pub extra_required: &'static [&'static str],
    /// Columns copied into `QaSample::extra` when the header has them.
    pub extra_optional: &'static [&'static str],
    pub types: &'static [&'static str],
}

/// Column positions found in the header.
struct Columns {
    names: Vec<String>,
    video: usize,
    frame_count: usize,
    width: usize,
    height: usize,
    question: usize,
    answer: usize,
    qid: usize,
    qtype: usize,
    options: [usize; NUM_OPTIONS],
    extra: Vec<(String, usize)>,
}

impl Columns {
    fn label(&self, i: usize) -> String {
        match self.names.get(i) {
            Some(n) => format!("{} ({n})", i + 1),
            None => format!("{}", i + 1),
        }
    }
}

pub(crate) fn read_mc_csv(path: &Path, fmt: &McCsvFormat, opts: &ReadOptions) -> Result<Annotations> {
    let bytes = std::fs::read(path).with_context(|| format!("reading annotation file {}", path.display()))?;
    let lines = Lines::new(&bytes);
    // `base`: where the reader's input starts in `bytes` (it moves on when a row with an unclosed
    // quote is skipped). Positions come from our own line index: the csv crate counts `\n`s
    // consumed, which is one short for a CRLF row (its `\n` is consumed with the next row).
    let mut base = 0usize;
    let mut rdr = csv_reader(&bytes, true);
    let header = rdr
        .byte_headers()
        .with_context(|| format!("reading the header of {}", path.display()))?
        .clone();
    let names: Vec<String> = header.iter().map(|h| String::from_utf8_lossy(h).trim().to_string()).collect();
    let cols = find_columns(path, fmt, names)?;

    let mut sink = RowSink::new(opts);
    let mut samples = UniqueSamples::new();
    let mut record = csv::ByteRecord::new();
    loop {
        match rdr.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let mut row = BadRow::new(path, format!("unreadable CSV: {e}"));
                row.line = e.position().map(|p| lines.line_of(row_start(&bytes, base + p.byte() as usize)));
                return Err(anyhow::Error::new(row));
            }
        }
        let start = row_start(&bytes, base + record.position().map_or(0, |p| p.byte() as usize));
        let end = base + rdr.position().byte() as usize;
        let line = lines.line_of(start);
        if let Some(bad) = check_quotes(path, &cols, &lines, &bytes, start, end, record.len()) {
            // Skipped, the next row is read from the line after the one the quote opened on.
            let resume = lines.next_line_start(bad.quote_at);
            sink.reject(bad.row)?;
            base = resume;
            rdr = csv_reader(&bytes[base..], false);
            continue;
        }
        match parse_row(path, fmt, &cols, &record, line) {
            Ok(sample) => samples.push(&mut sink, sample, format!("line {line}"), "question", |m| {
                BadRow::new(path, m).line(line).column(cols.label(cols.qid))
            })?,
            Err(bad) => sink.reject(bad)?,
        }
    }
    Ok(samples.finish(sink))
}

fn csv_reader(bytes: &[u8], has_headers: bool) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new().has_headers(has_headers).flexible(true).from_reader(bytes)
}

/// Where the row the reader was at `pos` begins: past the line breaks (the rest of the previous
/// row's terminator, empty lines) that the reader skips.
fn row_start(bytes: &[u8], pos: usize) -> usize {
    pos + bytes[pos.min(bytes.len())..]
        .iter()
        .take_while(|&&b| b == b'\n' || b == b'\r')
        .count()
}

/// The physical lines of a file: a line ends at `\n`, or at a `\r` not followed by `\n`.
struct Lines {
    /// Offsets of the last byte of each line break.
    breaks: Vec<usize>,
    len: usize,
}

impl Lines {
    fn new(bytes: &[u8]) -> Self {
        let breaks = (0..bytes.len())
            .filter(|&i| bytes[i] == b'\n' || (bytes[i] == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
            .collect();
        Self { breaks, len: bytes.len() }
    }
    /// The 1-based line of byte `offset`.
    fn line_of(&self, offset: usize) -> u64 {
        1 + self.breaks.partition_point(|&b| b < offset) as u64
    }
    /// The offset where the line after the one holding `offset` begins (the end of the file if
    /// there is none).
    fn next_line_start(&self, offset: usize) -> usize {
        let i = self.breaks.partition_point(|&b| b < offset);
        self.breaks.get(i).map_or(self.len, |&b| b + 1)
    }
    /// The number of the last line.
    fn last(&self) -> u64 {
        self.line_of(self.len.saturating_sub(1))
    }
}

/// A row whose quotes are wrong, and the offset of the quote that opened the bad field.
struct QuoteError {
    row: BadRow,
    quote_at: usize,
}

/// The row `bytes[start..end]` (as read, `fields` fields) has an unclosed quote: a quoted field
/// runs to the end of the file, or one that spans line breaks swallows lines that look like
/// rows or leaves the row with another number of fields than the header.
fn check_quotes(path: &Path, cols: &Columns, lines: &Lines, bytes: &[u8], start: usize, end: usize, fields: usize) -> Option<QuoteError> {
    let end = end.min(bytes.len());
    let q = scan_quotes(&bytes[start..end])?;
    let open = start + q.open;
    let (open_line, row_line) = (lines.line_of(open), lines.line_of(start));
    let row_note = if row_line == open_line {
        String::new()
    } else {
        format!(" (in the row that starts on line {row_line})")
    };
    let ncols = cols.names.len();
    let reason = match q.close {
        None => format!(
            "a quote opened on line {open_line}{row_note} is never closed: the rest of the file (to line {}) would be one field",
            lines.last()
        ),
        Some(close) => {
            let inner = &bytes[open + 1..start + close];
            // A line inside the field with as many commas as the header has is a swallowed row.
            let swallowed = inner
                .split(|&b| b == b'\n' || b == b'\r')
                .skip(1)
                .any(|l| l.iter().filter(|&&b| b == b',').count() + 1 >= ncols);
            if !swallowed && fields == ncols {
                return None;
            }
            format!(
                "a quote opened on line {open_line}{row_note} closes only on line {}, which makes lines \
                 {open_line}-{} one row of {fields} fields (the header has {ncols}): a quote is probably unclosed",
                lines.line_of(start + close),
                lines.line_of(start + close),
            )
        }
    };
    Some(QuoteError {
        row: BadRow::new(path, reason).line(open_line).column(cols.label(q.field)),
        quote_at: open,
    })
}

/// The first quoted field of a raw CSV row that holds a line break or is never closed.
struct QuotedSpan {
    /// 0-based field index.
    field: usize,
    /// Offset of the opening quote in the row.
    open: usize,
    /// Offset of the closing quote; `None`: the row ends inside the quotes.
    close: Option<usize>,
}

/// Walk a raw row by the csv crate's rules (a quote opens a field only as its first byte, `""`
/// inside quotes is a quote) and return its first quoted field that spans a line break or is
/// still open at the end.
fn scan_quotes(raw: &[u8]) -> Option<QuotedSpan> {
    let (mut field, mut i) = (0usize, 0usize);
    let mut at_field_start = true;
    while i < raw.len() {
        let b = raw[i];
        if at_field_start && b == b'"' {
            let open = i;
            let mut broken = false;
            i += 1;
            loop {
                match raw.get(i) {
                    None => return Some(QuotedSpan { field, open, close: None }),
                    Some(b'"') if raw.get(i + 1) == Some(&b'"') => i += 2,
                    Some(b'"') => break,
                    Some(b'\n' | b'\r') => {
                        broken = true;
                        i += 1
                    }
                    Some(_) => i += 1,
                }
            }
            if broken {
                return Some(QuotedSpan {
                    field,
                    open,
                    close: Some(i),
                });
            }
            at_field_start = false;
        } else if b == b',' {
            field += 1;
            at_field_start = true;
        } else if b == b'\n' || b == b'\r' {
            return None;
        } else {
            at_field_start = false;
        }
        i += 1;
    }
    None
}

fn find_columns(path: &Path, fmt: &McCsvFormat, names: Vec<String>) -> Result<Columns> {
    let pos = |n: &str| names.iter().position(|h| h == n);
    let mut missing: Vec<String> = Vec::new();
    if !fmt.video_columns.iter().any(|c| pos(c).is_some()) {
        missing.push(fmt.video_columns.join(" or "));
    }
    let video = fmt.video_columns.iter().find_map(|c| pos(c)).unwrap_or(0);
    let mut need = |n: &str| -> usize {
        pos(n).unwrap_or_else(|| {
            missing.push(n.to_string());
            0
        })
    };
    let frame_count = need("frame_count");
    let width = need("width");
    let height = need("height");
    let question = need("question");
    let answer = need("answer");
    let qid = need("qid");
    let qtype = need("type");
    let mut options = [0usize; NUM_OPTIONS];
    for (i, o) in options.iter_mut().enumerate() {
        *o = need(&format!("a{i}"));
    }
    let mut extra: Vec<(String, usize)> = fmt.extra_required.iter().map(|n| (n.to_string(), need(n))).collect();
    for n in fmt.extra_optional {
        if let Some(i) = pos(n) {
            extra.push((n.to_string(), i));
        }
    }
    if !missing.is_empty() {
        let mut expected = vec![fmt.video_columns[0].to_string()];
        expected.extend(["frame_count", "width", "height", "question", "answer", "qid", "type"].map(String::from));
        expected.extend((0..NUM_OPTIONS).map(|i| format!("a{i}")));
        expected.extend(fmt.extra_required.iter().map(|s| s.to_string()));
        return Err(anyhow::Error::new(
            BadRow::new(
                path,
                format!(
                    "the header lacks column(s) {}; a {:?} annotation file has the columns {} (found: {})",
                    missing.join(", "),
                    fmt.dataset,
                    expected.join(","),
                    names.join(",")
                ),
            )
            .line(1)
            .column(missing.join(", ")),
        ));
    }
    Ok(Columns {
        names,
        video,
        frame_count,
        width,
        height,
        question,
        answer,
        qid,
        qtype,
        options,
        extra,
    })
}

/// One CSV record being read into a sample: its fields, and errors that point at a column.
struct Row<'a> {
    path: &'a Path,
    cols: &'a Columns,
    rec: &'a csv::ByteRecord,
    line: u64,
}

impl Row<'_> {
    /// An error about column `col` of this row.
    fn bad(&self, col: usize, reason: String) -> BadRow {
        BadRow::new(self.path, reason).line(self.line).column(self.cols.label(col))
    }

    /// The row must have as many fields as the header.
    fn check_width(&self) -> Result<(), BadRow> {
        let (rec, cols) = (self.rec, self.cols);
        if rec.len() != cols.names.len() {
            let col = rec.len().min(cols.names.len());
            let what = if rec.len() < cols.names.len() {
                "is missing"
            } else {
                "is not in the header"
            };
            return Err(self.bad(
                col,
                format!(
                    "expected {} fields (as the header), found {}: column {} {what}",
                    cols.names.len(),
                    rec.len(),
                    cols.label(col)
                ),
            ));
        }
        Ok(())
    }

    /// Field `i`, trimmed (UTF-8).
    fn field(&self, i: usize) -> Result<&str, BadRow> {
        let raw = self.rec.get(i).unwrap_or(b"");
        std::str::from_utf8(raw)
            .map(str::trim)
            .map_err(|e| self.bad(i, format!("not valid UTF-8: {e}")))
    }

    /// Field `i`, which must not be empty (`what` it should hold names it in the error).
    fn non_empty(&self, i: usize, what: &str) -> Result<String, BadRow> {
        let v = self.field(i)?;
        if v.is_empty() {
            Err(self.bad(i, format!("expected {what}, found an empty field")))
        } else {
            Ok(v.to_string())
        }
    }

    /// Field `i` as a non-negative integer.
    fn integer(&self, i: usize) -> Result<u64, BadRow> {
        let v = self.field(i)?;
        v.parse::<u64>()
            .map_err(|_| self.bad(i, format!("expected a non-negative integer, found `{v}`")))
    }

    /// The answer column as an option index: the index itself, or the option its text equals.
    fn answer(&self, fmt: &McCsvFormat, options: &[String]) -> Result<usize, BadRow> {
        let col = self.cols.answer;
        let answer_raw = self.field(col)?;
        match fmt.answer {
            AnswerColumn::Index => match answer_raw.parse::<usize>() {
                Ok(i) if i < NUM_OPTIONS => Ok(i),
                _ => Err(self.bad(col, format!("expected an option index 0-{}, found `{answer_raw}`", NUM_OPTIONS - 1))),
            },
            AnswerColumn::Text => match options.iter().position(|o| o == answer_raw) {
                Some(i) => {
                    // The first equal option, as a Python reader's `options.index(answer)` (the
                    // training target); in scoring, any option with this text is right.
                    let same: Vec<usize> = (0..options.len()).filter(|&j| options[j] == answer_raw).collect();
                    if same.len() > 1 {
                        tracing::info!(
                            "{}:{}: the answer `{answer_raw}` equals options {same:?}; option {i} is the training \
                             target, and a prediction of any of them is scored right",
                            self.path.display(),
                            self.line
                        );
                    }
                    Ok(i)
                }
                None => {
                    let hint = if answer_raw.parse::<usize>().is_ok_and(|i| i < NUM_OPTIONS) {
                        " (an option index: this looks like a NExT-QA-format file; read it as --dataset nextqa, with \
                         --grounding gsub_*.json for the NExT-GQA metrics)"
                    } else {
                        ""
                    };
                    Err(self.bad(
                        col,
                        format!(
                            "the answer `{answer_raw}` equals none of the options a0-a{}: {:?}{hint}",
                            NUM_OPTIONS - 1,
                            options
                        ),
                    ))
                }
            },
        }
    }
}

/// One CSV record as a multiple-choice sample, or the first field that is wrong in it.
fn parse_row(path: &Path, fmt: &McCsvFormat, cols: &Columns, rec: &csv::ByteRecord, line: u64) -> Result<QaSample, BadRow> {
    let row = Row { path, cols, rec, line };
    row.check_width()?;
    let video = row.non_empty(cols.video, "a video id")?;
    let frame_count = row.integer(cols.frame_count)?;
    let width = row.integer(cols.width)?;
    let height = row.integer(cols.height)?;
    let question = row.non_empty(cols.question, "a question")?;
    let question = question.trim_end_matches('?').trim_end().to_string();
    let qid = row.integer(cols.qid)?.to_string();
    let qtype = row.non_empty(cols.qtype, "a question type")?;
    if !fmt.types.contains(&qtype.as_str()) {
        return Err(row.bad(
            cols.qtype,
            format!("expected a question type among {}, found `{qtype}`", fmt.types.join(", ")),
        ));
    }
    let mut options = Vec::with_capacity(NUM_OPTIONS);
    for (i, &c) in cols.options.iter().enumerate() {
        options.push(row.non_empty(c, &format!("the text of option a{i}"))?);
    }
    let answer = row.answer(fmt, &options)?;
    let mut extra = BTreeMap::new();
    extra.insert("frame_count".to_string(), frame_count.to_string());
    extra.insert("width".to_string(), width.to_string());
    extra.insert("height".to_string(), height.to_string());
    for (name, i) in &cols.extra {
        extra.insert(name.clone(), row.field(*i)?.to_string());
    }
    Ok(QaSample {
        dataset: fmt.dataset,
        key: format!("{video}_{qid}"),
        qid,
        video,
        question,
        options,
        answer: Answer::Choice(answer),
        qtype,
        extra,
    })
}
