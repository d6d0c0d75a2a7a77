//! LoRA files in the two formats other tools share: kohya (`lora_unet_<module>.lora_down.weight`,
//! `.lora_up.weight`, `.alpha`; A1111, ComfyUI) and PEFT / diffusers (`unet.<module>.lora_A.weight`,
//! `.lora_B.weight`, rank and alpha in the `lora_adapter_metadata` metadata). `import` reads
//! them, `export` writes an erasure adapter as one; both name modules and tensors through
//! [`LoraFormat`].

mod export;
mod import;

pub use export::LoraExport;
pub use import::LoraAdapter;

/// The two LoRA file formats other tools share, read and written alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Peft,
}

/// Which part of a module's update `scale · up · down` a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    Down,
    Up,
    Alpha,
}

impl LoraFormat {
    /// The format of a file with these tensor names, if it is a LoRA file at all.
    pub fn detect<'a>(mut names: impl Iterator<Item = &'a str>) -> Option<Self> {
        names.find_map(|n| {
            if n.starts_with("lora_unet_") || n.starts_with("lora_te") {
                Some(Self::Kohya)
            } else if n.contains(".lora_A.") || n.contains(".lora_B.") {
                Some(Self::Peft)
            } else {
                None
            }
        })
    }

    /// The name this format gives the UNet module at diffusers path `path`.
    fn module_name(self, path: &str) -> String {
        match self {
            Self::Kohya => format!("lora_unet_{}", path.replace('.', "_")),
            Self::Peft => format!("unet.{path}"),
        }
    }

    /// The full name of `part` of the update of the module at diffusers path `path`, as written.
    fn tensor_name(self, path: &str, part: Part) -> String {
        let suffix = self
            .suffixes()
            .iter()
            .find_map(|&(suffix, p)| (p == part).then_some(suffix))
            .unwrap_or_default();
        format!("{}{suffix}", self.module_name(path))
    }

    /// A tensor name split into its module and which part of the update it holds.
    fn split_name(self, name: &str) -> Option<(&str, Part)> {
        self.suffixes()
            .iter()
            .find_map(|(suffix, part)| name.strip_suffix(suffix).map(|m| (m, *part)))
    }

    /// The tensor name suffixes of each part of a module's update; the first of each part is
    /// the one an export writes.
    fn suffixes(self) -> &'static [(&'static str, Part)] {
        match self {
            Self::Kohya => &[
                (".lora_down.weight", Part::Down),
                (".lora_up.weight", Part::Up),
                (".alpha", Part::Alpha),
            ],
            Self::Peft => &[
                (".lora_A.weight", Part::Down),
                (".lora_B.weight", Part::Up),
                (".lora_A.default.weight", Part::Down),
                (".lora_B.default.weight", Part::Up),
            ],
        }
    }
}
