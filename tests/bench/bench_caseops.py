"""Benchmark: CaseOps against plain tokens at equal vocabulary, bits per byte of the original text.

Exports the embedded sample twice with the same settings and vocabulary, plain (`sample_sp<V>`) and
case-transformed (`--caseops`: `sample_sp<V>_lossless_caps_caseops_v1_reserved`, scored on its byte
sidecar), then trains the same small model on each for the same steps and tokens per step and prints
the validation bytes each counts (equal: both are the original text's), tokens per byte, and val_bpb
before and after the int8 export roundtrip. Not collected by pytest. Run from the repo root:

    python tests/bench/bench_caseops.py [--vocab-size 1024] [--steps 150] [--seeds 1337]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

COMMON = {
    "RECIPE": "baseline", "NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "8192", "GRAD_ACCUM_STEPS": "1", "VAL_BATCH_SIZE": "65536",
    "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "50", "COMPILE": "0",
    "MATRIX_BITS": "8",
}
PATTERNS = {
    "val": r"^val_loader:.* tokens:(\d+) targets:\d+ bytes:(\d+) byte_source:(\w+)",
    "pre_bpb": r"^pre-quantization post-\w+ val_loss:[\d.]+ val_bpb:([\d.]+)",
    "bpb": r"^final_int\d_\w+_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)",
}


def run(name: str, data: dict, vocab: int, steps: int, seed: int, workdir: Path, caseops: bool) -> dict:
    env = {**os.environ, **COMMON, "VOCAB_SIZE": str(vocab), "ITERATIONS": str(steps), "SEED": str(seed),
           "WARMDOWN_ITERS": str(max(steps // 3, 1)), "DATA_PATH": data["dataset_dir"],
           "TOKENIZER_PATH": data["tokenizer_path"], "CASEOPS_ENABLED": "1" if caseops else "0",
           "ARTIFACT_DIR": str(workdir), "RUN_ID": f"{name}-{seed}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    tokens, num_bytes, source = re.findall(PATTERNS["val"], proc.stdout, re.M)[-1]
    return dict(tokens=int(tokens), bytes=int(num_bytes), source=source,
                pre_bpb=float(re.findall(PATTERNS["pre_bpb"], proc.stdout, re.M)[-1]),
                bpb=float(re.findall(PATTERNS["bpb"], proc.stdout, re.M)[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    args = parser.parse_args()
    from data.prepare_sample import prepare_sample

    datasets = {"plain": prepare_sample(vocab_size=args.vocab_size),
                "caseops": prepare_sample(vocab_size=args.vocab_size, caseops=True)}
    print(f"sample, vocab {args.vocab_size}, {args.steps} steps x {COMMON['TRAIN_BATCH_TOKENS']} tokens, "
          f"{COMMON['NUM_LAYERS']}x{COMMON['MODEL_DIM']}, seq {COMMON['TRAIN_SEQ_LEN']}, float32 on CPU")
    print("| data | seed | val tokens | val bytes (source) | tokens/byte | val_bpb pre-quant "
          "| val_bpb int8 roundtrip |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, data in datasets.items():
                r = run(name, data, args.vocab_size, args.steps, seed, Path(tmp), caseops=name == "caseops")
                print(f"| {name} | {seed} | {r['tokens']:,} | {r['bytes']:,} ({r['source']}) | "
                      f"{r['tokens'] / r['bytes']:.4f} | {r['pre_bpb']:.4f} | {r['bpb']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
