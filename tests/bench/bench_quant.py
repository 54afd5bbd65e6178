"""Benchmark: quantization schemes and coders on a model trained on the sample, and the record size.

Not collected by pytest (a benchmark, not a test). Run from the repo root:

    python tests/bench/bench_quant.py [--steps 150] [--part table|fullsize|all] [--model-dir DIR]
        [--fullsize-coders brotli,ans] [--fullsize-scale init|trained]

Part `table`: trains a small model on the embedded sample (sp1024, built if missing; or reuses
DIR/final_model.pt), then for each export scheme prints val_bpb before and after the roundtrip and
the gap, and the artifact's model bytes under zlib, lzma, byte-shuffle+brotli-11 and ans, beside the
order-0 entropy of the codes and the ans context model's cross-entropy. The codes-only columns
compare the coders on exactly the same codes. A second table shows where the ans artifact's bytes go
(side information, tables, rANS words beside their model cross-entropy, and the other streams).

Part `fullsize`: the default RECIPE=record model at full size (35.9M parameters), its matrices drawn
at the scale of the trained sample model's (per group, Gaussian: no structure is invented, so ans
gains only what exact coding and its row/column context find there), exported with the record
settings: bytes by group, the code bytes, whether it fits, and the ans decode time on one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

# Large enough that attention matrices (288^2 > 65,536 values) are quantized too, small enough for CPU.
SMALL = {
    "RECIPE": "baseline", "VOCAB_SIZE": "1024", "NUM_LAYERS": "3", "MODEL_DIM": "288", "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2", "MLP_MULT": "3", "TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "8192",
    "GRAD_ACCUM_STEPS": "1", "VAL_BATCH_SIZE": "65536", "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0",
    "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "50", "COMPILE": "0", "QUANT_METHOD": "absmax", "COMPRESSOR": "zlib",
    "MUON_WD": "0.095", "EMBED_WD": "0.085",
}
CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), False)
COMPRESSORS = ("zlib", "lzma", "brotli", "ans")


def schemes() -> dict[str, tuple[tg.QuantPlan, bool]]:
    """name -> (plan, LQER on)."""
    six = dict(embed=8, head=8, attn=6, mlp=6, other=6)
    plans = {
        "int8 absmax (baseline)": (tg.QuantPlan("absmax", {g: 8 for g in tg.QUANT_GROUPS}), False),
        "int6 RTN absmax": (tg.QuantPlan("absmax", six), False),
        "int6 RTN SDClip": (tg.QuantPlan("sdclip", six), False),
        "int6 GPTQ": (tg.QuantPlan("gptq", six), False),
        "int6 GPTQ, absmax grid": (tg.QuantPlan("gptq", six, {g: 0.0 for g in six}), False),
        "mixed int5 MLP / int6 GPTQ": (tg.QuantPlan("gptq", dict(six, mlp=5)), False),
    }
    if hasattr(tg, "apply_lqer"):
        plans["int6 GPTQ + LQER"] = (tg.QuantPlan("gptq", six), True)
    return plans


def train_small(steps: int, model_dir: Path, sample: dict) -> tg.Hyperparameters:
    hp = tg.Hyperparameters.from_env({**SMALL, "ITERATIONS": str(steps), "WARMDOWN_ITERS": str(max(steps // 3, 1)),
                                      "DATA_PATH": sample["dataset_dir"], "TOKENIZER_PATH": sample["tokenizer_path"],
                                      "ARTIFACT_DIR": str(model_dir), "RUN_ID": "bench_quant"})
    if not (model_dir / "bench_quant" / "final_model.pt").exists():
        tg.run(hp, CPU)
    return hp


def part_table(args, sample: dict) -> dict:
    model_dir = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp())
    hp = train_small(args.steps, model_dir, sample)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    model.load_state_dict(torch.load(model_dir / "bench_quant" / "final_model.pt", map_location="cpu"))
    sd = model.state_dict()
    val_tokens = tg.load_validation_tokens(hp.data_path)
    luts = tg.build_byte_luts(tg.load_tokenizer(hp), hp.vocab_size)

    def score(m: tg.GPT) -> float:
        m.eval()
        return tg.evaluate(m.forward_logits, val_tokens, luts, tg.EvalContext(CPU), seq_len=hp.train_seq_len,
                           batch_seqs=32).val_bpb

    pre = score(model)
    calib_hp = dataclasses.replace(hp, gptq_calibration_batches=args.calibration_batches, gptq_calibration_seqs=8,
                                   gptq_calibration_source=args.calibration_source)
    t0 = time.perf_counter()
    hessians = tg.collect_hessians(model, tg.calibration_inputs(calib_hp, CPU, model, tg.shard_files(hp.data_path, "train"), False),
                                   tg.QuantPlan("gptq", dict(embed=8, head=8, attn=6, mlp=6, other=6)), False)
    calib_s = time.perf_counter() - t0
    print(f"small model: {sum(p.numel() for p in model.parameters()):,} parameters, {args.steps} steps x "
          f"{SMALL['TRAIN_BATCH_TOKENS']} tokens on the sample; GPTQ calibration: "
          f"{args.calibration_source}, {args.calibration_batches} x 8 sequences x {hp.train_seq_len} tokens ({calib_s:.0f}s); val tokens "
          f"{val_tokens.numel():,}")
    print("| scheme | val_bpb pre-quant | val_bpb roundtrip | gap | model bytes zlib | lzma | brotli | ans | "
          "codes: order-0 | codes: ans model CE | codes: brotli | codes: ans | ans vs brotli (codes) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for name, (plan, lqer) in schemes().items():
        entries = tg.quantize_state_dict(sd, plan, hessians if plan.method == "gptq" else None)
        if lqer:
            entries = tg.apply_lqer(sd, entries, rank=4, top_k=3, factor_bits=4, hessians=hessians)
        fresh = tg.GPT(model.cfg)
        fresh.load_state_dict(tg.dequantize_state_dict(entries))
        post = score(fresh)
        sizes, streams, all_stats = {}, {}, {}
        for c in COMPRESSORS:
            stats = all_stats[c] = {}
            blob = tg.pack_artifact(entries, compressor=c, model=dataclasses.asdict(model.cfg), stats=stats)
            back, _ = tg.unpack_artifact(blob)
            assert all(torch.equal(a.codes, b.codes) for a, b in zip(back, entries) if a.bits)
            sizes[c], streams[c] = len(blob), stats["codes"]
        quantized = [e for e in entries if e.bits]
        order0, model_ce = tg.code_entropy_report([e.codes.numpy() for e in quantized], [e.bits for e in quantized])
        gain = 100 * (1 - streams["ans"] / streams["brotli"])
        ans_parts = {}
        tg.ans_encode([e.codes.numpy() for e in quantized], [e.bits for e in quantized], ans_parts)
        rows[name] = dict(pre=pre, post=post, sizes=sizes, streams=streams, stats=all_stats, ans_parts=ans_parts)
        print(f"| {name} | {pre:.4f} | {post:.4f} | {post - pre:+.4f} | {sizes['zlib']:,} | {sizes['lzma']:,} | "
              f"{sizes['brotli']:,} | {sizes['ans']:,} | {order0:,.0f} | {model_ce:,.0f} | {streams['brotli']:,} | "
              f"{streams['ans']:,} | {gain:.2f}% smaller |", flush=True)
    print("\nWhere the bytes go (ans artifact vs brotli artifact, same entries; codes = ans side information +"
          " tables + rANS words, beside the words' model cross-entropy):")
    print("| scheme | whole: brotli | whole: ans | ans vs brotli (whole) | codes: side info | codes: tables | "
          "codes: rANS words | codes: model CE | float16: brotli | float16: ans | scales | float32 | lqer | header |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        a, b, parts = r["stats"]["ans"], r["stats"]["brotli"], r["ans_parts"]
        print(f"| {name} | {r['sizes']['brotli']:,} | {r['sizes']['ans']:,} | "
              f"{100 * (1 - r['sizes']['ans'] / r['sizes']['brotli']):.2f}% smaller | {parts['side']:,} | "
              f"{parts['tables']:,} | {parts['words']:,} | {parts['model_ce']:,.0f} | {b.get('float16', 0):,} | "
              f"{a.get('float16', 0):,} | {a['scales']:,} | {a.get('float32', 0):,} | {a.get('lqer', 0):,} | "
              f"{a['header']:,} |", flush=True)
    def gap(name: str) -> float:
        return rows[name]["post"] - rows[name]["pre"]

    print(f"int6 gap ratios: GPTQ (absmax grid) / RTN absmax = {gap('int6 GPTQ, absmax grid') / gap('int6 RTN absmax'):.3f}; "
          f"GPTQ (SDClip grid) / RTN SDClip = {gap('int6 GPTQ') / gap('int6 RTN SDClip'):.3f}; "
          f"GPTQ (SDClip grid) / RTN absmax = {gap('int6 GPTQ') / gap('int6 RTN absmax'):.3f}")
    return dict(model=model, hp=hp)


def part_fullsize(reference: tg.GPT | None, coders: tuple[str, ...] = ("brotli", "ans")) -> None:
    hp = tg.Hyperparameters.from_env({})  # RECIPE=record, every default
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    plan = tg.QuantPlan.from_hparams(hp)
    group_std = {}
    if reference is not None:
        for name, t in reference.state_dict().items():
            if t.ndim == 2 and t.numel() >= tg.Hyperparameters.quant_min_numel:
                group_std.setdefault(tg.tensor_group(name), []).append(float(t.float().std()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and p.numel() >= tg.Hyperparameters.quant_min_numel:
                stds = group_std.get(tg.tensor_group(name)) or [1 / math.sqrt(p.shape[1])]
                p.normal_(0.0, sum(stds) / len(stds))
    sd = model.state_dict()
    n_code = tg.code_bytes()
    print(f"\nfull size RECIPE=record: {sum(p.numel() for p in model.parameters()):,} parameters, method "
          f"{plan.method} (bytes measured with its SDClip grid rounded to nearest: GPTQ keeps that grid), "
          f"bits {plan.bits}, clip sigmas {plan.clip_sigmas}")
    rtn_plan = dataclasses.replace(plan, method="sdclip")
    t0 = time.perf_counter()
    entries = tg.quantize_state_dict(sd, rtn_plan)
    print(f"quantize: {time.perf_counter() - t0:.1f}s")
    quantized = [e for e in entries if e.bits]
    order0, model_ce = tg.code_entropy_report([e.codes.numpy() for e in quantized], [e.bits for e in quantized])
    print("| coder | model bytes | codes | scales | float16 | float32 | header | code bytes | total | fits "
          "16,000,000 | pack s | unpack s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in coders:
        stats = {}
        t0 = time.perf_counter()
        blob = tg.pack_artifact(entries, compressor=c, model=dataclasses.asdict(model.cfg), stats=stats)
        pack_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tg.unpack_artifact(blob)
        unpack_s = time.perf_counter() - t0
        total = len(blob) + n_code
        print(f"| {c} | {len(blob):,} | {stats['codes']:,} | {stats['scales']:,} | {stats.get('float16', 0):,} | "
              f"{stats.get('float32', 0):,} | {stats['header']:,} | {n_code:,} | {total:,} | "
              f"{'yes' if total <= tg.ARTIFACT_LIMIT_BYTES else 'NO'} | {pack_s:.1f} | {unpack_s:.1f} |", flush=True)
    print(f"codes: order-0 entropy {order0:,.0f} bytes, ans model cross-entropy {model_ce:,.0f} bytes")
    for group in tg.QUANT_GROUPS:
        members = [e for e in quantized if tg.tensor_group(e.name) == group]
        if members:
            stats = {}
            tg.pack_artifact(members, compressor="ans", stats=stats)
            n = sum(e.codes.numel() for e in members)
            print(f"group {group}: {len(members)} tensors, {n:,} values at {members[0].bits} bits, ans codes "
                  f"{stats['codes']:,} bytes ({8 * stats['codes'] / n:.3f} bits/value)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--calibration-batches", type=int, default=4, help="GPTQ calibration batches of 8 sequences")
    parser.add_argument("--calibration-source", choices=("selfgen", "train"), default="selfgen",
                        help="GPTQ_CALIBRATION_SOURCE: sequences the model samples itself, or training shards")
    parser.add_argument("--part", choices=("table", "fullsize", "all"), default="all")
    parser.add_argument("--model-dir", default="", help="reuse (or create) the trained small model here")
    parser.add_argument("--fullsize-coders", default="brotli,ans",
                        help="coders of the fullsize part (brotli-11 alone takes minutes there)")
    parser.add_argument("--fullsize-scale", choices=("init", "trained"), default="init",
                        help="fullsize matrices at 1/sqrt(fan-in) (init) or at the --model-dir model's scale")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from data.prepare_sample import prepare_sample

    sample = prepare_sample(vocab_size=1024)
    reference = None
    if args.part in ("table", "all"):
        reference = part_table(args, sample)["model"]
    if args.part in ("fullsize", "all"):
        if reference is None and args.model_dir and args.fullsize_scale == "trained":
            hp = train_small(args.steps, Path(args.model_dir), sample)
            reference = tg.GPT(tg.ModelConfig.from_hparams(hp))
            reference.load_state_dict(torch.load(Path(args.model_dir) / "bench_quant" / "final_model.pt",
                                                 map_location="cpu"))
        part_fullsize(reference, tuple(args.fullsize_coders.split(",")))


if __name__ == "__main__":
    main()
