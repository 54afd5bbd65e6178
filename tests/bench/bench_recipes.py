"""Benchmark: recipes and optimizer settings at a small CPU size, same parameters, same tokens.

Trains each configuration on the embedded sample (sp1024; built if missing) with the same number of
steps and tokens per step, and prints val_bpb before and after the export roundtrip and tokens/s.
Not collected by pytest (a benchmark, not a test). Run from the repo root:

    python tests/bench/bench_recipes.py [--suite recipes|optimizer|loader|details|all] [--steps 150]
                                        [--data sample|docshuffled|both] [--batch-tokens 16384] [--jobs 1]

`--jobs N` trains N configurations at once (set OMP_NUM_THREADS so that N of them share the cores);
rows print in table order either way.

Suite `recipes`: RECIPE=baseline vs RECIPE=record, sized to about the same unique parameter count
(printed). The record stack's looping switches on at 35% of the steps (no wallclock cap).
Suite `optimizer`: the baseline architecture trained with the baseline optimizer settings vs the
record ones (Polar Express, MuonEq-R, weight decay, fraction warmdown with MIN_LR, EMA 0.9965 with
its warm-up + SWA over the last 30%), exported at 8 bits both.
Suite `loader`: each recipe with TRAIN_LOADER=stream (a contiguous seeded stream: one batch holds a few
dozen neighbouring documents) vs TRAIN_LOADER=shuffled (seq_len+1 windows from all over the data).
`--data docshuffled` trains on a copy of the sample whose training documents are put in a seeded random
order before export (as FineWeb's shards are; the sample is in alphabetical order), with the same
tokenizer and validation set, so the table shows how much of the loader's gain survives there.
Suite `details`: the record recipe (4 layers, as in `recipes`) with each of its model details from
issue 20 turned back, one at a time and all together: document-masked attention, orthogonal init, and
the record's two-lane form (x0 blended into the attention read only) against ours before (`lane`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

COMMON = {
    "VOCAB_SIZE": "1024", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "256",
    "TRAIN_BATCH_TOKENS": "16384", "GRAD_ACCUM_STEPS": "1", "VAL_BATCH_SIZE": "65536", "WARMUP_STEPS": "0",
    "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "50", "COMPILE": "0",
}

# name -> env on top of COMMON. Unique parameters: baseline 6 layers x MLP 2x vs record 4 layers x MLP 4x
# (the record stack reuses layers 1-2 twice more, so it costs more FLOPs per token for the same size).
RECORD_OPTIMIZER = {
    "MUON_NS_COEFFICIENTS": "polar_express", "MUON_ROW_NORMALIZE": "1", "MUON_WD": "0.095", "EMBED_WD": "0.085",
    "ADAM_WD": "0.02", "WARMDOWN_FRAC": "0.5", "MIN_LR": "0.1", "EMA_DECAY": "0.9965", "SWA_START_FRAC": "0.7",
    "SWA_EVERY": "5", "MATRIX_BITS": "8",
}
# The record recipe at 4 layers: its depth rules give XSA on all 4, parallel from layer 1, loop 1-2.
# Exported and scored like the baseline (8-bit absmax + zlib, flat eval) so every row compares training
# alone, and a CPU run does not spend its time on GPTQ self-generation, stride-64 sliding windows or TTT.
RECORD_SMALL = {"RECIPE": "record", "NUM_LAYERS": "4", "NUM_LOOPS": "2", "MATRIX_BITS": "8", "QUANT_METHOD": "absmax",
                "COMPRESSOR": "zlib", "EVAL_STRIDE": "0", "TTT_ENABLED": "0"}
SUITES = {
    "recipes": {
        "baseline": {"RECIPE": "baseline", "NUM_LAYERS": "6"},
        "record": RECORD_SMALL,
    },
    "loader": {
        "record, stream": {**RECORD_SMALL, "TRAIN_LOADER": "stream"},
        "record, shuffled": {**RECORD_SMALL, "TRAIN_LOADER": "shuffled"},
        "baseline, stream": {"RECIPE": "baseline", "NUM_LAYERS": "6", "TRAIN_LOADER": "stream"},
        "baseline, shuffled": {"RECIPE": "baseline", "NUM_LAYERS": "6", "TRAIN_LOADER": "shuffled"},
    },
    "details": {
        "record": RECORD_SMALL,
        "record, DOC_MASKED_ATTENTION=0": {**RECORD_SMALL, "DOC_MASKED_ATTENTION": "0"},
        "record, ORTHO_INIT=0": {**RECORD_SMALL, "ORTHO_INIT": "0"},
        "record, PARALLEL_X0_MIX=lane": {**RECORD_SMALL, "PARALLEL_X0_MIX": "lane"},
        "record, all three back": {**RECORD_SMALL, "DOC_MASKED_ATTENTION": "0", "ORTHO_INIT": "0",
                                   "PARALLEL_X0_MIX": "lane"},
    },
    "optimizer": {
        "baseline-optimizer": {"RECIPE": "baseline", "NUM_LAYERS": "6"},
        "record-optimizer": {"RECIPE": "baseline", "NUM_LAYERS": "6", **RECORD_OPTIMIZER},
    },
}

PATTERNS = {
    "params": r"^model_params:(\d+)",
    "pre_bpb": r"^pre-quantization post-\w+ val_loss:[\d.]+ val_bpb:([\d.]+)",
    "bpb": r"^final_int\d_\w+_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)",
    "train_ms": r"^step:\d+/\d+ val_loss:.* train_time:(\d+)ms",
    "bytes": r"^artifact code_bytes:\d+ model_bytes:\d+ total_bytes:(\d+)",
}


def run_config(name: str, env: dict, steps: int, sample: dict, workdir: Path) -> dict:
    # WARMDOWN_ITERS is the baseline's schedule; configs with WARMDOWN_FRAC use the fraction instead.
    full = {**os.environ, **COMMON, "WARMDOWN_ITERS": str(max(steps // 3, 1)), **env, "ITERATIONS": str(steps),
            "DATA_PATH": sample["dataset_dir"], "TOKENIZER_PATH": sample["tokenizer_path"],
            "ARTIFACT_DIR": str(workdir / name), "RUN_ID": name}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        full.pop(k, None)
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=full, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    out = {}
    for key, pattern in PATTERNS.items():
        matches = re.findall(pattern, proc.stdout, re.M)
        out[key] = float(matches[-1])
    out["tok_per_s"] = steps * int(COMMON["TRAIN_BATCH_TOKENS"]) / (out["train_ms"] / 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--data", choices=["sample", "docshuffled", "both"], default="sample")
    parser.add_argument("--batch-tokens", type=int, default=int(COMMON["TRAIN_BATCH_TOKENS"]),
                        help="tokens per step (a multiple of the sequence length 256)")
    parser.add_argument("--jobs", type=int, default=1, help="configurations trained at once")
    args = parser.parse_args()
    COMMON["TRAIN_BATCH_TOKENS"] = str(args.batch_tokens)
    from data.prepare_sample import prepare_sample

    sample = prepare_sample(vocab_size=1024)
    configs = {k: v for name, suite in SUITES.items() if args.suite in (name, "all") for k, v in suite.items()}
    tokens = args.steps * int(COMMON["TRAIN_BATCH_TOKENS"])
    print(f"sample sp1024, {args.steps} steps x {COMMON['TRAIN_BATCH_TOKENS']} tokens = {tokens:,} tokens each, "
          f"seq {COMMON['TRAIN_SEQ_LEN']}, dim {COMMON['MODEL_DIM']}, float32 on CPU")
    print("| data | config | unique params | val_bpb pre-quant | val_bpb int8 roundtrip | artifact bytes | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {"sample": sample}
        if args.data in ("docshuffled", "both"):
            datasets["docshuffled"] = docshuffled_copy(sample, Path(tmp) / "docshuffled")
        if args.data == "docshuffled":
            del datasets["sample"]
        rows = [(data_name, data, name, env) for data_name, data in datasets.items() for name, env in configs.items()]
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:  # threads only wait on subprocesses
            futures = [pool.submit(run_config, f"{d}-{n}".replace(", ", "-"), env, args.steps, data, Path(tmp))
                       for d, data, n, env in rows]
            for (data_name, _, name, _), future in zip(rows, futures):
                r = future.result()
                print(f"| {data_name} | {name} | {int(r['params']):,} | {r['pre_bpb']:.4f} | {r['bpb']:.4f} "
                      f"| {int(r['bytes']):,} | {r['tok_per_s']:,.0f} |", flush=True)


def docshuffled_copy(sample: dict, root: Path) -> dict:
    """The sample with its training documents in a seeded random order; same tokenizer, same validation."""
    import random

    from data.export_shards import export_dataset
    from data.prepare_sample import load_sample_docs, split_sample

    train, val, _ = split_sample(load_sample_docs())
    random.Random(0).shuffle(train)
    return export_dataset(train, val, datasets_root=root / "datasets", tokenizers_root=root / "tokenizers",
                          dataset_name="sample_sp1024_docshuffled", tokenizer_name="sample_1024_bpe",
                          vocab_size=1024, reuse_tokenizer=sample["tokenizer_path"])


if __name__ == "__main__":
    main()
