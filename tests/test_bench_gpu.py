"""The GPU probe (tests/bench/bench_gpu.py) never rots: its --dry-run runs every phase on the CPU."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, subprocess_env


@pytest.mark.slow
def test_gpu_probe_dry_run_runs_every_phase_and_writes_its_report(sample_dataset, tmp_path):
    limits = [f"--{name}-limit=300" for name in ("env", "tests", "train", "export", "eval", "attention")]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "bench_gpu.py"), "--dry-run",
                           "--data", sample_dataset["dataset_dir"], "--tokenizer", sample_dataset["tokenizer_path"],
                           "--out", str(tmp_path), *limits], env=subprocess_env({}), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_probe.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["env", "tests", "train", "export", "eval", "attention"]
    assert all(p["status"].startswith("ok") for p in phases.values()), {k: p["status"] for k, p in phases.items()}
    assert phases["env"]["torch"] == torch.__version__ and phases["env"]["cuda_available"] is False
    cuda_tests = (ROOT / "tests" / "test_cuda.py").read_text().count("\ndef test_") + sum(
        f.read_text().count("@pytest.mark.cuda\n") for f in (ROOT / "tests").glob("test_*.py") if f.name != "test_cuda.py")
    assert cuda_tests > (ROOT / "tests" / "test_cuda.py").read_text().count("\ndef test_")  # the FlexAttention one
    assert phases["tests"]["skipped"] == cuda_tests and phases["tests"]["failure"] == 0  # no CUDA here
    assert phases["train"]["steps"] == 3 and phases["train"]["ms_per_step_median"] > 0
    assert phases["train"]["model_params"] > 0 and phases["train"]["roundtrip_val_bpb"] > 0
    for key in ("calibration_selfgen_s", "calibration_train_s", "gptq_s", "unpack_brotli_s", "unpack_ans_s"):
        assert phases["export"][key] >= 0
    assert phases["export"]["pack_brotli_bytes"] > 0 and phases["export"]["pack_ans_bytes"] > 0
    assert 1000 <= phases["eval"]["targets"] < 4000
    for stage in ("roundtrip", "sliding", "ttt"):  # the record recipe's three passes, each extrapolated
        assert phases["eval"][f"{stage}_s_per_M_targets"] > 0 and phases["eval"][f"{stage}_projected_8gpu_s"] > 0
    # no CUDA: the dense-mask SDPA step only, and why FA3's varlen kernel is not measured
    assert phases["attention"]["sdpa_ms_per_step"] > 0 and phases["attention"]["documents_per_batch"] > 16
    assert phases["attention"]["fa3_varlen"] == "flash_attn_interface not installed"
    assert (tmp_path / "gpu_probe.md").read_text().startswith("# GPU probe: no GPU")
