"""Benchmark: our full training step against a bare reference step of the same model, in one process.

"ours" is `train_gpt.train()` itself (loader with prefetch, the agreed clock, schedules, EMA/SWA
bookkeeping, logging rules); "bare" is forward + backward + the same optimizers' steps on batches made
in advance, nothing else. Blocks of `--steps` steps alternate (bare, ours, bare, ours, ...), so a
machine that gets busier or quieter affects both alike; the first pair is a warm-up and not counted.
A profiled block of ours also reports the share of its wall time spent outside torch operators
(host-side Python between operators), and each side its voluntary context switches per step (an
OpenMP thread that went to sleep between operators instead of spin-waiting: what a second OpenMP
team in a loader thread caused, see TokenStream). Run from the repo root:

    python tests/bench/bench_step.py [--shape tiny|record] [--steps 10] [--rounds 3] [--set KEY=VALUE ...]

Shapes: `tiny` is the issue's comparison shape (RECIPE=baseline, 4 layers x 128, MLP 2x, seq 256,
8,192 tokens/step, vocab 1024); `record` is RECIPE=record at its full width and depth on CPU (seq 256,
8,192 tokens/step to keep a step short). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

SHAPES = {
    "tiny": {"RECIPE": "baseline", "NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
             "MLP_MULT": "2", "VOCAB_SIZE": "1024"},
    # ENABLE_LOOPING_AT=0: the layer loop runs from the first step, in ours and in bare alike, so both
    # do the same model work (a block of a few steps would otherwise switch it on part-way through).
    "record": {"RECIPE": "record", "VOCAB_SIZE": "8192", "ENABLE_LOOPING_AT": "0"},
}
# WARMDOWN_ITERS=0 and no fraction schedule: a flat LR, so the bare step (which sets no LR) trains alike.
COMMON = {"TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "8192", "GRAD_ACCUM_STEPS": "1", "WARMUP_STEPS": "0",
          "WARMDOWN_ITERS": "0", "WARMDOWN_FRAC": "0", "MIN_LR": "0",
          "VAL_LOSS_EVERY": "0", "MAX_WALLCLOCK_SECONDS": "0", "TRAIN_LOG_EVERY": "1000000", "COMPILE": "0"}
CPU = tg.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)


def synthetic_shards(folder: Path, vocab: int, tokens: int = 2_000_000) -> None:
    rng = np.random.default_rng(0)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, tokens)
    data = rng.integers(0, vocab, tokens).astype("<u2")
    data[:: 500] = 1  # documents
    (folder / "fineweb_train_000000.bin").write_bytes(header.tobytes() + data.tobytes())


def ours_block(hp, model, optimizers, files, steps: int) -> float:
    """Wall seconds of `steps` steps of the real training loop."""
    hp = tg.dataclasses.replace(hp, iterations=steps)
    clock = tg.PhaseClock(None, None)
    averager = tg.WeightAverager(model, ema_decay=hp.ema_decay, swa_start_frac=hp.swa_start_frac,
                                 swa_every=hp.swa_every)

    run = tg.TrainingRun(hp, CPU, False, None, lambda *a, **k: None, None, None, None, files, 0, model, model, None,
                         optimizers, [], None, clock)
    start = time.perf_counter()
    tg.train(run, averager)
    return time.perf_counter() - start


def bare_block(hp, model, optimizers, batches, steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        model(x, y, hp.num_loops > 0 and hp.enable_looping_at == 0).backward()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def outside_operator_share(hp, model, optimizers, files, steps: int) -> float:
    """1 - (time inside top-level torch operators on the main thread) / (wall time), for a block of ours."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = ours_block(hp, model, optimizers, files, steps)
    main_thread = None
    inside_us = 0.0
    events = [e for e in prof.events() if e.cpu_parent is None and not e.name.startswith("ProfilerStep")]
    if events:
        main_thread = max({e.thread for e in events}, key=lambda t: sum(e.cpu_time_total for e in events if e.thread == t))
    inside_us = sum(e.cpu_time_total for e in events if e.thread == main_thread)
    return max(0.0, 1.0 - inside_us / 1e6 / wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], help="extra knobs for both, KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**SHAPES[args.shape], **COMMON, **dict(kv.split("=", 1) for kv in args.set)}
        synthetic_shards(Path(tmp), int(env["VOCAB_SIZE"]))
        env.update(DATA_PATH=tmp, TOKENIZER_PATH=str(Path(tmp) / "unused.model"))
        hp = tg.Hyperparameters.from_env(env)
        torch.manual_seed(0)
        model = tg.GPT(tg.ModelConfig.from_hparams(hp))
        optimizers = tg.build_optimizers(hp, model, CPU.device)
        files = tg.shard_files(tmp, "train")
        loader = tg.make_train_loader(hp.train_loader, files, 0, 1, CPU.device, hp.seed, hp.train_seq_len)
        batches = [loader.next_batch(hp.train_batch_tokens, hp.train_seq_len, 1) for _ in range(args.steps)]
        loader.close()
        ours, bare, sleeps = [], [], {"bare": [], "ours": []}

        def switches() -> int:  # voluntary context switches: a thread that went to sleep
            return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw

        for round_idx in range(args.rounds + 1):
            s0 = switches()
            b = bare_block(hp, model, optimizers, batches, args.steps)
            s1 = switches()
            o = ours_block(hp, model, optimizers, files, args.steps)
            s2 = switches()
            if round_idx:  # round 0 warms allocator and caches
                bare.append(1000 * b / args.steps)
                ours.append(1000 * o / args.steps)
                sleeps["bare"].append((s1 - s0) / args.steps)
                sleeps["ours"].append((s2 - s1) / args.steps)
        share = outside_operator_share(hp, model, optimizers, files, args.steps)
        print(f"shape {args.shape} ({sum(p.numel() for p in model.parameters()):,} params), "
              f"{hp.train_batch_tokens} tokens/step, seq {hp.train_seq_len}, torch threads {torch.get_num_threads()}, "
              f"{args.rounds} rounds x {args.steps} steps")
        print("| step | ms/step (median) | ms/step per round | ours / bare | outside torch ops (ours) "
              "| thread sleeps per step |")
        print("|---|---|---|---|---|---|")
        ratio = statistics.median(o / b for o, b in zip(ours, bare))
        print(f"| bare | {statistics.median(bare):.1f} | {' '.join(f'{v:.0f}' for v in bare)} | 1.00 | "
              f"| {statistics.median(sleeps['bare']):.0f} |")
        print(f"| ours | {statistics.median(ours):.1f} | {' '.join(f'{v:.0f}' for v in ours)} | {ratio:.3f} "
              f"| {100 * share:.1f}% | {statistics.median(sleeps['ours']):.0f} |")


if __name__ == "__main__":
    main()
