//! Building networks from a tensor source with shape checks, and the store of trainable variables.
//!
//! A network's `load(lb: &Loader, ...)` asks for each tensor by name and shape. The loader
//! * reads it from the source (checking the shape, converting the dtype), or creates it with the
//!   given [`Init`] when the loader has no source (benchmarks, tests, new trainable modules);
//! * turns it into a trainable [`Var`] (f32 master copy) when its full name is trainable, else a
//!   plain tensor in the frozen compute dtype — frozen tensors never take part in autograd;
//! * records which source tensors were used, so [`Loader::finish`] can reject a checkpoint whose
//!   tensors the model did not consume.

use super::init::Init;
use super::source::TensorSource;
use crate::rng::SeededRng;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

type Pred = Box<dyn Fn(&str) -> bool>;

struct Shared {
    source: Option<Arc<dyn TensorSource + Send + Sync>>,
    device: Device,
    frozen_dtype: DType,
    trainable: Pred,
    ignored: Pred,
    vars: RefCell<VarStore>,
    used: RefCell<BTreeSet<String>>,
    rng: RefCell<SeededRng>,
    /// `Some`: problems with loaded values (non-finite, integer weights) are listed here instead
    /// of failing the load (`gcg check-weights` reports them all).
    problems: Option<RefCell<Vec<String>>>,
}

/// A cursor into the parameter namespace (`lb.pp("encoder").pp("layer.0")`).
#[derive(Clone)]
pub struct Loader {
    shared: Rc<Shared>,
    prefix: String,
}

impl Loader {
    fn build(source: Option<Arc<dyn TensorSource + Send + Sync>>, device: &Device, dtype: DType, seed: u64) -> Self {
        Self {
            shared: Rc::new(Shared {
                source,
                device: device.clone(),
                frozen_dtype: dtype,
                trainable: Box::new(|_| false),
                ignored: Box::new(|_| false),
                vars: RefCell::new(VarStore::default()),
                used: RefCell::new(BTreeSet::new()),
                rng: RefCell::new(SeededRng::new(seed)),
                problems: None,
            }),
            prefix: String::new(),
        }
    }

    /// Load every tensor from `source`; frozen tensors are converted to `dtype`.
    pub fn from_source(source: Arc<dyn TensorSource + Send + Sync>, device: &Device, dtype: DType) -> Self {
        Self::build(Some(source), device, dtype, 0)
    }

    /// No checkpoint: every tensor is initialised from its [`Init`] with a seeded generator.
    pub fn random(device: &Device, dtype: DType, seed: u64) -> Self {
        Self::build(None, device, dtype, seed)
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Rc::get_mut(&mut self.shared).expect("configure a Loader before cloning it")
    }

    /// Which full tensor names become trainable variables.
    pub fn with_trainable(mut self, pred: impl Fn(&str) -> bool + 'static) -> Self {
        self.shared_mut().trainable = Box::new(pred);
        self
    }

    /// Source tensors that may stay unused without error (e.g. saved buffers like `position_ids`).
    pub fn with_ignored(mut self, pred: impl Fn(&str) -> bool + 'static) -> Self {
        self.shared_mut().ignored = Box::new(pred);
        self
    }

    /// Seed of the generator that initialises tensors the source does not hold.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.shared_mut().rng = RefCell::new(SeededRng::new(seed));
        self
    }

    /// List problems with loaded values (NaN/±∞, integer weights) in [`Loader::value_problems`]
    /// instead of failing on the first one.
    pub fn collecting_value_problems(mut self) -> Self {
        self.shared_mut().problems = Some(RefCell::new(Vec::new()));
        self
    }

    /// The problems found so far (with [`Loader::collecting_value_problems`]).
    pub fn value_problems(&self) -> Vec<String> {
        self.shared.problems.as_ref().map(|p| p.borrow().clone()).unwrap_or_default()
    }

    /// Weights must be floating point and finite: the tensor's name and file otherwise.
    fn check_values(&self, origin: impl FnOnce() -> String, t: &Tensor) -> Result<()> {
        let problem = if !t.dtype().is_float() {
            Some(format!(
                "tensor {} is stored as {:?}; model weights must be floating point",
                origin(),
                t.dtype()
            ))
        } else {
            crate::util::non_finite(t)?.map(|bad| format!("tensor {} {:?} holds {}", origin(), t.dims(), bad.describe(t.dims())))
        };
        match (problem, &self.shared.problems) {
            (None, _) => Ok(()),
            (Some(p), Some(list)) => {
                list.borrow_mut().push(p);
                Ok(())
            }
            (Some(p), None) => bail!("{p}"),
        }
    }

    /// A loader for the names under `{prefix}.{name}`.
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        let name = name.as_ref();
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else if name.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            shared: self.shared.clone(),
            prefix,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn device(&self) -> &Device {
        &self.shared.device
    }
    pub fn dtype(&self) -> DType {
        self.shared.frozen_dtype
    }
    pub fn has_source(&self) -> bool {
        self.shared.source.is_some()
    }

    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else if name.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Does the source hold `{prefix}.{name}`? (Always false without a source.)
    pub fn contains(&self, name: &str) -> bool {
        self.shared.source.as_ref().is_some_and(|s| s.contains(&self.full_name(name)))
    }

    /// The shape the source stores for `{prefix}.{name}`, if any.
    pub fn stored_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shared
            .source
            .as_ref()
            .and_then(|s| s.meta(&self.full_name(name)))
            .map(|m| m.shape)
    }

    /// Get a tensor of the given shape.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        self.get_any(shape, &[name], init)
    }

    /// Get a tensor stored under the first of several alternative names (checkpoints saved by
    /// different library versions name some tensors differently).
    pub fn get_any(&self, shape: impl Into<Shape>, names: &[&str], init: Init) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let full: Vec<String> = names.iter().map(|n| self.full_name(n)).collect();
        let canonical = full[0].clone();
        let raw = match &self.shared.source {
            None => {
                let mut rng = self.shared.rng.borrow_mut();
                init.make(&shape, DType::F32, &self.shared.device, &mut rng)?
            }
            Some(src) => {
                let found = full.iter().find(|n| src.contains(n)).ok_or_else(|| {
                    let alts = if full.len() > 1 {
                        format!(" (also looked for {})", full[1..].join(", "))
                    } else {
                        String::new()
                    };
                    anyhow!(
                        "missing tensor '{canonical}'{alts} of shape {:?} in {}",
                        shape.dims(),
                        src.describe()
                    )
                })?;
                let meta = src.meta(found).expect("contains() implies meta()");
                if meta.shape != shape.dims() {
                    bail!(
                        "tensor {} has shape {:?}, but the model expects {:?} (does the checkpoint match the config?)",
                        src.origin(found),
                        meta.shape,
                        shape.dims()
                    );
                }
                self.shared.used.borrow_mut().insert(found.clone());
                let t = src
                    .load(found, &self.shared.device)
                    .with_context(|| format!("loading {}", src.origin(found)))?;
                self.check_values(|| src.origin(found), &t)?;
                t
            }
        };
        self.finish_tensor(&canonical, raw)
    }

    /// Like [`Loader::get`], but a tensor the source does not hold is initialised from `init`
    /// instead of being an error (modules GCG adds on top of a pretrained checkpoint, e.g. the
    /// frame-position embedding, which a fine-tuned checkpoint holds and a pretrained one does not).
    pub fn get_or_init(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let full = self.full_name(name);
        match &self.shared.source {
            Some(src) if !src.contains(&full) => {
                let raw = {
                    let mut rng = self.shared.rng.borrow_mut();
                    init.make(&shape, DType::F32, &self.shared.device, &mut rng)?
                };
                self.finish_tensor(&full, raw)
            }
            _ => self.get(shape, name, init),
        }
    }

    /// Register an already computed tensor (e.g. assembled from pieces) under `name`, trainable or
    /// frozen by the same rule as loaded tensors.
    pub fn adopt(&self, name: &str, t: Tensor) -> Result<Tensor> {
        self.finish_tensor(&self.full_name(name), t)
    }

    /// Mark a source tensor as consumed without building a parameter from it.
    pub fn mark_used(&self, name: &str) {
        self.shared.used.borrow_mut().insert(self.full_name(name));
    }

    /// Load a source tensor as stored (no shape check, no variable), marking it used.
    pub fn raw(&self, name: &str) -> Result<Tensor> {
        let full = self.full_name(name);
        let src = self
            .shared
            .source
            .as_ref()
            .ok_or_else(|| anyhow!("no checkpoint to read '{full}' from"))?;
        if !src.contains(&full) {
            bail!("missing tensor '{full}' in {}", src.describe());
        }
        self.shared.used.borrow_mut().insert(full.clone());
        src.load(&full, &self.shared.device)
    }

    fn finish_tensor(&self, full: &str, raw: Tensor) -> Result<Tensor> {
        if (self.shared.trainable)(full) {
            let mut vars = self.shared.vars.borrow_mut();
            if let Some(v) = vars.vars.get(full) {
                return Ok(v.as_tensor().clone());
            }
            let v = Var::from_tensor(&raw.to_dtype(DType::F32)?)?;
            let t = v.as_tensor().clone();
            vars.vars.insert(full.to_string(), v);
            Ok(t)
        } else {
            Ok(raw.to_dtype(self.shared.frozen_dtype)?)
        }
    }

    /// Check that the model consumed every tensor of the source (except ignored ones).
    pub fn finish(&self) -> Result<()> {
        let Some(src) = &self.shared.source else { return Ok(()) };
        let used = self.shared.used.borrow();
        let extra: Vec<String> = src
            .names()
            .into_iter()
            .filter(|n| !used.contains(n) && !(self.shared.ignored)(n))
            .collect();
        if !extra.is_empty() {
            let shown: Vec<String> = extra.iter().take(8).map(|n| src.origin(n)).collect();
            bail!(
                "{} tensor(s) of the checkpoint are not used by the model: {}{} (wrong checkpoint, or a config that does not match it?)",
                extra.len(),
                shown.join(", "),
                if extra.len() > 8 { ", ..." } else { "" }
            );
        }
        Ok(())
    }

    /// The trainable variables created so far.
    pub fn vars(&self) -> VarStore {
        self.shared.vars.borrow().clone()
    }

    /// Draw from the loader's generator (for initialisations computed outside [`Init`]).
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut SeededRng) -> T) -> T {
        f(&mut self.shared.rng.borrow_mut())
    }
}

/// Trainable variables by full name.
#[derive(Clone, Default)]
pub struct VarStore {
    pub vars: BTreeMap<String, Var>,
}

impl VarStore {
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }
    pub fn len(&self) -> usize {
        self.vars.len()
    }
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }
    pub fn num_params(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }
    pub fn extend(&mut self, other: VarStore) {
        self.vars.extend(other.vars);
    }

    /// Save as safetensors (atomically: written to a temporary name, then renamed).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let tensors: BTreeMap<String, Tensor> = self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
        crate::util::save_safetensors_atomic(&tensors, path)
    }

    /// The variables holding NaN or ±∞, by name, with where (a diverged training shows here).
    pub fn non_finite(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (name, var) in &self.vars {
            if let Some(bad) = crate::util::non_finite(var.as_tensor())? {
                out.push((name.clone(), bad.describe(var.dims())));
            }
        }
        Ok(out)
    }

    /// Overwrite the variables' values from a source (resume / load fine-tuned weights).
    /// Every variable must be present with its shape, floating point and finite.
    pub fn load_from(&self, src: &dyn TensorSource) -> Result<()> {
        for (name, var) in &self.vars {
            let meta = src
                .meta(name)
                .ok_or_else(|| anyhow!("missing trainable tensor '{name}' in {}", src.describe()))?;
            if meta.shape != var.dims() {
                bail!("tensor {} has shape {:?}, expected {:?}", src.origin(name), meta.shape, var.dims());
            }
            var.set(&load_weight(src, name, var)?)?;
            super::mark_written();
        }
        Ok(())
    }

    /// Warm start: overwrite the variables the source holds (shapes must match) and keep the
    /// others as initialised; tensors of the source that are not variables here are ignored.
    /// Returns the names of the variables the source did not have.
    pub fn load_matching(&self, src: &dyn TensorSource) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        for (name, var) in &self.vars {
            let Some(meta) = src.meta(name) else {
                missing.push(name.clone());
                continue;
            };
            if meta.shape != var.dims() {
                bail!("tensor {} has shape {:?}, expected {:?}", src.origin(name), meta.shape, var.dims());
            }
            var.set(&load_weight(src, name, var)?)?;
            super::mark_written();
        }
        Ok(missing)
    }
}

/// A variable's new value from `src`: floating point and finite, or an error naming it.
fn load_weight(src: &dyn TensorSource, name: &str, var: &Var) -> Result<Tensor> {
    let t = src
        .load(name, var.device())
        .with_context(|| format!("loading {}", src.origin(name)))?;
    if !t.dtype().is_float() {
        bail!(
            "tensor {} is stored as {:?}; model weights must be floating point",
            src.origin(name),
            t.dtype()
        );
    }
    if let Some(bad) = crate::util::non_finite(&t)? {
        bail!("tensor {} {:?} holds {}", src.origin(name), t.dims(), bad.describe(t.dims()));
    }
    Ok(t.to_dtype(var.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::Loader;
    use crate::weights::init::Init;
    use crate::weights::MapSource;
    use candle_core::{DType, Device, Tensor};
    use std::sync::Arc;

    fn source() -> MapSource {
        let dev = Device::Cpu;
        let mut w = vec![0.1f32; 6];
        w[4] = f32::NAN;
        MapSource::new(
            [
                ("ok.weight".to_string(), Tensor::ones((2, 3), DType::F32, &dev).unwrap()),
                ("nan.weight".to_string(), Tensor::from_vec(w, (2, 3), &dev).unwrap()),
                ("int.weight".to_string(), Tensor::zeros((2, 3), DType::I64, &dev).unwrap()),
            ],
            "ckpt.safetensors",
        )
    }

    #[test]
    fn non_finite_or_integer_weights_are_refused_by_name_or_listed_when_asked() -> anyhow::Result<()> {
        let lb = Loader::from_source(Arc::new(source()), &Device::Cpu, DType::F32);
        lb.get((2, 3), "ok.weight", Init::Zeros)?;
        let e = lb.get((2, 3), "nan.weight", Init::Zeros).unwrap_err().to_string();
        assert_eq!(
            e,
            "tensor 'nan.weight' in ckpt.safetensors [2, 3] holds 1 non-finite value (the first at [1, 1])"
        );
        let e = lb.get((2, 3), "int.weight", Init::Zeros).unwrap_err().to_string();
        assert!(e.contains("'int.weight' in ckpt.safetensors is stored as I64"), "{e}");

        // Trainable variables restored from a checkpoint are checked too.
        let lb = Loader::from_source(Arc::new(source()), &Device::Cpu, DType::F32).with_trainable(|_| true);
        lb.get((2, 3), "ok.weight", Init::Zeros)?;
        let vars = lb.vars();
        let mut bad = source();
        bad.insert("ok.weight", Tensor::full(f32::INFINITY, (2, 3), &Device::Cpu)?);
        let e = vars.load_from(&bad).unwrap_err().to_string();
        assert!(e.contains("'ok.weight'") && e.contains("6 non-finite values"), "{e}");

        let lb = Loader::from_source(Arc::new(source()), &Device::Cpu, DType::F32).collecting_value_problems();
        for name in ["ok.weight", "nan.weight", "int.weight"] {
            lb.get((2, 3), name, Init::Zeros)?;
        }
        let problems = lb.value_problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("'nan.weight'") && problems[1].contains("'int.weight'"));
        Ok(())
    }
}
