//! PyTorch `.pth` checkpoints (the zip format of `torch.save` since PyTorch 1.6): a state dict,
//! a state dict nested under a key (`{"model": {...}}`), or a single bare tensor / parameter
//! (GCG's `query_tokens_t5.pth` is `torch.save(nn.Parameter)`).
//!
//! The pickle is parsed with candle's pickle machine; tensor bytes are read from the zip entry
//! each tensor's storage names.

use super::source::{TensorMeta, TensorSource};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

pub struct PthSource {
    path: PathBuf,
    infos: BTreeMap<String, TensorInfo>,
}

fn unwrap_module(obj: Object) -> Object {
    // TorchScript modules wrap their state in Build(Reduce(__torch__.Module)).
    match obj {
        Object::Build { callable, args } => match *callable {
            Object::Reduce { callable: inner, .. } if matches!(&*inner, Object::Class { module_name, class_name } if module_name == "__torch__" && class_name == "Module") => {
                *args
            }
            other => Object::Build {
                callable: Box::new(other),
                args,
            },
        },
        obj => obj,
    }
}

impl PthSource {
    /// Open a checkpoint. `key`: the entry holding the state dict in a nested checkpoint
    /// (e.g. `"model"`); `bare_name`: the name under which a single bare tensor is exposed.
    pub fn open(path: impl AsRef<Path>, key: Option<&str>, bare_name: &str) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let ctx = || format!("reading PyTorch checkpoint {}", path.display());
        let file = std::fs::File::open(&path).with_context(ctx)?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| not_a_zip(&path, e))?;
        let pkl = (0..zip.len())
            .filter_map(|i| zip.by_index(i).ok().and_then(|f| f.name().ok().map(|n| n.to_string())))
            .find(|n| n.ends_with("data.pkl"))
            .ok_or_else(|| anyhow!("{}: no data.pkl inside the zip; not a torch.save checkpoint", path.display()))?;
        let dir = PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
        let obj = {
            let entry = zip.by_name(&pkl).with_context(ctx)?;
            let mut reader = std::io::BufReader::new(entry);
            let mut stack = Stack::empty();
            stack.read_loop(&mut reader).with_context(ctx)?;
            stack.finalize().with_context(ctx)?
        };
        let mut obj = unwrap_module(obj);
        if let Some(key) = key {
            match obj {
                Object::Dict(kvs) => {
                    let mut keys = Vec::new();
                    let mut found = None;
                    for (k, v) in kvs {
                        if let Object::Unicode(s) = &k {
                            keys.push(s.clone());
                            if s == key {
                                found = Some(v);
                            }
                        }
                    }
                    obj = found.ok_or_else(|| {
                        anyhow!(
                            "{}: no entry '{key}' at the top level (it has: {})",
                            path.display(),
                            keys.join(", ")
                        )
                    })?;
                }
                _ => bail!("{}: asked for entry '{key}', but the checkpoint is not a dict", path.display()),
            }
        }
        let mut infos = BTreeMap::new();
        match obj {
            Object::Dict(kvs) => {
                for (k, v) in kvs {
                    let name = match &k {
                        Object::Unicode(s) => s.clone(),
                        _ => continue,
                    };
                    match v.into_tensor_info(k, &dir) {
                        Ok(Some(info)) => {
                            infos.insert(name, info);
                        }
                        Ok(None) => {} // non-tensor entries (e.g. `_metadata`, counters)
                        Err(e) => bail!("{}: cannot read tensor '{name}': {e}", path.display()),
                    }
                }
            }
            other => match other.into_tensor_info(Object::Unicode(bare_name.to_string()), &dir) {
                Ok(Some(info)) => {
                    infos.insert(bare_name.to_string(), info);
                }
                _ => bail!("{}: the checkpoint holds neither a state dict nor a tensor", path.display()),
            },
        }
        Ok(Self { path, infos })
    }
}

/// Why `path` does not open as a zip archive, told from its first bytes: a zip that is cut short
/// or damaged, a legacy (pre-1.6, pickle-stream) `torch.save` file, or something else.
fn not_a_zip(path: &Path, e: zip::result::ZipError) -> anyhow::Error {
    let mut head = Vec::with_capacity(8);
    let len = std::fs::File::open(path).and_then(|f| {
        let len = f.metadata()?.len();
        f.take(8).read_to_end(&mut head)?;
        Ok(len)
    });
    let len = match len {
        Ok(len) => len,
        Err(io) => return anyhow!("reading PyTorch checkpoint {}: {io}", path.display()),
    };
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        anyhow!(
            "{} is truncated or corrupt: it starts as a zip archive (the torch.save format) but the archive is incomplete ({e}); \
             the file has {len} bytes, and a complete archive ends with its central directory — copy or download it again",
            path.display()
        )
    } else if head.first() == Some(&0x80) {
        // Pickle protocol 2+ starts with the PROTO opcode 0x80: the legacy torch.save stream.
        anyhow!(
            "{} is a legacy (pre-1.6, non-zip) PyTorch checkpoint, which gcg does not read; \
             re-save it with a recent PyTorch (torch.save(torch.load(f), f))",
            path.display()
        )
    } else {
        anyhow!(
            "{} is not a PyTorch checkpoint: neither a zip archive (torch.save since PyTorch 1.6) nor a pickle \
             (legacy torch.save); it has {len} bytes and starts with {:02x?}",
            path.display(),
            head
        )
    }
}

impl TensorSource for PthSource {
    fn names(&self) -> Vec<String> {
        self.infos.keys().cloned().collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.infos.get(name).map(|i| TensorMeta {
            shape: i.layout.dims().to_vec(),
            dtype: i.dtype,
        })
    }
    fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let info = self
            .infos
            .get(name)
            .ok_or_else(|| anyhow!("no tensor '{name}' in {}", self.path.display()))?;
        let ctx = || format!("reading tensor '{name}' from {}", self.path.display());
        let file = std::fs::File::open(&self.path).with_context(ctx)?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).with_context(ctx)?;
        let mut entry = zip.by_name(&info.path).with_context(ctx)?;
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).with_context(ctx)?;
        let esize = info.dtype.size_in_bytes();
        if bytes.len() < info.storage_size * esize {
            bail!(
                "tensor '{name}' in {}: storage holds {} bytes, expected {} (file truncated?)",
                self.path.display(),
                bytes.len(),
                info.storage_size * esize
            );
        }
        let storage = Tensor::from_raw_buffer(&bytes[..info.storage_size * esize], info.dtype, &[info.storage_size], &Device::Cpu)
            .with_context(ctx)?;
        // Rebuild the (possibly strided, offset) view torch saved, then make it contiguous.
        let layout = &info.layout;
        let dims = layout.dims();
        let strides = layout.stride();
        let offset = layout.start_offset() / esize;
        let t = if dims.is_empty() {
            storage.narrow(0, offset, 1)?.reshape(())?
        } else if layout.is_contiguous() {
            let n: usize = dims.iter().product();
            if offset + n > info.storage_size {
                bail!(
                    "tensor '{name}' in {}: view of {n} elements at {offset} exceeds a storage of {}",
                    self.path.display(),
                    info.storage_size
                );
            }
            storage.narrow(0, offset, n)?.reshape(dims)?
        } else {
            let n: usize = dims.iter().product();
            let mut idx = Vec::with_capacity(n);
            let mut counter = vec![0usize; dims.len()];
            for _ in 0..n {
                let lin: usize = offset + counter.iter().zip(strides).map(|(c, s)| c * s).sum::<usize>();
                if lin >= info.storage_size {
                    bail!(
                        "tensor '{name}' in {}: view reaches element {lin} of a storage of {}",
                        self.path.display(),
                        info.storage_size
                    );
                }
                idx.push(lin as u32);
                for d in (0..dims.len()).rev() {
                    counter[d] += 1;
                    if counter[d] < dims[d] {
                        break;
                    }
                    counter[d] = 0;
                }
            }
            let idx = Tensor::from_vec(idx, n, &Device::Cpu)?;
            storage.index_select(&idx, 0)?.reshape(dims)?
        };
        Ok(t.to_device(dev)?)
    }
    fn origin(&self, name: &str) -> String {
        format!("'{name}' in {}", self.path.display())
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
