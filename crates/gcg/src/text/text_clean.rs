//! The text clean-up of CLIP's `simple_tokenizer` as the GCG code runs it:
//! `whitespace_clean(basic_clean(text)).lower()` with
//! `basic_clean = ftfy.fix_text → html.unescape → html.unescape → strip` and
//! `whitespace_clean = re.sub(r"\s+", " ") → strip`.
//!
//! `ftfy.fix_text` is reproduced step by step (per line, until nothing changes): HTML entity
//! decoding (only while no line so far contained `<`), C1 controls read as Windows-1252, Latin
//! ligatures split, half/full-width forms to their standard width, curly quotes straightened,
//! line breaks unified, ANSI terminal escapes and unwanted control characters removed, NFC.
//!
//! Not reproduced (documented differences from the Python reference):
//! * ftfy's mojibake repair (`fix_encoding` with `restore_byte_a0`, `replace_lossy_sequences`,
//!   `decode_inconsistent_utf8`): text that ftfy would decide is mis-decoded UTF-8, such as
//!   `"cafÃ©"`, is kept as written instead of being turned into `"café"`;
//! * lone surrogates (`fix_surrogates`) cannot occur in a Rust `str`;
//! * the ANSI-escape pattern accepts ASCII digits only (Python's `\d` takes any decimal digit);
//! * case mapping, NFC and `\p{L}`/`\p{N}` follow the Unicode tables of the Rust toolchain and
//!   the tokenizers crate, which may be newer than Python's for recently assigned characters.

use super::html_entities::HTML5_ENTITIES;
use ::tokenizers::NormalizedString;
use std::borrow::Cow;

/// The CLIP text clean-up of the GCG code (see the module docs for what is not reproduced).
pub fn clip_clean(text: &str) -> String {
    let fixed = ftfy_fix_text(text);
    let once = html_unescape(&fixed);
    let twice = html_unescape(&once);
    let stripped = python_strip(&twice);
    let mut collapsed = String::with_capacity(stripped.len());
    let mut in_space = false;
    for c in stripped.chars() {
        if c.is_whitespace() {
            if !in_space {
                collapsed.push(' ');
            }
            in_space = true;
        } else {
            collapsed.push(c);
            in_space = false;
        }
    }
    python_strip(&collapsed).to_lowercase()
}

/// Python's `str.isspace`: Unicode White_Space plus the ASCII separators U+001C–U+001F.
fn python_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub(crate) fn python_strip(s: &str) -> &str {
    s.trim_matches(python_is_space)
}

/// `ftfy.fix_text` with its default configuration, minus the mojibake repair.
pub fn ftfy_fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // unescape_html="auto": on until a line containing '<' is seen, then off for the rest.
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if unescape && segment.contains('<') {
            unescape = false;
        }
        out.push_str(&ftfy_fix_segment(segment, unescape));
    }
    out
}

fn ftfy_fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let orig = text.clone();
        if unescape {
            text = ftfy_unescape_html(&text);
        }
        text = fix_c1_controls(&text);
        text = fix_latin_ligatures(&text);
        text = fix_character_width(&text);
        text = uncurl_quotes(&text);
        text = fix_line_breaks(&text);
        text = remove_terminal_escapes(&text);
        text = remove_control_chars(&text);
        text = nfc(&text);
        if text == orig {
            return text;
        }
    }
}

/// NFC normalisation.
fn nfc(s: &str) -> String {
    let mut n = NormalizedString::from(s);
    n.nfc();
    n.get().to_string()
}

/// Windows-1252 for the bytes 0x80–0x9F (the five undefined ones map to themselves), as
/// `html.unescape` and ftfy's "sloppy-windows-1252" read them.
const CP1252_C1: [char; 32] = [
    '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}', '\u{2021}', '\u{2c6}', '\u{2030}', '\u{160}',
    '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}', '\u{8f}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}',
    '\u{2014}', '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}', '\u{178}',
];

fn fix_c1_controls(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{80}'..='\u{9f}' => CP1252_C1[c as usize - 0x80],
            _ => c,
        })
        .collect()
}

fn fix_latin_ligatures(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let rep = match c {
            'Ĳ' => "IJ",
            'ĳ' => "ij",
            'ŉ' => "ʼn",
            'Ǳ' => "DZ",
            'ǲ' => "Dz",
            'ǳ' => "dz",
            'Ǆ' => "DŽ",
            'ǅ' => "Dž",
            'ǆ' => "dž",
            'Ǉ' => "LJ",
            'ǈ' => "Lj",
            'ǉ' => "lj",
            'Ǌ' => "NJ",
            'ǋ' => "Nj",
            'ǌ' => "nj",
            'ﬀ' => "ff",
            'ﬁ' => "fi",
            'ﬂ' => "fl",
            'ﬃ' => "ffi",
            'ﬄ' => "ffl",
            'ﬅ' => "ſt",
            'ﬆ' => "st",
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push_str(rep);
    }
    out
}

/// U+3000 → space; the half/full-width forms block U+FF01–U+FFEF → their NFKC form.
fn fix_character_width(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ffef}' => {
                let mut n = NormalizedString::from(c.to_string());
                n.nfkc();
                out.push_str(n.get());
            }
            _ => out.push(c),
        }
    }
    out
}

fn uncurl_quotes(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            _ => c,
        })
        .collect()
}

fn fix_line_breaks(s: &str) -> String {
    s.replace("\r\n", "\n").replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

/// Removes `ESC [ (digits|;)* letter`.
fn remove_terminal_escapes(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\u{1b}' && chars.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == ';') {
                j += 1;
            }
            if j < chars.len() && chars[j].is_ascii_alphabetic() {
                i = j + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

fn remove_control_chars(s: &str) -> String {
    s.chars()
        .filter(|&c| {
            !matches!(c,
                '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}' | '\u{206a}'..='\u{206f}'
                | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
        })
        .collect()
}

fn entity(name: &str) -> Option<&'static str> {
    HTML5_ENTITIES
        .binary_search_by(|(k, _)| k.as_bytes().cmp(name.as_bytes()))
        .ok()
        .map(|i| HTML5_ENTITIES[i].1)
}

/// ftfy's entity fixer: `&#?[0-9A-Za-z]{1,24};` replaced when it names an HTML5 entity (with
/// the `;`), an all-caps spelling of a lower-case entity that `html.unescape` would not decode
/// (`&EACUTE;` → `É`), or a numeric reference that decodes completely.
fn ftfy_unescape_html(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'&' {
            i += 1;
            continue;
        }
        let numeric = b.get(i + 1) == Some(&b'#');
        let start = i + 1 + numeric as usize;
        let mut j = start;
        while j < b.len() && b[j].is_ascii_alphanumeric() {
            j += 1;
        }
        let run = j - start;
        if !(1..=24).contains(&run) || b.get(j) != Some(&b';') {
            i += 1;
            continue;
        }
        let whole = &s[i..=j];
        let name = &s[start..=j]; // with ';'
        let replacement: Option<String> = if numeric {
            let un = html_unescape(whole);
            (!un.contains(';')).then(|| un.into_owned())
        } else if let Some(v) = entity(name) {
            Some(v.to_string())
        } else {
            let lower = name.to_ascii_lowercase();
            let is_caps = name == name.to_ascii_uppercase();
            match entity(&lower) {
                Some(v) if is_caps && html_unescape(whole) == whole => Some(v.to_uppercase()),
                _ => None,
            }
        };
        if let Some(rep) = replacement {
            out.push_str(&s[last..i]);
            out.push_str(&rep);
            last = j + 1;
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out.push_str(&s[last..]);
    out
}

fn is_invalid_codepoint(n: u32) -> bool {
    matches!(n, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef) || (n & 0xfffe) == 0xfffe
}

fn numeric_charref(n: u64) -> String {
    match n {
        0 => "\u{fffd}".to_string(),
        0x0d => "\r".to_string(),
        0x80..=0x9f => CP1252_C1[n as usize - 0x80].to_string(),
        0xd800..=0xdfff => "\u{fffd}".to_string(),
        n if n > 0x10ffff => "\u{fffd}".to_string(),
        n if is_invalid_codepoint(n as u32) => String::new(),
        n => char::from_u32(n as u32).map(String::from).unwrap_or_else(|| "\u{fffd}".to_string()),
    }
}

/// Python's `html.unescape` (HTML5 rules): numeric references with the HTML5 replacements for
/// invalid code points, named references with or without `;` (the longest known prefix wins).
pub fn html_unescape(s: &str) -> Cow<'_, str> {
    if !s.contains('&') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match charref(after) {
            Some((consumed, rep)) => {
                out.push_str(&rep);
                rest = &after[consumed..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// One reference after '&': (bytes consumed, replacement), or None when nothing matches.
fn charref(after: &str) -> Option<(usize, String)> {
    let b = after.as_bytes();
    if b.first() == Some(&b'#') {
        let hex = matches!(b.get(1), Some(b'x') | Some(b'X'));
        let start = if hex { 2 } else { 1 };
        let mut j = start;
        while j < b.len() && (if hex { b[j].is_ascii_hexdigit() } else { b[j].is_ascii_digit() }) {
            j += 1;
        }
        if j == start {
            return None; // '#' cannot start a named reference either
        }
        let radix = if hex { 16 } else { 10 };
        let mut n: u64 = 0;
        for &d in &b[start..j] {
            let v = (d as char).to_digit(radix).unwrap_or(0) as u64;
            n = n.saturating_mul(radix as u64).saturating_add(v);
        }
        let consumed = if b.get(j) == Some(&b';') { j + 1 } else { j };
        return Some((consumed, numeric_charref(n)));
    }
    // [^\t\n\f <&#;]{1,32};?
    let mut end = 0;
    let mut count = 0;
    for (idx, c) in after.char_indices() {
        if count == 32 || matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        end = idx + c.len_utf8();
        count += 1;
    }
    if count == 0 {
        return None;
    }
    let consumed = if after[end..].starts_with(';') { end + 1 } else { end };
    let name = &after[..consumed];
    if let Some(v) = entity(name) {
        return Some((consumed, v.to_string()));
    }
    // the longest prefix of at least two characters (excluding the last) that is an entity
    let bounds: Vec<usize> = name.char_indices().map(|(i, _)| i).collect();
    for x in (2..bounds.len()).rev() {
        if let Some(v) = entity(&name[..bounds[x]]) {
            return Some((consumed, format!("{v}{}", &name[bounds[x]..])));
        }
    }
    Some((consumed, format!("&{name}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_table_is_sorted_for_binary_search() {
        assert!(HTML5_ENTITIES.windows(2).all(|w| w[0].0.as_bytes() < w[1].0.as_bytes()));
        assert_eq!(entity("amp;"), Some("&"));
        assert_eq!(entity("amp"), Some("&"));
        assert_eq!(entity("nosuch;"), None);
    }
}
