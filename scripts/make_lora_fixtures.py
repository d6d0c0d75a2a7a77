"""Reference outputs of LoRA files as diffusers + peft apply them, for tests/lora.rs.

Writes under ``tests/fixtures/lora/`` (relative to the repo root):

* ``unet-inputs.safetensors`` -- ``unet.sample`` / ``unet.timesteps`` /
  ``unet.encoder_hidden_states`` for the tiny SD 1.x fixture model (the parity contract).
* ``diffusers-peft.safetensors`` -- a LoRA that diffusers saved itself
  (``StableDiffusionPipeline.save_lora_weights`` of a peft ``LoraConfig`` on every transformer
  linear and the 1x1-convolution ``proj_in`` / ``proj_out``, random weights).
* ``expected-exported-kohya.safetensors``, ``expected-diffusers-peft.safetensors`` and
  ``expected-stacked.safetensors`` -- ``unet.out`` of the UNet in float64 with (a) the kohya file
  this project exported, ``exported-kohya.safetensors`` (written by
  ``cargo test --test lora -- --ignored write_the_export_fixture``), (b) the file above, and
  (c) both at once, (a) at strength 0.5 and (b) at 1.

Run once by a developer, never by CI, from the repo root, after the Rust command above:

    pip install torch diffusers peft transformers safetensors
    python scripts/make_lora_fixtures.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

diffusers_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests/fixtures/tiny-sd1"
OUT = ROOT / "tests/fixtures/lora"
EXPORTED = OUT / "exported-kohya.safetensors"
PEFT_FILE = OUT / "diffusers-peft.safetensors"


def pipeline() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    channels = pipe.unet.config.in_channels
    context = pipe.text_encoder.config.hidden_size
    return {
        "unet.sample": torch.randn(2, channels, 8, 8, generator=generator),
        "unet.timesteps": torch.tensor([10, 500], dtype=torch.int64),
        "unet.encoder_hidden_states": torch.randn(2, 77, context, generator=generator),
    }


def unet_out(pipe: StableDiffusionPipeline, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    unet = pipe.unet.to(torch.float64)
    with torch.no_grad():
        out = unet(
            x["unet.sample"].double(),
            x["unet.timesteps"],
            encoder_hidden_states=x["unet.encoder_hidden_states"].double(),
        ).sample
    return {"unet.out": out.float().contiguous()}


def activate(unet, names: list[str], weights: list[float]) -> None:
    """Every named adapter on, each at its weight. (diffusers' ``set_adapters`` cannot expand
    weights for a UNet whose ``layers_per_block`` is a list, as the tiny model's is.)"""
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(names)
            for name, weight in zip(names, weights):
                if name in module.scaling:
                    module.set_scale(name, weight)


def make_peft_file() -> None:
    pipe = pipeline()
    config = LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
        init_lora_weights="gaussian",
    )
    pipe.unet.add_adapter(config)
    torch.manual_seed(11)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    StableDiffusionPipeline.save_lora_weights(
        OUT,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=config.to_dict(),
        weight_name=PEFT_FILE.name,
    )


def main() -> None:
    if not EXPORTED.exists():
        raise SystemExit(f"{EXPORTED} is missing: run the Rust command in this script's docstring first")
    OUT.mkdir(parents=True, exist_ok=True)
    x = inputs(pipeline())
    save_file(x, OUT / "unet-inputs.safetensors")
    make_peft_file()

    cases = {
        "exported-kohya": [(EXPORTED, 1.0)],
        "diffusers-peft": [(PEFT_FILE, 1.0)],
        "stacked": [(EXPORTED, 0.5), (PEFT_FILE, 1.0)],
    }
    for name, files in cases.items():
        pipe = pipeline()
        names = []
        for i, (path, _) in enumerate(files):
            adapter = f"a{i}"
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
            names.append(adapter)
        activate(pipe.unet, names, [w for _, w in files])
        save_file(unet_out(pipe, x), OUT / f"expected-{name}.safetensors")
        print(f"wrote expected-{name}.safetensors")


if __name__ == "__main__":
    main()
