//! Gradient bookkeeping: sums over passes, scaling, and a snapshot to undo an epoch.

use candle_core::Tensor;
use candle_core::backprop::GradStore;

use super::ErasureTrainer;

impl ErasureTrainer<'_> {
    /// A copy of the weights and optimiser state, to undo a partly trained epoch.
    pub(super) fn snapshot(&self) -> candle_core::Result<Snapshot> {
        Ok(Snapshot {
            weights: self
                .opt
                .params()
                .map(|(_, var)| var.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
            state: self.opt.state(),
            steps: self.opt.steps(),
        })
    }

    pub(super) fn restore(&mut self, snapshot: Snapshot) -> candle_core::Result<()> {
        for ((_, var), saved) in self.opt.params().zip(&snapshot.weights) {
            var.set(saved)?;
        }
        self.opt.restore(&snapshot.state, snapshot.steps)
    }

    pub(super) fn scale(&self, grads: &mut GradStore, factor: f64) -> candle_core::Result<()> {
        for (_, var) in self.opt.params() {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * factor)?);
            }
        }
        Ok(())
    }

    /// Adds the adapter variables' gradients in `grads` to `into` (other tensors' gradients,
    /// which a backward pass also returns, are dropped).
    pub(super) fn accumulate(
        &self,
        into: &mut GradStore,
        grads: &GradStore,
    ) -> candle_core::Result<()> {
        for (_, var) in self.opt.params() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let sum = match into.get(var.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g.detach(),
            };
            into.insert(var.as_tensor(), sum);
        }
        Ok(())
    }
}

pub(super) struct Snapshot {
    weights: Vec<Tensor>,
    state: std::collections::HashMap<String, crate::train::adamw::SlotState>,
    steps: u64,
}
