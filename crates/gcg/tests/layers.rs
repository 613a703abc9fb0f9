//! The library's layers point one way (DESIGN.md, "Layout"): a top-level module uses only
//! modules of lower layers. This test reads the sources (comments and `#[cfg(test)]` blocks
//! aside) and fails on an upward or sideways `crate::…` path, or on a module missing from the
//! table below (a new module takes its place here and in DESIGN.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top.
const LAYERS: &[&[&str]] = &[
    &["util", "rng"],
    &["weights", "text", "video"],
    &["store", "synth", "nn"],
    &["data", "models"],
    &["grounding", "eval"],
    &["features", "model"],
    &["train"],
    &["run"],
    &["demo"],
    &["ask"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments and its trailing `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names through `crate::`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c}`
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            // `crate::name!` is a macro exported at the crate root, not a module.
            let is_macro = rest[name.len()..].starts_with('!');
            if !name.is_empty() && !is_macro {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn layers_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut uses: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for used in crate_paths(&code(&text)) {
            if used != module {
                uses.entry(module.clone())
                    .or_default()
                    .entry(used)
                    .or_insert_with(|| rel.to_path_buf());
            }
        }
        uses.entry(module).or_default();
    }
    let mut problems = Vec::new();
    for (module, used) in &uses {
        let Some(lm) = layer_of(module) else {
            problems.push(format!("module `{module}` has no layer (add it to LAYERS here and to DESIGN.md)"));
            continue;
        };
        for (u, file) in used {
            match layer_of(u) {
                None => problems.push(format!("{}: `crate::{u}` names a module without a layer", file.display())),
                Some(lu) if lu >= lm => problems.push(format!(
                    "{}: `{module}` (layer {lm}) uses `{u}` (layer {lu}): layers point downwards only",
                    file.display()
                )),
                Some(_) => {}
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The check sees the real graph (not an empty one).
    assert!(uses["run"].contains_key("model") && uses["model"].contains_key("grounding"));
}

#[test]
fn the_path_scanner_reads_groups_and_skips_comments() {
    let c = code("use crate::{nn::Linear, weights};\n// crate::demo\nlet x = crate::rng::SeededRng::new(0); // crate::run\ncrate::choice_names!(X, \"x\", { A => \"a\" });\n#[cfg(test)]\nmod tests {\n use crate::train;\n}");
    let got: Vec<String> = crate_paths(&c).into_iter().collect();
    assert_eq!(got, ["nn", "rng", "weights"]);
}
