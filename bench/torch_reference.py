"""PyTorch (diffusers / transformers) CPU reference timings at Stable Diffusion 1.5 size.

Models are built in memory with random weights (nothing is downloaded or read from disk),
run in float32, eval mode, with ``torch.set_num_threads(os.cpu_count())``.

Cases:
  unet_fwd_32_b2     UNet forward, latent 32x32, batch 2 (77x768 context)
  unet_fwd_64_b2     UNet forward, latent 64x64, batch 2
  unet_train_frozen_32_b1
                     UNet forward + backward of out.pow(2).mean(), latent 32x32, batch 1, the
                     base frozen and gradients only for a rank-4 LoRA (peft) on every attn2
                     to_k / to_v: the erasure trainer's step
  vae_decode_32_b1   VAE decode of a 32x32 latent (-> 256x256 image)
  vae_decode_64_b1   VAE decode of a 64x64 latent (-> 512x512 image)
  text_encoder_b2    CLIP ViT-L/14 text encoder, batch 2, 77 tokens
  demo_unet_fwd_b8   the built-in demo model's UNet (64/96/128 channels, 16x16 latents, 24x64
                     context; src/demo_world/architecture.rs), batch 8: one guided step of 4
  demo_vae_decode_b4 the demo model's VAE decode of 4 latents of 16x16 (-> 64x64 images)

Usage:
  /work/venv/bin/python bench/torch_reference.py [--json] [--repeats N] [--min-seconds S]
                                               [--only NAME[,NAME]]

Each case runs once as warm-up, then at least ``--repeats`` timed runs (default 3), and more
until the timed runs add up to ``--min-seconds`` (default 2), as ``erasure-studio bench`` does;
the median (the upper middle run of an even count, as there) is reported.  ``peak_rss_mib`` is the peak resident set size (getrusage) of a process that ran that
case alone: with several cases, each runs in a child process, as ``erasure-studio bench`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

CASES = [
    "unet_fwd_32_b2",
    "unet_fwd_64_b2",
    "unet_train_frozen_32_b1",
    "vae_decode_32_b1",
    "vae_decode_64_b1",
    "text_encoder_b2",
    "demo_unet_fwd_b8",
    "demo_vae_decode_b4",
]


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=768,
        attention_head_dim=8,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_eps=1e-5,
    )


def sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=512,
        scaling_factor=0.18215,
    )


def clip_vit_l14_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg)


def demo_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 96, 128),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=64,
        norm_num_groups=16,
        act_fn="silu",
    )


def demo_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        act_fn="silu",
        sample_size=64,
        mid_block_add_attention=False,
    )


def make_case(name: str):
    """Return a zero-argument callable that runs one iteration of the case."""
    gen = torch.Generator().manual_seed(0)
    if name == "demo_unet_fwd_b8":
        unet = demo_unet().eval()
        sample = torch.randn((8, 4, 16, 16), generator=gen)
        t = torch.tensor([500] * 8, dtype=torch.int64)
        ctx = torch.randn((8, 24, 64), generator=gen)

        def run():
            with torch.no_grad():
                return unet(sample, t, encoder_hidden_states=ctx).sample

        return run
    if name == "demo_vae_decode_b4":
        vae = demo_vae().eval()
        z = torch.randn((4, 4, 16, 16), generator=gen)

        def run():
            with torch.no_grad():
                return vae.decode(z).sample

        return run
    if name.startswith("unet_"):
        side = 32 if "_32_" in name else 64
        batch = int(name.rsplit("_b", 1)[1])
        unet = sd15_unet().eval()
        sample = torch.randn((batch, 4, side, side), generator=gen)
        t = torch.tensor([500] * batch, dtype=torch.int64)
        ctx = torch.randn((batch, 77, 768), generator=gen)
        if name.startswith("unet_train_frozen"):
            from peft import LoraConfig

            unet.requires_grad_(False)
            targets = [n for n, _ in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
            unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True, target_modules=targets))
            trainable = [p for p in unet.parameters() if p.requires_grad]
            assert trainable, "the LoRA should be the only trainable parameters"

            def run():
                for p in trainable:
                    p.grad = None
                out = unet(sample, t, encoder_hidden_states=ctx).sample
                loss = out.pow(2).mean()
                loss.backward()
                return loss.detach()

            return run

        def run():
            with torch.no_grad():
                return unet(sample, t, encoder_hidden_states=ctx).sample

        return run
    if name.startswith("vae_decode_"):
        side = 32 if "_32_" in name else 64
        vae = sd_vae().eval()
        z = torch.randn((1, 4, side, side), generator=gen)

        def run():
            with torch.no_grad():
                return vae.decode(z / vae.config.scaling_factor).sample

        return run
    if name == "text_encoder_b2":
        te = clip_vit_l14_text().eval()
        ids = torch.randint(0, 49406, (2, 77), generator=gen)
        ids[:, 0] = 49406
        ids[:, -1] = 49407

        def run():
            with torch.no_grad():
                return te(ids).last_hidden_state

        return run
    raise ValueError(f"unknown case {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object per case and line")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case after one warm-up (default 3)")
    ap.add_argument("--min-seconds", type=float, default=2.0,
                    help="more timed runs until they add up to this many seconds (default 2)")
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args()

    names = [n.strip() for n in args.only.split(",") if n.strip()] or CASES
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)

    if not args.json:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
              f"repeats>={args.repeats}, min_seconds={args.min_seconds}")
        print(f"{'case':24} {'median_s':>10} {'min_s':>10} {'runs':>5} {'peak_rss_mib':>13}")
    for name in names:
        if len(names) == 1:
            row = run_case(name, args.repeats, args.min_seconds)
        else:
            row = run_case_in_child(name, args.repeats, args.min_seconds)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{name:24} {row['median_s']:10.3f} {row['min_s']:10.3f} {row['runs']:5d} "
                  f"{row['peak_rss_mib']:13.1f}", flush=True)


def run_case(name: str, repeats: int, min_seconds: float) -> dict:
    run = make_case(name)
    run()  # warm-up
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "name": name,
        "median_s": times[len(times) // 2],
        "min_s": times[0],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "runs": len(times),
    }


def run_case_in_child(name: str, repeats: int, min_seconds: float) -> dict:
    """One case in a fresh process, so its peak RSS is its own (as the engine's bench does)."""
    cmd = [sys.executable, __file__, "--json", "--only", name, "--repeats", str(repeats),
           "--min-seconds", str(min_seconds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])

if __name__ == "__main__":
    main()
