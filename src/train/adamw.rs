//! AdamW (decoupled weight decay, PyTorch's formulation) with global-norm gradient clipping, a
//! guard against non-finite gradients, optional exponential moving averages of the weights, and
//! state that checkpoints can save and restore exactly.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Gradients are rescaled so their global L2 norm is at most this.
    pub max_grad_norm: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (ramped up as
    /// `min(decay, (1 + t) / (10 + t))` so early weights fade fast). Diffusion models sample
    /// better from the average than from the last, noisy iterate.
    pub ema_decay: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            ema_decay: None,
        }
    }
}

/// What one call to `step` did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepOutcome {
    /// Parameters moved; the gradient norm before clipping.
    Applied { grad_norm: f64 },
    /// A gradient held NaN or infinity: nothing changed, not even the moments.
    SkippedNonFinite,
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    /// The moving average of `var`, when the config asks for one.
    ema: Option<Tensor>,
}

/// One parameter's optimiser state, as checkpoints save it.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub m: Tensor,
    pub v: Tensor,
    pub ema: Option<Tensor>,
}

pub struct AdamW {
    slots: Vec<Slot>,
    step: u64,
    config: AdamWConfig,
}

impl AdamW {
    /// Optimises `params` (name, variable); names key the saved state.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                let ema = config
                    .ema_decay
                    .map(|_| var.as_tensor().copy())
                    .transpose()?;
                Ok(Slot {
                    name,
                    m: zeros.clone(),
                    v: zeros,
                    var,
                    ema,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step: 0,
            config,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update from `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepOutcome> {
        let mut sq_sum = 0.0;
        for slot in &self.slots {
            if let Some(g) = grads.get(slot.var.as_tensor()) {
                sq_sum += g
                    .to_dtype(candle_core::DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
        }
        let grad_norm = sq_sum.sqrt();
        if !grad_norm.is_finite() {
            return Ok(StepOutcome::SkippedNonFinite);
        }
        let clip = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let ema_decay = c
            .ema_decay
            .map(|d| d.min((1.0 + t as f64) / (10.0 + t as f64)));
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            // Detached: the state must not keep a graph that links every step to the last.
            let g = (g.detach() * clip)?;
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?.detach();
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
            let m_hat = (&slot.m / bias1)?;
            let v_hat = (&slot.v / bias2)?;
            let theta = slot.var.as_tensor().detach();
            let decayed = (&theta * (1.0 - c.lr * c.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            slot.var.set(&(decayed - (update * c.lr)?)?)?;
            if let (Some(ema), Some(d)) = (&mut slot.ema, ema_decay) {
                *ema = ((&*ema * d)? + (slot.var.as_tensor() * (1.0 - d))?)?.detach();
            }
        }
        Ok(StepOutcome::Applied { grad_norm })
    }

    /// Moments (and moving averages) by parameter name, for checkpoints.
    pub fn state(&self) -> HashMap<String, SlotState> {
        self.slots
            .iter()
            .map(|s| {
                let state = SlotState {
                    m: s.m.clone(),
                    v: s.v.clone(),
                    ema: s.ema.clone(),
                };
                (s.name.clone(), state)
            })
            .collect()
    }

    /// Restores the state and step count saved by `state` / `steps`.
    pub fn restore(&mut self, state: &HashMap<String, SlotState>, steps: u64) -> Result<()> {
        for slot in &mut self.slots {
            let saved = state.get(&slot.name).ok_or_else(|| {
                candle_core::Error::Msg(format!("optimizer state for `{}` is missing", slot.name))
            })?;
            let like = |t: &Tensor, model: &Tensor| -> Result<Tensor> {
                if t.shape() != model.shape() {
                    candle_core::bail!("optimizer state for `{}` has the wrong shape", slot.name);
                }
                t.to_device(model.device())?.to_dtype(model.dtype())
            };
            slot.m = like(&saved.m, &slot.m)?;
            slot.v = like(&saved.v, &slot.v)?;
            if let Some(ema) = &mut slot.ema {
                let Some(saved_ema) = &saved.ema else {
                    candle_core::bail!(
                        "the checkpoint has no weight average for `{}`; it was trained without one",
                        slot.name
                    );
                };
                *ema = like(saved_ema, ema)?;
            }
        }
        self.step = steps;
        Ok(())
    }

    /// Replaces every parameter by its moving average (the weights to ship at the end of a
    /// run); without averages the parameters stay as they are.
    pub fn use_averages(&self) -> Result<()> {
        for slot in &self.slots {
            if let Some(ema) = &slot.ema {
                slot.var.set(ema)?;
            }
        }
        Ok(())
    }

    /// The optimised parameters, by name.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar_var(x: f64) -> Var {
        Var::from_tensor(&Tensor::new(&[x], &Device::Cpu).unwrap()).unwrap()
    }

    /// Two steps on f(x) = x², checked against AdamW's formulas written out by hand.
    #[test]
    fn matches_the_adamw_update_rule() {
        let x = scalar_var(3.0);
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            max_grad_norm: None,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], cfg).unwrap();
        let (mut m, mut v, mut theta) = (0.0f64, 0.0f64, 3.0f64);
        for t in 1..=2 {
            let grads = x
                .as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_eq!(
                opt.step(&grads).unwrap(),
                StepOutcome::Applied {
                    grad_norm: (2.0 * theta).abs()
                }
            );
            let g = 2.0 * theta;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let (mh, vh) = (m / (1.0 - 0.9f64.powi(t)), v / (1.0 - 0.999f64.powi(t)));
            theta = theta * (1.0 - 0.1 * 0.5) - 0.1 * mh / (vh.sqrt() + 1e-8);
            let got = x.as_tensor().to_vec1::<f64>().unwrap()[0];
            assert!((got - theta).abs() < 1e-12, "step {t}: {got} vs {theta}");
        }
        // No state may hold a graph: it would chain every step to the previous ones and grow
        // without bound.
        for s in opt.state().values() {
            assert!(!s.m.track_op() && !s.v.track_op());
        }
    }

    #[test]
    fn clips_the_global_norm_and_skips_non_finite_gradients() {
        let (a, b) = (scalar_var(3.0), scalar_var(4.0));
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            ..Default::default()
        };
        let mut opt =
            AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg).unwrap();
        // Gradients (3, 4): norm 5, clipped to 1 → moments see (0.6, 0.8).
        let loss =
            ((a.as_tensor().sqr().unwrap() + b.as_tensor().sqr().unwrap()).unwrap() * 0.5).unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            opt.step(&grads).unwrap(),
            StepOutcome::Applied { grad_norm: 5.0 }
        );
        let m = &opt.state()["a"].m;
        assert!((m.to_vec1::<f64>().unwrap()[0] - 0.1 * 0.6).abs() < 1e-6);

        let before = a.as_tensor().to_vec1::<f64>().unwrap();
        let nan = (a.as_tensor() * f64::NAN)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(opt.step(&nan).unwrap(), StepOutcome::SkippedNonFinite);
        assert_eq!(a.as_tensor().to_vec1::<f64>().unwrap(), before);
        assert_eq!(opt.steps(), 1);
    }

    /// The average follows `ema ← d·ema + (1 − d)·θ` with the ramped decay, and
    /// `use_averages` installs it.
    #[test]
    fn keeps_a_ramped_moving_average_of_the_weights() {
        let x = scalar_var(3.0);
        let cfg = AdamWConfig {
            lr: 0.1,
            ema_decay: Some(0.5),
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], cfg).unwrap();
        let mut ema = 3.0f64;
        for t in 1..=4 {
            let grads = x.as_tensor().sum_all().unwrap().backward().unwrap();
            opt.step(&grads).unwrap();
            let theta = x.as_tensor().to_vec1::<f64>().unwrap()[0];
            let d = 0.5f64.min((1.0 + t as f64) / (10.0 + t as f64));
            ema = d * ema + (1.0 - d) * theta;
        }
        let kept = opt.state()["x"]
            .ema
            .as_ref()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        assert!((kept - ema).abs() < 1e-12, "{kept} vs {ema}");
        opt.use_averages().unwrap();
        assert_eq!(x.as_tensor().to_vec1::<f64>().unwrap()[0], kept);
    }
}
