"""Generate the parity fixtures that the Rust test-suite compares against.

What it writes (everything under ``tests/fixtures/``, relative to the repo root):

* ``clip-tokenizer/tokenizer/``  -- the full OpenAI CLIP BPE tokenizer (49408 tokens) in the
  Hugging Face folder layout (vocab.json, merges.txt, tokenizer_config.json,
  special_tokens_map.json), rebuilt from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.
* ``tiny-sd1/`` and ``tiny-sd2/`` -- two tiny random-weight Stable-Diffusion models in the
  diffusers folder layout (model_index.json, tokenizer/, text_encoder/, unet/, vae/,
  scheduler/).  tiny-sd1 mimics SD 1.x (quick_gelu CLIP, ``text_model.`` key prefix,
  conv proj_in/out, int attention_head_dim, PNDM scheduler config); tiny-sd2 mimics SD 2.x
  (gelu CLIP without key prefix, linear proj_in/out, per-block head counts, upcast attention,
  pad token "!", DDIM v-prediction scheduler config with leading spacing, steps_offset 0 and
  clip_sample true, which StableDiffusionPipeline rewrites to 1 and false).
* ``tokenizer-json/tokenizer/tokenizer.json`` -- tiny-sd1's tokenizer in the fast-tokenizer
  file format only.
* ``tiny-clip/`` and ``parity/clip-{inputs,expected}.safetensors`` -- a tiny random-weight
  ``CLIPModel`` (text and image towers, projections) and its ``get_image_features`` /
  ``get_text_features`` outputs.
* ``parity/tokenizer-{inputs,expected}.safetensors`` -- ~30 tricky prompts and their ids
  from ``transformers.CLIPTokenizer`` with the full vocabulary.
* ``parity/{sd1,sd2}-{inputs,expected}.safetensors`` -- inputs and float64 reference outputs
  of tokenizer, text encoder, UNet, VAE decoder and a full StableDiffusionPipeline (DDIM) run
  on the tiny models.  Contract (input name -> output name):
    metadata ``prompts`` (JSON list)                  -> ``tokenizer.input_ids``        I64 [N, 77]
    ``text_encoder.input_ids`` I64 [B, 77]            -> ``text_encoder.last_hidden_state`` F32 [B, 77, D]
    ``unet.sample`` / ``unet.timesteps`` / ``unet.encoder_hidden_states`` -> ``unet.out``
    ``vae.latents`` (scaled, as the UNet sees them)  -> ``vae.image`` (raw decode of latents / scaling_factor)
    ``pipeline.input_ids`` / ``pipeline.uncond_input_ids`` / ``pipeline.init_latents`` /
    ``pipeline.guidance_scale`` F32 [1] / ``pipeline.steps`` I64 [1] -> ``pipeline.latents``
  Float outputs are computed with every model in float64 and stored as F32.
* ``parity/ddim.json`` -- DDIMScheduler reference values for a set of configs.
* ``parity/README.md`` -- float32-vs-float64 noise floor of every float output.

Everything is deterministic (fixed torch seeds, no network, no downloaded weights).
Run once by a developer, never by CI, from the repo root in a Python environment with the
packages below (PyPI's torch is large; a virtual environment outside the repo is best):

    pip install torch diffusers transformers safetensors && pip install --no-deps open-clip-torch
    python scripts/make_parity_fixtures.py

Requirements: torch, diffusers, transformers, safetensors and an installed open_clip
(only its bundled BPE merges file is used).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import unicodedata
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save_bytes

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()


def save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors save with a byte-for-byte reproducible header.

    safetensors' own writer emits ``__metadata__`` entries in hash-map (random) order, so
    files with more than one metadata key would differ between runs.  We re-serialise its
    header with sorted keys (data section and offsets are untouched) and re-pad it to a
    multiple of 8 bytes, as the format requires.
    """
    raw = st_save_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    text += b" " * (-len(text) % 8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.write(raw[8 + n :])
    # Round-trip check.
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(tensors), path
        for k in tensors:
            assert torch.equal(f.get_tensor(k), tensors[k].cpu()), (path, k)
        assert (f.metadata() or {}) == (metadata or {}), path


REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
PARITY = FIXTURES / "parity"

MAX_LEN = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
FULL_MERGES = 49152 - 256 - 2  # number of merges OpenAI CLIP uses (48894)
TINY_MERGES = 1500


# --------------------------------------------------------------------------------------
# Tokenizer files
# --------------------------------------------------------------------------------------


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins of GPT-2 byte-level BPE, in GPT-2/CLIP vocabulary order.

    Bytes that are already printable (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to
    themselves and come first; the remaining bytes map to U+0100, U+0101, ... in byte order.
    Returns the characters in vocabulary order (index == position in the CLIP vocab).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    assert len(chars) == 256 and len(set(chars)) == 256
    return chars


def load_clip_merges() -> list[tuple[str, str]]:
    import importlib.util

    # Locate open_clip without importing it (its import pulls in torchvision).
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "open_clip is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : FULL_MERGES + 1]]
    assert len(merges) == FULL_MERGES
    assert all(len(m) == 2 for m in merges)
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    alphabet = byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token in vocabulary"
    return vocab


def _added_token(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def special_tokens_map(pad_token: str) -> dict:
    return {
        "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS),
        "pad_token": pad_token,
        "unk_token": _added_token(EOS),
    }


def sd1_tokenizer_config() -> dict:
    """tokenizer_config.json as shipped with SD 1.x diffusers repos (minus local paths)."""

    def typed(content):
        return {"__type": "AddedToken", **_added_token(content)}

    return {
        "add_prefix_space": False,
        "bos_token": typed(BOS),
        "do_lower_case": True,
        "eos_token": typed(EOS),
        "errors": "replace",
        "model_max_length": MAX_LEN,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": typed(EOS),
    }


def write_json(path: Path, obj, compact: bool = False, inline_number_lists: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compact:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=2)
        if inline_number_lists:
            # Put lists of plain numbers on one line to keep the file short and readable.
            text = re.sub(
                r"\[\s*(-?[0-9][0-9.eE+-]*(?:,\s*-?[0-9][0-9.eE+-]*)*)\s*\]",
                lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
                text,
            )
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text + "\n")


def write_tokenizer_dir(
    out: Path,
    merges: list[tuple[str, str]],
    pad_token: str,
    with_tokenizer_config: bool,
) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    write_json(out / "vocab.json", vocab, compact=True)
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    write_json(out / "special_tokens_map.json", special_tokens_map(pad_token))
    if with_tokenizer_config:
        write_json(out / "tokenizer_config.json", sd1_tokenizer_config())
    return vocab


def tokenize(tok: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tok(prompts, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    t = torch.tensor(ids, dtype=torch.int64)
    assert t.shape == (len(prompts), MAX_LEN), t.shape
    return t


LONG_PROMPT = " ".join(
    f"word{i % 17} {w}"
    for i, w in enumerate(
        (
            "the quick brown fox jumps over the lazy dog while a majestic castle rises above "
            "misty mountains under a golden sunset sky with dramatic clouds and birds flying "
            "across the horizon near a calm lake reflecting every colour of the evening light"
        ).split()
        * 2
    )
)  # 120+ words: exercises truncation to 77 tokens


TOKENIZER_PROMPTS = [
    "a photo of a cat",
    "a photo of an astronaut riding a horse, highly detailed, 8k, trending on artstation",
    "A PHOTO OF A CAT IN UPPER CASE",
    "Mixed CaSe WoRdS and DON'T Don't",
    "wow!!! amazing... really?!?",
    "hello,world",
    "it's a dog, don't worry, they'll come, we're fine, I'm here, you've seen, he'd go",
    "a 'quoted' word and ''double single'' quotes",
    "the year 1999, pi is 3.14 and 1,000,000 people",
    "caf\u00e9",  # NFC
    "cafe\u0301",  # NFD
    "a na\u00efve \u00c5ngstr\u00f6m",  # NFC
    unicodedata.normalize("NFD", "a na\u00efve \u00c5ngstr\u00f6m"),  # NFD
    "Stra\u00dfe in \u0130stanbul",  # German sharp s, Turkish dotted capital I
    "\u4e00\u53ea\u732b\u5750\u5728\u684c\u5b50\u4e0a, \u6771\u4eac\u306e\u591c\u666f",  # CJK
    "a cute dog \U0001f436 wearing a hat \U0001f3a9\U0001f44d\U0001f3fd",  # emoji (+ skin tone)
    "tabs\tand\nnewlines   and    multiple spaces",
    "   leading and trailing spaces   ",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space and zero\u200bwidth space",
    "a cat<|endoftext|>a dog",
    "<|startoftext|> literal start token",
    "",
    LONG_PROMPT,
    "masterpiece, best quality, (ultra detailed:1.2), portrait of a woman, bokeh, 35mm",
    "oil painting of a lighthouse at sunset by greg rutkowski and alphonse mucha",
    "low quality, blurry, deformed, bad anatomy, watermark, signature",
    'semi-colons; colons: "double quotes" (parentheses) [brackets] {braces}',
    "email@example.com #hashtag $100 50% a+b=c ~tilde_under",
    "<b>html &amp; entities</b>",
    "\u03a9mega \u03b4elta \u041f\u0420\u0418\u0412\u0415\u0422 \u043c\u0438\u0440",
]


def make_full_tokenizer(merges) -> None:
    tok_dir = FIXTURES / "clip-tokenizer" / "tokenizer"
    vocab = write_tokenizer_dir(tok_dir, merges, pad_token=EOS, with_tokenizer_config=True)
    assert len(vocab) == 49408
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 49408, len(tok)
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407
    assert tok.model_max_length == MAX_LEN
    # Well-known ids of the real OpenAI CLIP vocabulary.
    known = tok("a photo of a cat").input_ids
    assert known == [49406, 320, 1125, 539, 320, 2368, 49407], known

    ids = tokenize(tok, TOKENIZER_PROMPTS)
    save_file({}, PARITY / "tokenizer-inputs.safetensors", metadata={"prompts": json.dumps(TOKENIZER_PROMPTS)})
    save_file(
        {"tokenizer.input_ids": ids},
        PARITY / "tokenizer-expected.safetensors",
        metadata={"prompts": json.dumps(TOKENIZER_PROMPTS)},
    )
    print(f"full tokenizer: {len(vocab)} tokens, {len(TOKENIZER_PROMPTS)} prompts")
    for p, row in zip(TOKENIZER_PROMPTS, ids.tolist()):
        n = row.index(49407) + 1 if 49407 in row else MAX_LEN
        print(f"  {p[:40]!r:46} -> {row[:n][:14]}{' ...' if n > 14 else ''}")


# --------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter so that no path is trivially zero / identity.

    Constant tensors (norm weights = 1, biases = 0, zero-initialised projections) get
    absolute noise (or a fresh fan-in scaled init for all-zero matrices); everything else
    gets 5% of its own standard deviation as noise.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            std = p.float().std().item() if p.numel() > 1 else 0.0
            if std < 1e-6:
                if p.dim() >= 2 and p.abs().max().item() == 0.0:
                    p.copy_(noise / math.sqrt(p[0].numel()))
                else:
                    p.add_(0.1 * noise)
            else:
                p.add_(0.05 * std * noise)


def model_index(scheduler_class: str) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    # clip_sample and steps_offset are what StableDiffusionPipeline's constructor rewrites (to
    # False and 1): the fixture checks that the engine applies the same corrections.
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

MODELS = {
    "sd1": dict(
        dir="tiny-sd1",
        seed=1,
        pad_token=EOS,
        tokenizer_config=True,
        text_prefix=True,
        text=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="quick_gelu",
            projection_dim=32,
        ),
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 24, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=[2, 1, 2],
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=8,
            use_linear_projection=False,
            # Options real SD checkpoints leave at their defaults, set here so the engine is checked
            # on them too (diffusers ignores resnet_out_scale_factor for these block types).
            transformer_layers_per_block=[2, 1, 1],
            resnet_out_scale_factor=2.0,
            mid_block_scale_factor=1.5,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=16,
            scaling_factor=0.18215,
        ),
        scheduler=SD1_SCHEDULER,
    ),
    "sd2": dict(
        dir="tiny-sd2",
        seed=2,
        pad_token="!",
        tokenizer_config=False,
        text_prefix=False,
        text=dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=3,
            hidden_act="gelu",
            projection_dim=48,
        ),
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            norm_num_groups=16,
            cross_attention_dim=48,
            attention_head_dim=[2, 4, 4],
            use_linear_projection=True,
            upcast_attention=True,
            act_fn="swish",
            flip_sin_to_cos=False,
            freq_shift=1,
            downsample_padding=0,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=16,
            scaling_factor=0.13025,
        ),
        scheduler=SD2_SCHEDULER,
    ),
}


def build_model_dir(name: str, merges) -> Path:
    spec = MODELS[name]
    root = FIXTURES / spec["dir"]
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    write_json(root / "model_index.json", model_index(spec["scheduler"]["_class_name"]))

    tiny_merges = merges[:TINY_MERGES]
    vocab = write_tokenizer_dir(
        root / "tokenizer", tiny_merges, pad_token=spec["pad_token"], with_tokenizer_config=spec["tokenizer_config"]
    )
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    assert len(tok) == len(vocab) == 512 + TINY_MERGES + 2, (len(tok), len(vocab))

    # ---- text encoder
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        max_position_embeddings=MAX_LEN,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=tok.pad_token_id,
        **spec["text"],
    )
    torch.manual_seed(spec["seed"] * 100 + 1)
    te = CLIPTextModel(cfg).eval()
    perturb_(te, spec["seed"] * 100 + 2)
    te_dir = root / "text_encoder"
    te.save_pretrained(te_dir, safe_serialization=True)
    st_path = te_dir / "model.safetensors"
    sd = {k: v.contiguous() for k, v in te.state_dict().items()}
    if spec["text_prefix"]:
        sd = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in sd.items()}
    else:
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    # Drop non-persistent / derivable buffers if any slipped in.
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    save_file(sd, st_path, metadata={"format": "pt"})
    reloaded, info = CLIPTextModel.from_pretrained(te_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in te.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k

    # ---- unet
    torch.manual_seed(spec["seed"] * 100 + 3)
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    perturb_(unet, spec["seed"] * 100 + 4)
    unet.save_pretrained(root / "unet", safe_serialization=True)

    # ---- vae
    torch.manual_seed(spec["seed"] * 100 + 5)
    vae = AutoencoderKL(**spec["vae"]).eval()
    perturb_(vae, spec["seed"] * 100 + 6)
    vae.save_pretrained(root / "vae", safe_serialization=True)

    # ---- scheduler
    write_json(root / "scheduler" / "scheduler_config.json", spec["scheduler"])

    # The whole folder must load as a diffusers pipeline.
    pipe = StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    return root


# --------------------------------------------------------------------------------------
# Parity inputs / expected outputs
# --------------------------------------------------------------------------------------


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    b = b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def load_components(root: Path, dtype: torch.dtype):
    te = CLIPTextModel.from_pretrained(root / "text_encoder").to(dtype).eval()
    unet = UNet2DConditionModel.from_pretrained(root / "unet").to(dtype).eval()
    vae = AutoencoderKL.from_pretrained(root / "vae").to(dtype).eval()
    return te, unet, vae


PARITY_SPEC = {
    "sd1": dict(
        prompts=[
            "a photo of a cat",
            "an astronaut riding a horse, highly detailed, 8k",
            "",
            "Caf\u00e9 \u00c5ngstr\u00f6m!!! it's 1999",
            LONG_PROMPT,
        ],
        te_prompts=["a photo of a cat", "", "an astronaut riding a horse, highly detailed, 8k"],
        unet_b=2,
        unet_hw=(8, 8),
        unet_t=[1, 500],
        vae_b=2,
        vae_hw=(8, 8),
        pipe_prompts=["a photo of a cat", "an astronaut riding a horse, highly detailed"],
        pipe_negative=["", ""],
        pipe_hw=(8, 8),
        guidance=7.5,
        steps=8,
    ),
    "sd2": dict(
        prompts=[
            "a photo of a cat",
            "an oil painting of a lighthouse at sunset",
            "",
            "naive dog!!! don't 3.14",
            LONG_PROMPT,
        ],
        te_prompts=["a photo of a cat", "", "an oil painting of a lighthouse at sunset"],
        unet_b=3,
        unet_hw=(6, 10),
        unet_t=[1, 500, 999],
        vae_b=1,
        vae_hw=(4, 6),
        pipe_prompts=["a photo of a cat", "an oil painting of a lighthouse at sunset", "a red apple"],
        pipe_negative=["", "blurry, low quality", ""],
        pipe_hw=(8, 12),
        guidance=4.0,
        steps=6,
    ),
}


def run_pipeline(root: Path, te, unet, vae, tok, scheduler_config, ids, uncond_ids, init_latents, guidance, steps, h, w):
    scheduler = DDIMScheduler.from_config(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond = te(ids)[0]
        uncond = te(uncond_ids)[0]
        out = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            latents=init_latents,
            height=h * pipe.vae_scale_factor,
            width=w * pipe.vae_scale_factor,
            num_inference_steps=steps,
            guidance_scale=guidance,
            eta=0.0,
            output_type="latent",
        ).images
    return out, pipe


def make_parity(name: str, root: Path) -> dict[str, float]:
    spec = PARITY_SPEC[name]
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    scheduler_config = json.load(open(root / "scheduler" / "scheduler_config.json"))
    gen = torch.Generator().manual_seed({"sd1": 11, "sd2": 22}[name])

    inputs: dict[str, torch.Tensor] = {}
    # tokenizer
    tok_ids = tokenize(tok, spec["prompts"])
    # text encoder
    inputs["text_encoder.input_ids"] = tokenize(tok, spec["te_prompts"])
    te32 = CLIPTextModel.from_pretrained(root / "text_encoder")
    d = te32.config.hidden_size
    # unet
    b, (h, w) = spec["unet_b"], spec["unet_hw"]
    inputs["unet.sample"] = torch.randn((b, 4, h, w), generator=gen)
    inputs["unet.timesteps"] = torch.tensor(spec["unet_t"], dtype=torch.int64)
    inputs["unet.encoder_hidden_states"] = torch.randn((b, MAX_LEN, d), generator=gen)
    # vae
    b, (h, w) = spec["vae_b"], spec["vae_hw"]
    inputs["vae.latents"] = torch.randn((b, 4, h, w), generator=gen)
    # pipeline
    h, w = spec["pipe_hw"]
    inputs["pipeline.input_ids"] = tokenize(tok, spec["pipe_prompts"])
    inputs["pipeline.uncond_input_ids"] = tokenize(tok, spec["pipe_negative"])
    inputs["pipeline.init_latents"] = torch.randn((len(spec["pipe_prompts"]), 4, h, w), generator=gen)
    inputs["pipeline.guidance_scale"] = torch.tensor([spec["guidance"]], dtype=torch.float32)
    inputs["pipeline.steps"] = torch.tensor([spec["steps"]], dtype=torch.int64)

    results = {}
    for dtype in (torch.float64, torch.float32):
        te, unet, vae = load_components(root, dtype)
        r = {}
        with torch.no_grad():
            r["text_encoder.last_hidden_state"] = te(inputs["text_encoder.input_ids"]).last_hidden_state
            r["unet.out"] = unet(
                inputs["unet.sample"].to(dtype),
                inputs["unet.timesteps"],
                encoder_hidden_states=inputs["unet.encoder_hidden_states"].to(dtype),
            ).sample
            r["vae.image"] = vae.decode(inputs["vae.latents"].to(dtype) / vae.config.scaling_factor).sample
        r["pipeline.latents"], pipe = run_pipeline(
            root,
            te,
            unet,
            vae,
            tok,
            scheduler_config,
            inputs["pipeline.input_ids"],
            inputs["pipeline.uncond_input_ids"],
            inputs["pipeline.init_latents"].to(dtype),
            spec["guidance"],
            spec["steps"],
            h,
            w,
        )
        results[dtype] = r
        if dtype == torch.float64:
            effective_sched = {k: v for k, v in sorted(dict(pipe.scheduler.config).items()) if not k.startswith("_")}
            pipe_timesteps = pipe.scheduler.timesteps.tolist()
        else:
            # Cross-check: letting the pipeline tokenize the prompt strings itself gives the
            # same latents as feeding the embeddings of our ids.
            tok.model_max_length = MAX_LEN  # tiny-sd2 has no tokenizer_config.json
            with torch.no_grad():
                via_prompts = pipe(
                    prompt=spec["pipe_prompts"],
                    negative_prompt=spec["pipe_negative"],
                    latents=inputs["pipeline.init_latents"],
                    height=h * pipe.vae_scale_factor,
                    width=w * pipe.vae_scale_factor,
                    num_inference_steps=spec["steps"],
                    guidance_scale=spec["guidance"],
                    eta=0.0,
                    output_type="latent",
                ).images
            assert torch.equal(via_prompts, r["pipeline.latents"]), "prompt path != embeddings path"

    expected = {"tokenizer.input_ids": tok_ids}
    floors = {}
    for k, v64 in results[torch.float64].items():
        assert v64.dtype == torch.float64, (k, v64.dtype)
        assert torch.isfinite(v64).all(), k
        expected[k] = v64.to(torch.float32).contiguous()
        floors[k] = rel_l2(results[torch.float32][k], v64)
    for k, v in expected.items():
        print(f"  {name} {k:34} {str(list(v.shape)):16} {str(v.dtype):14}" + (
            f" |x|_rms={v.double().pow(2).mean().sqrt().item():.4g}  f32-vs-f64 rel L2={floors[k]:.3g}" if k in floors else ""
        ))

    meta_in = {"prompts": json.dumps(spec["prompts"])}
    meta_out = {
        "prompts": json.dumps(spec["prompts"]),
        "generator": f"scripts/make_parity_fixtures.py (torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__})",
        "pipeline.prompts": json.dumps(spec["pipe_prompts"]),
        "pipeline.negative_prompts": json.dumps(spec["pipe_negative"]),
        "pipeline.scheduler_config": json.dumps(effective_sched, default=str),
        "pipeline.timesteps": json.dumps(pipe_timesteps),
    }
    save_file({k: v.contiguous() for k, v in inputs.items()}, PARITY / f"{name}-inputs.safetensors", metadata=meta_in)
    save_file(expected, PARITY / f"{name}-expected.safetensors", metadata=meta_out)
    print(f"  {name} pipeline timesteps: {pipe_timesteps}")
    return floors, effective_sched, pipe_timesteps


# --------------------------------------------------------------------------------------
# DDIM scheduler fixture
# --------------------------------------------------------------------------------------

DDIM_SAMPLE = [0.5, -1.25, 0.3, 2.0]
DDIM_MODEL_OUTPUT = [0.1, -0.4, 0.8, -0.3]
DDIM_VARIANCE_NOISE = [0.7, -0.2, -1.1, 0.4]

DDIM_CASES = [
    # name, config overrides, num_inference_steps
    ("sd15_leading_offset1_50", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon"), 50),
    ("sd15_leading_offset1_10", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon"), 10),
    ("linear_leading_offset0_alpha1_sample_10", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, prediction_type="sample"), 10),
    ("linear_linspace_offset0_alpha1_eps_10", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="linspace", steps_offset=0, set_alpha_to_one=True, prediction_type="epsilon"), 10),
    ("scaled_linspace_offset1_eps_50", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace", steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon"), 50),
    ("sd2_trailing_offset0_alpha1_v_50", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, prediction_type="v_prediction"), 50),
    ("cosine_trailing_offset0_alpha1_v_10", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, prediction_type="v_prediction"), 10),
    ("cosine_leading_offset1_alpha0_eps_50", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon"), 50),
    ("zero_snr_trailing_v_10", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, prediction_type="v_prediction", rescale_betas_zero_snr=True), 10),
    # 48 and 112 trailing steps: numpy's arange rounding differs from T - i*ratio at .5 ties.
    ("sd2_trailing_v_48", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, prediction_type="v_prediction"), 48),
    ("sd2_trailing_v_112", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, prediction_type="v_prediction"), 112),
    ("clip_sample_v_leading_20", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, prediction_type="v_prediction", clip_sample=True, clip_sample_range=0.5), 20),
]


def _floats(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.reshape(-1).tolist()]


def make_ddim() -> None:
    sample = torch.tensor(DDIM_SAMPLE, dtype=torch.float64).reshape(1, 1, 2, 2)
    model_output = torch.tensor(DDIM_MODEL_OUTPUT, dtype=torch.float64).reshape(1, 1, 2, 2)
    noise = torch.tensor(DDIM_VARIANCE_NOISE, dtype=torch.float64).reshape(1, 1, 2, 2)
    cases = []
    for name, overrides, n in DDIM_CASES:
        cfg = dict(num_train_timesteps=1000, clip_sample=False)
        cfg.update(overrides)
        sched = DDIMScheduler(**cfg)
        sched.set_timesteps(n)
        ts = [int(t) for t in sched.timesteps.tolist()]
        ac = sched.alphas_cumprod
        steps = []
        for idx in (0, n // 2, n - 1):
            t = ts[idx]
            out = sched.step(model_output, t, sample, eta=0.0).prev_sample
            steps.append({"timestep": t, "eta": 0.0, "prev_sample": _floats(out)})
        t = ts[n // 2]
        out = sched.step(model_output, t, sample, eta=1.0, variance_noise=noise).prev_sample
        steps.append({"timestep": t, "eta": 1.0, "use_variance_noise": True, "prev_sample": _floats(out)})
        full_cfg = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
        cases.append(
            {
                "name": name,
                "config": full_cfg,
                "num_inference_steps": n,
                "alphas_cumprod": {str(i): float(ac[i]) for i in (0, 1, 500, 999)},
                "final_alpha_cumprod": float(sched.final_alpha_cumprod),
                "timesteps": ts,
                "steps": steps,
            }
        )
    doc = {
        "_comment": (
            "DDIMScheduler reference values from diffusers "
            f"{diffusers.__version__}, generated by scripts/make_parity_fixtures.py. "
            "betas/alphas_cumprod are float32 in diffusers (values here are those float32 numbers); "
            "step() was run on float64 sample/model_output of shape [1,1,2,2] (row-major values below). "
            "prev_timestep inside step() is timestep - num_train_timesteps // num_inference_steps for every spacing; "
            "a negative prev_timestep uses final_alpha_cumprod. eta=1 entries use variance_noise. "
            "Suggested tolerance: 1e-5 absolute."
        ),
        "sample": DDIM_SAMPLE,
        "model_output": DDIM_MODEL_OUTPUT,
        "variance_noise": DDIM_VARIANCE_NOISE,
        "shape": [1, 1, 2, 2],
        "cases": cases,
    }
    write_json(PARITY / "ddim.json", doc, inline_number_lists=True)
    print(f"ddim.json: {len(cases)} cases")


# --------------------------------------------------------------------------------------


def write_readme(floors: dict, scheds: dict) -> None:
    lines = [
        "# Parity fixtures",
        "",
        "Generated by `scripts/make_parity_fixtures.py` (run it with `/work/venv/bin/python scripts/make_parity_fixtures.py`",
        f"from the repo root; torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}).",
        "Do not edit by hand. Float references are computed in float64 and stored as F32.",
        "",
        "## float32 noise floor",
        "",
        "Relative L2 difference ||f32 - f64|| / ||f64|| of the same torch computation run in float32",
        "(a Rust float32 implementation cannot be expected to get much closer than this):",
        "",
        "| model | output | rel L2 (torch f32 vs f64) |",
        "|---|---|---|",
    ]
    for model, fl in floors.items():
        for k, v in fl.items():
            lines.append(f"| {model} | `{k}` | {v:.1e} |")
    lines += [
        "",
        "## Pipeline notes",
        "",
        "`pipeline.latents` is `StableDiffusionPipeline(..., scheduler=DDIMScheduler.from_config(scheduler_config))`",
        "with `prompt_embeds = text_encoder(pipeline.input_ids)[0]`, `negative_prompt_embeds = text_encoder(pipeline.uncond_input_ids)[0]`,",
        "`latents = init_latents`, eta 0, `output_type=\"latent\"`. Classifier-free guidance batches [uncond, cond].",
        "The pipeline constructor forces `steps_offset = 1` on the scheduler config (deprecation shim), so the",
        "effective DDIM configs and timesteps were:",
        "",
    ]
    for model, (cfg, ts) in scheds.items():
        keep = {k: cfg[k] for k in ("beta_schedule", "beta_start", "beta_end", "prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr") if k in cfg}
        lines.append(f"* {model}: `{json.dumps(keep)}` -> timesteps `{ts}`")
    lines += [
        "",
        "Other reference quirks worth knowing: diffusers builds betas / alphas_cumprod in float32 even when the",
        "models run in float64, and the UNet's sinusoidal timestep embedding is computed in float32 and then cast",
        "to the model dtype. DDIM's `step()` uses `prev_t = t - 1000 // num_inference_steps` for every spacing.",
        "",
        "## Tokenizer notes (transformers " + transformers.__version__ + " `CLIPTokenizer`, tokenizers backend)",
        "",
        "* Normalizer: NFC, then every `\\s+` run (incl. tab, newline, U+00A0, U+3000) -> one space, then lowercase",
        "  (Unicode full lowercase: `İ` -> `i` + U+0307). No ftfy, no HTML unescape (`&amp;` stays `& amp ;`).",
        "  NFD input therefore tokenizes exactly like its NFC form.",
        "* Pre-tokenizer: regex `<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`",
        "  (non-matching text, i.e. whitespace, is dropped), then GPT-2 byte-level mapping; `</w>` ends each word.",
        "  Digits are single-digit words; U+200B (zero-width space) is not whitespace and becomes its own word.",
        "* Literal `<|endoftext|>` / `<|startoftext|>` inside a prompt become the special ids (49407 / 49406)",
        "  and tokenization continues after them. (Quirk: with these files bos is a `normalized` added token and",
        "  eos is not, so `<|STARTOFTEXT|>` in upper case also becomes 49406 but `<|ENDOFTEXT|>` does not become",
        "  49407; no fixture prompt depends on this.)",
        "* Truncation keeps 75 content tokens + bos + eos; padding uses the pad token after eos.",
        "* tiny-sd2 has no tokenizer_config.json: `special_tokens_map.json` is honoured, so pad is `!` = id 0, and",
        "  `model_max_length` is unset (1e30) -- use 77 (the text encoder's max_position_embeddings).",
        "",
    ]
    (PARITY / "README.md").write_text("\n".join(lines), encoding="utf-8")


def make_clip() -> None:
    """``tiny-clip/``: a tiny random-weight ``CLIPModel`` (both towers and projections) with
    tiny-sd1's tokenizer, and ``parity/clip-{inputs,expected}.safetensors``:
    ``clip.pixel_values`` F32 [B, 3, S, S] -> ``clip.image_embeds`` (``get_image_features``),
    ``clip.input_ids`` I64 [B, 77] -> ``clip.text_embeds`` (``get_text_features``)."""
    from transformers import CLIPConfig, CLIPModel

    root = FIXTURES / "tiny-clip"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tok_dir = FIXTURES / "tiny-sd1" / "tokenizer"
    for f in tok_dir.iterdir():
        shutil.copy(f, root / f.name)
    tok = CLIPTokenizer.from_pretrained(root)
    torch.manual_seed(7)
    config = CLIPConfig(
        # eos_token_id 2 is the legacy value real OpenAI checkpoints carry: the pooled text
        # output then sits at the highest id of each row.
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            eos_token_id=2, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, hidden_act="quick_gelu",
        ),
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    perturb_(model, 7)
    model.save_pretrained(root, safe_serialization=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "model.safetensors", metadata={"format": "pt"})
    gen = torch.Generator().manual_seed(8)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    ids = tokenize(tok, ["a red striped star on a black background", "a photo of a cat", ""])
    with torch.no_grad():
        m64 = model.double()
        image = m64.get_image_features(pixel_values=pixels.double()).pooler_output
        text = m64.get_text_features(input_ids=ids).pooler_output
    save_file({"clip.pixel_values": pixels, "clip.input_ids": ids}, PARITY / "clip-inputs.safetensors")
    save_file(
        {"clip.image_embeds": image.float(), "clip.text_embeds": text.float()},
        PARITY / "clip-expected.safetensors",
    )
    print(f"tiny-clip: wrote {root.relative_to(REPO)}")


def make_tokenizer_json() -> None:
    """``tokenizer-json/tokenizer/``: tiny-sd1's tokenizer saved by transformers as ``tokenizer.json``
    only (the fast-tokenizer file format), to check the engine reads that format identically."""
    root = FIXTURES / "tokenizer-json"
    if root.exists():
        shutil.rmtree(root)
    out = root / "tokenizer"
    out.mkdir(parents=True)
    tok = CLIPTokenizer.from_pretrained(FIXTURES / "tiny-sd1" / "tokenizer")
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    print(f"tokenizer-json: wrote {out.relative_to(REPO)}")


def main() -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    PARITY.mkdir(parents=True, exist_ok=True)
    merges = load_clip_merges()
    make_full_tokenizer(merges)
    floors = {}
    scheds = {}
    for name in ("sd1", "sd2"):
        root = build_model_dir(name, merges)
        print(f"{name}: wrote {root.relative_to(REPO)}")
        fl, cfg, ts = make_parity(name, root)
        floors[name] = fl
        scheds[name] = (cfg, ts)
    make_tokenizer_json()
    make_clip()
    make_ddim()
    write_readme(floors, scheds)
    total = 0
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
    print(f"total fixture size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
