//! Reading a store: an immutable snapshot of the index plus memory-mapped shards.

use super::check::{CheckOptions, StoreCheck};
use super::format::{f16_from_bytes, f16_to_f32, f32_from_bytes};
use super::index::{read_index, Index, QuestionEntry, Stamp, StoreDType, StoreMeta, TensorLoc, VideoEntry, INDEX_FILE, SHARD_DIR};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Shards mapped so far, shared by all snapshots of a store (shards never change once named).
#[derive(Default)]
struct MapCache {
    maps: Mutex<HashMap<String, Arc<Mmap>>>,
}

impl MapCache {
    fn get(&self, dir: &Path, shard: &str, expected_len: u64) -> Result<Arc<Mmap>> {
        let mut maps = self.maps.lock().map_err(|_| anyhow!("the shard map cache is poisoned"))?;
        if let Some(m) = maps.get(shard) {
            return Ok(m.clone());
        }
        let path = dir.join(SHARD_DIR).join(shard);
        let file = std::fs::File::open(&path).with_context(|| format!("opening shard {}", path.display()))?;
        let len = file.metadata()?.len();
        ensure!(
            len == expected_len,
            "shard {} has {len} bytes, the index says {expected_len} (was it modified?)",
            path.display()
        );
        // SAFETY: shards are written once under a temporary name and never modified after the
        // rename that publishes them; the store's contract forbids changing them in place.
        let map = Arc::new(unsafe { Mmap::map(&file) }.with_context(|| format!("mapping shard {}", path.display()))?);
        maps.insert(shard.to_string(), map.clone());
        Ok(map)
    }
}

/// A tensor's bytes inside a mapped shard (no copy).
#[derive(Clone)]
pub struct MappedTensor {
    map: Arc<Mmap>,
    pub loc: TensorLoc,
}

impl MappedTensor {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.loc.offsets[0] as usize..self.loc.offsets[1] as usize]
    }

    pub fn shape(&self) -> &[usize] {
        &self.loc.shape
    }

    /// The f16 values (borrowed from the map on little-endian machines).
    pub fn as_f16(&self) -> Result<Cow<'_, [f16]>> {
        ensure!(
            self.loc.dtype == StoreDType::F16,
            "tensor {} is {:?}, not F16",
            self.loc.name,
            self.loc.dtype
        );
        Ok(f16_from_bytes(self.bytes()))
    }

    /// The values as f32 (F16 and F32 tensors).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self.loc.dtype {
            StoreDType::F32 => Ok(f32_from_bytes(self.bytes())),
            StoreDType::F16 => {
                let src = self.as_f16()?;
                let mut out = vec![0f32; src.len()];
                f16_to_f32(&src, &mut out);
                Ok(out)
            }
            other => bail!("tensor {} is {other:?}, not a float tensor", self.loc.name),
        }
    }

    /// A candle tensor of the stored shape in `dtype` on `dev`. F16 → F16 is one copy from the
    /// map into the tensor; F16 → F32 / BF16 converts while copying.
    pub fn to_tensor(&self, dtype: DType, dev: &Device) -> Result<Tensor> {
        let shape = self.loc.shape.as_slice();
        Ok(match (self.loc.dtype, dtype) {
            (StoreDType::F16, DType::F16) => Tensor::from_slice(&self.as_f16()?[..], shape, dev)?,
            (StoreDType::F16, DType::F32) | (StoreDType::F32, DType::F32) => Tensor::from_vec(self.to_f32()?, shape, dev)?,
            (StoreDType::F16, DType::BF16) => Tensor::from_vec(f16_to_bf16(&self.as_f16()?), shape, dev)?,
            (stored, want) => Tensor::from_vec(self.to_f32()?, shape, dev)
                .and_then(|t| t.to_dtype(want))
                .with_context(|| format!("tensor {}: {stored:?} to {want:?}", self.loc.name))?,
        })
    }
}

/// f16 → bf16 through f32 (exact in f32, then rounded to nearest even).
pub(crate) fn f16_to_bf16(src: &[f16]) -> Vec<bf16> {
    let mut tmp = vec![0f32; src.len()];
    f16_to_f32(src, &mut tmp);
    tmp.into_iter().map(bf16::from_f32).collect()
}

/// The CLIP text embeddings of one question.
#[derive(Debug, Clone, PartialEq)]
pub struct QuestionTexts {
    pub dim: usize,
    pub question: Vec<f32>,
    /// [num_options, dim] row-major.
    pub options: Vec<f32>,
    pub num_options: usize,
    pub answer: Vec<f32>,
    pub event: Vec<f32>,
}

/// One consistent version of the store: the index as read at one moment and the shards it
/// names. Entries added later are invisible to it; everything it lists stays readable.
pub struct Snapshot {
    dir: PathBuf,
    index: Index,
    stamp: Option<Stamp>,
    maps: Arc<MapCache>,
}

impl Snapshot {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn generation(&self) -> u64 {
        self.index.generation
    }

    pub fn meta(&self) -> Option<StoreMeta> {
        self.index.meta
    }

    pub fn contains_video(&self, id: &str) -> bool {
        self.index.videos.contains_key(id)
    }

    pub fn contains_question(&self, key: &str) -> bool {
        self.index.questions.contains_key(key)
    }

    pub fn video(&self, id: &str) -> Result<&VideoEntry> {
        self.index
            .videos
            .get(id)
            .ok_or_else(|| anyhow!("video {id} is not in the feature store {}", self.dir.display()))
    }

    pub fn question(&self, key: &str) -> Result<&QuestionEntry> {
        self.index.questions.get(key).ok_or_else(|| {
            anyhow!(
                "question {key} has no labels in the feature store {} (run `gcg labels`)",
                self.dir.display()
            )
        })
    }

    fn mapped(&self, shard: &str, loc: &TensorLoc) -> Result<MappedTensor> {
        let info = self
            .index
            .shards
            .get(shard)
            .ok_or_else(|| anyhow!("shard {shard} is not listed in the index"))?;
        Ok(MappedTensor {
            map: self.maps.get(&self.dir, shard, info.bytes)?,
            loc: loc.clone(),
        })
    }

    /// The un-normalised ViT features of a video, F16 [T, tokens, width], without copying; an
    /// error for a video stored without them (`--embeddings-only`).
    pub fn features(&self, id: &str) -> Result<MappedTensor> {
        let v = self.video(id)?;
        let f = v.features.as_ref().ok_or_else(|| {
            anyhow!(
                "video {id} was stored without its ViT features (gcg features --embeddings-only) in {}: \
                 train with `[data] online_vit = true`, which decodes its frames and runs the ViT in the loop",
                self.dir.display()
            )
        })?;
        self.mapped(&v.shard, f)
    }

    /// Does the store hold the ViT features of video `id` (not `--embeddings-only`)?
    pub fn has_features(&self, id: &str) -> Result<bool> {
        Ok(self.video(id)?.features.is_some())
    }

    /// Features as a tensor [T, tokens, width] in `dtype` (F16, F32 or BF16).
    pub fn features_tensor(&self, id: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.features(id)?.to_tensor(dtype, dev)
    }

    /// CLIP frame embeddings, F32 [T, E].
    pub fn frame_embeds(&self, id: &str) -> Result<MappedTensor> {
        let v = self.video(id)?;
        self.mapped(&v.shard, &v.frame_embeds)
    }

    fn question_tensor(&self, q: &QuestionEntry, name: &str) -> Result<MappedTensor> {
        let loc = self
            .index
            .shards
            .get(&q.shard)
            .and_then(|s| s.tensors.get(name))
            .ok_or_else(|| anyhow!("question shard {} has no tensor {name}", q.shard))?;
        self.mapped(&q.shard, loc)
    }

    /// The rows `[row, row + n)` of the question's shard `text_embeds`, as f32.
    fn text_rows(&self, q: &QuestionEntry, row: usize, n: usize) -> Result<Vec<f32>> {
        let t = self.question_tensor(q, "text_embeds")?;
        let e = t.loc.shape[1];
        let bytes = t.bytes();
        Ok(f32_from_bytes(&bytes[row * e * 4..(row + n) * e * 4]))
    }

    /// The question's CLIP text embeddings.
    pub fn question_texts(&self, key: &str) -> Result<QuestionTexts> {
        let q = self.question(key)?;
        let all = self.text_rows(q, q.text_row, q.num_text_rows())?;
        let e = all.len() / q.num_text_rows();
        let o = q.num_options;
        Ok(QuestionTexts {
            dim: e,
            question: all[..e].to_vec(),
            options: all[e..(1 + o) * e].to_vec(),
            num_options: o,
            answer: all[(1 + o) * e..(2 + o) * e].to_vec(),
            event: all[(2 + o) * e..].to_vec(),
        })
    }

    /// Writes the question's rows (question, options, answer, event) into `out`
    /// (`num_text_rows × E` values) without intermediate vectors.
    pub(crate) fn question_rows_into(&self, q: &QuestionEntry, out: &mut [f32]) -> Result<()> {
        let t = self.question_tensor(q, "text_embeds")?;
        let e = t.loc.shape[1];
        let n = q.num_text_rows();
        ensure!(
            out.len() == n * e,
            "question rows: buffer of {} values for {n} rows of {e}",
            out.len()
        );
        let bytes = &t.bytes()[q.text_row * e * 4..(q.text_row + n) * e * 4];
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }

    /// s_t = cos(F_t, text(event)) for each frame.
    pub fn curve(&self, key: &str) -> Result<Vec<f32>> {
        let q = self.question(key)?;
        let t = self.question_tensor(q, "curves")?;
        Ok(f32_from_bytes(&t.bytes()[q.curve_start * 4..(q.curve_start + q.num_frames) * 4]))
    }

    /// Checks the index against the shard files, as deep as asked (see [`super::check()`]).
    pub fn check(&self, opts: CheckOptions) -> Result<StoreCheck> {
        super::check::check(&self.dir, &self.index, opts)
    }

    /// An error unless every listed shard exists with its listed size and a header that puts
    /// each tensor where the index says.
    pub fn verify(&self) -> Result<()> {
        let found = self.check(CheckOptions {
            headers: true,
            ..CheckOptions::default()
        })?;
        ensure!(
            found.is_clean(),
            "the feature store {} is damaged (`gcg store verify --repair` drops the broken records so that \
             `gcg features` / `gcg labels` recompute them):\n{}",
            self.dir.display(),
            found.describe()
        );
        Ok(())
    }

    /// Shard files in the directory that the index does not list: left by a writer stopped
    /// between renaming a shard and publishing it (harmless; their records were redone or will
    /// be). Shards whose entries were all superseded stay listed and are not counted here.
    pub fn unlisted_shards(&self) -> Result<Vec<String>> {
        super::check::unlisted_shards(&self.dir.join(SHARD_DIR), &self.index)
    }
}

/// A feature store opened for reading. Cheap to clone and share between threads; each
/// [`Store::snapshot`] is a consistent view, [`Store::refresh`] picks up new commits.
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    current: Arc<RwLock<Arc<Snapshot>>>,
    maps: Arc<MapCache>,
}

impl Store {
    /// Opens the store in `dir` (which must hold an `index.json`).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(INDEX_FILE);
        ensure!(
            dir.is_dir(),
            "the feature store {} does not exist (create it with `gcg features`)",
            dir.display()
        );
        if !path.exists() {
            let shards = super::writer::lost_index_shards(&dir)?;
            ensure!(shards == 0, "{}", super::writer::lost_index_message(&dir, shards));
            anyhow::bail!(
                "{} is not a feature store (no {INDEX_FILE}; create one with `gcg features`)",
                dir.display()
            );
        }
        let maps = Arc::new(MapCache::default());
        let (index, stamp) = read_index(&dir)?;
        let snap = Snapshot {
            dir: dir.clone(),
            index,
            stamp,
            maps: maps.clone(),
        };
        Ok(Self {
            dir,
            current: Arc::new(RwLock::new(Arc::new(snap))),
            maps,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Re-reads the index when it changed on disk. Returns whether the snapshot changed.
    pub fn refresh(&self) -> Result<bool> {
        let path = self.dir.join(INDEX_FILE);
        let stamp = Stamp::of(&std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?);
        if self.snapshot().stamp == Some(stamp) {
            return Ok(false);
        }
        let (index, stamp) = read_index(&self.dir)?;
        let snap = Arc::new(Snapshot {
            dir: self.dir.clone(),
            index,
            stamp,
            maps: self.maps.clone(),
        });
        let mut cur = self.current.write().map_err(|_| anyhow!("the store snapshot lock is poisoned"))?;
        // Threads sharing this store refresh concurrently: one that read an older index must not
        // replace a newer snapshot another thread already installed (generations only grow).
        if snap.index.generation < cur.index.generation {
            return Ok(false);
        }
        let changed = cur.index.generation != snap.index.generation || cur.stamp != snap.stamp;
        *cur = snap;
        Ok(changed)
    }
}
