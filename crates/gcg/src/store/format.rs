//! Shard files: plain safetensors, written by hand so that the writer knows every tensor's byte
//! range without reading the file back, and fsynced before they are renamed into place.

use super::index::{StoreDType, TensorLoc};
use anyhow::{bail, ensure, Context, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

/// A tensor to write: raw little-endian bytes.
pub(crate) struct RawTensor<'a> {
    pub name: String,
    pub dtype: StoreDType,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

/// Writes a safetensors file at `path` (which must not be the final name: the caller renames
/// it) and fsyncs it. Tensors are laid out by descending element size (then in the given
/// order) after an 8-byte-aligned header, so every tensor is aligned to its element size.
/// Returns each tensor's location (absolute offsets), in the given order, and the CRC-32 of the
/// whole file.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[RawTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<TensorLoc>, u32)> {
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        ensure!(
            seen.insert(t.name.as_str()),
            "shard {}: tensor name {} repeats",
            path.display(),
            t.name
        );
        let want = t.shape.iter().product::<usize>() * t.dtype.size();
        ensure!(
            t.data.len() == want,
            "shard {}: tensor {} has {} bytes, {:?} {:?} needs {}",
            path.display(),
            t.name,
            t.data.len(),
            t.dtype,
            t.shape,
            want
        );
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.size()));
    let mut rel = vec![[0u64; 2]; tensors.len()];
    let mut offset = 0u64;
    for &i in &order {
        let n = tensors[i].data.len() as u64;
        rel[i] = [offset, offset + n];
        offset += n;
    }
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    for (t, r) in tensors.iter().zip(&rel) {
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype.name(), "shape": t.shape, "data_offsets": r }),
        );
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let data_start = 8 + header.len() as u64;

    let file = std::fs::File::create(path).with_context(|| format!("creating shard {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(4 << 20, file);
    let mut crc = crc32fast::Hasher::new();
    let mut write = |w: &mut std::io::BufWriter<std::fs::File>| -> std::io::Result<()> {
        let size = (header.len() as u64).to_le_bytes();
        let parts = [&size[..], &header[..]]
            .into_iter()
            .chain(order.iter().map(|&i| &tensors[i].data[..]));
        for part in parts {
            crc.update(part);
            w.write_all(part)?;
        }
        w.flush()
    };
    write(&mut w).with_context(|| format!("writing shard {}", path.display()))?;
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing shard {}", path.display()))?;
    file.sync_all().with_context(|| format!("syncing shard {}", path.display()))?;
    let locs = tensors
        .iter()
        .zip(&rel)
        .map(|(t, r)| TensorLoc {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            offsets: [data_start + r[0], data_start + r[1]],
        })
        .collect();
    Ok((locs, crc.finalize()))
}

/// The CRC-32 of a whole file, read in 8 MiB pieces.
pub(crate) fn file_crc32(path: &Path) -> Result<u32> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(crc.finalize());
        }
        crc.update(&buf[..n]);
    }
}

/// Reads a shard's header: its tensors (absolute offsets) and `__metadata__`.
pub fn read_header(path: &Path) -> Result<(BTreeMap<String, TensorLoc>, BTreeMap<String, String>)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
    let file_len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("reading the header size of {}", path.display()))?;
    let n = u64::from_le_bytes(n);
    ensure!(
        n <= 100 << 20 && 8 + n <= file_len,
        "shard {}: header size {n} is impossible for a {file_len}-byte file",
        path.display()
    );
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("reading the header of {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&header).with_context(|| format!("shard {}: the header is not JSON", path.display()))?;
    let obj = value
        .as_object()
        .with_context(|| format!("shard {}: the header is not a JSON object", path.display()))?;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v.clone()).with_context(|| format!("shard {}: __metadata__", path.display()))?;
            continue;
        }
        let dtype: StoreDType = serde_json::from_value(v["dtype"].clone()).with_context(|| {
            format!(
                "shard {}: tensor {name} has dtype {}, expected F16/F32/F64/I64",
                path.display(),
                v["dtype"]
            )
        })?;
        let shape: Vec<usize> =
            serde_json::from_value(v["shape"].clone()).with_context(|| format!("shard {}: tensor {name}: shape", path.display()))?;
        let r: [u64; 2] = serde_json::from_value(v["data_offsets"].clone())
            .with_context(|| format!("shard {}: tensor {name}: data_offsets", path.display()))?;
        let loc = TensorLoc {
            name: name.clone(),
            dtype,
            shape,
            offsets: [8 + n + r[0], 8 + n + r[1]],
        };
        loc.validate().with_context(|| format!("shard {}", path.display()))?;
        if loc.offsets[1] > file_len {
            bail!("shard {}: tensor {name} ends past the end of the file", path.display());
        }
        tensors.insert(name.clone(), loc);
    }
    Ok((tensors, metadata))
}

/// Little-endian bytes of a slice of plain numbers: borrowed on little-endian machines.
macro_rules! le_bytes_fn {
    ($name:ident, $t:ty) => {
        pub(crate) fn $name(xs: &[$t]) -> Cow<'_, [u8]> {
            #[cfg(target_endian = "little")]
            {
                // SAFETY: a plain number type without padding, viewed as its bytes for its lifetime.
                Cow::Borrowed(unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) })
            }
            #[cfg(not(target_endian = "little"))]
            {
                Cow::Owned(xs.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        }
    };
}
le_bytes_fn!(f16_bytes, half::f16);
le_bytes_fn!(f32_bytes, f32);
le_bytes_fn!(f64_bytes, f64);
le_bytes_fn!(i64_bytes, i64);

/// The f32 values of little-endian bytes (copying).
pub(crate) fn f32_from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The f64 values of little-endian bytes (copying).
pub(crate) fn f64_from_bytes(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// The f16 values of little-endian bytes: borrowed when aligned on a little-endian machine.
pub(crate) fn f16_from_bytes(b: &[u8]) -> Cow<'_, [half::f16]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: every bit pattern is a valid f16; `align_to` only yields the aligned middle.
        let (pre, mid, post) = unsafe { b.align_to::<half::f16>() };
        if pre.is_empty() && post.is_empty() {
            return Cow::Borrowed(mid);
        }
    }
    Cow::Owned(b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect())
}

/// f16 → f32 over a whole slice (`half` uses F16C when the CPU has it; the conversion is exact).
/// Producing a fresh f32 buffer costs more in page faults than in the conversion itself.
pub(crate) fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
}
