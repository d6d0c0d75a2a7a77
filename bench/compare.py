"""Runs the engine's bench and the PyTorch reference case by case, alternating, and prints the
ratios (engine / PyTorch) as a Markdown table (BENCHMARKS.md's latest tables are its output).

Each case runs in rounds: engine, PyTorch, engine, PyTorch, ... (`--rounds`, default 3), each a
process of its own that times the case at least `--repeats` times and until its timed runs add
up to `--min-seconds`.  A side's time is the median of its rounds' medians; the table also gives
the lowest and highest of the rounds' ratios, so a reader sees how much the machine moved.
Alternating keeps both sides of a ratio close in time on a shared, noisy machine.  The cases are
the engine's (`erasure-studio bench --list`); those the reference does not have are timed on the
engine only.

Usage:
  python3 bench/compare.py [--engine target/release/erasure-studio] [--python /work/venv/bin/python]
                           [--rounds R] [--repeats N] [--min-seconds S] [--only NAME[,NAME]]
                           [--json-out FILE]
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
    ap.add_argument("--rounds", type=int, default=3, help="alternating processes per side and case")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process, at least")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="timed seconds per process, at least")
    ap.add_argument("--only", default="")
    ap.add_argument("--json-out", help="also write every row as JSON lines to this file")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not names:
        listed = subprocess.run([args.engine, "bench", "--list"], check=True, capture_output=True, text=True)
        names = listed.stdout.split()
    timing = ["--json", "--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds)]
    rows = []
    for name in names:
        row = {"name": name, "engine": [], "torch": []}
        for _ in range(args.rounds):
            row["engine"].append(last_json_line([args.engine, "bench", *timing, "--only", name]))
            if name in REFERENCE_CASES:
                row["torch"].append(
                    last_json_line([args.python, str(HERE / "torch_reference.py"), *timing, "--only", name])
                )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print("| case | engine (s) | PyTorch (s) | ratio | rounds' ratios | peak RSS engine / PyTorch (MiB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        e = median_of(row["engine"])
        rss_e = max(r["peak_rss_mib"] for r in row["engine"])
        if not row["torch"]:
            print(f"| `{row['name']}` | {e:.3f} | — | — | — | {rss_e:.0f} / — |")
            continue
        t = median_of(row["torch"])
        rss_t = max(r["peak_rss_mib"] for r in row["torch"])
        ratios = [a["median_s"] / b["median_s"] for a, b in zip(row["engine"], row["torch"])]
        print(
            f"| `{row['name']}` | {e:.3f} | {t:.3f} | {e / t:.2f} | {min(ratios):.2f}–{max(ratios):.2f} "
            f"| {rss_e:.0f} / {rss_t:.0f} |"
        )
    if args.json_out:
        Path(args.json_out).write_text("".join(json.dumps(r) + "\n" for r in rows))


def median_of(results: list[dict]) -> float:
    """The median of the rounds' medians (the upper middle one of an even count)."""
    times = sorted(r["median_s"] for r in results)
    return times[len(times) // 2]


if __name__ == "__main__":
    main()
