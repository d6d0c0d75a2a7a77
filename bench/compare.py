"""Runs the engine's bench and the PyTorch reference case by case, alternating, and prints the
ratios (engine / PyTorch) as a Markdown table, as BENCHMARKS.md gives them.

Alternating the two per case keeps both sides of a ratio close in time on a shared, noisy
machine.  The cases are the engine's (`erasure-studio bench --list`); those the reference does
not have are timed on the engine only.

Usage:
  python3 bench/compare.py [--engine target/release/erasure-studio] [--python /work/venv/bin/python]
                           [--repeats N] [--only NAME[,NAME]] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE_CASES = {
    "text_encoder_b2",
    "unet_fwd_32_b2",
    "unet_fwd_64_b2",
    "unet_train_frozen_32_b1",
    "vae_decode_32_b1",
    "vae_decode_64_b1",
    "demo_unet_fwd_b8",
    "demo_vae_decode_b4",
}


def last_json_line(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="target/release/erasure-studio")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch, diffusers and peft")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--json-out", help="also write every row as JSON lines to this file")
    args = ap.parse_args()

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not names:
        listed = subprocess.run([args.engine, "bench", "--list"], check=True, capture_output=True, text=True)
        names = listed.stdout.split()
    rows = []
    for name in names:
        engine = last_json_line(
            [args.engine, "bench", "--json", "--only", name, "--repeats", str(args.repeats)]
        )
        reference = None
        if name in REFERENCE_CASES:
            reference = last_json_line(
                [args.python, str(HERE / "torch_reference.py"), "--json", "--only", name,
                 "--repeats", str(args.repeats)]
            )
        row = {"name": name, "engine": engine, "torch": reference}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print("| case | engine (s) | PyTorch (s) | ratio | peak RSS engine / PyTorch (MiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        e, t = row["engine"], row["torch"]
        if t is None:
            print(f"| `{row['name']}` | {e['median_s']:.3f} | — | — | {e['peak_rss_mib']:.0f} / — |")
        else:
            ratio = e["median_s"] / t["median_s"]
            print(
                f"| `{row['name']}` | {e['median_s']:.3f} | {t['median_s']:.3f} | {ratio:.2f} "
                f"| {e['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} |"
            )
    if args.json_out:
        Path(args.json_out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
