//! What every annotation reader shares: the strict / skip-bad-rows option, the bad-row report, and
//! an order-preserving JSON value (the official scripts iterate JSON objects in file order).

use anyhow::{Context, Result};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// How a reader treats a malformed row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// `false` (the default): the first malformed row is an error. `true`: malformed rows are
    /// collected into [`Annotations::bad_rows`] and reading goes on.
    pub skip_bad_rows: bool,
}

impl ReadOptions {
    pub fn strict() -> Self {
        Self { skip_bad_rows: false }
    }
    pub fn skip_bad_rows() -> Self {
        Self { skip_bad_rows: true }
    }
}

/// One malformed row (or JSON entry): where it is and what is wrong with it.
///
/// It is also the error a strict reader returns (`anyhow::Error::downcast_ref::<BadRow>()`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BadRow {
    pub file: PathBuf,
    /// 1-based line of the row in the file (CSV, JSONL; JSON syntax errors), when known.
    pub line: Option<u64>,
    /// The entry, where lines do not apply (JSON files): a video id, `"entry 12"`, ...
    pub entry: Option<String>,
    /// The column: `"6 (answer)"` for CSV (1-based index and header name), a field path such
    /// as `"predictive.reason"` for JSON.
    pub column: Option<String>,
    /// What was expected and what was found.
    pub reason: String,
}

impl BadRow {
    pub fn new(file: &Path, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line: None,
            entry: None,
            column: None,
            reason: reason.into(),
        }
    }
    pub fn line(mut self, line: u64) -> Self {
        self.line = Some(line);
        self
    }
    pub fn entry(mut self, entry: impl Into<String>) -> Self {
        self.entry = Some(entry.into());
        self
    }
    pub fn column(mut self, column: impl Into<String>) -> Self {
        self.column = Some(column.into());
        self
    }
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(e) = &self.entry {
            write!(f, ", {e}")?;
        }
        if let Some(c) = &self.column {
            write!(f, ", column {c}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for BadRow {}

/// The samples of one annotation file (or folder) and the rows that were skipped.
#[derive(Debug, Clone, Default)]
pub struct Annotations {
    pub samples: Vec<super::QaSample>,
    /// Empty unless [`ReadOptions::skip_bad_rows`] was set.
    pub bad_rows: Vec<BadRow>,
}

/// The samples of an annotation file, keys unique: a repeated key is a bad row that says where
/// the key first was.
pub(crate) struct UniqueSamples {
    samples: Vec<super::QaSample>,
    /// Where each key was read ("line 7", "entry 3").
    first: std::collections::HashMap<String, String>,
}

impl UniqueSamples {
    pub(crate) fn new() -> Self {
        Self {
            samples: Vec::new(),
            first: Default::default(),
        }
    }

    /// Keep `s`, read at `at`; a key seen before goes to `sink` as `duplicate {what} {key} (first
    /// at {where})`, made into a bad row (line, column) by `bad`.
    pub(crate) fn push(
        &mut self,
        sink: &mut RowSink,
        s: super::QaSample,
        at: String,
        what: &str,
        bad: impl FnOnce(String) -> BadRow,
    ) -> Result<()> {
        if let Some(first) = self.first.get(&s.key) {
            return sink.reject(bad(format!("duplicate {what} {} (first at {first})", s.key)));
        }
        self.first.insert(s.key.clone(), at);
        self.samples.push(s);
        Ok(())
    }

    /// Nothing kept and nothing rejected: an empty file.
    pub(crate) fn is_empty(&self, sink: &RowSink) -> bool {
        self.samples.is_empty() && sink.bad.is_empty()
    }

    pub(crate) fn finish(self, sink: RowSink) -> Annotations {
        Annotations {
            samples: self.samples,
            bad_rows: sink.bad,
        }
    }
}

/// Collects bad rows or turns the first one into an error.
pub(crate) struct RowSink {
    opts: ReadOptions,
    pub(crate) bad: Vec<BadRow>,
}

impl RowSink {
    pub(crate) fn new(opts: &ReadOptions) -> Self {
        Self {
            opts: *opts,
            bad: Vec::new(),
        }
    }
    /// Err in strict mode; records the row otherwise (the caller reports the recorded rows:
    /// `gcg labels` and `gcg eval` print each once).
    pub(crate) fn reject(&mut self, row: BadRow) -> Result<()> {
        if self.opts.skip_bad_rows {
            tracing::debug!("skipping bad row: {row}");
            self.bad.push(row);
            Ok(())
        } else {
            Err(anyhow::Error::new(row))
        }
    }
}

/// A JSON value whose objects keep their keys in file order (serde_json's `Value` sorts them).
#[derive(Debug, Clone, PartialEq)]
pub enum OJson {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<OJson>),
    Obj(Vec<(String, OJson)>),
}

impl OJson {
    pub fn kind(&self) -> &'static str {
        match self {
            OJson::Null => "null",
            OJson::Bool(_) => "a boolean",
            OJson::Int(_) => "an integer",
            OJson::Float(_) => "a number",
            OJson::Str(_) => "a string",
            OJson::Arr(_) => "an array",
            OJson::Obj(_) => "an object",
        }
    }
    pub fn get(&self, key: &str) -> Option<&OJson> {
        match self {
            OJson::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            OJson::Int(i) => Some(*i as f64),
            OJson::Float(x) => Some(*x),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            OJson::Str(s) => Some(s),
            _ => None,
        }
    }
    /// A string, or an integer written as its decimal digits (ids are written both ways).
    pub fn as_id(&self) -> Option<String> {
        match self {
            OJson::Str(s) => Some(s.clone()),
            OJson::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }
    /// Short text of the value for error messages.
    pub fn preview(&self) -> String {
        let s = match self {
            OJson::Null => "null".to_string(),
            OJson::Bool(b) => b.to_string(),
            OJson::Int(i) => i.to_string(),
            OJson::Float(x) => x.to_string(),
            OJson::Str(s) => format!("{s:?}"),
            OJson::Arr(a) => format!("an array of {}", a.len()),
            OJson::Obj(o) => format!("an object with {} keys", o.len()),
        };
        if s.chars().count() > 60 {
            format!("{}...", s.chars().take(60).collect::<String>())
        } else {
            s
        }
    }
}

impl<'de> Deserialize<'de> for OJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OJson;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<OJson, E> {
                Ok(OJson::Null)
            }
            fn visit_none<E: de::Error>(self) -> std::result::Result<OJson, E> {
                Ok(OJson::Null)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> std::result::Result<OJson, E> {
                Ok(OJson::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, i: i64) -> std::result::Result<OJson, E> {
                Ok(OJson::Int(i))
            }
            fn visit_u64<E: de::Error>(self, u: u64) -> std::result::Result<OJson, E> {
                Ok(i64::try_from(u).map(OJson::Int).unwrap_or(OJson::Float(u as f64)))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> std::result::Result<OJson, E> {
                Ok(OJson::Float(x))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<OJson, E> {
                Ok(OJson::Str(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> std::result::Result<OJson, E> {
                Ok(OJson::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<OJson, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element()? {
                    v.push(x);
                }
                Ok(OJson::Arr(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<OJson, A::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = map.next_entry::<String, OJson>()? {
                    v.push((k, x));
                }
                Ok(OJson::Obj(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parse a JSON file; a syntax error names the file, line and column.
pub(crate) fn read_json_file(path: &Path) -> Result<OJson> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_json(path, &text)
}

pub(crate) fn parse_json(path: &Path, text: &str) -> Result<OJson> {
    serde_json::from_str::<OJson>(text).map_err(|e| {
        anyhow::Error::new(
            BadRow::new(path, format!("invalid JSON: {e}"))
                .line(e.line() as u64)
                .column(e.column().to_string()),
        )
    })
}

/// The non-blank lines of a JSON Lines file, each with its 1-based line number and parsed (a
/// syntax error is a [`BadRow`] naming the file, line and column). A file that cannot be read or
/// is not UTF-8 is an error naming it.
pub(crate) fn read_jsonl(path: &Path) -> Result<Vec<(u64, Result<OJson, BadRow>)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytecount_newlines(&e.as_bytes()[..e.utf8_error().valid_up_to()]);
        anyhow::Error::new(BadRow::new(path, format!("not valid UTF-8: {}", e.utf8_error())).line(line))
    })?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i as u64 + 1;
        if l.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<OJson>(l).map_err(|e| {
            BadRow::new(path, format!("invalid JSON: {e}"))
                .line(line)
                .column(e.column().to_string())
        });
        out.push((line, parsed));
    }
    Ok(out)
}

fn bytecount_newlines(b: &[u8]) -> u64 {
    b.iter().filter(|&&c| c == b'\n').count() as u64
}
