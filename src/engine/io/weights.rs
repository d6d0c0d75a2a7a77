//! Weight files: safetensors read through a memory map, with errors that name file and tensor.
//!
//! `WeightFiles` is a candle `SimpleBackend`, so model code asks a `VarBuilder` for tensors by
//! their checkpoint names and gets dtype conversion, shape checks and readable errors for free.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::bail;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use memmap2::Mmap;
use safetensors::tensor::{SafeTensors, TensorInfo, TensorView};

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Alternative checkpoint names: `(canonical fragment, legacy fragment)`. A tensor asked for by
/// its canonical name is also found under the legacy spelling.
pub type Aliases = &'static [(&'static str, &'static str)];

pub struct WeightFiles {
    files: Vec<MappedFile>,
    index: HashMap<String, (usize, TensorInfo)>,
    aliases: Aliases,
}

impl WeightFiles {
    /// Maps and validates every file (header, offsets, length) up front, so a truncated or
    /// corrupt file fails here with its path rather than half-way through a model.
    pub fn open(paths: &[PathBuf], aliases: Aliases) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(path)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
            // SAFETY: the map is read-only; the studio never writes model files while reading them.
            let mmap = unsafe { Mmap::map(&file) }
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: not a valid safetensors file ({e:?}); the file may be truncated or corrupt, download it again",
                    path.display()
                ))
            })?;
            let file_idx = files.len();
            for (name, info) in metadata.tensors() {
                index.insert(name, (file_idx, info.clone()));
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
            });
        }
        Ok(Self {
            files,
            index,
            aliases,
        })
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        names.join(", ")
    }

    /// The stored name for `name`, trying the legacy spellings of `aliases`.
    fn resolve(&self, name: &str) -> Option<&str> {
        if let Some((key, _)) = self.index.get_key_value(name) {
            return Some(key);
        }
        self.aliases.iter().find_map(|(canonical, legacy)| {
            let alt = name.replacen(canonical, legacy, 1);
            (alt != name)
                .then(|| self.index.get_key_value(&alt).map(|(k, _)| k.as_str()))
                .flatten()
        })
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let stored = self.resolve(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: tensor `{name}` not found ({} tensors in the file); the weights do not match the config",
                self.describe_files(),
                self.index.len()
            ))
        })?;
        let (file_idx, info) = &self.index[stored];
        let file = &self.files[*file_idx];
        let (start, end) = info.data_offsets;
        let bytes = &file.mmap[file.data_start + start..file.data_start + end];
        let view = TensorView::new(info.dtype, info.shape.clone(), bytes).map_err(|e| {
            candle_core::Error::Msg(format!("{}: tensor `{stored}`: {e:?}", file.path.display()))
        })?;
        view.load(device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| {
                candle_core::Error::Msg(format!("{}: tensor `{stored}`: {e}", file.path.display()))
            })
    }

    fn path_of(&self, name: &str) -> Option<&Path> {
        let stored = self.resolve(name)?;
        Some(&self.files[self.index[stored].0].path)
    }
}

impl SimpleBackend for WeightFiles {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let tensor = self.load(name, dtype, device)?;
        if tensor.shape() != &shape {
            let path = self.path_of(name).map(|p| p.display().to_string());
            candle_core::bail!(
                "{}: tensor `{name}` has shape {:?}, the config implies {:?}; the weights do not match the config",
                path.unwrap_or_default(),
                tensor.dims(),
                shape.dims()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }
}

/// The weight files of a component: `{stem}.safetensors`, else the `.fp16` variant, each either
/// whole or sharded with an `.index.json`.
pub fn weight_files(dir: &Path, stem: &str) -> anyhow::Result<Vec<PathBuf>> {
    for variant in ["", ".fp16"] {
        let single = dir.join(format!("{stem}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
        if index.is_file() {
            return sharded_files(&index);
        }
    }
    let pickle = dir.join(format!("{stem}.bin"));
    if pickle.is_file() {
        bail!(
            "{}: only .safetensors weights are supported; convert this PyTorch pickle to safetensors first",
            pickle.display()
        );
    }
    bail!(
        "{}: no weights found (expected {stem}.safetensors or {stem}.fp16.safetensors)",
        dir.display()
    )
}

fn sharded_files(index: &Path) -> anyhow::Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let parsed: Index = crate::engine::io::config::read_json(index)?;
    let dir = index.parent().expect("index has a parent");
    let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

pub(crate) fn component_weights(
    dir: &Path,
    stem: &str,
    aliases: Aliases,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<VarBuilder<'static>> {
    let files = weight_files(dir, stem)?;
    Ok(WeightFiles::open(&files, aliases)?.into_var_builder(dtype, device))
}
