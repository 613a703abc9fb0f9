//! Weights by name: wherever a weights directory is asked for, a Hugging Face model id
//! (`Salesforce/instructblip-flan-t5-xl`, `google/flan-t5-xl`, the GCG release `WHB139426/GCG`)
//! works too. A name is resolved to a snapshot directory of the standard HF cache, the one
//! `huggingface-cli download` and transformers fill:
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub)
//! └── models--{org}--{name}/
//!     ├── refs/main                  the commit hash of the snapshot in use
//!     ├── snapshots/{hash}/...       the repository's files (links into blobs/)
//!     └── blobs/
//! ```
//!
//! Only the files the loader will read are asked for (see [`Need`]): those missing from the cached
//! snapshot are downloaded through `hf-hub`'s blocking client, unless `HF_HUB_OFFLINE` is set, in
//! which case the error names the model id, the missing files, the cache directory looked in and
//! the command that would fetch them. A path that exists always wins over a name, and a string
//! that is neither an existing path nor a plausible `org/name` id is returned unchanged, so the
//! loader reports it as a missing directory, as it does for any path.

use super::checkpoints::{is_gcg_release, is_hf_snapshot};
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo};
use std::cell::OnceCell;
use std::path::{Path, PathBuf};

/// The Flan-T5 the official GCG code loads (`T5ForConditionalGeneration.from_pretrained`), used for a
/// GCG release that carries no `flan-t5/` folder when no `t5` is given.
pub const DEFAULT_FLAN_T5: &str = "google/flan-t5-xl";

/// The GCG release files a checkpoint needs besides the ViT (`weights/checkpoints.rs` `GcgRelease`).
const RELEASE_FILES: [&str; 3] = ["qformer_t5.pth", "query_tokens_t5.pth", "llm_proj_t5.pth"];
/// The GCG CLIP branch files (`models/clip_branch.rs` `load_gcg_clip_files`).
const CLIP_FILES: [&str; 4] = [
    "eva_clip_last_vision_block.pth",
    "eva_clip_last_vision_norm.pth",
    "eva_clip_last_vision_head.pth",
    "eva_clip_text_model.pth",
];
/// The CLIP BPE merges `gcg labels` reads from the CLIP directory by default (fetched when the
/// repository has it).
const CLIP_BPE: &str = "bpe_simple_vocab_16e6.txt.gz";
const VIT_TRUNK: &str = "eva_vit_g.pth";
const VIT_POST_LN: &str = "eva_vit_post_layernorm.pth";

/// Is `s` a plausible Hugging Face model id `org/name`? Both parts are non-empty and made of
/// ASCII letters, digits, `-`, `_` and `.`, neither starts or ends with `-` or `.`, `--` and `..`
/// do not occur, and the whole is at most 96 characters (the Hub's own rules for repository
/// names). Paths such as `/abs/dir`, `./dir`, `../dir`, `a/b/c` or `dir` are not ids.
pub fn is_model_id(s: &str) -> bool {
    model_id_problem(s).is_none()
}

/// Why `s` is not a model id (None when it is one).
pub fn model_id_problem(s: &str) -> Option<String> {
    if s.len() > 96 {
        return Some(format!("it is {} characters long (at most 96)", s.len()));
    }
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() != 2 {
        return Some("a model id has the form org/name (exactly one '/')".to_string());
    }
    for part in parts {
        if part.is_empty() {
            return Some("the organisation and the name must both be non-empty".to_string());
        }
        if let Some(c) = part.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
            return Some(format!("'{c}' is not allowed (letters, digits, '-', '_', '.')"));
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Some(format!("'{part}' starts or ends with '-' or '.'"));
        }
        if part.contains("--") || part.contains("..") {
            return Some(format!("'{part}' contains '--' or '..'"));
        }
    }
    None
}

/// The model id a weights location names: `spec` when it is no existing path and is a plausible
/// `org/name` id.
pub fn as_model_id(spec: &Path) -> Option<&str> {
    if spec.exists() {
        return None;
    }
    spec.to_str().filter(|s| is_model_id(s))
}

/// Is `HF_HUB_OFFLINE` set to a true value (1, on, yes, true)?
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
}

fn env_dir(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The Hugging Face home: `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else
/// `~/.cache/huggingface`.
fn hf_home() -> Result<PathBuf> {
    if let Some(h) = env_dir("HF_HOME") {
        return Ok(h);
    }
    if let Some(x) = env_dir("XDG_CACHE_HOME") {
        return Ok(x.join("huggingface"));
    }
    let home = env_dir("HOME")
        .ok_or_else(|| anyhow!("cannot locate the Hugging Face cache: none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HOME is set"))?;
    Ok(home.join(".cache").join("huggingface"))
}

/// The hub cache directory: `$HF_HUB_CACHE`, else `<HF home>/hub` (see [`hf_home`]).
pub fn hub_cache_dir() -> Result<PathBuf> {
    match env_dir("HF_HUB_CACHE") {
        Some(d) => Ok(d),
        None => Ok(hf_home()?.join("hub")),
    }
}

/// What a consumer reads from a weights location, so that only those files are fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The frozen ViT (`gcg features --weights`): an HF snapshot (config.json + safetensors) or
    /// the release's `eva_vit_g.pth` (+ `eva_vit_post_layernorm.pth` when the repository has it).
    Vit,
    /// The GCG CLIP branch (`--clip`): the four `eva_clip_*.pth` files, and the CLIP BPE merges
    /// when the repository has them.
    ClipBranch,
    /// The text tokenizers: `tokenizer.json` (T5) and `qformer_tokenizer/tokenizer.json`.
    Tokenizers,
    /// A Flan-T5 snapshot: config.json + safetensors (sharded with an index, or one file).
    T5,
}

/// Where a checkpoint's files are, names resolved: the directory [`open_any`] opens and the
/// Flan-T5 snapshot of a GCG release (None: `<dir>/flan-t5`).
///
/// [`open_any`]: crate::models::checkpoint::open_any
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointDirs {
    pub dir: PathBuf,
    pub t5: Option<PathBuf>,
}

/// Resolve a weights location that may be a model id to a local directory holding what `need`
/// reads (downloading the missing files when the network is allowed). An existing path, or a
/// string that is not a plausible id, comes back unchanged.
pub fn locate(spec: &Path, need: Need) -> Result<PathBuf> {
    let Some(id) = as_model_id(spec) else {
        return Ok(spec.to_path_buf());
    };
    locate_id(id, need).with_context(|| as_id_note(id))
}

/// The context of every error about a location read as a model id (it may be a mistyped path).
fn as_id_note(id: &str) -> String {
    format!("reading `{id}` as a Hugging Face model id (no file or directory has that name)")
}

fn locate_id(id: &str, need: Need) -> Result<PathBuf> {
    let repo = HubRepo::open(id)?;
    let files = match need {
        Need::Vit => {
            if repo.has_hf_weights()? {
                repo.hf_weight_files("")?
            } else if repo.has(VIT_TRUNK)? {
                let mut f = vec![VIT_TRUNK.to_string()];
                if repo.has(VIT_POST_LN)? {
                    f.push(VIT_POST_LN.to_string());
                }
                f
            } else {
                return Err(repo.kind_error(&["config.json + model*.safetensors (an HF snapshot)", VIT_TRUNK]));
            }
        }
        Need::ClipBranch => {
            let mut f: Vec<String> = CLIP_FILES.iter().map(|s| s.to_string()).collect();
            if repo.has(CLIP_BPE)? {
                f.push(CLIP_BPE.to_string());
            }
            f
        }
        Need::Tokenizers => vec!["tokenizer.json".to_string(), "qformer_tokenizer/tokenizer.json".to_string()],
        Need::T5 => {
            if !repo.has_hf_weights()? {
                return Err(repo.kind_error(&["config.json + model*.safetensors (a Flan-T5 snapshot)"]));
            }
            repo.hf_weight_files("")?
        }
    };
    repo.fetch_all(&files)
}

/// Resolve the location of a whole checkpoint (`[weights] pretrained`, `check-weights --weights`):
/// an HF InstructBLIP snapshot or a GCG release, each by path or by model id, and the Flan-T5 of a
/// release (`t5`, by path or id; default `flan-t5/` inside the release, else
/// [`DEFAULT_FLAN_T5`]). `with_vit`: a release's ViT trunk (`eva_vit_g.pth`) is needed too
/// (without it the release's post-LayerNorm file serves a model that reads cached features).
pub fn locate_checkpoint(spec: &Path, t5: Option<&Path>, with_vit: bool) -> Result<CheckpointDirs> {
    let t5 = t5.map(|t| locate(t, Need::T5)).transpose()?;
    let Some(id) = as_model_id(spec) else {
        // A local directory: a release without flan-t5/ and no `t5` takes the official Flan-T5.
        let dir = spec.to_path_buf();
        if t5.is_none() && !is_hf_snapshot(&dir) && is_gcg_release(&dir) && !dir.join("flan-t5").exists() {
            let t5 = locate(Path::new(DEFAULT_FLAN_T5), Need::T5).with_context(|| {
                format!(
                    "the GCG release {} has no flan-t5/ folder and no `t5` was given, so its Flan-T5 is {DEFAULT_FLAN_T5}",
                    dir.display()
                )
            })?;
            return Ok(CheckpointDirs { dir, t5: Some(t5) });
        }
        return Ok(CheckpointDirs { dir, t5 });
    };
    locate_checkpoint_id(id, t5, with_vit).with_context(|| as_id_note(id))
}

fn locate_checkpoint_id(id: &str, t5: Option<PathBuf>, with_vit: bool) -> Result<CheckpointDirs> {
    let repo = HubRepo::open(id)?;
    if repo.has_hf_weights()? {
        let dir = repo.fetch_all(&repo.hf_weight_files("")?)?;
        return Ok(CheckpointDirs { dir, t5 });
    }
    if !repo.has("qformer_t5.pth")? {
        return Err(repo.kind_error(&[
            "config.json + model*.safetensors (an HF snapshot)",
            "qformer_t5.pth (the GCG release)",
        ]));
    }
    let mut files: Vec<String> = RELEASE_FILES.iter().map(|s| s.to_string()).collect();
    let has_ln = repo.has(VIT_POST_LN)?;
    if has_ln {
        files.push(VIT_POST_LN.to_string());
    }
    if with_vit || !has_ln {
        files.push(VIT_TRUNK.to_string());
    }
    let inner_t5 = t5.is_none() && repo.has("flan-t5/config.json")?;
    if inner_t5 {
        files.extend(repo.hf_weight_files("flan-t5/")?);
    }
    let dir = repo.fetch_all(&files)?;
    let t5 = match t5 {
        Some(t) => Some(t),
        None if inner_t5 => None,
        None => Some(locate(Path::new(DEFAULT_FLAN_T5), Need::T5).with_context(|| {
            format!("the GCG release {id} has no flan-t5/ folder and no `t5` was given, so its Flan-T5 is {DEFAULT_FLAN_T5}")
        })?),
    };
    Ok(CheckpointDirs { dir, t5 })
}

/// One model repository seen through the cache (and, unless offline, the Hub).
struct HubRepo {
    id: String,
    cache_dir: PathBuf,
    cache: Cache,
    offline: bool,
    /// The repository's file names on the Hub (asked once, only when the cache cannot answer).
    listing: OnceCell<Vec<String>>,
    api: OnceCell<Api>,
}

impl HubRepo {
    fn open(id: &str) -> Result<Self> {
        let cache_dir = hub_cache_dir()?;
        Ok(Self {
            id: id.to_string(),
            cache: Cache::new(cache_dir.clone()),
            cache_dir,
            offline: offline(),
            listing: OnceCell::new(),
            api: OnceCell::new(),
        })
    }

    fn repo(&self) -> Repo {
        Repo::model(self.id.clone())
    }

    /// `models--{org}--{name}` in the cache.
    fn repo_dir(&self) -> PathBuf {
        self.cache_dir.join(self.repo().folder_name())
    }

    fn ref_path(&self) -> PathBuf {
        self.repo_dir().join("refs").join("main")
    }

    /// The snapshot `refs/main` points at (None: not cached).
    fn snapshot_dir(&self) -> Option<PathBuf> {
        let hash = std::fs::read_to_string(self.ref_path()).ok()?;
        let hash = hash.trim();
        (!hash.is_empty()).then(|| self.cache.repo(self.repo()).pointer_path(hash))
    }

    /// Is `file` in the cached snapshot (a link whose blob is there)?
    fn cached(&self, file: &str) -> bool {
        self.snapshot_dir().is_some_and(|d| d.join(file).is_file())
    }

    /// Does the repository have `file`: in the cache, or (online) on the Hub.
    fn has(&self, file: &str) -> Result<bool> {
        if self.cached(file) {
            return Ok(true);
        }
        if self.offline {
            return Ok(false);
        }
        Ok(self.listing()?.iter().any(|f| f == file))
    }

    fn has_hf_weights(&self) -> Result<bool> {
        Ok(self.has("config.json")? && (self.has("model.safetensors.index.json")? || self.has("model.safetensors")?))
    }

    /// The files of an HF snapshot under `prefix` (`""` or `flan-t5/`): config.json and the
    /// safetensors, the shards named by the index when there is one.
    fn hf_weight_files(&self, prefix: &str) -> Result<Vec<String>> {
        let index = format!("{prefix}model.safetensors.index.json");
        let mut files = vec![format!("{prefix}config.json")];
        if self.has(&index)? {
            let path = self.fetch_one(&index)?;
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no \"weight_map\" object", path.display()))?;
            let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str()).map(|s| format!("{prefix}{s}")).collect();
            shards.sort();
            shards.dedup();
            files.push(index);
            files.extend(shards);
        } else {
            files.push(format!("{prefix}model.safetensors"));
        }
        Ok(files)
    }

    /// What a user can do about files that are not cached.
    fn hint(&self) -> String {
        let mut h = format!(
            "download it with `huggingface-cli download {}`, or point HF_HUB_CACHE (or HF_HOME) at the cache that holds it",
            self.id
        );
        if self.offline {
            h.push_str(", or unset HF_HUB_OFFLINE to let gcg download it");
        } else {
            h.push_str(" (a gated or private repository also needs HF_TOKEN)");
        }
        h
    }

    /// Where the cache was looked in, for errors.
    fn looked_in(&self) -> String {
        match self.snapshot_dir() {
            Some(d) => format!("the Hugging Face cache {} (snapshot {})", self.cache_dir.display(), d.display()),
            None => format!(
                "the Hugging Face cache {} ({} does not exist)",
                self.cache_dir.display(),
                self.ref_path().display()
            ),
        }
    }

    fn offline_note(&self) -> &'static str {
        if self.offline {
            " and HF_HUB_OFFLINE forbids downloading"
        } else {
            ""
        }
    }

    /// The repository holds none of the file sets a consumer can read (or is not cached at all).
    fn kind_error(&self, wanted: &[&str]) -> anyhow::Error {
        if self.snapshot_dir().is_none() && self.offline {
            return anyhow!(
                "the model {} is not in {} and HF_HUB_OFFLINE forbids downloading it (gcg reads {} from it); {}",
                self.id,
                self.looked_in(),
                wanted.join(" or "),
                self.hint()
            );
        }
        let has = match wanted {
            [one] => format!("has no {one}"),
            _ => format!("has neither {}", wanted.join(" nor ")),
        };
        anyhow!(
            "the model {} {has}; looked in {}{}; {}",
            self.id,
            self.looked_in(),
            if self.offline {
                " (HF_HUB_OFFLINE: the Hub was not asked)"
            } else {
                " and on the Hub"
            },
            self.hint()
        )
    }

    fn api(&self) -> Result<&Api> {
        if let Some(a) = self.api.get() {
            return Ok(a);
        }
        let mut b = ApiBuilder::from_cache(self.cache.clone()).with_progress(true);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            b = b.with_endpoint(endpoint);
        }
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| hf_home().ok().and_then(|h| std::fs::read_to_string(h.join("token")).ok()))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let api = b
            .with_token(token)
            .build()
            .with_context(|| format!("starting the Hugging Face client for {}", self.id))?;
        Ok(self.api.get_or_init(|| api))
    }

    fn listing(&self) -> Result<&Vec<String>> {
        if let Some(l) = self.listing.get() {
            return Ok(l);
        }
        let info = self.api()?.repo(self.repo()).info().map_err(|e| {
            anyhow!(
                "the model {} is not (wholly) in {} and the Hub could not list its files: {e}; {}",
                self.id,
                self.looked_in(),
                self.hint()
            )
        })?;
        Ok(self
            .listing
            .get_or_init(|| info.siblings.into_iter().map(|s| s.rfilename).collect()))
    }

    /// One file of the snapshot, downloaded when missing (unless offline).
    fn fetch_one(&self, file: &str) -> Result<PathBuf> {
        let dir = self.fetch_all(&[file.to_string()])?;
        Ok(dir.join(file))
    }

    /// Make every file of `files` present in one snapshot directory (the one `refs/main` points
    /// at) and return it. A download may move `refs/main` to a newer commit, so files cached under
    /// the old one are fetched again until the snapshot is whole.
    fn fetch_all(&self, files: &[String]) -> Result<PathBuf> {
        for round in 0..3 {
            let missing: Vec<&String> = files.iter().filter(|f| !self.cached(f)).collect();
            if missing.is_empty() {
                return self.snapshot_dir().ok_or_else(|| anyhow!("{} vanished", self.ref_path().display()));
            }
            let names = missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
            if self.offline || round == 2 {
                let verb = if missing.len() == 1 { "is" } else { "are" };
                bail!(
                    "the model {}: {names} {verb} not in {}{}; {}",
                    self.id,
                    self.looked_in(),
                    self.offline_note(),
                    self.hint()
                );
            }
            let api = self.api()?;
            for f in missing {
                eprintln!("downloading {f} of {} into {}", self.id, self.cache_dir.display());
                api.model(self.id.clone()).download(f).map_err(|e| {
                    anyhow!(
                        "the model {}: {f} is not in {} and downloading it failed: {e}; {}",
                        self.id,
                        self.looked_in(),
                        self.hint()
                    )
                })?;
            }
        }
        unreachable!("the last round returns or fails")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_org_slash_name() {
        for ok in [
            "Salesforce/instructblip-flan-t5-xl",
            "google/flan-t5-xl",
            "WHB139426/GCG",
            "a/b",
            "Org_1/name.v2",
        ] {
            assert!(is_model_id(ok), "{ok}: {:?}", model_id_problem(ok));
        }
        for (bad, why) in [
            ("flan-t5-xl", "exactly one '/'"),
            ("a/b/c", "exactly one '/'"),
            ("/abs/dir", "exactly one '/'"),
            ("/abs", "non-empty"),
            ("dir/", "non-empty"),
            ("./dir", "starts or ends"),
            ("../dir", "starts or ends"),
            ("org/-name", "starts or ends"),
            ("org/name.", "starts or ends"),
            ("org/na--me", "'--'"),
            ("org/na..me", "'..'"),
            ("org/na me", "' ' is not allowed"),
            ("org\\name/x", "'\\' is not allowed"),
            ("", "exactly one '/'"),
        ] {
            let p = model_id_problem(bad);
            assert!(p.as_deref().is_some_and(|p| p.contains(why)), "{bad:?}: {p:?}");
        }
        let long = format!("org/{}", "n".repeat(93));
        assert!(model_id_problem(&long).is_some_and(|p| p.contains("97 characters")));
        assert!(is_model_id(&format!("org/{}", "n".repeat(92))));
    }

    #[test]
    fn an_existing_path_is_never_an_id() {
        let tmp = tempfile::tempdir().unwrap();
        let org = tmp.path().join("Org");
        std::fs::create_dir_all(org.join("Name")).unwrap();
        let cwd_rel = Path::new("Org/Name");
        assert_eq!(
            as_model_id(cwd_rel),
            Some("Org/Name"),
            "not a path relative to the test's working directory"
        );
        assert_eq!(as_model_id(&org.join("Name")), None);
        // locate() hands an existing path back untouched, whatever it holds.
        assert_eq!(locate(&org.join("Name"), Need::T5).unwrap(), org.join("Name"));
        // Neither a path nor an id: handed back for the loader to name as a missing directory.
        assert_eq!(
            locate(Path::new("no/such/dir"), Need::Tokenizers).unwrap(),
            PathBuf::from("no/such/dir")
        );
    }
}
