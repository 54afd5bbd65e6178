"""The GPU probe: one command that measures on one CUDA GPU what a competitor needs to know before their
first 8xH100 hour, in at most 8 minutes (each phase has its own time limit; every phase reports even if
a later one fails):

  1. env     torch, CUDA and driver versions, GPU name and memory, FlashAttention 3 present or not
  2. tests   `pytest -m cuda tests`: the CUDA-only tests (bf16 vs fp32 step, compiled vs eager, fused
             AdamW, NCCL + the gloo control group, GPTQ codes CUDA = CPU, pack roundtrip, the compiled
             FlexAttention document mask against the dense one)
  3. train   `torchrun --nproc_per_node=1 train_gpt.py`, RECIPE=record at full size and the record's
             per-GPU load (786,432 / 8 tokens per step, seq 2048) for --train-seconds: compile seconds,
             ms/step, tokens/s, MFU, peak memory (anchor: the 2026-04-09 record ran 0.76-0.81M tok/s per H100)
  4. export  on the trained weights: calibration seconds (selfgen and train), GPTQ seconds, pack seconds
             and bytes with brotli and ans, unpack seconds
  5. eval    EVAL_ONLY=1 on the artifact over a fixed slice of validation tokens (--eval-targets): the
             roundtrip, sliding (stride 64, seq 2048) and the recipe's phased TTT, as seconds per million
             targets, extrapolated to the 40.5M-target FineWeb validation set on 8 GPUs against 600 s
  6. attention  ms per compiled training step (forward and backward, no optimizer) of the record model on
             the record's per-GPU batch of training documents, with each document-mask kernel: FlexAttention
             and FlashAttention 3's varlen kernel (when installed and it passes its start-up check), side by
             side, with their graph counts

It writes gpu_probe.json and gpu_probe.md into --out (default: a fresh runs/gpu_probe_<time>/).

The data: any shard folder at vocab 8192 (the record recipe's). The embedded sample is enough:
    python data/prepare_sample.py --vocab-size 8192
    python tests/bench/bench_gpu.py --data data/datasets/sample_sp8192 --tokenizer data/tokenizers/sample_8192_bpe.model

A machine with no network and torch already installed: fetch the other wheels elsewhere
(`pip download -d wheels brotli constriction sentencepiece numpy`, for the GPU machine's Python and
platform), carry the folder, then `pip install --no-index --find-links wheels brotli constriction
sentencepiece numpy pytest`.

On a CPU, `--dry-run` runs every phase at tiny sizes (under a minute; tests/test_bench_gpu.py runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FINEWEB_VAL_TARGETS = 40_500_000  # the FineWeb validation set scored by the challenge (spec)
EVAL_BUDGET_S, RECORD_GPUS = 600.0, 8

# RECIPE=record at full size, one GPU carrying one of the record's 8 shares of a step.
TRAIN_ENV = dict(RECIPE="record", TRAIN_BATCH_TOKENS=str(786_432 // RECORD_GPUS), GRAD_ACCUM_STEPS="1",
                 ITERATIONS="1000000", WARMUP_STEPS="2", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="25",
                 TTT_ENABLED="0", EVAL_STRIDE="0", REPLACE_RUN="1")
# The same pipeline, shrunk for a CPU: every phase runs, nothing is measured that matters.
DRY_ENV = dict(DEVICE="cpu", ITERATIONS="3", MAX_WALLCLOCK_SECONDS="0", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="64",
               TRAIN_BATCH_TOKENS="1024", WARMUP_STEPS="0", GPTQ_CALIBRATION_BATCHES="1",
               GPTQ_CALIBRATION_SEQS="2", GPTQ_CALIBRATION_SEQ_LEN="16", VAL_BATCH_SIZE="4096", TTT_LORA_RANK="4",
               TTT_BATCH_SIZE="4", PHASED_TTT_PREFIX_DOCS="4", TTT_CHUNK_TOKENS="512", AUTO_FIT_FILL="0")
LIMITS = dict(env=20, tests=80, train=140, export=50, eval=80, attention=110)  # seconds; 480 in all


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="shard folder (fineweb_train_*.bin, fineweb_val_*.bin)")
    ap.add_argument("--tokenizer", required=True, help="the shards' SentencePiece .model")
    ap.add_argument("--out", help="output folder (default: a fresh runs/gpu_probe_<time>/)")
    ap.add_argument("--dry-run", action="store_true", help="every phase at tiny sizes on the CPU")
    ap.add_argument("--train-seconds", type=float, default=30.0, help="timed training (after compile)")
    ap.add_argument("--eval-targets", type=int, default=262_144, help="validation targets the eval phase scores")
    for name, seconds in LIMITS.items():
        ap.add_argument(f"--{name}-limit", type=float, default=seconds, help=f"phase time limit (s), default {seconds}")
    ap.add_argument("--attention-steps", type=int, default=10, help="timed steps per attention kernel")
    ap.add_argument("--phase", choices=("env", "export", "attention"), help=argparse.SUPPRESS)  # a child's phase
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---- the phases that run in a child process of this script -------------------------------------------


def phase_env() -> dict:
    import torch

    facts = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                 cuda_available=torch.cuda.is_available(),
                 flash_attn_3=importlib.util.find_spec("flash_attn_interface") is not None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        facts["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    for name in ("numpy", "sentencepiece", "brotli", "constriction"):
        spec = importlib.util.find_spec(name)
        facts[name] = __import__(name).__dict__.get("__version__", "present") if spec else None
    return facts


def phase_export(run_dir: Path, env: dict) -> dict:
    """Calibration, GPTQ and both coders on the weights the train phase wrote, timed one by one."""
    import dataclasses

    import torch

    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    hp = tg.Hyperparameters.from_env(env)
    device = torch.device("cuda" if torch.cuda.is_available() and hp.device != "cpu" else "cpu")
    rt = tg.Runtime(0, 1, 0, device, False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp)).to(device)
    model.load_state_dict(torch.load(run_dir / "final_model.pt", map_location=device))
    autocast = lambda: tg.autocast_context(hp, device)  # noqa: E731
    plan = tg.QuantPlan.from_hparams(hp)
    train_files = tg.shard_files(hp.data_path, "train")
    looping = hp.num_loops > 0
    out: dict = {}

    def timed(key: str, fn):
        sync()
        t0 = time.perf_counter()
        value = fn()
        sync()
        out[key] = round(time.perf_counter() - t0, 3)
        return value

    hessians = None
    for source in ("selfgen", "train"):
        hp_source = dataclasses.replace(hp, gptq_calibration_source=source)
        hessians = timed(f"calibration_{source}_s", lambda: tg.collect_hessians(
            model, tg.calibration_inputs(hp_source, rt, model, train_files, looping, autocast), plan, looping,
            autocast))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hessians = {k: v.cpu() for k, v in hessians.items()}
    entries = timed("gptq_s", lambda: tg.quantize_state_dict(state, plan, hessians, tg.gptq_options(hp)))
    meta = dict(looping=looping, quant_method=plan.method, tag=f"int{hp.matrix_bits}_probe")
    for coder in ("brotli", "ans"):
        blob = timed(f"pack_{coder}_s", lambda: tg.pack_artifact(entries, compressor=coder,
                                                                 model=dataclasses.asdict(model.cfg), meta=meta))
        out[f"pack_{coder}_bytes"] = len(blob)
        timed(f"unpack_{coder}_s", lambda: tg.unpack_artifact(blob))
    out["quantized_values"] = sum(e.codes.numel() for e in entries if e.bits)
    return out


def phase_attention(env: dict, steps: int) -> dict:
    """ms per compiled training step (forward and backward) with each document-mask kernel this machine
    has: FlexAttention and FA3 varlen on CUDA (their graph counts too), SDPA's dense mask on a CPU."""
    import dataclasses
    import statistics

    import torch

    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    hp = tg.Hyperparameters.from_env(env)
    cuda = torch.cuda.is_available() and hp.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    backend, why = tg.select_attention_backend("auto", device, doc_masked=True)
    out: dict = {"fa3_varlen": "ok" if backend == "fa3" else why}
    kernels = (["flex"] + ["varlen"] * (backend == "fa3")) if cuda else ["sdpa"]
    rows, seq = hp.train_batch_tokens // hp.train_seq_len, hp.train_seq_len
    tokens = tg.load_data_shard(tg.shard_files(hp.data_path, "train")[0])[: rows * seq + 1].long()
    x, y = tokens[:-1].view(rows, seq).to(device), tokens[1:].view(rows, seq).to(device)
    out["documents_per_batch"] = int((x == tg.BOS_ID).sum()) + rows  # with every row's leading tail
    for kernel in kernels:
        torch._dynamo.reset()
        with tg.compile_settings(False, tg.CompileRecord("inductor", "error")) as record:
            cfg = tg.ModelConfig.from_hparams(dataclasses.replace(hp, attn_backend="fa3" if kernel == "varlen" else "sdpa"))
            model = tg.GPT(cfg).to(device).train()
            model.doc_attention_kernel = kernel
            step = tg.maybe_compile(model, cuda, f"train_step_{kernel}")
            times, warm = [], 3 if cuda else 1  # the first steps compile (CUDA) or warm the allocator (CPU)
            for i in range(warm + steps):
                sync()
                t0 = time.perf_counter()
                with tg.autocast_context(hp, device):
                    loss = step(x, y, False)
                loss.backward()
                sync()
                times.append(1000 * (time.perf_counter() - t0))
                model.zero_grad(set_to_none=True)
            out[f"{kernel}_ms_per_step"] = round(statistics.median(times[warm:]), 1)
            out[f"{kernel}_graphs"] = record.graphs.get(f"train_step_{kernel}", 0)
    if "varlen" in kernels:
        out["varlen_over_flex"] = round(out["varlen_ms_per_step"] / out["flex_ms_per_step"], 3)
    return out


# ---- the driver -----------------------------------------------------------------------------------------


def run_child(cmd: list[str], env: dict, limit: float, log_path: Path) -> tuple[str, str]:
    """(status, output) of a child process under a time limit; its output also goes to log_path."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        output, status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timeout after {limit:.0f}s"
    log_path.write_text(output)
    return status + f" in {time.perf_counter() - t0:.1f}s", output


def last_error(output: str) -> str:
    lines = [x for x in output.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:") or "Error" in x]
    return (errors or lines or [""])[-1][:300]


def probe_data(data: Path, tokenizer: Path, folder: Path, targets: int) -> tuple[Path, int]:
    """The train shards (linked) and the first whole validation documents holding about `targets`."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from data.shards import read_shard, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    train = sorted(data.glob("fineweb_train_*.bin"))
    val = sorted(data.glob("fineweb_val_*.bin"))
    if not train or not val:
        raise SystemExit(f"error: {data} holds no fineweb_train_*.bin or fineweb_val_*.bin; see --help for the sample")
    for f in train:
        (folder / f.name).unlink(missing_ok=True)
        (folder / f.name).symlink_to(f.resolve())
    tokens = np.concatenate([read_shard(f) for f in val])
    bos = np.flatnonzero(tokens == 1)
    cut = next((int(b) for b in bos if b > targets), len(tokens))
    write_shard(folder / "fineweb_val_000000.bin", tokens[:cut])
    return folder, cut - 1


def log_value(pattern: str, text: str, cast=float):
    found = re.findall(pattern, text, re.M)
    return cast(found[-1]) if found else None


def train_report(output: str, run_dir: Path, batch_tokens: int, peak_tflops: float) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    steps = manifest.get("step_times_ms", {})
    median = steps.get("median")
    phases = manifest.get("phases_ms", {})
    flops = log_value(r"^flops_per_token: forward:\d+ train:(\d+)", output)
    tok_s = batch_tokens / (median / 1000) if median else None
    return dict(model_params=log_value(r"^model_params:(\d+)", output, int),
                compile_s=round(phases["warmup"] / 1000, 1) if "warmup" in phases else None,
                steps=steps.get("count"), ms_per_step_median=round(median, 1) if median else None,
                ms_per_step_p90=round(steps["p90"], 1) if "p90" in steps else None,
                tokens_per_s=round(tok_s) if tok_s else None,
                mfu_pct=round(100 * flops * tok_s / (peak_tflops * 1e12), 1) if flops and tok_s else None,
                peak_allocated_mib=log_value(r"^peak memory allocated: (\d+) MiB", output, int),
                peak_reserved_mib=log_value(r"reserved: (\d+) MiB$", output, int),
                compile_graphs=log_value(r"^compile:graphs (.*)$", output, str),
                roundtrip_val_bpb=log_value(r"_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", output))


def eval_report(output: str, targets: int) -> dict:
    phases = dict(re.findall(r"(\w+):(\d+)ms", (re.findall(r"^eval_phases: (.*)$", output, re.M) or [""])[-1]))
    report: dict = dict(targets=targets, warmup_s=int(phases["warmup"]) / 1000 if "warmup" in phases else None)
    projected = 0.0
    for name in ("roundtrip", "sliding", "ttt"):
        if name in phases:
            per_million = int(phases[name]) / 1000 / (targets / 1e6)
            report[f"{name}_s_per_M_targets"] = round(per_million, 2)
            report[f"{name}_projected_8gpu_s"] = round(per_million * FINEWEB_VAL_TARGETS / 1e6 / RECORD_GPUS, 1)
            projected += report[f"{name}_projected_8gpu_s"]
    report["projected_8gpu_total_s"] = round(projected, 1)
    report["within_600s"] = projected <= EVAL_BUDGET_S
    report["final_val_bpb"] = log_value(r"^final_score stage:\w+ val_loss:[\d.]+ val_bpb:([\d.]+)", output)
    return report


def markdown(results: dict) -> str:
    env = results["phases"].get("env", {})
    lines = [f"# GPU probe: {env.get('gpu', 'no GPU')} (torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"driver {env.get('driver')}, FA3 {'yes' if env.get('flash_attn_3') else 'no'})", "",
             "| phase | status | measured |", "|---|---|---|"]
    for name, phase in results["phases"].items():
        shown = {k: v for k, v in phase.items() if k not in ("status", "error")}
        detail = ", ".join(f"{k}={v}" for k, v in shown.items()) or phase.get("error", "")
        lines.append(f"| {name} | {phase['status']} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:  # a child: print the phase's JSON on the last line
        env = json.loads(os.environ["PROBE_ENV"])
        result = phase_env() if args.phase == "env" else phase_attention(env, args.attention_steps) if (
            args.phase == "attention") else phase_export(Path(args.run_dir), env)
        print(json.dumps(result))
        return 0
    out = Path(args.out or ROOT / "runs" / time.strftime("gpu_probe_%Y%m%d_%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    targets = 1_000 if args.dry_run else args.eval_targets
    data, targets = probe_data(Path(args.data), Path(args.tokenizer), out / "probe_data", targets)
    knobs = dict(TRAIN_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(Path(args.tokenizer).resolve()),
                 ARTIFACT_DIR=str(out / "runs"), MAX_WALLCLOCK_SECONDS=str(args.train_seconds))
    if args.dry_run:
        knobs.update(DRY_ENV, VOCAB_SIZE=str(_vocab_size(args.tokenizer)))
    base_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base_env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", PROBE_ENV=json.dumps(knobs))
    results: dict = dict(args={k: v for k, v in vars(args).items() if k not in ("phase", "run_dir")}, phases={})
    run_dir = out / "runs" / "train"

    def child(name: str, cmd: list[str], env: dict | None = None) -> str:
        status, output = run_child(cmd, env or base_env, getattr(args, f"{name}_limit"), out / f"{name}.log")
        results["phases"][name] = dict(status=status)
        if not status.startswith("ok"):
            results["phases"][name]["error"] = last_error(output)
        return output

    me = [sys.executable, str(Path(__file__).resolve())]
    output = child("env", me + ["--data", args.data, "--tokenizer", args.tokenizer, "--phase", "env"])
    if results["phases"]["env"]["status"].startswith("ok"):
        results["phases"]["env"].update(json.loads(output.strip().splitlines()[-1]))

    xml = out / "cuda_tests.xml"
    cuda_files = [str(f) for f in sorted((ROOT / "tests").glob("test_*.py")) if "mark.cuda" in f.read_text()]
    child("tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *cuda_files,
                    f"--junitxml={xml}"])  # only the files that hold cuda tests: collecting the rest takes seconds
    if xml.is_file():
        outcome = {c.get("name"): next((x.tag for x in c if x.tag in ("failure", "error", "skipped")), "passed")
                   for c in ET.parse(xml).getroot().iter("testcase")}
        counts = Counter(outcome.values())
        results["phases"]["tests"].update({k: counts[k] for k in ("passed", "failure", "error", "skipped")},
                                          failing=[n for n, v in outcome.items() if v in ("failure", "error")])

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    output = child("train", launcher + [str(ROOT / "train_gpt.py")],
                   dict(base_env, **knobs, RUN_ID="train"))
    peak = 989.0  # H100/H200 SXM dense bf16, as train_gpt.py's PEAK_TFLOPS default
    results["phases"]["train"].update(train_report(output, run_dir, int(knobs["TRAIN_BATCH_TOKENS"]), peak))
    artifact = next(iter(sorted(run_dir.glob("final_model.*.ptz"))), None) if run_dir.is_dir() else None

    if (run_dir / "final_model.pt").is_file():
        output = child("export", me + ["--data", args.data, "--tokenizer", args.tokenizer, "--phase", "export",
                                       "--run-dir", str(run_dir)])
        if results["phases"]["export"]["status"].startswith("ok"):
            results["phases"]["export"].update(json.loads(output.strip().splitlines()[-1]))
    else:
        results["phases"]["export"] = dict(status="skipped (the train phase wrote no weights)")

    if artifact is not None:
        eval_knobs = {k: v for k, v in knobs.items() if k not in ("TTT_ENABLED", "EVAL_STRIDE")}  # the recipe's
        if args.dry_run:
            eval_knobs["EVAL_STRIDE"] = "32"  # the recipe's 64 is the whole dry-run window: no sliding pass
        output = child("eval", [sys.executable, str(ROOT / "train_gpt.py")],
                       dict(base_env, **eval_knobs, EVAL_ONLY="1", ARTIFACT_PATH=str(artifact), RUN_ID="eval",
                            MAX_EVAL_SECONDS="0"))
        results["phases"]["eval"].update(eval_report(output, targets))
    else:
        results["phases"]["eval"] = dict(status="skipped (the train phase wrote no artifact)")

    steps = ["--attention-steps", "2"] if args.dry_run else ["--attention-steps", str(args.attention_steps)]
    output = child("attention", me + ["--data", args.data, "--tokenizer", args.tokenizer, "--phase", "attention",
                                      *steps])
    if results["phases"]["attention"]["status"].startswith("ok"):
        results["phases"]["attention"].update(json.loads(output.strip().splitlines()[-1]))

    (out / "gpu_probe.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gpu_probe.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'gpu_probe.json'} and {out / 'gpu_probe.md'}")
    return 0


def _vocab_size(tokenizer: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()


if __name__ == "__main__":
    sys.exit(main())
