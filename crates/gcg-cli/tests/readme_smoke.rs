//! The README's smoke run of the whole recipe (synth → features → labels → train, which predicts
//! and scores its test split), run as the README prints it: its shell block, with `gcg` this
//! build's binary, in a scratch folder that has the repository's `tests/` (the tokenizers the run
//! config names).

use std::path::Path;
use std::process::Command;

#[test]
fn the_readmes_smoke_run_works_as_printed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let at = readme
        .find("**A smoke run of the whole recipe")
        .expect("the README's smoke run paragraph");
    let start = at + readme[at..].find("```sh\n").expect("its shell block") + "```sh\n".len();
    let block = &readme[start..start + readme[start..].find("\n```\n").expect("the block's end")];
    let tmp = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.join("tests").canonicalize().unwrap(), tmp.path().join("tests")).unwrap();
    // `gcg` is a shell function calling this build's binary.
    let script = format!("set -eu\ngcg() {{ \"{}\" \"$@\"; }}\n{block}\n", env!("CARGO_BIN_EXE_gcg"));
    let o = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "the README's smoke run failed:\n{script}\n{out}\n{err}");
    // The run trained, predicted its test split and scored it with both benchmarks' metrics.
    let run = tmp.path().join("smoke/runs/run");
    assert!(run.join("checkpoints/last").is_dir(), "{err}");
    let predictions = std::fs::read_to_string(run.join("predictions-test.jsonl")).unwrap();
    let annotated = std::fs::read_to_string(tmp.path().join("smoke/world/test.csv"))
        .unwrap()
        .lines()
        .count()
        - 1;
    assert_eq!(predictions.lines().count(), annotated);
    assert!(out.contains("overall") && out.contains("Acc@GQA"), "{out}");
    // No lock file is left beside the outputs (the store's index.lock is part of its format).
    fn locks(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                locks(&p, out);
            } else if p.extension().is_some_and(|x| x == "lock") && !p.ends_with("store/index.lock") {
                out.push(p.display().to_string());
            }
        }
    }
    let mut left = Vec::new();
    locks(&tmp.path().join("smoke"), &mut left);
    assert!(left.is_empty(), "{left:?}");
}
