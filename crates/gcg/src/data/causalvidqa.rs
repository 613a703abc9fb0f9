//! Causal-VidQA: one folder per video under the QA directory, each with
//! `text.json` = `{descriptive: {question, answer: [5]}, explanatory: {question, answer: [5]},
//! predictive: {question, answer: [5], reason: [5]}, counterfactual: {question, answer: [5],
//! reason: [5]}}` and `answer.json` = `{descriptive: {answer}, explanatory: {answer},
//! predictive: {answer, reason}, counterfactual: {answer, reason}}` (option indices).
//!
//! Each video gives six multiple-choice samples, in the order and with the keys of the official
//! code (`{video}_{k}`): 0 D (descriptive), 1 E (explanatory), 2 PA / 3 PR (predictive answer /
//! reason), 4 CA / 5 CR (counterfactual answer / reason). The splits are lists of video ids
//! (`train.pkl`, `valid.pkl`, `test.pkl` in the release; [`read_split`] also takes `.txt` / `.json`).

use super::read::{read_json_file, Annotations, BadRow, OJson, ReadOptions, RowSink};
use super::{Answer, Dataset, QaSample};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// Number of candidates per question.
pub const NUM_OPTIONS: usize = 5;

/// The six questions of a video: (index in the key, type, section of text.json, field).
pub const QUESTIONS: [(usize, &str, &str, &str); 6] = [
    (0, "D", "descriptive", "answer"),
    (1, "E", "explanatory", "answer"),
    (2, "PA", "predictive", "answer"),
    (3, "PR", "predictive", "reason"),
    (4, "CA", "counterfactual", "answer"),
    (5, "CR", "counterfactual", "reason"),
];

/// Read the videos of `videos` (a split), or every sub-folder of `qa_dir` (sorted) when `None`.
pub fn read(qa_dir: &Path, videos: Option<&[String]>) -> Result<Vec<QaSample>> {
    Ok(read_with(qa_dir, videos, &ReadOptions::strict())?.samples)
}

/// As [`read`]; with `skip_bad_rows` a video with a malformed or missing file is left out whole
/// (its six questions belong together) and reported.
pub fn read_with(qa_dir: &Path, videos: Option<&[String]>, opts: &ReadOptions) -> Result<Annotations> {
    let list: Vec<String> = match videos {
        Some(v) => v.to_vec(),
        None => {
            let mut v = Vec::new();
            for e in std::fs::read_dir(qa_dir).with_context(|| format!("listing the Causal-VidQA QA directory {}", qa_dir.display()))? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    v.push(e.file_name().to_string_lossy().to_string());
                }
            }
            v.sort();
            v
        }
    };
    let mut sink = RowSink::new(opts);
    let mut samples = Vec::with_capacity(list.len() * 6);
    let mut seen = HashSet::new();
    for video in &list {
        if !seen.insert(video.as_str()) {
            sink.reject(BadRow::new(qa_dir, "video listed twice in the split").entry(format!("video {video}")))?;
            continue;
        }
        match read_video(qa_dir, video) {
            Ok(s) => samples.extend(s),
            Err(e) => match e.downcast::<BadRow>() {
                Ok(bad) => sink.reject(bad)?,
                Err(other) => return Err(other),
            },
        }
    }
    Ok(Annotations {
        samples,
        bad_rows: sink.bad,
    })
}

fn read_video(qa_dir: &Path, video: &str) -> Result<Vec<QaSample>> {
    let dir = qa_dir.join(video);
    let text_path = dir.join("text.json");
    let answer_path = dir.join("answer.json");
    for p in [&text_path, &answer_path] {
        if !p.is_file() {
            bail!(BadRow::new(p, "file not found").entry(format!("video {video}")));
        }
    }
    let text = read_json_file(&text_path)?;
    let answers = read_json_file(&answer_path)?;
    let mut out = Vec::with_capacity(6);
    for (k, qtype, section, field) in QUESTIONS {
        let bad_text = |col: String, reason: String| anyhow!(BadRow::new(&text_path, reason).entry(format!("video {video}")).column(col));
        let sec = text
            .get(section)
            .ok_or_else(|| bad_text(section.to_string(), "missing section".into()))?;
        let question = sec
            .get("question")
            .and_then(OJson::as_str)
            .map(|q| q.trim().trim_end_matches('?').trim_end().to_string())
            .filter(|q| !q.is_empty())
            .ok_or_else(|| bad_text(format!("{section}.question"), "expected the question text".into()))?;
        let options: Vec<String> = match sec.get(field) {
            Some(OJson::Arr(a)) if a.len() == NUM_OPTIONS && a.iter().all(|x| x.as_str().is_some()) => {
                a.iter().map(|x| x.as_str().unwrap_or_default().trim().to_string()).collect()
            }
            other => {
                let found = other.map(|o| o.preview()).unwrap_or_else(|| "nothing".into());
                return Err(bad_text(
                    format!("{section}.{field}"),
                    format!("expected {NUM_OPTIONS} candidate texts, found {found}"),
                ));
            }
        };
        let ans = answers.get(section).and_then(|s| s.get(field));
        let index = match ans {
            Some(OJson::Int(i)) if (0..NUM_OPTIONS as i64).contains(i) => *i as usize,
            other => {
                let found = other.map(|o| o.preview()).unwrap_or_else(|| "nothing".into());
                bail!(BadRow::new(
                    &answer_path,
                    format!("expected an option index 0-{}, found {found}", NUM_OPTIONS - 1)
                )
                .entry(format!("video {video}"))
                .column(format!("{section}.{field}")));
            }
        };
        let mut extra = BTreeMap::new();
        extra.insert("category".to_string(), section.to_string());
        extra.insert("part".to_string(), field.to_string());
        out.push(QaSample {
            dataset: Dataset::CausalVidQa,
            key: format!("{video}_{k}"),
            qid: k.to_string(),
            video: video.to_string(),
            question,
            options,
            answer: Answer::Choice(index),
            qtype: qtype.to_string(),
            extra,
        });
    }
    // The reason questions are asked given the correct answer of their question.
    for (a, r) in [(2, 3), (4, 5)] {
        let given = out[a].answer_text().to_string();
        out[r].extra.insert("given_answer".to_string(), given);
    }
    Ok(out)
}

/// Read a split: a list of video ids as the release's pickle (`train.pkl`, a pickled list of
/// strings), a JSON list, or a text file with one id a line.
pub fn read_split(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading split file {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "pkl" | "pickle" => unpickle_strings(&bytes).with_context(|| format!("reading pickled split {}", path.display())),
        "json" => {
            let json = super::read::parse_json(path, &String::from_utf8_lossy(&bytes))?;
            match json {
                OJson::Arr(a) => a
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        x.as_id().ok_or_else(|| {
                            anyhow!(BadRow::new(path, format!("expected a video id, found {}", x.preview())).entry(format!("entry {i}")))
                        })
                    })
                    .collect(),
                other => bail!(BadRow::new(path, format!("expected a list of video ids, found {}", other.kind()))),
            }
        }
        _ => {
            let text = String::from_utf8(bytes).map_err(|e| anyhow!(BadRow::new(path, format!("not valid UTF-8: {e}"))))?;
            Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        }
    }
}

/// A minimal unpickler for what the Causal-VidQA splits hold: a list, tuple or set of strings,
/// any protocol (0–5). Anything else is an error.
fn unpickle_strings(b: &[u8]) -> Result<Vec<String>> {
    let mut u = Unpickler {
        b,
        i: 0,
        stack: Vec::new(),
        items: Vec::new(),
        marks: Vec::new(),
    };
    loop {
        let op = *u.b.get(u.i).ok_or_else(|| anyhow!("pickle ends without STOP"))?;
        u.i += 1;
        if op == b'.' {
            break; // STOP
        }
        u.op(op)?;
    }
    match (u.stack.len(), u.items.is_empty()) {
        (1, true) => Ok(u.stack.pop().unwrap_or_default()),
        _ => bail!("the pickle does not hold a single list of strings"),
    }
}

/// The unpickler's state: the bytes, the position, and the pickle machine's stack as far as
/// lists of strings need it.
struct Unpickler<'a> {
    b: &'a [u8],
    i: usize,
    /// The containers being built.
    stack: Vec<Vec<String>>,
    /// Loose strings on the stack (after MARK).
    items: Vec<String>,
    marks: Vec<usize>,
}

impl Unpickler<'_> {
    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let i = self.i;
        let s = self.b.get(i..i + n).ok_or_else(|| anyhow!("truncated pickle at byte {}", i))?;
        self.i += n;
        Ok(s)
    }

    /// The bytes up to the next newline (consumed), as text.
    fn read_line(&mut self) -> Result<String> {
        let rest = self.b.get(self.i..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| anyhow!("truncated pickle at byte {}", self.i))?;
        let s = String::from_utf8_lossy(&rest[..n]).to_string();
        self.i += n + 1;
        Ok(s)
    }

    /// Runs one opcode (any but STOP).
    fn op(&mut self, op: u8) -> Result<()> {
        match op {
            0x80 => {
                self.take(1)?;
            } // PROTO
            0x95 => {
                self.take(8)?;
            } // FRAME
            b']' | b'l' | 0x8f | b')' | b'(' | b'e' | 0x90 | b't' | 0x85..=0x87 | b'a' => self.container_op(op)?,
            b'X' | 0x8c | 0x8d | b'T' | b'U' | b'B' | b'C' | b'V' | b'S' => self.string_op(op)?,
            0x94 => {} // MEMOIZE
            b'q' => {
                self.take(1)?;
            } // BINPUT
            b'r' => {
                self.take(4)?;
            } // LONG_BINPUT
            b'p' => {
                self.read_line()?;
            } // PUT
            other => bail!(
                "unsupported pickle opcode 0x{other:02x} at byte {} (expected a list of strings)",
                self.i - 1
            ),
        }
        Ok(())
    }

    /// The opcodes that build lists, tuples and sets, and MARK.
    fn container_op(&mut self, op: u8) -> Result<()> {
        match op {
            b']' | b'l' | 0x8f | b')' => {
                // EMPTY_LIST, LIST (protocol 0, after MARK), EMPTY_SET, EMPTY_TUPLE
                if op == b'l' {
                    let m = self.marks.pop().ok_or_else(|| anyhow!("LIST without MARK"))?;
                    let list = self.items.split_off(m);
                    self.stack.push(list);
                } else {
                    self.stack.push(Vec::new());
                }
            }
            b'(' => self.marks.push(self.items.len()),
            b'e' | 0x90 | b't' => {
                // APPENDS, ADDITEMS, TUPLE: the strings since the MARK
                let m = self.marks.pop().ok_or_else(|| anyhow!("APPENDS without MARK"))?;
                let new = self.items.split_off(m);
                if op == b't' {
                    self.stack.push(new);
                } else {
                    self.stack.last_mut().ok_or_else(|| anyhow!("APPENDS without a list"))?.extend(new);
                }
            }
            0x85..=0x87 => {
                // TUPLE1..TUPLE3
                let n = (op - 0x84) as usize;
                if self.items.len() < n {
                    bail!("TUPLE{n} with {} items on the stack", self.items.len());
                }
                let t = self.items.split_off(self.items.len() - n);
                self.stack.push(t);
            }
            _ => {
                // b'a', APPEND
                let s = self.items.pop().ok_or_else(|| anyhow!("APPEND without an item"))?;
                self.stack.last_mut().ok_or_else(|| anyhow!("APPEND without a list"))?.push(s);
            }
        }
        Ok(())
    }

    /// The string opcodes: length-prefixed (binary) or newline-ended (protocol 0).
    fn string_op(&mut self, op: u8) -> Result<()> {
        let s = match op {
            b'V' => self.read_line()?,
            b'S' => self.read_line()?.trim_matches(|c| c == '\'' || c == '"').to_string(),
            _ => {
                let len_bytes = match op {
                    b'X' | b'T' | b'B' => 4,
                    0x8d => 8,
                    _ => 1,
                };
                let le = |s: &[u8]| s.iter().rev().fold(0usize, |a, &x| (a << 8) | x as usize);
                let n = le(self.take(len_bytes)?);
                String::from_utf8_lossy(self.take(n)?).to_string()
            }
        };
        self.items.push(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::unpickle_strings;

    #[test]
    fn unpickles_string_lists_of_every_protocol() {
        // Bytes of pickle.dumps(['v1', 'abc'], protocol=p) from CPython 3.
        let p0 = b"(lp0\nVv1\np1\naVabc\np2\na.";
        let p2 = b"\x80\x02]q\x00(X\x02\x00\x00\x00v1q\x01X\x03\x00\x00\x00abcq\x02e.";
        let p4 = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00]\x94(\x8c\x02v1\x94\x8c\x03abc\x94e.";
        for p in [&p0[..], &p2[..], &p4[..]] {
            assert_eq!(unpickle_strings(p).unwrap(), vec!["v1".to_string(), "abc".to_string()]);
        }
        let set = b"\x80\x04\x95\t\x00\x00\x00\x00\x00\x00\x00\x8f\x94(\x8c\x01a\x94\x90.";
        assert_eq!(unpickle_strings(set).unwrap(), vec!["a".to_string()]);
        let tuple = b"\x80\x02X\x01\x00\x00\x00aq\x00X\x01\x00\x00\x00bq\x01\x86q\x02.";
        assert_eq!(unpickle_strings(tuple).unwrap(), vec!["a".to_string(), "b".to_string()]);
        // A dict is refused.
        assert!(unpickle_strings(b"\x80\x04}\x94.").is_err());
    }
}
