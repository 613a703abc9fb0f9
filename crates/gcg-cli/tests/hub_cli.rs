//! Weights by Hugging Face model id, resolved through a fake HF cache laid out as hf-hub and
//! huggingface-cli lay it out (`models--Org--Name/{refs/main, snapshots/<hash>/…, blobs/…}`, the
//! snapshot's files links into blobs/), with the tiny parity fixtures as its models. The network is
//! never reached: either everything is cached, or HF_HUB_OFFLINE=1, or HF_ENDPOINT points at a
//! closed local port.

use anyhow::Result;
use candle_core::{Device, Tensor};
use gcg::store::Store;
use gcg::SeededRng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity/tiny-s0")
        .join(kind)
}

/// Every file under `dir`, relative (`flan-t5/config.json`).
fn files_under(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir.join(rel)).unwrap() {
        let e = e.unwrap();
        let r = rel.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            files_under(dir, &r, out);
        } else {
            out.push(r);
        }
    }
}

/// Put `files` (relative path → source file) in the cache as model `id` at commit `hash`: each
/// file a blob, linked from the snapshot, and `refs/main` holding the hash (no newline, as
/// huggingface_hub writes it). Returns the snapshot directory.
fn cache_repo(cache: &Path, id: &str, hash: &str, files: &[(PathBuf, PathBuf)]) -> PathBuf {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (i, (rel, src)) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("{i:064x}"));
        std::fs::copy(src, &blob).unwrap();
        let link = snap.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&blob, &link).unwrap();
    }
    std::fs::write(repo.join("refs").join("main"), hash).unwrap();
    snap
}

/// A fixture directory's files, except those whose relative path starts with one of the strings
/// of `skip`.
fn fixture_files(kind: &str, skip: &[&str]) -> Vec<(PathBuf, PathBuf)> {
    let dir = fixture(kind);
    let mut rel = Vec::new();
    files_under(&dir, Path::new(""), &mut rel);
    rel.sort();
    rel.into_iter()
        .filter(|r| !skip.iter().any(|s| r.to_str().unwrap().starts_with(s)))
        .map(|r| (r.clone(), dir.join(&r)))
        .collect()
}

const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

/// `gcg` with a clean Hugging Face environment: the cache at `cache` (HF_HUB_CACHE), no proxies,
/// no token, the Hub at a closed local port (so an attempted download fails at once).
fn gcg(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gcg"));
    for v in [
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
        "XDG_CACHE_HOME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        c.env_remove(v);
    }
    c.env("HF_HUB_CACHE", cache).env("HF_ENDPOINT", "http://127.0.0.1:9");
    c
}

fn check_weights(mut c: Command, args: &[&str]) -> Output {
    c.arg("check-weights").args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn check_weights_by_name_reads_the_cached_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let snap = cache_repo(&cache, "Org/Name", HASH, &fixture_files("hf", &[]));

    let local = json(&check_weights(gcg(&cache), &["--weights", fixture("hf").to_str().unwrap()]));
    // Cached whole: no network needed (the Hub's address is a closed port), offline or not.
    for offline in [false, true] {
        let mut c = gcg(&cache);
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        }
        let v = json(&check_weights(c, &["--weights", "Org/Name"]));
        assert_eq!(v["weights_dir"].as_str(), Some(snap.to_str().unwrap()), "{v}");
        assert_eq!(v["weights"].as_str(), Some("Org/Name"));
        for k in ["tensors", "trainable_params", "ok", "config"] {
            assert_eq!(v[k], local[k], "{k}");
        }
    }

    // $HF_HOME/hub when HF_HUB_CACHE is unset, ~/.cache/huggingface/hub when HF_HOME is unset too.
    let home = tmp.path().join("hfhome");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::symlink(&cache, home.join("hub")).unwrap();
    let mut c = gcg(&cache);
    c.env_remove("HF_HUB_CACHE").env("HF_HOME", &home);
    let v = json(&check_weights(c, &["--weights", "Org/Name"]));
    assert_eq!(
        v["weights_dir"].as_str(),
        Some(home.join("hub").join(snap.strip_prefix(&cache).unwrap()).to_str().unwrap())
    );
    let user = tmp.path().join("user");
    std::fs::create_dir_all(user.join(".cache/huggingface")).unwrap();
    std::os::unix::fs::symlink(&cache, user.join(".cache/huggingface/hub")).unwrap();
    let mut c = gcg(&cache);
    c.env_remove("HF_HUB_CACHE").env("HOME", &user);
    let v = json(&check_weights(c, &["--weights", "Org/Name"]));
    assert!(v["weights_dir"].as_str().unwrap().starts_with(user.to_str().unwrap()), "{v}");

    // HF_HUB_CACHE wins over HF_HOME.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let mut c = gcg(&cache);
    c.env("HF_HOME", &other).env("HF_HUB_OFFLINE", "1");
    json(&check_weights(c, &["--weights", "Org/Name"]));
}

#[test]
fn a_missing_file_is_named_with_the_id_the_cache_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let shard = "model-00002-of-00002.safetensors";
    let snap = cache_repo(&cache, "Org/Name", HASH, &fixture_files("hf", &[shard]));

    // Offline: not downloaded, the message says what is missing, where it looked, what to do.
    let mut c = gcg(&cache);
    c.env("HF_HUB_OFFLINE", "1");
    let o = check_weights(c, &["--weights", "Org/Name"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in [
        "Org/Name",
        shard,
        cache.to_str().unwrap(),
        snap.to_str().unwrap(),
        "HF_HUB_OFFLINE",
        "`huggingface-cli download Org/Name`",
        "HF_HUB_CACHE",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    assert!(!err.contains("model-00001-of-00002"), "only the missing shard is named: {err}");

    // Online, the Hub unreachable: the download is tried and its failure named with the file.
    let o = check_weights(gcg(&cache), &["--weights", "Org/Name"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in [
        "Org/Name",
        shard,
        "downloading it failed",
        cache.to_str().unwrap(),
        "`huggingface-cli download Org/Name`",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }

    // A model that is not cached at all.
    let mut c = gcg(&cache);
    c.env("HF_HUB_OFFLINE", "1");
    let o = check_weights(c, &["--weights", "Org/Absent"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in [
        "Org/Absent",
        "models--Org--Absent/refs/main does not exist",
        "config.json",
        "qformer_t5.pth",
        "`huggingface-cli download Org/Absent`",
        "reading `Org/Absent` as a Hugging Face model id (no file or directory has that name)",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    // Online, the Hub unreachable: its file list could not be had.
    let o = check_weights(gcg(&cache), &["--weights", "Org/Absent"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in [
        "Org/Absent",
        "the Hub could not list its files",
        "models--Org--Absent/refs/main does not exist",
        "`huggingface-cli download Org/Absent`",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
}

#[test]
fn a_local_path_wins_and_a_non_id_is_the_usual_missing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    // The cached Org/Name lacks a shard; a directory Org/Name in the working directory is whole.
    cache_repo(
        &cache,
        "Org/Name",
        HASH,
        &fixture_files("hf", &["model-00002-of-00002.safetensors"]),
    );
    let work = tmp.path().join("work");
    let local = work.join("Org/Name");
    std::fs::create_dir_all(&local).unwrap();
    for (rel, src) in fixture_files("hf", &[]) {
        std::fs::copy(src, local.join(rel)).unwrap();
    }
    let mut c = gcg(&cache);
    c.current_dir(&work).env("HF_HUB_OFFLINE", "1");
    let v = json(&check_weights(c, &["--weights", "Org/Name"]));
    assert_eq!(v["weights_dir"].as_str(), Some("Org/Name"), "{v}");

    // Neither a path nor an id: the error of a missing directory, no Hub involved.
    for spec in ["./missing", "no/such/dir", "missing"] {
        let o = check_weights(gcg(&cache), &["--weights", spec]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("weights directory {spec} does not exist")) && !err.contains("Hugging Face cache"),
            "{err}"
        );
    }
}

#[test]
fn a_gcg_release_by_name_with_its_flan_t5_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    // The release with its flan-t5/ folder inside.
    cache_repo(&cache, "Org/Release", HASH, &fixture_files("gcg", &[]));
    let mut c = gcg(&cache);
    c.env("HF_HUB_OFFLINE", "1");
    let v = json(&check_weights(c, &["--weights", "Org/Release", "--preset", "tiny"]));
    assert_eq!(v["t5_dir"], serde_json::Value::Null, "{v}");
    let whole = v["tensors"].as_u64().unwrap();

    // The release as published (no flan-t5/), its Flan-T5 another model of the cache.
    let bare = fixture_files("gcg", &["flan-t5"]);
    cache_repo(&cache, "Org/Bare", HASH, &bare);
    let t5: Vec<(PathBuf, PathBuf)> = fixture_files("gcg", &[])
        .into_iter()
        .filter_map(|(r, s)| r.strip_prefix("flan-t5").ok().map(|r| (r.to_path_buf(), s.clone())))
        .collect();
    assert_eq!(t5.len(), 2, "{t5:?}");
    let t5_snap = cache_repo(&cache, "Org/Flan", "fedcba9876543210fedcba9876543210fedcba98", &t5);
    let mut c = gcg(&cache);
    c.env("HF_HUB_OFFLINE", "1");
    let v = json(&check_weights(
        c,
        &["--weights", "Org/Bare", "--t5", "Org/Flan", "--preset", "tiny"],
    ));
    assert_eq!(v["t5_dir"].as_str(), Some(t5_snap.to_str().unwrap()), "{v}");
    assert_eq!(v["tensors"].as_u64(), Some(whole));

    // Without --t5 the official google/flan-t5-xl is looked for, and named when missing.
    let mut c = gcg(&cache);
    c.env("HF_HUB_OFFLINE", "1");
    let o = check_weights(c, &["--weights", "Org/Bare", "--preset", "tiny"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in [
        "no flan-t5/ folder",
        "google/flan-t5-xl",
        "models--google--flan-t5-xl/refs/main does not exist",
        "`huggingface-cli download google/flan-t5-xl`",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }

    // A release missing its ViT trunk: named when the ViT is checked, not needed with --no-vit.
    let no_vit = fixture_files("gcg", &["eva_vit_g.pth"]);
    cache_repo(&cache, "Org/NoVit", HASH, &no_vit);
    let mut c = gcg(&cache);
    c.env("HF_HUB_OFFLINE", "1");
    let o = check_weights(c, &["--weights", "Org/NoVit", "--preset", "tiny"]);
    let err = stderr(&o);
    assert!(err.contains("Org/NoVit: eva_vit_g.pth is not in"), "{err}");
    let mut c = gcg(&cache);
    c.env("HF_HUB_OFFLINE", "1");
    json(&check_weights(c, &["--weights", "Org/NoVit", "--preset", "tiny", "--no-vit"]));
}

/// Three pre-decoded videos (4 frames of 42×42, the tiny ViT's size).
fn videos(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..3u64 {
        let mut rng = SeededRng::new(7 + i);
        let px = Tensor::from_vec(rng.normal_vec(4 * 3 * 42 * 42, 0.0, 1.0), (4, 3, 42, 42), &Device::Cpu).unwrap();
        let map: HashMap<String, Tensor> = [("pixel_values".to_string(), px)].into();
        candle_core::safetensors::save(&map, dir.join(format!("v{i}.safetensors"))).unwrap();
    }
}

#[test]
fn features_take_the_vit_and_the_clip_branch_by_name() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cache = tmp.path().join("hub");
    cache_repo(&cache, "Org/Name", HASH, &fixture_files("hf", &[]));
    // The release without its flan-t5/ (the CLIP branch does not need it).
    cache_repo(&cache, "Org/Release", HASH, &fixture_files("gcg", &["flan-t5"]));
    let vids = tmp.path().join("videos");
    videos(&vids);
    let features = |weights: &Path, clip: &Path, store: &Path| {
        let mut c = gcg(&cache);
        c.env("HF_HUB_OFFLINE", "1")
            .args(["features", "--videos"])
            .arg(&vids)
            .arg("--store")
            .arg(store);
        c.arg("--weights").arg(weights).arg("--clip").arg(clip);
        c.args(["--preset", "tiny", "--num-frames", "4", "--jobs", "1"]);
        c.output().unwrap()
    };
    let (by_path, by_name) = (tmp.path().join("s-path"), tmp.path().join("s-name"));
    for (w, c, s) in [
        (fixture("hf"), fixture("gcg"), &by_path),
        (PathBuf::from("Org/Name"), PathBuf::from("Org/Release"), &by_name),
    ] {
        let o = features(&w, &c, s);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // The ViT of the release's eva_vit_g.pth by name, too.
    let by_release = tmp.path().join("s-release");
    let o = features(Path::new("Org/Release"), Path::new("Org/Release"), &by_release);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b, r) = (
        Store::open(&by_path)?.snapshot(),
        Store::open(&by_name)?.snapshot(),
        Store::open(&by_release)?.snapshot(),
    );
    let ids: Vec<String> = a.index().videos.keys().cloned().collect();
    assert_eq!(ids.len(), 3);
    for id in &ids {
        let fa: Vec<u16> = a.features(id)?.as_f16()?.iter().map(|x| x.to_bits()).collect();
        let fb: Vec<u16> = b.features(id)?.as_f16()?.iter().map(|x| x.to_bits()).collect();
        assert_eq!(fa, fb, "{id}: features by path and by name differ");
        assert_eq!(r.features(id)?.as_f16()?.len(), fa.len());
    }

    // The CLIP branch missing from the named model: every missing file named.
    cache_repo(&cache, "Org/NoClip", HASH, &fixture_files("gcg", &["eva_clip_"]));
    let o = features(Path::new("Org/Name"), Path::new("Org/NoClip"), &tmp.path().join("s-x"));
    let err = stderr(&o);
    assert!(!o.status.success());
    for want in [
        "Org/NoClip",
        "eva_clip_last_vision_block.pth",
        "eva_clip_last_vision_norm.pth",
        "eva_clip_last_vision_head.pth",
        "eva_clip_text_model.pth",
        "are not in",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    Ok(())
}

/// A stand-in for the Hub on a local port, serving what hf-hub's blocking client asks:
/// `GET /api/models/{id}/revision/main` (the file list) and `GET /{id}/resolve/main/{file}` with a
/// byte range (ETag, X-Repo-Commit, Content-Range), one request per connection. Every request
/// path is logged.
struct FakeHub {
    endpoint: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeHub {
    /// `repos`: model id → (commit, files as relative path → source file).
    fn start(repos: Vec<(&str, &str, Vec<(PathBuf, PathBuf)>)>) -> FakeHub {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let served: HashMap<String, (String, Vec<(String, Vec<u8>)>)> = repos
            .into_iter()
            .map(|(id, commit, files)| {
                let files = files
                    .into_iter()
                    .map(|(rel, src)| (rel.to_str().unwrap().to_string(), std::fs::read(src).unwrap()))
                    .collect();
                (id.to_string(), (commit.to_string(), files))
            })
            .collect();
        let requests = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap() == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("range") {
                            range = Some(v.trim().trim_start_matches("bytes=").to_string());
                        }
                    }
                }
                requests.lock().unwrap().push(path.clone());
                let (status, headers, body) = Self::answer(&served, &path, range.as_deref());
                let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body));
            }
        });
        FakeHub { endpoint, log }
    }

    fn answer(
        served: &HashMap<String, (String, Vec<(String, Vec<u8>)>)>,
        path: &str,
        range: Option<&str>,
    ) -> (&'static str, Vec<(String, String)>, Vec<u8>) {
        let not_found = (
            "404 Not Found",
            vec![("X-Error-Code".to_string(), "EntryNotFound".to_string())],
            Vec::new(),
        );
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let Some((id, _)) = rest.split_once("/revision/") else {
                return not_found;
            };
            let Some((commit, files)) = served.get(id) else { return not_found };
            let siblings: Vec<serde_json::Value> = files.iter().map(|(f, _)| serde_json::json!({ "rfilename": f })).collect();
            let body = serde_json::json!({ "siblings": siblings, "sha": commit }).to_string().into_bytes();
            return ("200 OK", vec![("Content-Type".to_string(), "application/json".to_string())], body);
        }
        let Some((id, file)) = path.trim_start_matches('/').split_once("/resolve/main/") else {
            return not_found;
        };
        let Some((commit, files)) = served.get(id) else { return not_found };
        let Some(i) = files.iter().position(|(f, _)| f == file) else {
            return not_found;
        };
        let bytes = &files[i].1;
        let (start, end) = match range.and_then(|r| r.split_once('-')) {
            Some((a, b)) => {
                let a: usize = a.parse().unwrap();
                (
                    a,
                    if b.is_empty() {
                        bytes.len() - 1
                    } else {
                        b.parse::<usize>().unwrap()
                    },
                )
            }
            None => (0, bytes.len() - 1),
        };
        let headers = vec![
            ("ETag".to_string(), format!("\"{commit}{i:024x}\"")),
            ("X-Repo-Commit".to_string(), commit.clone()),
            ("Content-Range".to_string(), format!("bytes {start}-{end}/{}", bytes.len())),
        ];
        ("206 Partial Content", headers, bytes[start..=end].to_vec())
    }

    /// The files asked for so far, sorted, each once.
    fn downloads(&self) -> Vec<String> {
        let log = self.log.lock().unwrap();
        let mut seen: Vec<String> = log
            .iter()
            .filter_map(|p| p.split_once("/resolve/main/").map(|(_, f)| f.to_string()))
            .collect();
        seen.sort();
        seen.dedup();
        seen
    }
}

#[test]
fn missing_files_are_downloaded_into_the_cache_and_only_those_the_loader_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let mut files = fixture_files("hf", &[]);
    // A file of the repository that checking the weights does not read.
    files.push((PathBuf::from("unused/extra.bin"), fixture("hf").join("config.json")));
    let hub = FakeHub::start(vec![("Org/Name", HASH, files)]);
    let mut c = gcg(&cache);
    c.env("HF_ENDPOINT", &hub.endpoint);
    let v = json(&check_weights(c, &["--weights", "Org/Name"]));
    let snap = cache.join("models--Org--Name/snapshots").join(HASH);
    assert_eq!(v["weights_dir"].as_str(), Some(snap.to_str().unwrap()), "{v}");
    assert_eq!(
        hub.downloads(),
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
    assert_eq!(std::fs::read_to_string(cache.join("models--Org--Name/refs/main")).unwrap(), HASH);
    // Now cached: offline works.
    let mut c = gcg(&cache);
    c.env("HF_HUB_OFFLINE", "1");
    json(&check_weights(c, &["--weights", "Org/Name"]));

    // The cache holds an older commit without shard 2; the Hub is at a newer one: the snapshot
    // used is the new commit's, whole.
    let new = "1111111111111111111111111111111111111111";
    let cache2 = tmp.path().join("hub2");
    cache_repo(
        &cache2,
        "Org/Name",
        HASH,
        &fixture_files("hf", &["model-00002-of-00002.safetensors"]),
    );
    let hub2 = FakeHub::start(vec![("Org/Name", new, fixture_files("hf", &[]))]);
    let mut c = gcg(&cache2);
    c.env("HF_ENDPOINT", &hub2.endpoint);
    let v = json(&check_weights(c, &["--weights", "Org/Name"]));
    let snap = cache2.join("models--Org--Name/snapshots").join(new);
    assert_eq!(v["weights_dir"].as_str(), Some(snap.to_str().unwrap()), "{v}");
    for (rel, _) in fixture_files("hf", &[]) {
        assert!(snap.join(&rel).is_file(), "{rel:?} not in the new snapshot");
    }

    // A file the Hub does not have: its name, the id and the Hub's answer.
    let hub3 = FakeHub::start(vec![("Org/Release", HASH, fixture_files("gcg", &["llm_proj_t5.pth"]))]);
    let mut c = gcg(&tmp.path().join("hub3"));
    c.env("HF_ENDPOINT", &hub3.endpoint);
    let o = check_weights(c, &["--weights", "Org/Release", "--preset", "tiny"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in ["Org/Release", "llm_proj_t5.pth", "downloading it failed", "404"] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
}
