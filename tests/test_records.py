"""The records tool: a submission folder whose numbers match the logs, every refusal, the statistics."""

import json
import math
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import ROOT, TINY_ENV, subprocess_env
from records import records as rec
from test_train import run_tiny

SEEDS = (42, 314, 999)


@pytest.fixture(scope="module")
def seed_runs(sample_dataset, tmp_path_factory) -> dict[int, Path]:
    """Three tiny CPU seed runs of one config, with a validation point mid-run for the curves."""
    root = tmp_path_factory.mktemp("runs")
    env = dict(TINY_ENV, DATA_PATH=sample_dataset["dataset_dir"], TOKENIZER_PATH=sample_dataset["tokenizer_path"],
               ARTIFACT_DIR=str(root), ITERATIONS="4", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="2")
    return {seed: Path(run_tiny(env, SEED=str(seed), RUN_ID=f"seed{seed}")["run_dir"]) for seed in SEEDS}


def build(runs, out: Path, *extra: str) -> Path:
    args = rec.build_parser().parse_args(["build", *map(str, runs), "--name", "Tiny CPU example", "--author", "us",
                                          "--github-id", "us", "--date", "2026-11-23", "--out", str(out), *extra])
    return rec.build(args)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_three_seed_runs_become_a_complete_submission_folder(seed_runs, tmp_path):
    folder = build(seed_runs.values(), tmp_path, "--reference-nats", "7.0", "7.1", "7.2")
    assert folder == tmp_path / "track_cpu_example" / "2026-11-23_Tiny_CPU_example"  # CPU runs: never a record track
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "submission.json", "train_gpt.py", "requirements.txt", "constraints.txt",
            "train_loss.png", "val_bpb.png", "time_budget.png"} | {f"train_seed{s}.log" for s in SEEDS} == names
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["non_record"] is True and sub["track"] == "cpu_example" and sub["seeds"] == list(SEEDS)
    for seed, run_dir in seed_runs.items():
        log = (run_dir / "train.log").read_text()
        assert (folder / f"train_seed{seed}.log").read_text() == log  # unedited
        loss, bpb = re.search(r"^final_int8_zlib_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", log, re.M).groups()
        row = sub["seed_results"][str(seed)]
        assert (f"{row['val_loss']:.8f}", f"{row['val_bpb']:.8f}") == (loss, bpb)
        total = int(re.search(r"^artifact code_bytes:\d+ model_bytes:\d+ total_bytes:(\d+)", log, re.M).group(1))
        assert row["artifact_bytes"] == total
    bpbs = [sub["seed_results"][str(s)]["val_bpb"] for s in SEEDS]
    assert sub["val_bpb"] == pytest.approx(sum(bpbs) / 3, abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(math.sqrt(sum((b - sum(bpbs) / 3) ** 2 for b in bpbs) / 2), abs=1e-12)
    shipped = tg.shipped_code((ROOT / "train_gpt.py").read_bytes())
    assert (folder / "train_gpt.py").read_bytes() == shipped and sub["bytes_code"] == len(shipped)  # as counted
    readme = (folder / "README.md").read_text()
    assert "CPU example, not a record" in readme and f"{bpbs[0]:.8f}" in readme
    assert "for SEED in 42 314 999; do SEED=$SEED RUN_ID=seed$SEED" in readme and "![time_budget](time_budget.png)" in readme
    assert "record (0.005 nats, p<0.01) in nats" in readme and {t["unit"] for t in sub["significance"]} == {"nats"}
    for plot in ("train_loss.png", "val_bpb.png", "time_budget.png"):
        width, height = png_size(folder / plot)
        assert width >= 300 and height >= 200


def copy_runs(seed_runs: dict, tmp_path: Path) -> list[Path]:
    out = []
    for seed, run_dir in seed_runs.items():
        shutil.copytree(run_dir, tmp_path / "copies" / run_dir.name)
        out.append(tmp_path / "copies" / run_dir.name)
    return out


def edit_manifest(run_dir: Path, edit) -> None:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def set_path(keys: str, value):
    def edit(manifest):
        *parents, last = keys.split(".")
        target = manifest
        for key in parents:
            target = target[key]
        target[last] = value
    return edit


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (lambda d: edit_manifest(d, set_path("config_hash", "f" * 64)), "runs mix config hashes"),
    (lambda d: edit_manifest(d, set_path("code.train_gpt_sha256", "0" * 64)), "runs mix code hashes"),
    (lambda d: edit_manifest(d, set_path("compliance.train_time_ms", 600_001.0)), "training took 600.0 s, over the 600 s"),
    (lambda d: edit_manifest(d, set_path("compliance.eval_time_ms", 612_000.0)), "evaluation took 612.0 s, over the 600 s"),
    (lambda d: edit_manifest(d, set_path("artifact.total_bytes", 16_000_001)), "over the 16000000-byte limit"),
    (lambda d: edit_manifest(d, set_path("compliance.non_record", True)), "stamped non-record"),
    (lambda d: edit_manifest(d, set_path("status", "started")), "run status is 'started'"),
    # issue 18: seeds of another tokenizer or validation set, two runs in one folder, an EVAL_ONLY run
    (lambda d: edit_manifest(d, set_path("data.tokenizer_sha256", "0" * 64)), "runs mix tokenizers"),
    (lambda d: edit_manifest(d, lambda m: m["data"]["shard_sha256"].update(
        {name: "0" * 64 for name in m["data"]["shard_sha256"] if "_val_" in name})), "runs mix validation data"),
    (lambda d: (d / "train.log").write_text((d / "train.log").read_text() * 2), "holds more than one run"),
    (lambda d: edit_manifest(d, set_path("mode", "eval_only")), "an EVAL_ONLY run"),
    (lambda d: (d / "train.log").unlink(), "train.log is missing"),
    (lambda d: (d / "train.log").write_text(re.sub(r"(final_int8_zlib_roundtrip_exact val_loss:[\d.]+ val_bpb:)\d\.\d+",
                                                    r"\g<1>1.00000000", (d / "train.log").read_text())),
     "numbers disagree"),
])
def test_every_refusal_is_one_line_and_writes_nothing(seed_runs, tmp_path, damage, message):
    runs = copy_runs(seed_runs, tmp_path)
    damage(runs[1])
    with pytest.raises(rec.RecordError) as err:
        build(runs, tmp_path / "out")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "track_cpu_example" / "2026-11-23_Tiny_CPU_example").exists()


@pytest.mark.slow
def test_cli_help_compare_and_one_line_errors(seed_runs, tmp_path):
    tool = [sys.executable, str(ROOT / "records" / "records.py")]
    help_text = subprocess.run([*tool, "--help"], capture_output=True, text=True, env=subprocess_env({}))
    assert help_text.returncode == 0 and "build" in help_text.stdout and "compare" in help_text.stdout
    runs = [str(p) for p in seed_runs.values()]
    compare = subprocess.run([*tool, "compare", *runs], capture_output=True, text=True, env=subprocess_env({}))
    assert compare.returncode == 0, compare.stderr
    assert "| | seed42 | seed314 | seed999 |" in compare.stdout and "roundtrip.val_bpb" in compare.stdout
    assert "config.seed" in compare.stdout and "config.matrix_lr" not in compare.stdout  # only what differs
    stats = subprocess.run([*tool, "stats", *runs, "--reference-bpb", "9.0", "9.1", "9.2"], capture_output=True,
                           text=True, env=subprocess_env({}))
    assert "frontier (p<0.25) in bpb" in stats.stdout and "-> PASS" in stats.stdout
    bad = subprocess.run([*tool, "stats", str(tmp_path)], capture_output=True, text=True, env=subprocess_env({}))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no manifest.json" in bad.stderr


# ---- statistics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [-3.0, -0.5, 0.0, 0.7, 2.0, 6.965])
def test_student_t_tail_matches_closed_forms(t):
    assert rec.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert rec.student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert rec.student_t_sf(t, 1e6) == pytest.approx(0.5 * math.erfc(t / math.sqrt(2)), abs=1e-5)  # normal limit


def test_welch_test_matches_a_hand_computed_example():
    # candidate 1.100, 1.102, 1.104 (mean 1.102, var 4e-6); reference 1.110, 1.113, 1.116 (mean 1.113, var 9e-6)
    # t = (1.113 - 0.005 - 1.102) / sqrt(4e-6/3 + 9e-6/3) = 0.006 / 0.0020817 = 2.88231
    # df = (13e-6/3)^2 / ((4e-6/3)^2/2 + (9e-6/3)^2/2) = 1.877778e-11 / 5.388889e-12 = 3.48454
    result = rec.welch_improvement_test([1.100, 1.102, 1.104], [1.110, 1.113, 1.116], margin=0.005, alpha=0.01)
    assert result.t == pytest.approx(0.006 / math.sqrt(13e-6 / 3), rel=1e-9)
    assert result.df == pytest.approx((13e-6 / 3) ** 2 / ((4e-6 / 3) ** 2 / 2 + (3e-6) ** 2 / 2), rel=1e-9)
    assert result.t == pytest.approx(2.88231, abs=1e-5) and result.df == pytest.approx(3.48454, abs=1e-5)
    # the t-table's one-sided 0.025 points are 3.182 (df 3) and 2.776 (df 4), the 0.05 ones 2.353 and 2.132
    assert 0.025 < result.p_value < 0.05 and not result.passes  # p >= 0.01: not a record
    assert result.improvement == pytest.approx(0.011)
    assert rec.welch_improvement_test([1.100, 1.102, 1.104], [1.110, 1.113, 1.116], 0.0, 0.25).passes
    with pytest.raises(rec.RecordError, match="at least 2 values on each side"):
        rec.welch_improvement_test([1.1], [1.2, 1.3], 0.005, 0.01)
