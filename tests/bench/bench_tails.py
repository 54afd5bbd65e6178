"""Benchmark: bits per value of int6 SDClip codes (k = 12.85) for trained matrices against Gaussian ones.

The full-size record check (bench_quant.py --part fullsize) draws its matrices Gaussian; this shows
which way trained weights move the bytes. For each trained state dict given (e.g. the small models
bench_quant.py trains into --model-dir), the attention and MLP matrices are quantized as exported,
then the same shapes drawn Gaussian at each matrix's own std; both are packed with byte-shuffle +
brotli-11 and with ans. Run from the repo root (not collected by pytest):

    python tests/bench/bench_tails.py DIR/bench_quant/final_model.pt [more .pt files]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

SIX = dict(embed=8, head=8, attn=6, mlp=6, other=6)


def bits_per_value(matrices: dict[str, torch.Tensor]) -> dict[str, float]:
    entries = tg.quantize_state_dict(matrices, tg.QuantPlan("sdclip", SIX))
    values = sum(e.codes.numel() for e in entries)
    out = {}
    for coder in ("brotli", "ans"):
        stats: dict = {}
        tg.pack_artifact(entries, compressor=coder, stats=stats)
        out[coder] = 8 * stats["codes"] / values
    return out


def main() -> None:
    torch.manual_seed(0)
    print("| state dict | matrices | values | mean kurtosis | bits/value brotli | bits/value ans |")
    print("|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        sd = torch.load(path, map_location="cpu")
        trained = {n: t.float() for n, t in sd.items()
                   if tg.tensor_group(n) in ("attn", "mlp") and t.numel() >= tg.Hyperparameters.quant_min_numel}
        gaussian = {n: torch.randn_like(t) * t.std() for n, t in trained.items()}
        for label, mats in (("trained", trained), ("Gaussian, same shapes and stds", gaussian)):
            kurtosis = np.mean([float(((t - t.mean()) / t.std()).pow(4).mean()) for t in mats.values()])
            bpv = bits_per_value(mats)
            print(f"| {path} | {label} | {sum(t.numel() for t in mats.values()):,} | {kurtosis:.2f} | "
                  f"{bpv['brotli']:.3f} | {bpv['ans']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
