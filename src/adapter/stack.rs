//! Adapter files of any format, loaded for generation and stacked with a strength each.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;

use candle_core::{DType, Device, Result as CandleResult, Tensor};

use super::ErasureAdapter;
use super::lora::{LoraAdapter, LoraFormat};
use crate::engine::models::unet::{CrossAttnLayer, UNet, UNetHook};

/// An adapter file loaded for sampling: this project's native adapter or a LoRA.
pub enum LoadedAdapter {
    Erasure(ErasureAdapter),
    Lora(LoraAdapter),
}

impl LoadedAdapter {
    /// Reads `path` as a native adapter file or a kohya / PEFT LoRA, whichever it is.
    pub fn load(path: &Path, unet: &UNet, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        if ErasureAdapter::is_native_file(path)? {
            let adapter = ErasureAdapter::load(path, unet, dtype, device)?;
            Ok(Self::Erasure(adapter.detached()))
        } else {
            Ok(Self::Lora(LoraAdapter::load(path, unet, dtype, device)?))
        }
    }

    pub fn set_strength(&mut self, strength: f64) {
        match self {
            Self::Erasure(a) => a.set_strength(strength),
            Self::Lora(l) => l.set_strength(strength),
        }
    }

    /// What was loaded, in words, with anything the engine leaves out.
    pub fn describe(&self) -> String {
        match self {
            Self::Erasure(a) => format!("erasure adapter at strength {}", a.strength()),
            Self::Lora(l) => {
                let format = match l.format() {
                    LoraFormat::Kohya => "kohya",
                    LoraFormat::Peft => "PEFT",
                };
                let mut text = format!(
                    "{format} LoRA on {} layers at strength {}",
                    l.layer_count(),
                    l.strength()
                );
                if !l.skipped().is_empty() {
                    text += &format!(
                        "; {} modules not applied (text encoder or outside the UNet's \
                         transformers), e.g. {}",
                        l.skipped().len(),
                        l.skipped()[0]
                    );
                }
                text
            }
        }
    }

    fn hook(&self) -> &dyn UNetHook {
        match self {
            Self::Erasure(a) => a,
            Self::Lora(l) => l,
        }
    }
}

/// An adapter file and its strength, written `FILE[:strength]` on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub path: PathBuf,
    pub strength: f64,
}

impl FromStr for AdapterSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, strength) = s
            .rsplit_once(':')
            .and_then(|(path, strength)| Some((path, strength.parse::<f64>().ok()?)))
            .unwrap_or((s, 1.0));
        if path.is_empty() {
            return Err(format!("`{s}` names no file; write FILE or FILE:STRENGTH"));
        }
        if !strength.is_finite() {
            return Err(format!("`{s}`: the strength must be a finite number"));
        }
        Ok(Self {
            path: PathBuf::from(path),
            strength,
        })
    }
}

/// Adapters applied together: their updates add up.
#[derive(Default)]
pub struct AdapterStack {
    pub adapters: Vec<LoadedAdapter>,
}

impl AdapterStack {
    /// Loads every file of `specs` at its strength.
    pub fn load(
        specs: &[AdapterSpec],
        unet: &UNet,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let adapters = specs
            .iter()
            .map(|spec| {
                let mut adapter = LoadedAdapter::load(&spec.path, unet, dtype, device)
                    .with_context(|| format!("adapter {}", spec.path.display()))?;
                adapter.set_strength(spec.strength);
                Ok(adapter)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { adapters })
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// The stack as a sampling hook; `None` when it is empty, so the base model runs as is.
    pub fn as_hook(&self) -> Option<&dyn UNetHook> {
        (!self.is_empty()).then_some(self as &dyn UNetHook)
    }
}

/// The sum of the updates that are present, or `None` when there are none.
fn sum(
    updates: impl Iterator<Item = CandleResult<Option<Tensor>>>,
) -> CandleResult<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for update in updates {
        if let Some(u) = update? {
            total = Some(match total {
                Some(t) => (t + u)?,
                None => u,
            });
        }
    }
    Ok(total)
}

impl UNetHook for AdapterStack {
    fn key_value_update(
        &self,
        layer: &CrossAttnLayer,
        context: &Tensor,
    ) -> CandleResult<Option<(Tensor, Tensor)>> {
        let updates = self
            .adapters
            .iter()
            .map(|a| a.hook().key_value_update(layer, context))
            .collect::<CandleResult<Vec<_>>>()?;
        let keys = sum(updates
            .iter()
            .map(|u| Ok(u.as_ref().map(|(k, _)| k.clone()))))?;
        let values = sum(updates
            .iter()
            .map(|u| Ok(u.as_ref().map(|(_, v)| v.clone()))))?;
        Ok(keys.zip(values))
    }

    fn layer_update(&self, path: &str, x: &Tensor) -> CandleResult<Option<Tensor>> {
        sum(self.adapters.iter().map(|a| a.hook().layer_update(path, x)))
    }
}
