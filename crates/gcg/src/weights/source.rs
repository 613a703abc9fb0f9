//! Where named tensors come from.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// A read-only collection of named tensors.
pub trait TensorSource {
    /// All tensor names, sorted.
    fn names(&self) -> Vec<String>;
    fn meta(&self, name: &str) -> Option<TensorMeta>;
    fn load(&self, name: &str, dev: &Device) -> Result<Tensor>;
    /// Where a tensor lives, for error messages: `"'name' in /path/file"`.
    fn origin(&self, name: &str) -> String;
    /// A short description of the whole source.
    fn describe(&self) -> String;
    fn contains(&self, name: &str) -> bool {
        self.meta(name).is_some()
    }
}

fn st_dtype(dt: safetensors::Dtype) -> Result<DType> {
    use safetensors::Dtype as S;
    Ok(match dt {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

struct StFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

/// One or several memory-mapped `.safetensors` files (e.g. the shards of an HF snapshot).
pub struct SafetensorsSource {
    files: Vec<StFile>,
    index: BTreeMap<String, (usize, TensorMeta)>,
    label: String,
}

impl SafetensorsSource {
    /// Open the given files. A tensor present in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open safetensors file {}", path.display()))?;
            // SAFETY: the file is opened read-only; a concurrent writer would corrupt our view of
            // it, as with any memory-mapped reader (we never write in place ourselves).
            let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
            let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| not_safetensors(path, &mmap, e))?;
            for (name, view) in st.tensors() {
                let meta = TensorMeta {
                    shape: view.shape().to_vec(),
                    dtype: st_dtype(view.dtype()).with_context(|| format!("tensor '{name}' in {}", path.display()))?,
                };
                if let Some((other, _)) = index.insert(name.clone(), (fi, meta)) {
                    bail!("tensor '{name}' appears both in {} and {}", paths[other].display(), path.display());
                }
            }
            files.push(StFile { path: path.clone(), mmap });
        }
        let label = match paths {
            [one] => one.display().to_string(),
            many => format!(
                "{} safetensors files in {}",
                many.len(),
                many[0].parent().map(|p| p.display().to_string()).unwrap_or_default()
            ),
        };
        Ok(Self { files, index, label })
    }

    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_files(&[path.as_ref().to_path_buf()])
    }

    /// An HF snapshot directory: `model.safetensors.index.json` + shards, or one `model.safetensors`.
    /// Every shard the index names must exist and hold the tensors the index assigns to it.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no \"weight_map\" object", index_path.display()))?;
            let mut shards: Vec<String> = map
                .values()
                .map(|f| {
                    f.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("{}: a weight_map value is not a string", index_path.display()))
                })
                .collect::<Result<_>>()?;
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            for p in &paths {
                if !p.exists() {
                    bail!("{} names the shard {}, which does not exist", index_path.display(), p.display());
                }
            }
            let src = Self::open_files(&paths)?;
            for (name, file) in map {
                let file = file.as_str().unwrap_or_default();
                match src.index.get(name) {
                    None => bail!(
                        "{} assigns tensor '{name}' to {file}, but that file does not contain it",
                        index_path.display()
                    ),
                    Some((fi, _)) if src.files[*fi].path.file_name().and_then(|f| f.to_str()) != Some(file) => {
                        bail!(
                            "{} assigns tensor '{name}' to {file}, but it is in {}",
                            index_path.display(),
                            src.files[*fi].path.display()
                        )
                    }
                    _ => {}
                }
            }
            return Ok(Self {
                label: format!("HF snapshot {}", dir.display()),
                ..src
            });
        }
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Ok(Self {
                label: format!("HF snapshot {}", dir.display()),
                ..Self::open(&single)?
            });
        }
        bail!("{} holds neither model.safetensors.index.json nor model.safetensors", dir.display())
    }
}

/// Why `bytes` (the file `path`) is not a valid safetensors file: cut short (inside the header,
/// or before the end of the data the header describes: both sizes named) or not one at all.
fn not_safetensors(path: &Path, bytes: &[u8], e: safetensors::SafeTensorError) -> anyhow::Error {
    let (p, len) = (path.display(), bytes.len());
    let not_st = |why: String| anyhow!("{p} is not a valid safetensors file ({e}): {why}");
    if len < 8 {
        return anyhow!("{p} is truncated: it has {len} bytes, less than the 8-byte header length a safetensors file starts with");
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    // safetensors caps the header at 100 MB; a JSON header starts with `{`.
    if n > 100_000_000 || bytes.get(8).is_some_and(|&b| b != b'{') {
        return not_st(format!("its first 8 bytes announce a header of {n} bytes; it has {len} bytes"));
    }
    let need = 8 + n as usize;
    if len < need {
        return anyhow!(
            "{p} is truncated: its first 8 bytes announce a header of {n} bytes, which needs a file of at least {need} bytes; the file has {len} bytes"
        );
    }
    let Ok(header) = serde_json::from_slice::<serde_json::Value>(&bytes[8..need]) else {
        return not_st(format!("its header of {n} bytes is not JSON"));
    };
    let data = header
        .as_object()
        .into_iter()
        .flat_map(|o| o.values())
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let total = (need as u64).saturating_add(data);
    if total > len as u64 {
        anyhow!(
            "{p} is truncated: its header describes {total} bytes (8 + a {n}-byte header + {data} bytes of tensor data); the file has {len} bytes"
        )
    } else {
        not_st(format!("the header describes {total} bytes, the file has {len} bytes"))
    }
}

impl TensorSource for SafetensorsSource {
    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.index.get(name).map(|(_, m)| m.clone())
    }
    fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let (fi, _) = self
            .index
            .get(name)
            .ok_or_else(|| anyhow!("no tensor '{name}' in {}", self.label))?;
        let f = &self.files[*fi];
        let st = safetensors::SafeTensors::deserialize(&f.mmap).map_err(|e| anyhow!("{}: {e}", f.path.display()))?;
        let view = st
            .tensor(name)
            .map_err(|e| anyhow!("tensor '{name}' in {}: {e}", f.path.display()))?;
        use candle_core::safetensors::Load;
        view.load(dev)
            .with_context(|| format!("loading tensor '{name}' from {}", f.path.display()))
    }
    fn origin(&self, name: &str) -> String {
        match self.index.get(name) {
            Some((fi, _)) => format!("'{name}' in {}", self.files[*fi].path.display()),
            None => format!("'{name}' (not in {})", self.label),
        }
    }
    fn describe(&self) -> String {
        self.label.clone()
    }
}

/// Tensors held in memory.
#[derive(Default, Clone)]
pub struct MapSource {
    tensors: BTreeMap<String, Tensor>,
    label: String,
}

impl MapSource {
    pub fn new(tensors: impl IntoIterator<Item = (String, Tensor)>, label: impl Into<String>) -> Self {
        Self {
            tensors: tensors.into_iter().collect(),
            label: label.into(),
        }
    }
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }
    pub fn into_map(self) -> BTreeMap<String, Tensor> {
        self.tensors
    }
}

impl TensorSource for MapSource {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.tensors.get(name).map(|t| TensorMeta {
            shape: t.dims().to_vec(),
            dtype: t.dtype(),
        })
    }
    fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("no tensor '{name}' in {}", self.label))?;
        Ok(t.to_device(dev)?)
    }
    fn origin(&self, name: &str) -> String {
        format!("'{name}' in {}", self.label)
    }
    fn describe(&self) -> String {
        self.label.clone()
    }
}

/// Another source seen under different names: `rename(inner_name) -> Some(outer_name)` (None hides
/// a tensor). The renaming must be one-to-one.
pub struct RenamedSource {
    inner: Arc<dyn TensorSource + Send + Sync>,
    outer_to_inner: BTreeMap<String, String>,
}

impl RenamedSource {
    pub fn new(inner: Arc<dyn TensorSource + Send + Sync>, rename: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut outer_to_inner = BTreeMap::new();
        for n in inner.names() {
            if let Some(o) = rename(&n) {
                if let Some(prev) = outer_to_inner.insert(o.clone(), n.clone()) {
                    bail!("renaming {}: both '{prev}' and '{n}' map to '{o}'", inner.describe());
                }
            }
        }
        Ok(Self { inner, outer_to_inner })
    }
    /// Add a fixed prefix to every name.
    pub fn prefixed(inner: Arc<dyn TensorSource + Send + Sync>, prefix: &str) -> Result<Self> {
        Self::new(inner, |n| Some(format!("{prefix}{n}")))
    }
}

impl TensorSource for RenamedSource {
    fn names(&self) -> Vec<String> {
        self.outer_to_inner.keys().cloned().collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.outer_to_inner.get(name).and_then(|n| self.inner.meta(n))
    }
    fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let n = self
            .outer_to_inner
            .get(name)
            .ok_or_else(|| anyhow!("no tensor '{name}' in {}", self.inner.describe()))?;
        self.inner.load(n, dev)
    }
    fn origin(&self, name: &str) -> String {
        match self.outer_to_inner.get(name) {
            Some(n) if n != name => format!("{} (read as '{name}')", self.inner.origin(n)),
            Some(n) => self.inner.origin(n),
            None => format!("'{name}' (not in {})", self.inner.describe()),
        }
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Several sources seen as one; a name present in two of them is an error.
pub struct MergedSource {
    parts: Vec<Arc<dyn TensorSource + Send + Sync>>,
    owner: HashMap<String, usize>,
}

impl MergedSource {
    pub fn new(parts: Vec<Arc<dyn TensorSource + Send + Sync>>) -> Result<Self> {
        let mut owner = HashMap::new();
        for (i, p) in parts.iter().enumerate() {
            for n in p.names() {
                if let Some(j) = owner.insert(n.clone(), i) {
                    bail!("tensor '{n}' is provided twice: {} and {}", parts[j].origin(&n), p.origin(&n));
                }
            }
        }
        Ok(Self { parts, owner })
    }
}

impl TensorSource for MergedSource {
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.owner.keys().cloned().collect();
        v.sort();
        v
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.owner.get(name).and_then(|&i| self.parts[i].meta(name))
    }
    fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let i = self
            .owner
            .get(name)
            .ok_or_else(|| anyhow!("no tensor '{name}' in {}", self.describe()))?;
        self.parts[*i].load(name, dev)
    }
    fn origin(&self, name: &str) -> String {
        match self.owner.get(name) {
            Some(&i) => self.parts[i].origin(name),
            None => format!("'{name}' (not in {})", self.describe()),
        }
    }
    fn describe(&self) -> String {
        self.parts.iter().map(|p| p.describe()).collect::<Vec<_>>().join(" + ")
    }
}
