"""Benchmark: every evaluation form on one model trained on the sample, val_bpb and eval time side by side.

Trains a small model on the embedded sample (sp1024; built if missing) with train_gpt.run(), then
reloads its int8+zlib artifact once per evaluation form and runs the real evaluation stage
(`evaluate_artifact`: warm-up, FLOPs plan, scoring, compliance block) with:

    flat                  non-overlapping windows of EVAL_SEQ_LEN
    sliding               EVAL_STRIDE=32 (EVAL_SEQ_LEN 128)
    sliding + chunked TTT TTT_MODE=chunked (score-first full-model SGD per chunk)
    LoRA TTT              TTT_MODE=lora (per-document adapters)
    phased TTT            TTT_MODE=phased (global SGD phases on scored documents + LoRA)
    ..., R0427 settings   the same with RECIPE=record's adapter settings (R0427's run)
    pre-quant TTT (legal) a second training run with PREQUANT_TTT_ENABLED=1 on training data, scored
                          flat and sliding

on two validation streams: the first documents of the sample's validation split (about --val-tokens
tokens), and the same documents upper-cased (text unlike the training text). Eval time is the time of the scoring pass itself (warm-up excluded), on
this machine's CPU. Not collected by pytest. Run from the repo root:

    python tests/bench/bench_eval.py [--steps 120] [--val-tokens 4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

COMMON = {
    "RECIPE": "baseline", "VOCAB_SIZE": "1024", "NUM_LAYERS": "3", "MODEL_DIM": "96", "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "8192", "GRAD_ACCUM_STEPS": "1",
    "VAL_BATCH_SIZE": "8192", "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0",
    "TRAIN_LOG_EVERY": "50", "COMPILE": "0", "EVAL_STRIDE": "32",
    # TTT settings scaled to a few-thousand-token validation stream
    "TTT_CHUNK_TOKENS": "512", "TTT_BATCH_SEQS": "4", "PHASED_TTT_PREFIX_DOCS": "8", "PHASED_TTT_NUM_PHASES": "2",
    "TTT_BATCH_SIZE": "4",
}
PREQUANT = {"PREQUANT_TTT_ENABLED": "1", "PREQUANT_TTT_TOKENS": "32768", "PREQUANT_TTT_EPOCHS": "1",
            "PREQUANT_TTT_LR": "3e-4"}
# RECIPE=record's adapters (R0427's run): rank 80, alpha 144, AdamW LR 1e-4 betas (0, 0.99) decay 0.5, warm A.
R0427_LORA = {"TTT_LORA_RANK": "80", "TTT_LORA_ALPHA": "144", "TTT_LORA_LR": "1e-4", "TTT_BETA1": "0",
              "TTT_BETA2": "0.99", "TTT_WEIGHT_DECAY": "0.5", "TTT_WARM_START_A": "1"}
FORMS = {  # name -> (env on top of COMMON, which artifact, the pass that gives the score)
    "flat": ({"EVAL_STRIDE": "0"}, "base", "roundtrip"),
    "sliding (stride 32)": ({}, "base", "sliding"),
    "sliding + chunked TTT": ({"TTT_ENABLED": "1", "TTT_MODE": "chunked"}, "base", "ttt"),
    "LoRA TTT (per document)": ({"TTT_ENABLED": "1", "TTT_MODE": "lora"}, "base", "ttt"),
    "phased TTT": ({"TTT_ENABLED": "1", "TTT_MODE": "phased"}, "base", "ttt"),
    "LoRA TTT, R0427 adapter settings": ({"TTT_ENABLED": "1", "TTT_MODE": "lora", **R0427_LORA}, "base", "ttt"),
    "phased TTT, R0427 adapter settings": ({"TTT_ENABLED": "1", "TTT_MODE": "phased", **R0427_LORA}, "base", "ttt"),
    "pre-quant TTT on train data, flat": ({"EVAL_STRIDE": "0"}, "prequant", "roundtrip"),
    "pre-quant TTT on train data, sliding": ({}, "prequant", "sliding"),
}


def upper_cased(val: torch.Tensor, sp: spm.SentencePieceProcessor) -> torch.Tensor:
    bos = (val == tg.BOS_ID).nonzero().flatten().tolist() + [val.numel()]
    ids = []
    for a, b in zip(bos, bos[1:]):
        ids += [tg.BOS_ID] + sp.encode(sp.decode(val[a + 1 : b].tolist()).upper())
    return torch.tensor(ids)


def score(env: dict, artifact: Path, val: torch.Tensor, luts: tg.ByteLuts, stage: str) -> tuple[float, float, str]:
    """val_bpb of `stage` and its pass time (ms), through the run's own evaluation stage."""
    hp = tg.Hyperparameters.from_env(env)
    rt = tg.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    lines: list[str] = []
    clock = tg.PhaseClock(None, None)
    clock.start("eval")
    model, header = tg.load_artifact_model(artifact, rt.device)
    ctx = tg.EvalContext(rt, lambda: tg.autocast_context(hp, rt.device), log=lines.append)
    results = tg.evaluate_artifact(hp, model, val, luts, clock, ctx, use_compile=False, batch_seqs=16,
                                   tag=header["meta"]["tag"])
    clock.stop()
    phases = re.search(r"^eval_phases: (.*) total", "\n".join(lines), re.M).group(1)
    pass_ms = float(re.search(rf"\b{stage}:(\d+)ms", phases).group(1))
    return results[stage].val_bpb, pass_ms, next((x for x in lines if x.startswith("eval_plan_total")), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--val-tokens", type=int, default=4096, help="whole documents up to about this many; 0 = all")
    args = parser.parse_args()
    from data.prepare_sample import prepare_sample

    sample = prepare_sample(vocab_size=1024)
    sp = spm.SentencePieceProcessor(model_file=sample["tokenizer_path"])
    luts = tg.build_byte_luts(sp, 1024)
    val = tg.load_validation_tokens(sample["dataset_dir"])
    if args.val_tokens:
        bos = (val == tg.BOS_ID).nonzero().flatten().tolist() + [val.numel()]
        val = val[: max(b for b in bos if b <= max(args.val_tokens, bos[1]))]
    shifted = upper_cased(val, sp)
    rt = tg.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**COMMON, "ITERATIONS": str(args.steps), "WARMDOWN_ITERS": str(args.steps // 3),
               "DATA_PATH": sample["dataset_dir"], "TOKENIZER_PATH": sample["tokenizer_path"]}
        artifacts = {}
        for name, extra in (("base", {}), ("prequant", PREQUANT)):
            out = tg.run(tg.Hyperparameters.from_env({**env, **extra, "ARTIFACT_DIR": f"{tmp}/{name}",
                                                      "RUN_ID": name, "EVAL_STRIDE": "0"}), rt)
            artifacts[name] = Path(out["run_dir"]) / "final_model.quantized.ptz"
            extra_note = ""
            if out["prequant_ttt"] is not None:
                pq = out["prequant_ttt"]
                extra_note = (f", pre-quant TTT {pq['steps_done']} AdamW steps on {pq['tokens'].numel():,} training "
                              f"tokens in {pq['time_ms'] / 1000:.1f}s (reserved {pq['reserve_ms'] / 1000:.1f}s)")
            print(f"trained {name}: {out['steps']} steps, pre-quant val_bpb {out['pre_quant'].val_bpb:.4f}"
                  f"{extra_note}", flush=True)
        print(f"\nsample sp1024, {args.steps} steps x {COMMON['TRAIN_BATCH_TOKENS']} tokens, {COMMON['NUM_LAYERS']}x"
              f"{COMMON['MODEL_DIM']}, eval seq {COMMON['TRAIN_SEQ_LEN']}, float32 on CPU; validation "
              f"{val.numel() - 1:,} targets ({int((val == tg.BOS_ID).sum())} documents), upper-cased "
              f"{shifted.numel() - 1:,} targets\n")
        print("| evaluation | val_bpb (sample val) | eval time | val_bpb (upper-cased val) | eval time |")
        print("|---|---|---|---|---|")
        for name, (extra, which, stage) in FORMS.items():
            cells = []
            for stream in (val, shifted):
                bpb, ms, _ = score({**env, **extra}, artifacts[which], stream, luts, stage)
                cells += [f"{bpb:.4f}", f"{ms / 1000:.1f}s"]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        hp = tg.Hyperparameters.from_env({**env, "TTT_ENABLED": "1"})
        print("\nTTT settings: " + ", ".join(f"{f.name.upper()}={getattr(hp, f.name)}"
                                            for f in dataclasses.fields(hp) if f.name.startswith(("ttt_", "phased_",
                                                                                                    "global_ttt"))))


if __name__ == "__main__":
    main()
