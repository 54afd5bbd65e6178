"""The records tool: turn run folders into a submission folder, compare runs, test a claim against a record.

A run folder is what `train_gpt.py` writes for each run (`<ARTIFACT_DIR or ./runs>/<RUN_ID>/`: train.log,
manifest.json, the artifact and train_gpt.py exactly as counted). Subcommands:

    python records/records.py build runs/seed42 runs/seed314 runs/seed999 --name MyStack \\
        --author "Ada" --github-id ada [--reference records/track_10min_16mb/<prev>/submission.json]
    python records/records.py stats runs/seed* [--reference FILE | --reference-nats X Y Z]
    python records/records.py compare runs/a runs/b [runs/c ...]

`build` writes records/track_<track>/<date>_<name>/ (README.md, submission.json, train_seed<S>.log,
train_gpt.py, requirements.txt, constraints.txt, plots) and refuses, with one line each: runs that are not
complete, EVAL_ONLY runs, folders whose log holds two runs, mixed config or code hashes, mixed tokenizers or
validation data, training or evaluation over 600 s, artifacts over 16,000,000 bytes,
runs stamped non-record, missing logs, and numbers that disagree between logs, manifests and
submission.json. Runs made on a CPU are labelled as a CPU example that claims no challenge score (track
`cpu_example`). Plots need matplotlib (`pip install matplotlib -c constraints.txt`); without it they are
skipped with a note. Importing train_gpt here is fine: the tool is not part of the artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_LIMIT_MS = 600_000.0
EVAL_LIMIT_MS = 600_000.0
ARTIFACT_LIMIT_BYTES = 16_000_000
RECORD_MARGIN_NATS = 0.005  # a new record must beat the previous one by this much, at p < 0.01
POLICIES = {"record (0.005 nats, p<0.01)": (RECORD_MARGIN_NATS, 0.01), "frontier (p<0.25)": (0.0, 0.25)}


class RecordError(ValueError):
    """A refusal: one line naming the run, the problem and the fix."""


# ------------------------------------------------------------------------------------------------
# Reading run folders


@dataclass
class Run:
    folder: Path
    manifest: dict
    log: str

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    @property
    def final(self) -> dict:
        return self.manifest["final_score"]

    @property
    def on_gpu(self) -> bool:
        return str(self.manifest.get("environment", {}).get("device", "")).startswith("cuda")


def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    manifest_path, log_path = folder / "manifest.json", folder / "train.log"
    if not manifest_path.is_file():
        raise RecordError(f"{folder}: no manifest.json; give the run folder train_gpt.py wrote (runs/<RUN_ID>/)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RecordError(f"{manifest_path}: not valid JSON ({e}); the run folder is damaged") from None
    if manifest.get("status") != "complete":
        raise RecordError(f"{folder}: run status is {manifest.get('status')!r}, not 'complete'; it crashed or is "
                          "still running")
    if manifest.get("mode", "train") != "train":
        raise RecordError(f"{folder}: an EVAL_ONLY run (it scored an artifact, it trained nothing); give the run "
                          "folders of the training runs")
    if not log_path.is_file():
        raise RecordError(f"{folder}: train.log is missing; a submission needs every seed's log")
    log = log_path.read_text(encoding="utf-8")
    if len(re.findall(r"^run_dir:", log, re.M)) > 1:
        raise RecordError(f"{folder}: train.log holds more than one run (two runs wrote into this folder); re-run the "
                          "seed under a new RUN_ID")
    return Run(folder, manifest, log)


def log_value(run: Run, pattern: str, what: str) -> re.Match:
    matches = list(re.finditer(pattern, run.log, re.M))
    if not matches:
        raise RecordError(f"{run.folder}: train.log has no {what} line; the log is incomplete or edited")
    return matches[-1]


def check_log_matches_manifest(run: Run) -> None:
    """The score and the bytes in the manifest are exactly the ones the log reports."""
    final = run.final
    m = log_value(run, rf"^{re.escape(final['log_key'])} val_loss:([\d.]+) val_bpb:([\d.]+)$", final["log_key"])
    if m.group(1) != f"{final['val_loss']:.8f}" or m.group(2) != f"{final['val_bpb']:.8f}":
        raise RecordError(f"{run.folder}: train.log says val_loss:{m.group(1)} val_bpb:{m.group(2)} but manifest.json "
                          f"says {final['val_loss']:.8f} / {final['val_bpb']:.8f}; numbers disagree")
    art = run.manifest["artifact"]
    m = log_value(run, r"^artifact code_bytes:(\d+) model_bytes:(\d+) total_bytes:(\d+)", "artifact bytes")
    if tuple(map(int, m.groups())) != (art["code_bytes"], art["model_bytes"], art["total_bytes"]):
        raise RecordError(f"{run.folder}: artifact bytes in train.log {m.groups()} disagree with manifest.json")
    artifact = run.folder / art["file"]
    if artifact.is_file() and artifact.stat().st_size != art["model_bytes"]:
        raise RecordError(f"{artifact}: {artifact.stat().st_size} bytes on disk, manifest.json says {art['model_bytes']}")


def final_stage_text(run: Run) -> str:
    """The stage of the submitted score, and the one the run asked for if the eval budget made it fall back."""
    final = run.final
    return final["stage"] + (f" (fallback from {final['asked_stage']})" if final.get("fallback") else "")


def data_identity(run: Run) -> dict:
    """The tokenizer's sha256 and one digest of the validation shards' checksums, from the manifest
    (None where an older manifest does not record them). The config hash leaves the data paths out, so
    these are what says two runs were scored on the same thing."""
    data = run.manifest.get("data", {})
    val = sorted((name, sha) for name, sha in data.get("shard_sha256", {}).items() if "_val_" in name)
    return {"tokenizer_sha256": data.get("tokenizer_sha256"),
            "val_shards": hashlib.sha256(json.dumps(val).encode()).hexdigest() if val else None}


def check_submittable(runs: list[Run]) -> None:
    """Every refusal of `build`, in the order a reviewer would check."""
    if not runs:
        raise RecordError("no run folders given; pass the run folders of every seed")
    for key, what in (("config_hash", "config"), (("code", "train_gpt_sha256"), "code")):
        values = {r.name: (r.manifest[key[0]][key[1]] if isinstance(key, tuple) else r.manifest[key]) for r in runs}
        if len(set(values.values())) > 1:
            detail = ", ".join(f"{name}={value[:12]}" for name, value in values.items())
            raise RecordError(f"runs mix {what} hashes ({detail}); a record's seeds must share one {what}")
    for key, what in (("tokenizer_sha256", "tokenizers"), ("val_shards", "validation data")):
        values = {r.name: data_identity(r)[key] for r in runs}
        if len(set(values.values())) > 1:
            detail = ", ".join(f"{name}={str(value)[:12]}" for name, value in values.items())
            raise RecordError(f"runs mix {what} ({detail}); a record's seeds must be trained and scored on one "
                              "tokenizer and one validation set: re-run them with the same TOKENIZER_PATH and DATA_PATH")
    stages = {r.name: final_stage_text(r) for r in runs}
    if len({r.final["stage"] for r in runs}) > 1:
        raise RecordError(f"runs end at different evaluation stages ({', '.join(f'{k}={v}' for k, v in stages.items())});"
                          " a record's seeds are scored the same way: re-run the seeds that fell back with more "
                          "MAX_EVAL_SECONDS or a cheaper final pass")
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise RecordError(f"seeds repeat ({seeds}); each run of a submission needs its own seed")
    for r in runs:
        compliance = r.manifest.get("compliance", {})
        if compliance.get("non_record"):
            raise RecordError(f"{r.folder}: the run is stamped non-record ({compliance.get('non_record_reason', 'see its log')}); "
                              "it cannot be submitted")
        train_ms, eval_ms = compliance.get("train_time_ms", 0.0), compliance.get("eval_time_ms", 0.0)
        if train_ms > TRAIN_LIMIT_MS:
            raise RecordError(f"{r.folder}: training took {train_ms / 1000:.1f} s, over the 600 s limit")
        if eval_ms > EVAL_LIMIT_MS:
            raise RecordError(f"{r.folder}: evaluation took {eval_ms / 1000:.1f} s, over the 600 s limit")
        total = r.manifest["artifact"]["total_bytes"]
        if total > ARTIFACT_LIMIT_BYTES:
            raise RecordError(f"{r.folder}: artifact is {total} bytes, over the {ARTIFACT_LIMIT_BYTES}-byte limit")
        check_log_matches_manifest(r)


# ------------------------------------------------------------------------------------------------
# Statistics: mean and std over seeds, one-sided Welch t-test against a reference


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), using the symmetry for fast convergence."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result / a


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return tail if t >= 0 else 1.0 - tail


@dataclass(frozen=True)
class WelchResult:
    improvement: float  # reference mean - candidate mean (positive = candidate is better)
    margin: float
    t: float
    df: float
    p_value: float
    alpha: float

    @property
    def passes(self) -> bool:
        return self.p_value < self.alpha


def welch_improvement_test(candidate: list[float], reference: list[float], margin: float, alpha: float) -> WelchResult:
    """One-sided Welch t-test of H1: mean(candidate) < mean(reference) - margin (lower loss is better)."""
    if len(candidate) < 2 or len(reference) < 2:
        raise RecordError(f"a t-test needs at least 2 values on each side (got {len(candidate)} runs and "
                          f"{len(reference)} reference values); run more seeds")
    (m1, s1), (m2, s2) = mean_std(candidate), mean_std(reference)
    v1, v2 = s1 * s1 / len(candidate), s2 * s2 / len(reference)
    se = math.sqrt(v1 + v2)
    if se == 0:
        raise RecordError("every value on both sides is identical; a t-test is undefined")
    t = (m2 - margin - m1) / se
    df = (v1 + v2) ** 2 / ((v1 * v1 / (len(candidate) - 1)) + (v2 * v2 / (len(reference) - 1)))
    return WelchResult(m2 - m1, margin, t, df, student_t_sf(t, df), alpha)


def read_reference(path: str | None, nats: list[float] | None, bpb: list[float] | None) -> dict[str, list[float]]:
    """Per-seed reference numbers: a previous record's submission.json (seed_results), a JSON object
    {"val_loss": [...], "val_bpb": [...]}, or numbers on the command line."""
    if path is None:
        return {k: v for k, v in (("val_loss", nats), ("val_bpb", bpb)) if v}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecordError(f"reference {path}: cannot read it as JSON ({e.__class__.__name__}); pass a submission.json") from None
    if isinstance(data.get("seed_results"), dict):
        rows = list(data["seed_results"].values())
        return {k: [float(r[k]) for r in rows] for k in ("val_loss", "val_bpb") if all(k in r for r in rows)}
    out = {k: [float(v) for v in data[k]] for k in ("val_loss", "val_bpb") if isinstance(data.get(k), list)}
    if not out:
        raise RecordError(f"reference {path}: no seed_results and no val_loss/val_bpb lists; see --help")
    return out


def statistics(runs: list[Run], reference: dict[str, list[float]]) -> dict:
    losses, bpbs = [r.final["val_loss"] for r in runs], [r.final["val_bpb"] for r in runs]
    stats = {"n": len(runs), "val_loss_mean": mean_std(losses)[0], "val_loss_std": mean_std(losses)[1],
             "val_bpb_mean": mean_std(bpbs)[0], "val_bpb_std": mean_std(bpbs)[1], "tests": []}
    bpb_per_nat = stats["val_bpb_mean"] / stats["val_loss_mean"]  # this data's tokens-per-byte / ln 2
    for unit, values, scale in (("nats", losses, 1.0), ("bpb", bpbs, bpb_per_nat)):
        ref = reference.get("val_loss" if unit == "nats" else "val_bpb")
        if not ref:
            continue
        for policy, (margin_nats, alpha) in POLICIES.items():
            result = welch_improvement_test(values, ref, margin_nats * scale, alpha)
            stats["tests"].append({"policy": policy, "unit": unit, "improvement": result.improvement,
                                   "margin": result.margin, "t": result.t, "df": result.df,
                                   "p_value": result.p_value, "passes": result.passes})
    return stats


def format_statistics(stats: dict) -> list[str]:
    lines = [f"seeds: {stats['n']}  val_loss {stats['val_loss_mean']:.5f} ± {stats['val_loss_std']:.5f} nats  "
             f"val_bpb {stats['val_bpb_mean']:.5f} ± {stats['val_bpb_std']:.5f}"]
    for t in stats["tests"]:
        verdict = "PASS" if t["passes"] else "FAIL"
        lines.append(f"{t['policy']} in {t['unit']}: improvement {t['improvement']:+.5f} vs margin {t['margin']:.5f}, "
                     f"t={t['t']:.3f} df={t['df']:.2f} p={t['p_value']:.4g} -> {verdict}")
    return lines


# ------------------------------------------------------------------------------------------------
# Curves from the logs, and plots


def curves(run: Run) -> dict[str, list[tuple[int, float]]]:
    train = [(int(s), float(v)) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:([\d.]+)", run.log, re.M)]
    val = [(int(s), float(v)) for s, v in re.findall(r"^step:(\d+)/\d+ val_loss:[\d.]+ val_bpb:([\d.]+)", run.log, re.M)]
    return {"train_loss": train, "val_bpb": val}


def write_plots(runs: list[Run], folder: Path) -> list[str]:
    """train_loss.png, val_bpb.png and time_budget.png; [] (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plots (pip install matplotlib -c constraints.txt)")
        return []
    written = []
    for key, ylabel in (("train_loss", "train loss (nats/token)"), ("val_bpb", "val_bpb")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            points = curves(r)[key]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=f"seed {r.seed}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{key}.png", dpi=100)
        plt.close(fig)
        written.append(f"{key}.png")
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [f"seed {r.seed}" for r in runs]
    train_s = [r.manifest["compliance"]["train_time_ms"] / 1000 for r in runs]
    eval_s = [r.manifest["compliance"]["eval_time_ms"] / 1000 for r in runs]
    y = range(len(runs))
    ax.barh([i - 0.2 for i in y], train_s, height=0.4, label="training")
    ax.barh([i + 0.2 for i in y], eval_s, height=0.4, label="evaluation")
    ax.axvline(600, color="red", linestyle="--", label="600 s limit")
    ax.set_yticks(list(y), labels)
    ax.set_xlabel("seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "time_budget.png", dpi=100)
    plt.close(fig)
    return written + ["time_budget.png"]


# ------------------------------------------------------------------------------------------------
# build


def changed_knobs(config: dict) -> dict:
    """The knobs that differ from their recipe's defaults: what a reproduction command must set."""
    sys.path.insert(0, str(ROOT))
    import train_gpt

    defaults = train_gpt.Hyperparameters.from_env({"RECIPE": config["recipe"], "NUM_LAYERS": str(config["num_layers"])})
    skip = {"run_id", "artifact_dir", "seed", "replace_run"}
    return {k: v for k, v in config.items() if k not in skip and getattr(defaults, k, None) != v}


def env_text(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def seed_results(runs: list[Run]) -> dict:
    out = {}
    for r in runs:
        m = r.manifest
        out[str(r.seed)] = {
            "val_loss": r.final["val_loss"], "val_bpb": r.final["val_bpb"],
            "pre_quant_val_loss": m["scores"]["pre_quant"]["val_loss"],
            "pre_quant_val_bpb": m["scores"]["pre_quant"]["val_bpb"],
            "artifact_bytes": m["artifact"]["total_bytes"], "steps": m["training"]["steps"],
            "step_avg_ms": m["training"]["train_time_ms"] / max(m["training"]["steps"], 1),
            "train_time_s": m["compliance"]["train_time_ms"] / 1000, "eval_time_s": m["compliance"]["eval_time_ms"] / 1000,
            "run_id": m["run_id"], "final_stage": final_stage_text(r),
        }
    return out


def submission_json(runs: list[Run], args, stats: dict, track: str) -> dict:
    first = runs[0].manifest
    env = first["environment"]
    totals = [r.manifest["artifact"]["total_bytes"] for r in runs]
    best_code = first["artifact"]["code_bytes"]
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": args.date, "track": track, "non_record": not all(r.on_gpu for r in runs),
        "hardware": env.get("gpu") or env.get("device"), "world_size": first["world_size"],
        "pytorch_version": env.get("torch"), "cuda_version": env.get("cuda"),
        "val_loss": stats["val_loss_mean"], "val_bpb": stats["val_bpb_mean"],
        "val_loss_std": stats["val_loss_std"], "val_bpb_std": stats["val_bpb_std"],
        "bytes_total": max(totals), "bytes_code": best_code, "artifact_bytes_mean": sum(totals) / len(totals),
        "artifact_bytes_max": max(totals), "seeds": [r.seed for r in runs], "seed_results": seed_results(runs),
        "config_hash": first["config_hash"], "code_sha256": first["code"]["train_gpt_sha256"],
        "final_score_line": runs[0].final["log_key"], "final_stage": final_stage_text(runs[0]),
        "significance": stats["tests"],
        "compliance": {
            "train_under_600s": all(r.manifest["compliance"]["train_time_ms"] <= TRAIN_LIMIT_MS for r in runs),
            "eval_under_600s": all(r.manifest["compliance"]["eval_time_ms"] <= EVAL_LIMIT_MS for r in runs),
            "artifact_under_16mb": max(totals) <= ARTIFACT_LIMIT_BYTES,
            "three_seeds": len(runs) >= 3,
            "data_sources": first["compliance"].get("data_sources", {}),
        },
    }


def readme_text(runs: list[Run], sub: dict, stats: dict, plots: list[str], args) -> str:
    knobs = changed_knobs(runs[0].manifest["config"])
    env_prefix = " ".join(f"{k.upper()}={env_text(v)}" for k, v in sorted(knobs.items()))
    world = runs[0].manifest["world_size"]
    seeds = " ".join(str(r.seed) for r in runs)
    lines = [f"# {args.name}", ""]
    if sub["non_record"]:
        lines += ["> **CPU example, not a record.** These runs were made on a CPU at a toy scale to show the",
                  "> records workflow end to end. They claim no challenge score and are not comparable with",
                  "> 8×H100 submissions.", ""]
    lines += [args.blurb or "", "",
              f"Mean over {len(runs)} seeds: **val_bpb {stats['val_bpb_mean']:.8f}** (std {stats['val_bpb_std']:.8f}), "
              f"val_loss {stats['val_loss_mean']:.8f} nats (std {stats['val_loss_std']:.8f}); largest artifact "
              f"{sub['bytes_total']:,} bytes (code {sub['bytes_code']:,}). Score line: `{sub['final_score_line']}` "
              f"(stage: {sub['final_stage']}).", "",
              "| seed | val_loss | val_bpb | pre-quant val_bpb | steps | train s | eval s | artifact bytes |",
              "|---|---|---|---|---|---|---|---|"]
    for seed, r in sub["seed_results"].items():
        lines.append(f"| {seed} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['pre_quant_val_bpb']:.8f} | {r['steps']} "
                     f"| {r['train_time_s']:.1f} | {r['eval_time_s']:.1f} | {r['artifact_bytes']:,} |")
    lines += ["", "## Statistics", "", *[f"- {line}" for line in format_statistics(stats)]]
    if not stats["tests"]:
        lines.append("- no reference given (`--reference`), so no significance test")
    lines += ["", "## Config", "", f"config_hash `{sub['config_hash']}`, code sha256 `{sub['code_sha256']}`. "
              f"Knobs that differ from `RECIPE={runs[0].manifest['config']['recipe']}`:", ""]
    lines += [f"- `{k.upper()}={env_text(v)}`" for k, v in sorted(knobs.items())] or ["- none"]
    lines += ["", "## Compliance", ""]
    lines += [f"- `{k}`: {v}" for k, v in sub["compliance"].items()]
    lines += ["", "## Reproduce", "", "```bash",
              f"for SEED in {seeds}; do SEED=$SEED RUN_ID=seed$SEED {env_prefix} "
              f"torchrun --standalone --nproc_per_node={world} train_gpt.py; done".replace("  ", " "), "```", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    lines += ["## Files", "", "`train_gpt.py` is the code exactly as counted in the artifact; `train_seed<S>.log` "
              "are the unedited run logs; `submission.json` holds every number above.", ""]
    return "\n".join(lines)


def build(args) -> Path:
    runs = sorted((load_run(f) for f in args.runs), key=lambda r: r.seed)
    check_submittable(runs)
    stats = statistics(runs, read_reference(args.reference, args.reference_nats, args.reference_bpb))
    track = args.track if all(r.on_gpu for r in runs) else "cpu_example"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.name).strip("_")
    dest = Path(args.out) / f"track_{track}" / f"{args.date}_{slug}"
    if dest.exists() and not args.replace:
        raise RecordError(f"{dest} already exists; pick another --name or pass --replace")
    staging = Path(tempfile.mkdtemp(prefix=".records-", dir=dest.parent if dest.parent.exists() else None))
    try:
        for r in runs:
            shutil.copyfile(r.folder / "train.log", staging / f"train_seed{r.seed}.log")
        code = runs[0].folder / runs[0].manifest["artifact"]["code_file"]
        shutil.copyfile(code, staging / "train_gpt.py")
        for name in ("requirements.txt", "constraints.txt"):
            shutil.copyfile(ROOT / name, staging / name)
        sub = submission_json(runs, args, stats, track)
        (staging / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        plots = write_plots(runs, staging)
        (staging / "README.md").write_text(readme_text(runs, sub, stats, plots, args), encoding="utf-8")
        verify_folder(staging, runs)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return dest


def verify_folder(folder: Path, runs: list[Run]) -> None:
    """Read the written folder back: every number in submission.json is the one in the logs and manifests."""
    sub = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
    for r in runs:
        row = sub["seed_results"][str(r.seed)]
        log = (folder / f"train_seed{r.seed}.log").read_text(encoding="utf-8")
        line = f"{r.final['log_key']} val_loss:{row['val_loss']:.8f} val_bpb:{row['val_bpb']:.8f}"
        if not re.search(rf"^{re.escape(line)}$", log, re.M):
            raise RecordError(f"submission.json seed {r.seed} ({row['val_bpb']:.8f}) disagrees with train_seed{r.seed}.log")
        if row["artifact_bytes"] != r.manifest["artifact"]["total_bytes"]:
            raise RecordError(f"submission.json seed {r.seed} artifact bytes disagree with {r.folder}/manifest.json")
    if (folder / "train_gpt.py").stat().st_size != runs[0].manifest["artifact"]["code_bytes"]:
        raise RecordError("the copied train_gpt.py is not the size counted as code; the run folder was edited")
    bpbs = [sub["seed_results"][str(r.seed)]["val_bpb"] for r in runs]
    if abs(sum(bpbs) / len(bpbs) - sub["val_bpb"]) > 1e-12:
        raise RecordError("submission.json val_bpb is not the mean of its seeds")


# ------------------------------------------------------------------------------------------------
# compare


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_table(runs: list[Run]) -> str:
    """Side by side: the config knobs that differ, scores, bytes and phase times."""
    configs = [r.manifest["config"] for r in runs]
    differ = sorted(k for k in configs[0] if len({json.dumps(c.get(k)) for c in configs}) > 1 and k != "run_id")
    rows = [("config_hash", [r.manifest["config_hash"][:12] for r in runs])]
    rows += [(f"config.{k}", [c.get(k) for c in configs]) for k in differ]
    rows.append(("final_score.stage", [final_stage_text(r) for r in runs]))
    for name in dict.fromkeys(k for r in runs for k in r.manifest.get("scores", {})):  # a pass a run fell back from: -
        for key in ("val_bpb", "val_loss"):
            rows.append((f"{name}.{key}", [f"{r.manifest['scores'][name][key]:.8f}" if name in r.manifest["scores"]
                                           else "-" for r in runs]))
    rows.append(("artifact.total_bytes", [r.manifest["artifact"]["total_bytes"] for r in runs]))
    rows.append(("artifact.model_bytes", [r.manifest["artifact"]["model_bytes"] for r in runs]))
    rows.append(("training.steps", [r.manifest["training"]["steps"] for r in runs]))
    phases = sorted({p for r in runs for p in r.manifest.get("phases_ms", {})})
    rows += [(f"phase.{p}_s", [f"{r.manifest['phases_ms'].get(p, 0) / 1000:.1f}" for r in runs]) for p in phases]
    header = "| | " + " | ".join(r.name for r in runs) + " |"
    lines = [header, "|---" * (len(runs) + 1) + "|"]
    lines += ["| " + key + " | " + " | ".join(str(v) for v in values) + " |" for key, values in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="records.py", description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring (records/records.py) and records/README.md.")
    sub = p.add_subparsers(dest="command", required=True)

    def add_reference(q: argparse.ArgumentParser) -> None:
        q.add_argument("--reference", help="a previous record's submission.json (seed_results), or JSON "
                                           '{"val_loss": [...], "val_bpb": [...]}')
        q.add_argument("--reference-nats", type=float, nargs="+", help="reference per-seed val_loss values")
        q.add_argument("--reference-bpb", type=float, nargs="+", help="reference per-seed val_bpb values")

    b = sub.add_parser("build", help="make records/track_<track>/<date>_<name>/ from run folders")
    b.add_argument("runs", nargs="+", help="run folders (runs/<RUN_ID>/), one per seed")
    b.add_argument("--name", required=True, help="submission name (also the folder's slug)")
    b.add_argument("--author", default="")
    b.add_argument("--github-id", default="")
    b.add_argument("--blurb", default="")
    b.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="ISO date; default today")
    b.add_argument("--track", default="10min_16mb")
    b.add_argument("--out", default=str(ROOT / "records"), help="records root; default records/")
    b.add_argument("--replace", action="store_true", help="replace an existing submission folder")
    add_reference(b)
    s = sub.add_parser("stats", help="mean/std over seeds and the Welch t-tests against a reference")
    s.add_argument("runs", nargs="+")
    add_reference(s)
    c = sub.add_parser("compare", help="print run folders side by side")
    c.add_argument("runs", nargs="+")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build":
            print(f"wrote {build(args)}")
        elif args.command == "stats":
            runs = [load_run(f) for f in args.runs]
            reference = read_reference(args.reference, args.reference_nats, args.reference_bpb)
            print("\n".join(format_statistics(statistics(runs, reference))))
        else:
            print(compare_table([load_run(f) for f in args.runs]))
        return 0
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
