//! Resumable checkpoints: parameters, optimiser moments, weight averages and step count in one
//! safetensors file, written atomically so a crash leaves the previous checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};

use super::AdamW;
use super::adamw::SlotState;

const PARAM: &str = "param/";
const MOMENT1: &str = "adam_m/";
const MOMENT2: &str = "adam_v/";
const AVERAGE: &str = "ema/";
const STEPS_KEY: &str = "adamw_steps";

/// Writes the optimiser's parameters and state, plus `metadata`, to `path`.
pub fn save(path: &Path, opt: &AdamW, metadata: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, var) in opt.params() {
        tensors.insert(
            format!("{PARAM}{name}"),
            var.as_tensor().to_device(&Device::Cpu)?,
        );
    }
    for (name, state) in opt.state() {
        tensors.insert(format!("{MOMENT1}{name}"), state.m.to_device(&Device::Cpu)?);
        tensors.insert(format!("{MOMENT2}{name}"), state.v.to_device(&Device::Cpu)?);
        if let Some(ema) = state.ema {
            tensors.insert(format!("{AVERAGE}{name}"), ema.to_device(&Device::Cpu)?);
        }
    }
    let mut meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    meta.insert(STEPS_KEY.into(), opt.steps().to_string());
    crate::fs::atomically(path, |tmp| {
        Ok(safetensors::serialize_to_file(&tensors, Some(meta), tmp)?)
    })
}

/// Restores parameters and optimiser state saved by `save` into `opt`; returns the metadata.
pub fn load(path: &Path, opt: &mut AdamW) -> anyhow::Result<HashMap<String, String>> {
    let bytes = read(path)?;
    let metadata = metadata_of(path, &bytes)?;
    let steps: u64 = metadata
        .get(STEPS_KEY)
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "{}: no `{STEPS_KEY}` in the metadata; not a training checkpoint",
                path.display()
            )
        })?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let take = |key: String| -> anyhow::Result<&Tensor> {
        tensors.get(&key).with_context(|| {
            format!(
                "{}: `{key}` is missing; the checkpoint belongs to another model",
                path.display()
            )
        })
    };
    let mut state = HashMap::new();
    for (name, var) in opt.params() {
        let saved = take(format!("{PARAM}{name}"))?;
        if saved.shape() != var.as_tensor().shape() {
            bail!(
                "{}: `{name}` has shape {:?}, the model has {:?}",
                path.display(),
                saved.dims(),
                var.dims()
            );
        }
        var.set(&saved.to_device(var.device())?.to_dtype(var.dtype())?)?;
        let saved_state = SlotState {
            m: take(format!("{MOMENT1}{name}"))?.clone(),
            v: take(format!("{MOMENT2}{name}"))?.clone(),
            ema: tensors.get(&format!("{AVERAGE}{name}")).cloned(),
        };
        state.insert(name.to_string(), saved_state);
    }
    opt.restore(&state, steps)?;
    Ok(metadata)
}

/// The metadata of the checkpoint at `path`.
pub fn read_metadata(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    metadata_of(path, &read(path)?)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))
}

fn metadata_of(path: &Path, bytes: &[u8]) -> anyhow::Result<HashMap<String, String>> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a valid checkpoint ({e:?}); it may be truncated",
            path.display()
        )
    })?;
    Ok(header.metadata().clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::AdamWConfig;
    use candle_core::Var;

    fn run(opt: &mut AdamW, w: &Var, steps: usize) {
        let x = Tensor::new(&[[1.0f64, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
        for _ in 0..steps {
            let loss = (x.matmul(w.as_tensor()).unwrap() - 1.0)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
    }

    fn fresh() -> (AdamW, Var) {
        let w = Var::from_tensor(&Tensor::new(&[[0.3f64], [-0.1]], &Device::Cpu).unwrap()).unwrap();
        let config = AdamWConfig {
            ema_decay: Some(0.9),
            ..Default::default()
        };
        let opt = AdamW::new(vec![("w".into(), w.clone())], config).unwrap();
        (opt, w)
    }

    /// Three steps, save, reload into a fresh model, two more: identical to five straight,
    /// weight average included.
    #[test]
    fn resuming_reproduces_an_uninterrupted_run_exactly() {
        let dir = std::env::temp_dir().join(format!("ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ckpt.safetensors");
        let (mut straight, w_straight) = fresh();
        run(&mut straight, &w_straight, 5);

        let (mut first, w_first) = fresh();
        run(&mut first, &w_first, 3);
        let meta = BTreeMap::from([("stage".to_string(), "test".to_string())]);
        save(&path, &first, &meta).unwrap();
        let (mut resumed, w_resumed) = fresh();
        let loaded = load(&path, &mut resumed).unwrap();
        assert_eq!(loaded["stage"], "test");
        assert_eq!(resumed.steps(), 3);
        run(&mut resumed, &w_resumed, 2);
        assert_eq!(
            w_resumed.as_tensor().to_vec2::<f64>().unwrap(),
            w_straight.as_tensor().to_vec2::<f64>().unwrap()
        );
        let average = |opt: &AdamW| {
            opt.state()["w"]
                .ema
                .as_ref()
                .unwrap()
                .to_vec2::<f64>()
                .unwrap()
        };
        assert_eq!(average(&resumed), average(&straight));

        // A truncated checkpoint is refused with the file named.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = format!("{:#}", load(&path, &mut fresh().0).unwrap_err());
        assert!(
            err.contains("ckpt.safetensors") && err.contains("truncated"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
