"""Run folders: a seed sweep keeps every run, a re-used RUN_ID is refused, the manifest matches the files."""

import hashlib
import json
import re
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import ROOT
from test_train import run_tiny


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def sweep(tiny_env, tmp_path) -> dict:
    """Three seeds of one config, like `for SEED in 42 314 999; do SEED=$SEED RUN_ID=seed$SEED ...; done`."""
    return {seed: run_tiny(tiny_env, ITERATIONS="2", SEED=str(seed), RUN_ID=f"seed{seed}") for seed in (42, 314, 999)}


@pytest.mark.slow
def test_a_seed_sweep_keeps_every_run_and_each_manifest_matches_its_files(sweep, tmp_path):
    hashes = set()
    for seed, out in sweep.items():
        run_dir = tmp_path / f"seed{seed}"
        assert Path(out["run_dir"]) == run_dir
        names = {p.name for p in run_dir.iterdir()}
        assert {"train.log", "manifest.json", "train_gpt.py", "final_model.pt", "final_model.quantized.ptz"} <= names
        manifest = json.loads((run_dir / "manifest.json").read_text())
        log = (run_dir / "train.log").read_text()
        assert manifest["status"] == "complete" and manifest["seed"] == seed and manifest["run_id"] == f"seed{seed}"
        hashes.add(manifest["config_hash"])
        # every number in the manifest is the one in the log and on disk
        line = re.search(r"^final_int8_zlib_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)$", log, re.M)
        assert f"{manifest['scores']['roundtrip']['val_bpb']:.8f}" == line.group(2)
        assert f"{manifest['scores']['roundtrip']['val_loss']:.8f}" == line.group(1)
        artifact = manifest["artifact"]
        assert artifact["model_bytes"] == (run_dir / artifact["file"]).stat().st_size
        assert artifact["sha256"] == sha256(run_dir / artifact["file"])
        assert artifact["total_bytes"] == artifact["model_bytes"] + artifact["code_bytes"] == out["total_bytes"]
        shipped = tg.shipped_code((ROOT / "train_gpt.py").read_bytes())  # the code as counted
        assert (run_dir / "train_gpt.py").read_bytes() == shipped and artifact["code_bytes"] == len(shipped)
        assert manifest["code"]["train_gpt_sha256"] == sha256(ROOT / "train_gpt.py")
        assert manifest["code"]["shipped_sha256"] == artifact["code_sha256"] == hashlib.sha256(shipped).hexdigest()
        data = manifest["data"]
        shards = sorted(Path(manifest["config"]["data_path"]).glob("fineweb_*.bin"))
        assert data["checksum_source"] == "data manifest" and data["train_shards"] == 1
        assert data["shard_sha256"] == {p.name: sha256(p) for p in shards}
        assert manifest["step_times_ms"]["count"] == 2 and manifest["training"]["steps"] == 2
        assert manifest["scores"]["roundtrip"]["num_targets"] == out["roundtrip"].num_targets
        assert set(manifest["phases_ms"]) >= {"train", "eval", "serialize"}
    assert len(hashes) == 1  # seeds differ, the config does not
    # the hash ignores only what names, places or seeds a run
    base = tg.Hyperparameters.from_env({"RECIPE": "baseline"})
    assert tg.config_hash(base) == tg.config_hash(tg.Hyperparameters.from_env({"RECIPE": "baseline", "SEED": "9",
                                                                               "RUN_ID": "x", "DATA_PATH": "/d"}))
    assert tg.config_hash(base) != tg.config_hash(tg.Hyperparameters.from_env({"RECIPE": "baseline", "MATRIX_LR": "0.01"}))


@pytest.mark.slow
def test_a_reused_run_id_is_refused_and_the_old_run_is_untouched(tiny_env, tmp_path):
    first = run_tiny(tiny_env, ITERATIONS="1", RUN_ID="same")
    run_dir = Path(first["run_dir"])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(tg.RunError) as err:
        run_tiny(tiny_env, ITERATIONS="1", RUN_ID="same", SEED="5")
    assert "\n" not in str(err.value) and f"run folder {run_dir}/ already exists" in str(err.value)
    assert "REPLACE_RUN=1" in str(err.value)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing appended or overwritten
    replaced = run_tiny(tiny_env, ITERATIONS="1", RUN_ID="same", SEED="5", REPLACE_RUN="1")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 5 and replaced["run_dir"] == first["run_dir"]
    assert len(re.findall(r"^run_dir:", (run_dir / "train.log").read_text(), re.M)) == 1  # fresh, not appended


@pytest.mark.slow
def test_a_crashed_run_leaves_a_manifest_that_says_so(tiny_env, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise tg.RunError("simulated crash in training")

    monkeypatch.setattr(tg, "train", boom)
    with pytest.raises(tg.RunError):
        run_tiny(tiny_env, RUN_ID="crash")
    manifest = json.loads((tmp_path / "crash" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "simulated crash in training" in manifest["error"]
    assert manifest["config"]["run_id"] == "crash" and "scores" not in manifest
    assert manifest["data"]["train_shards"] == 1  # what was known before the crash is kept


@pytest.mark.slow
def test_run_ids_that_are_paths_are_refused(tiny_env):
    with pytest.raises(tg.ConfigError, match="RUN_ID='../x' must be a plain folder name"):
        run_tiny(tiny_env, RUN_ID="../x")
