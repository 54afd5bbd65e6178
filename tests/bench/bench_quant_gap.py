"""Benchmark: the quantization gap at issue 19's tiny shape, GPTQ against round-to-nearest on the same grid.

Not collected by pytest. Run from the repo root:

    python tests/bench/bench_quant_gap.py --model-dir DIR [--steps 350] [--calibration-batches 64] [--env K=V]

Trains (or reuses DIR/tiny/final_model.pt) RECIPE=record shrunk to 4 layers x 128, MLP 4x, seq 256,
--steps x 8,192 tokens on the embedded sample (sp1024), with every matrix of >= 4,096 values
quantized (QUANT_MIN_NUMEL=4096). GPTQ is calibrated on --calibration-batches x 32 training sequences of
256 tokens. Prints, against the float model's val_bpb:
  1. per group (one group quantized at a time), the gap of round-to-nearest and of GPTQ on the SDClip
     grid (int6 k = 12.85, int8 embedding k = 20);
  2. the export before (those settings) and with R0427's (int7 embedding k = 14, MLP k = 11.5,
     attention k = 13, LQER rank 4 top 3, A int2, B int4 / 64): gap, bytes under brotli and ans,
     pack and unpack seconds;
  3. budget filling: R0427's settings under a cap 10% above their natural brotli size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

TINY = {"RECIPE": "record", "VOCAB_SIZE": "1024", "NUM_LAYERS": "4", "MODEL_DIM": "128", "MLP_MULT": "4",
        "TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "8192", "GRAD_ACCUM_STEPS": "1", "MAX_WALLCLOCK_SECONDS": "0",
        "WARMUP_STEPS": "0", "VAL_LOSS_EVERY": "0", "VAL_BATCH_SIZE": "65536", "TRAIN_LOG_EVERY": "50",
        "COMPILE": "0", "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "QUANT_METHOD": "sdclip", "RUN_ID": "tiny"}
CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), False)
BEFORE = tg.QuantPlan("gptq", dict(embed=8, head=8, attn=6, mlp=6, other=6),
                      dict(embed=20.0, head=20.0, attn=12.85, mlp=12.85, other=12.85), min_numel=4096)
R0427 = tg.QuantPlan("gptq", dict(embed=7, head=7, attn=6, mlp=6, other=6),
                     dict(embed=14.0, head=14.0, attn=13.0, mlp=11.5, other=12.85), min_numel=4096)
R0427_LQER = dict(rank=4, top_k=3, factor_bits=4, a_bits=2, group=64)


def trained_tiny(steps: int, model_dir: Path, sample: dict) -> tuple[tg.Hyperparameters, tg.GPT]:
    hp = tg.Hyperparameters.from_env({**TINY, "ITERATIONS": str(steps), "DATA_PATH": sample["dataset_dir"],
                                      "TOKENIZER_PATH": sample["tokenizer_path"], "ARTIFACT_DIR": str(model_dir)})
    weights = model_dir / "tiny" / "final_model.pt"
    if not weights.exists():
        tg.run(hp, CPU)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    return hp, model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--calibration-batches", type=int, default=64, help="batches of 32 x 256 training tokens")
    parser.add_argument("--model-dir", required=True, help="reuse (or create) the trained tiny model here")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the tiny model, e.g. NUM_LOOPS=0 (use a new --model-dir)")
    args = parser.parse_args()
    TINY.update(kv.split("=", 1) for kv in args.env)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from data.prepare_sample import prepare_sample

    hp, model = trained_tiny(args.steps, Path(args.model_dir), prepare_sample(vocab_size=1024))
    sd, looping = model.state_dict(), model.cfg.num_loops > 0
    val_tokens = tg.load_validation_tokens(hp.data_path)
    luts = tg.build_byte_luts(tg.load_tokenizer(hp), hp.vocab_size)

    def score(state: dict) -> float:
        m = tg.GPT(model.cfg)
        m.load_state_dict(state)
        m.eval()
        with torch.no_grad():
            return tg.evaluate(lambda x: m.forward_logits(x, looping), val_tokens, luts, tg.EvalContext(CPU),
                               seq_len=hp.train_seq_len, batch_seqs=32).val_bpb

    pre = score(sd)
    calib = dataclasses.replace(hp, gptq_calibration_source="train", gptq_calibration_batches=args.calibration_batches,
                                gptq_calibration_seqs=32)
    t0 = time.perf_counter()
    hessians = tg.collect_hessians(model, tg.calibration_inputs(calib, CPU, model, tg.shard_files(hp.data_path, "train"),
                                                                looping), BEFORE, looping)
    print(f"tiny model: {sum(p.numel() for p in model.parameters()):,} parameters, {args.steps} steps x 8,192 tokens; "
          f"val_bpb float {pre:.5f}; GPTQ calibration {args.calibration_batches * 32 * 256:,} training tokens "
          f"({time.perf_counter() - t0:.0f}s); {len(hessians)} Hessians", flush=True)

    def quantized(plan: tg.QuantPlan, groups, lqer: dict | None = None) -> tuple[dict, list]:
        entries = tg.quantize_state_dict(sd, plan, hessians if plan.method == "gptq" else None)
        if lqer:
            entries = tg.apply_lqer(sd, entries, hessians=hessians, **lqer)
        deq = tg.dequantize_state_dict(entries)
        return {n: deq[n] if tg.tensor_group(n) in groups else t for n, t in sd.items()}, entries

    print("\n| quantized | round-to-nearest (SDClip) | GPTQ | GPTQ / RTN |\n|---|---|---|---|")
    for name, groups in (("embedding only (int8, k = 20)", {"embed"}), ("attention only (int6, k = 12.85)", {"attn"}),
                         ("MLP only (int6, k = 12.85)", {"mlp"}), ("all", set(tg.QUANT_GROUPS))):
        rtn = score(quantized(dataclasses.replace(BEFORE, method="sdclip"), groups)[0]) - pre
        gptq = score(quantized(BEFORE, groups)[0]) - pre
        print(f"| {name} | {rtn:+.4f} | {gptq:+.4f} | {gptq / rtn:.2f} |", flush=True)

    print("\n| export | val_bpb | gap | brotli bytes | ans bytes | ans vs brotli | brotli pack / unpack s | "
          "ans pack / unpack s |\n|---|---|---|---|---|---|---|---|")
    for name, plan, lqer in (("before: int6 k 12.85, int8 embedding k 20", BEFORE, None),
                             ("R0427: int7 embedding k 14, MLP k 11.5, attention k 13, LQER", R0427, R0427_LQER)):
        state, entries = quantized(plan, set(tg.QUANT_GROUPS), lqer)
        post, cells = score(state), {}
        for coder in ("brotli", "ans"):
            t0 = time.perf_counter()
            blob = tg.pack_artifact(entries, compressor=coder, model=dataclasses.asdict(model.cfg))
            t1 = time.perf_counter()
            tg.unpack_artifact(blob)
            cells[coder] = (len(blob), t1 - t0, time.perf_counter() - t1)
        b, a = cells["brotli"], cells["ans"]
        print(f"| {name} | {post:.5f} | {post - pre:+.4f} | {b[0]:,} | {a[0]:,} | {100 * (1 - a[0] / b[0]):.2f}% smaller | "
              f"{b[1]:.2f} / {b[2]:.2f} | {a[1]:.2f} / {a[2]:.2f} |", flush=True)

    def pack(entries):
        return tg.pack_artifact(entries, compressor="brotli", model=dataclasses.asdict(model.cfg))

    natural = len(pack(quantized(R0427, set(tg.QUANT_GROUPS), R0427_LQER)[1]))
    cap = int(natural * 1.10)
    lines: list[str] = []
    blob, entries = tg.fit_artifact(sd, R0427, target_bytes=cap, pack=pack, hessians=hessians,
                                    lqer=R0427_LQER, log=lines.append)
    post = score(tg.dequantize_state_dict(entries))
    print("\nbudget filling, R0427 settings, brotli, cap = natural size x 1.10:")
    print("\n".join("    " + line for line in lines))
    print(f"| natural bytes | cap | filled bytes | left | val_bpb gap natural | filled |\n|---|---|---|---|---|---|\n"
          f"| {natural:,} | {cap:,} | {len(blob):,} | {cap - len(blob):,} | "
          f"{score(quantized(R0427, set(tg.QUANT_GROUPS), R0427_LQER)[0]) - pre:+.4f} | {post - pre:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
