//! AdamW with parameter groups (as `torch.optim.AdamW`), gradient clipping by global norm
//! (as `torch.nn.utils.clip_grad_norm_`), and gradient accumulation.

use crate::weights::VarStore;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One group of parameters with its own learning rate and weight decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupConfig {
    pub name: String,
    /// Base learning rate (the schedule multiplies it).
    pub lr: f64,
    pub weight_decay: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    group: usize,
    m: Tensor,
    v: Tensor,
    /// Updates this parameter received (torch keeps the step per parameter: a parameter without a
    /// gradient in some step keeps its own, smaller bias correction afterwards).
    step: u64,
}

/// AdamW over named variables split into groups. The update of each parameter p with gradient g
/// at step t (1-based), learning rate lr and weight decay λ is torch's:
/// p ← p·(1 − lr·λ); m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
/// p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε).
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub groups: Vec<GroupConfig>,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// `assign(name) -> group index` places every variable in a group.
    pub fn new(vars: &VarStore, groups: Vec<GroupConfig>, cfg: AdamWConfig, assign: impl Fn(&str) -> usize) -> Result<Self> {
        if groups.is_empty() {
            bail!("AdamW needs at least one parameter group");
        }
        let mut slots = Vec::new();
        for (name, var) in vars.iter() {
            let group = assign(name);
            if group >= groups.len() {
                bail!(
                    "parameter {name} assigned to group {group}, but there are only {} groups",
                    groups.len()
                );
            }
            if var.dtype() != DType::F32 && var.dtype() != DType::F64 {
                bail!("parameter {name} is {:?}; trainable parameters are kept in f32", var.dtype());
            }
            slots.push(Slot {
                name: name.clone(),
                var: var.clone(),
                group,
                m: var.zeros_like()?,
                v: var.zeros_like()?,
                step: 0,
            });
        }
        Ok(Self {
            cfg,
            groups,
            slots,
            step: 0,
        })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Number of parameters per group.
    pub fn group_sizes(&self) -> Vec<usize> {
        let mut n = vec![0; self.groups.len()];
        for s in &self.slots {
            n[s.group] += s.var.elem_count();
        }
        n
    }

    /// Apply one update with the gradients in `grads` and the group learning rates
    /// `base lr × lr_scale`. Parameters without a gradient are left unchanged (as torch does for
    /// `p.grad is None`), and their moments too.
    pub fn step(&mut self, grads: &Grads, lr_scale: f64) -> Result<()> {
        self.step_with(grads, &|base| base * lr_scale)
    }

    /// One update with each group's learning rate given by `lr(base rate of the group)`.
    pub fn step_with(&mut self, grads: &Grads, lr_of: &dyn Fn(f64) -> f64) -> Result<()> {
        self.step += 1;
        let (b1, b2, eps) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps);
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.name) else { continue };
            s.step += 1;
            let bc1 = 1.0 - b1.powi(s.step as i32);
            let bc2 = 1.0 - b2.powi(s.step as i32);
            // Detached, so that the moments never hold a graph (see `Grads::accumulate`).
            let g = g.to_dtype(s.var.dtype())?.detach();
            let gc = &self.groups[s.group];
            let lr = lr_of(gc.lr);
            let p = s.var.as_tensor();
            let decayed = if gc.weight_decay != 0.0 {
                p.affine(1.0 - lr * gc.weight_decay, 0.0)?
            } else {
                p.clone()
            };
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((s.v.sqrt()? / bc2.sqrt())? + eps)?;
            let update = ((&s.m / denom)? * (lr / bc1))?;
            s.var.set(&(decayed - update)?)?;
        }
        crate::weights::mark_written();
        Ok(())
    }

    /// The optimiser state as named tensors (`exp_avg.{name}`, `exp_avg_sq.{name}`, and the
    /// per-parameter update count `step.{name}` as an f64 scalar) for a checkpoint.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.insert(format!("exp_avg.{}", s.name), s.m.clone());
            out.insert(format!("exp_avg_sq.{}", s.name), s.v.clone());
            out.insert(format!("step.{}", s.name), Tensor::new(s.step as f64, &candle_core::Device::Cpu)?);
        }
        Ok(out)
    }

    /// Restore moments and the step counter saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            for (key, slot) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let k = format!("{key}.{}", s.name);
                let t = tensors.get(&k).ok_or_else(|| anyhow!("optimizer state has no '{k}'"))?;
                if t.dims() != s.var.dims() {
                    bail!("optimizer state '{k}' has shape {:?}, the parameter {:?}", t.dims(), s.var.dims());
                }
                *slot = t.to_dtype(s.var.dtype())?.to_device(s.var.device())?;
            }
            let k = format!("step.{}", s.name);
            let t = tensors.get(&k).ok_or_else(|| anyhow!("optimizer state has no '{k}'"))?;
            s.step = t.to_dtype(DType::F64)?.to_scalar::<f64>()? as u64;
        }
        self.step = step;
        Ok(())
    }
}

/// Gradients by parameter name, accumulated over micro-batches.
#[derive(Default)]
pub struct Grads {
    by_name: BTreeMap<String, Tensor>,
}

impl Grads {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Multiply every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.by_name.values_mut() {
            *g = (&*g * factor)?;
        }
        Ok(())
    }

    /// Add the gradients a backward pass computed for the variables of `vars`, times `scale`
    /// (1/accumulation steps). Only trainable variables are read: the frozen networks have none.
    ///
    /// Each is kept detached from the graph: candle detaches the gradients of inner nodes but
    /// not those it hands back for variables, and a weight's gradient (the product of an
    /// activation and an output gradient) would otherwise hold the step's whole forward graph —
    /// and through the optimiser's moments, every earlier step's too (the demo's CLIP
    /// pre-training grew by ~17 MB a step and slowed to a third of its speed).
    pub fn accumulate(&mut self, store: &GradStore, vars: &VarStore, scale: f64) -> Result<()> {
        for (name, var) in vars.iter() {
            let Some(g) = store.get(var.as_tensor()) else { continue };
            let g = g.detach();
            let g = if scale == 1.0 { g } else { (g * scale)? };
            let entry = match self.by_name.remove(name) {
                Some(prev) => (prev + g).with_context(|| format!("accumulating the gradient of {name}"))?,
                None => g,
            };
            self.by_name.insert(name.clone(), entry);
        }
        Ok(())
    }

    /// Insert a gradient directly (tests, other sources).
    pub fn insert(&mut self, name: impl Into<String>, g: Tensor) {
        self.by_name.insert(name.into(), g.detach());
    }

    /// √(Σ‖g‖²) over all gradients.
    pub fn global_norm(&self) -> Result<f64> {
        let mut total = 0f64;
        for g in self.by_name.values() {
            total += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(total.sqrt())
    }

    /// Are all gradients finite?
    pub fn all_finite(&self) -> Result<bool> {
        Ok(self.global_norm()?.is_finite())
    }

    /// `clip_grad_norm_(max_norm)`: scale all gradients by max_norm / (norm + 1e-6) when that is
    /// below 1. Returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in self.by_name.values_mut() {
                *g = (&*g * coef)?;
            }
        }
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Neither the accumulated gradients nor the moments hold a graph after a step: a weight
    /// whose gradient is an activation times an output gradient (here `w2`, behind `w1`) gets
    /// from candle a gradient that still points at the forward graph.
    #[test]
    fn gradients_and_moments_hold_no_graph() -> Result<()> {
        let dev = Device::Cpu;
        let mut vars = VarStore::default();
        let w1 = Var::from_vec((0..12).map(|i| 0.1 * i as f32).collect::<Vec<_>>(), (4, 3), &dev)?;
        let w2 = Var::from_vec((0..6).map(|i| 0.2 - 0.05 * i as f32).collect::<Vec<_>>(), (3, 2), &dev)?;
        vars.vars.insert("w1".into(), w1.clone());
        vars.vars.insert("w2".into(), w2.clone());
        let groups = vec![GroupConfig {
            name: "all".into(),
            lr: 1e-2,
            weight_decay: 0.1,
        }];
        let mut opt = AdamW::new(&vars, groups, AdamWConfig::default(), |_| 0)?;
        let x = Tensor::from_vec((0..8).map(|i| i as f32 - 3.0).collect::<Vec<_>>(), (2, 4), &dev)?;
        for _ in 0..3 {
            let y = x.matmul(w1.as_tensor())?.tanh()?.matmul(w2.as_tensor())?;
            let store = y.sqr()?.sum_all()?.backward()?;
            assert!(
                store.get(w2.as_tensor()).unwrap().track_op(),
                "candle's own gradient of w2 keeps its graph"
            );
            let mut grads = Grads::new();
            grads.accumulate(&store, &vars, 0.5)?;
            grads.accumulate(&store, &vars, 1.0)?;
            for name in ["w1", "w2"] {
                assert!(!grads.get(name).unwrap().track_op(), "the gradient of {name} holds a graph");
            }
            opt.step(&grads, 1.0)?;
            for s in &opt.slots {
                assert!(!s.m.track_op() && !s.v.track_op(), "the moments of {} hold a graph", s.name);
            }
        }
        Ok(())
    }
}
