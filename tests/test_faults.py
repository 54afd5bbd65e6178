"""Faults and bad input (issue 18): every one ends with one line naming the cause and the fix, exit code
2, and nothing lost or left half-written. Unit-level where possible; file-system faults are mocked at
the syscall boundary."""

import errno
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ROOT, subprocess_env
from data.shards import write_shard
from records import records as rec
from test_train import CPU, run_tiny


@pytest.fixture()
def small_env(tiny_env, tmp_path) -> dict:
    """tiny_env with a validation set cut to its first documents (about 2,000 tokens, at a BOS), so
    that scoring, most of a tiny run's time, is short."""
    data = tmp_path / "small_data"
    data.mkdir()
    source = Path(tiny_env["DATA_PATH"])
    for shard in source.glob("fineweb_train_*.bin"):
        (data / shard.name).symlink_to(shard)
    val = tg.load_data_shard(tg.shard_files(str(source), "val")[0]).numpy()
    cut = int(np.flatnonzero(val == tg.BOS_ID)[np.flatnonzero(val == tg.BOS_ID) >= 2000][0])
    write_shard(data / "fineweb_val_000000.bin", val[:cut].astype(np.uint16))
    return {**tiny_env, "DATA_PATH": str(data)}


@pytest.fixture()
def no_training(monkeypatch):
    """Training steps that compute nothing (loss 5.0, weights as initialised): these tests are about
    what happens around the steps, and a real step costs most of a tiny run's time on a busy machine."""
    monkeypatch.setattr(tg, "train_step", lambda *args, **kwargs: torch.tensor(5.0))


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


# ---- 1. the run folder is claimed atomically ---------------------------------------------------------


def _claimer(artifact_dir: str, replace: bool, start, done, results) -> None:
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "ARTIFACT_DIR": artifact_dir, "RUN_ID": "race",
                                      "REPLACE_RUN": "1" if replace else "0"})
    start.wait()
    try:
        run_dir = tg.claim_run_dir(hp, CPU)
        (run_dir / f"winner-{os.getpid()}").write_text("mine")
        results.put(("won", os.getpid()))
    except tg.RunError as e:
        results.put(("lost", str(e)))
    done.wait()  # hold the claim (and its lock) until every claimer has tried


@pytest.mark.parametrize("before", ["nothing", "empty folder", "old run + REPLACE_RUN=1"])
def test_of_n_simultaneous_claimers_exactly_one_wins_and_the_others_touch_nothing(tmp_path, before):
    run_dir = tmp_path / "race"
    replace = before.startswith("old")
    if before != "nothing":
        run_dir.mkdir()
    if replace:
        (run_dir / "train.log").write_text("an old run\n")
    n = 4
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(tmp_path), replace, start, done, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    winners = [pid for kind, pid in outcomes if kind == "won"]
    assert len(winners) == 1, outcomes
    for kind, message in outcomes:
        if kind == "lost":
            assert "\n" not in message and ("already exists" in message or "still going" in message), message
    # the winner's folder holds only its own files; the losers left nothing anywhere
    assert sorted(p.name for p in run_dir.iterdir()) == ["train.log", f"winner-{winners[0]}"]
    assert (run_dir / "train.log").read_text() == ""  # a fresh log: the old run is gone, nothing appended
    assert [p.name for p in tmp_path.iterdir()] == ["race"]  # no temporary or moved-aside folder left


def test_replace_run_never_replaces_a_run_that_is_still_going(tmp_path):
    live = tg.Hyperparameters.from_env({"RECIPE": "baseline", "ARTIFACT_DIR": str(tmp_path), "RUN_ID": "x"})
    run_dir = tg.claim_run_dir(live, CPU)
    try:
        with pytest.raises(tg.RunError, match="belongs to a run that is still going") as err:
            tg.claim_run_dir(tg.Hyperparameters.from_env({"RECIPE": "baseline", "ARTIFACT_DIR": str(tmp_path),
                                                          "RUN_ID": "x", "REPLACE_RUN": "1"}), CPU)
        one_line(err.value)
        assert run_dir.is_dir() and [p.name for p in tmp_path.iterdir()] == ["x"]
    finally:
        tg.release_run_dir(run_dir)
    # once it has ended, REPLACE_RUN=1 may delete it
    tg.claim_run_dir(tg.Hyperparameters.from_env({"RECIPE": "baseline", "ARTIFACT_DIR": str(tmp_path), "RUN_ID": "x",
                                                  "REPLACE_RUN": "1"}), CPU)
    tg.release_run_dir(run_dir)


# ---- 2. SIGTERM and SIGHUP: the manifest says "failed" with the signal ------------------------------


def run_main(env: dict, monkeypatch) -> int:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return tg.main()


def signal_self_after(monkeypatch, name: str, sig: signal.Signals):
    """Make tg.<name> send `sig` to this process once, right after it first returns (the handler raises
    at the next bytecode, as it would for a signal from outside)."""
    original, sent = getattr(tg, name), []

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if not sent:
            sent.append(sig)
            os.kill(os.getpid(), sig)
        return out
    monkeypatch.setattr(tg, name, wrapper)
    return sent


@pytest.mark.parametrize("where, sig", [("train_step", signal.SIGTERM), ("fit_artifact", signal.SIGHUP),
                                        ("evaluate_artifact", signal.SIGTERM)])
def test_a_stop_signal_leaves_a_failed_manifest_naming_it_and_no_artifact_under_its_final_name(
        small_env, tmp_path, monkeypatch, capsys, no_training, where, sig):
    """Mid-training, mid-export (weights fitted, nothing written yet) and mid-scoring (artifact written)."""
    sent = signal_self_after(monkeypatch, where, sig)
    before = signal.getsignal(sig)
    rc = run_main({**small_env, "ITERATIONS": "2" if where == "train_step" else "1"}, monkeypatch)
    assert sent == [sig] and rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: stopped by {sig.name};") and "REPLACE_RUN=1" in err
    run_dir = tmp_path / "test"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["signal"] == sig.name and sig.name in manifest["error"]
    assert "finished_utc" in manifest and "scores" not in manifest
    names = {p.name for p in run_dir.iterdir()}
    assert "final_model.quantized.ptz" not in names and not any(n.endswith(".tmp") for n in names)
    if where == "evaluate_artifact":  # it was written before the signal: kept, but not under its final name
        assert "final_model.quantized.ptz.failed" in names and manifest["artifact_kept_as"] == "final_model.quantized.ptz.failed"
    if where == "train_step":  # stopped after its first step: nothing of the export exists
        assert manifest["data"]["train_shards"] == 1 and "final_model.pt" not in names
        log = (run_dir / "train.log").read_text()
        assert "clock: train_budget" in log and not re.search(r"^step:2/2 |^weights:exporting", log, re.M)
    assert signal.getsignal(sig) == before  # main() puts the handlers back


def _worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


@pytest.mark.slow
def test_sigterm_to_both_gloo_ranks_mid_training_is_recorded_and_both_exit_with_code_2(tiny_env, tmp_path):
    env = subprocess_env({**tiny_env, "ITERATIONS": "100000", "TRAIN_LOG_EVERY": "1", "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt.py")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "test" / "train.log"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and re.search(r"^step:2/", log.read_text(), re.M)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2
    for pid in workers:  # as a scheduler does: every process of the job gets SIGTERM
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    manifest = json.loads((tmp_path / "test" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["signal"] == "SIGTERM", manifest.get("error")
    assert "error: stopped by SIGTERM;" in out
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", out)
    assert proc.returncode != 0 and codes and set(codes) == {"2"}, out[-3000:]


# ---- 3. divergence: the loop stops at the step, the export refuses broken weights -------------------


@pytest.mark.slow
@pytest.mark.parametrize("iterations, bad_step, bad_loss", [("12", 3, math.nan), ("12", 2, 1e4),
                                                            ("12", 12, math.inf)])
def test_a_diverged_loss_stops_the_run_at_its_step(tiny_env, tmp_path, monkeypatch, iterations, bad_step, bad_loss):
    """Step 12 is not a logged step (TRAIN_LOG_EVERY=100): the last step is checked too."""
    def fake_step(run, loader, lr_scale, step, *rest):
        return torch.tensor(bad_loss if step + 1 == bad_step else 5.0)
    monkeypatch.setattr(tg, "train_step", fake_step)
    with pytest.raises(tg.RunError) as err:
        run_tiny(tiny_env, ITERATIONS=iterations, TRAIN_LOG_EVERY="100")
    message = one_line(err.value)
    assert f"training diverged: train_loss {bad_loss:.4g} at step {bad_step} " in message and "MATRIX_LR" in message
    manifest = json.loads((tmp_path / "test" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and f"at step {bad_step}" in manifest["error"]
    assert not (tmp_path / "test" / "final_model.pt").exists()


def test_check_training_loss_bounds():
    tg.check_training_loss(2 * math.log(1024) - 1e-9, 1, 1024)  # a bad but finite loss is not divergence
    for loss in (math.nan, math.inf, -math.inf, 2 * math.log(1024) + 1e-6):
        with pytest.raises(tg.RunError, match="at step 7 "):
            tg.check_training_loss(loss, 7, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("value, what", [(math.nan, "non-finite"), (7e4, "past the fp16 range")])
def test_the_export_refuses_broken_weights_before_writing_anything(small_env, tmp_path, monkeypatch, no_training,
                                                                  value, what):
    real_train = tg.train

    def poisoned(run, averager):
        state = real_train(run, averager)
        with torch.no_grad():
            run.base_model.blocks[0].mlp_scale[3] = value
        return state
    monkeypatch.setattr(tg, "train", poisoned)
    with pytest.raises(tg.RunError) as err:
        run_tiny(small_env, ITERATIONS="1")
    message = one_line(err.value)
    assert "refusing to export: weight blocks.0.mlp_scale" in message and what in message
    names = {p.name for p in (tmp_path / "test").iterdir()}
    assert names == {"train.log", "manifest.json"}  # no raw weights, no artifact, no temporary file
    assert json.loads((tmp_path / "test" / "manifest.json").read_text())["status"] == "failed"
    tg.check_exportable({"w": torch.full((3,), 65504.0), "ids": torch.tensor([10**6])})  # the edge is fine


# ---- 4. training ids are range-checked as the shards are read ---------------------------------------


@pytest.mark.parametrize("kind", ["stream", "shuffled"])
def test_out_of_range_training_ids_stop_the_loader_naming_the_shard(tmp_path, kind):
    good = np.ones(4096, dtype=np.uint16)
    bad = good.copy()
    bad[1000] = 1500
    write_shard(tmp_path / "fineweb_train_000000.bin", good)
    write_shard(tmp_path / "fineweb_train_000001.bin", bad)
    files = tg.shard_files(str(tmp_path), "train")
    with pytest.raises(tg.RunError) as err:
        loader = tg.make_train_loader(kind, files, 0, 1, torch.device("cpu"), 1, 128, vocab_size=1024)
        for _ in range(8):  # 8 x 4096 tokens: both shards are read
            loader.next_batch(4096, 128, 1)
    message = one_line(err.value)
    assert f"training shard {files[1]} holds token id 1500 >= VOCAB_SIZE=1024" in message and "DATA_PATH" in message
    ok = tg.make_train_loader(kind, files[:1], 0, 1, torch.device("cpu"), 1, 128, vocab_size=1024)
    ok.next_batch(4096, 128, 1)
    ok.close()


# ---- 5. a garbage tokenizer ----------------------------------------------------------------------------


def test_a_garbage_tokenizer_is_one_line(tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(b"\x00garbage, not a protobuf" * 50)
    with pytest.raises(tg.RunError) as err:
        tg.load_tokenizer(tg.Hyperparameters.from_env({"RECIPE": "baseline", "TOKENIZER_PATH": str(path)}))
    message = one_line(err.value)
    assert f"TOKENIZER_PATH={path} is not a SentencePiece model" in message and "point TOKENIZER_PATH" in message


# ---- 6. file-system errors name the path (mocked at the syscall boundary) ---------------------------


def failing_mkdir(monkeypatch, under: Path, code: int):
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(under)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "read-only: set ARTIFACT_DIR"),
                                       (errno.ENOSPC, "the disk is full"),
                                       (errno.EACCES, "no write permission")])
def test_a_run_folder_that_cannot_be_made_is_one_line_with_exit_code_2(tiny_env, tmp_path, monkeypatch, capsys,
                                                                       code, fix):
    artifact_dir = tmp_path / "runs"
    failing_mkdir(monkeypatch, artifact_dir, code)
    assert run_main({**tiny_env, "ARTIFACT_DIR": str(artifact_dir)}, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: cannot write {artifact_dir}" in err and fix in err, err
    assert not artifact_dir.exists()


def test_a_file_where_the_folder_should_be_and_a_too_long_run_id(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "ARTIFACT_DIR": str(tmp_path / "runs"), "RUN_ID": "a"})
    with pytest.raises(tg.RunError) as err:
        tg.claim_run_dir(hp, CPU)
    assert f"cannot write {tmp_path / 'runs'}" in one_line(err.value) and "a file stands where a folder should be" in str(err.value)
    (tmp_path / "b").write_text("a file named like the run")
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "ARTIFACT_DIR": str(tmp_path), "RUN_ID": "b",
                                      "REPLACE_RUN": "1"})
    with pytest.raises(tg.RunError, match="is a file, not a run folder"):
        tg.claim_run_dir(hp, CPU)
    assert (tmp_path / "b").read_text() == "a file named like the run"  # never deleted
    with pytest.raises(tg.ConfigError) as err:
        tg.agree_run_id("r" * 300, CPU)
    assert "RUN_ID is 300 bytes long" in one_line(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "runs"]


@pytest.mark.slow
def test_a_full_disk_while_writing_the_log_header_still_leaves_a_manifest(tiny_env, tmp_path, monkeypatch):
    class FullDisk:
        """A file whose writes of more than 4 KiB fail as write(2) does on a full disk."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            if len(text) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(tg, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    with pytest.raises(tg.RunError) as err:
        run_tiny(tiny_env)
    log = tmp_path / "test" / "train.log"
    assert one_line(err.value) == f"cannot write {log}: No space left on device; the disk is full: free space or set " \
                                  "ARTIFACT_DIR to a disk with room"
    manifest = json.loads((tmp_path / "test" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "No space left on device" in manifest["error"]


def test_write_atomic_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    tg.write_atomic(path, b"old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(tg.RunError) as err:
        tg.write_atomic(path, b"new")
    assert one_line(err.value).startswith(f"cannot write {path}: No space left on device; the disk is full")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


# ---- 7. impossible shapes stop the run before anything is allocated --------------------------------


def test_impossible_shapes_are_refused_before_any_allocation(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.ones(3000, dtype=np.uint16))
    files = tg.shard_files(str(tmp_path), "train")
    val = torch.ones(1000, dtype=torch.int64)
    base = {"RECIPE": "baseline", "TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "8192", "VAL_BATCH_SIZE": "8192"}
    tg.check_shapes_fit(tg.Hyperparameters.from_env(base), CPU, files, val)  # fits
    start = time.perf_counter()
    with pytest.raises(tg.RunError) as err:
        tg.check_shapes_fit(tg.Hyperparameters.from_env({**base, "NUM_LAYERS": "100000"}), CPU, files, val)
    assert time.perf_counter() - start < 10  # nothing built: the old code took 100 s to fail in the allocator
    assert "NUM_LAYERS=100000" in one_line(err.value) and "lower NUM_LAYERS" in str(err.value)
    with pytest.raises(tg.RunError) as err:
        tg.check_shapes_fit(tg.Hyperparameters.from_env({**base, "TRAIN_SEQ_LEN": "4096"}), CPU, files, val)
    assert "TRAIN_SEQ_LEN=4096 is longer than every training shard (the largest holds 3000" in one_line(err.value)
    with pytest.raises(tg.RunError) as err:
        tg.check_shapes_fit(tg.Hyperparameters.from_env({**base, "TRAIN_SEQ_LEN": "2048",
                                                         "TRAIN_BATCH_TOKENS": "16384", "VAL_BATCH_SIZE": "16384"}),
                            CPU, files, val)
    assert "is longer than the validation set (999 targets)" in one_line(err.value)
    with pytest.raises(tg.RunError, match=r"^EVAL_SEQ_LEN=1000 is longer than the validation set"):
        tg.check_shapes_fit(tg.Hyperparameters.from_env({**base, "EVAL_SEQ_LEN": "1000"}), CPU, files, val)


@pytest.mark.slow
def test_a_model_too_large_for_the_machine_stops_in_the_run_before_building(tiny_env, tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "GPT", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(tg.RunError, match="the model cannot train here"):
        run_tiny(tiny_env, NUM_LAYERS="100000", MODEL_DIM="512")


# ---- 8. one training-data access span, checked before the manifest is finished ----------------------


def test_the_data_access_span_sums_every_phase_that_reads_training_data():
    clock = tg.PhaseClock(600_000.0, None)
    clock.totals.update(train=590_000.0, prequant_ttt=6_000.0, calibration=5_000.0, pre_quant_eval=9e9)
    assert tg.train_data_access_ms(clock, prequant_on_train=True, calibrate_on_train=True) == 601_000.0
    assert tg.train_data_access_ms(clock, prequant_on_train=False, calibrate_on_train=True) == 595_000.0
    assert tg.train_data_access_ms(clock, prequant_on_train=True, calibrate_on_train=False) == 596_000.0


@pytest.mark.slow
def test_a_run_past_the_cap_counting_pre_quant_ttt_is_non_record_and_refused(small_env, tmp_path, monkeypatch,
                                                                             no_training):
    real = tg.run_prequant_ttt

    def slow_prequant(prequant, model, clock, **kwargs):  # as if the slice took longer than the whole cap
        real(prequant, model, clock, **kwargs)
        clock.totals["prequant_ttt"] += 61_000.0
    monkeypatch.setattr(tg, "run_prequant_ttt", slow_prequant)
    out = run_tiny(small_env, ITERATIONS="2", MAX_WALLCLOCK_SECONDS="60", PREQUANT_TTT_ENABLED="1",
                   PREQUANT_TTT_TOKENS="1024", TTT_BATCH_SEQS="8")
    assert out["train_data_access_end_ms"] > out["cap_ms"] == 60_000.0 and out["non_record"]
    manifest = json.loads((tmp_path / "test" / "manifest.json").read_text())
    compliance = manifest["compliance"]
    assert compliance["non_record"] and not compliance["train_data_inside_cap"]
    assert "training-data access (training + pre-quant TTT) ended at" in compliance["non_record_reason"]
    log = (tmp_path / "test" / "train.log").read_text()
    assert re.search(r"^train_data_access_end:\d+ms \(training \+ pre-quant TTT; cap 60000.0\) inside_cap:0$", log, re.M)
    with pytest.raises(rec.RecordError, match="stamped non-record .training-data access"):
        rec.check_submittable([rec.load_run(tmp_path / "test")])


# ---- 9. the data a run used is in its manifest ------------------------------------------------------


def test_the_manifest_records_the_tokenizer_and_validation_checksums(tiny_env, tmp_path):
    fingerprint = tg.data_fingerprint(tiny_env["DATA_PATH"], tiny_env["TOKENIZER_PATH"])
    assert fingerprint["tokenizer_sha256"] == tg.file_sha256(Path(tiny_env["TOKENIZER_PATH"]))
    assert any("_val_" in name for name in fingerprint["shard_sha256"])
    # the config hash still ignores where the data lives: the records tool compares the fingerprints
    a = tg.Hyperparameters.from_env({"RECIPE": "baseline", "DATA_PATH": "/a", "TOKENIZER_PATH": "/a/t.model"})
    b = tg.Hyperparameters.from_env({"RECIPE": "baseline", "DATA_PATH": "/b", "TOKENIZER_PATH": "/b/t.model"})
    assert tg.config_hash(a) == tg.config_hash(b)


# ---- 10. EVAL_ONLY writes a manifest; its early failures leave the RUN_ID free ----------------------


@pytest.mark.slow
def test_eval_only_writes_a_manifest_and_its_failures_say_how_to_rerun(small_env, tmp_path, monkeypatch, no_training):
    trained = run_tiny(small_env, ITERATIONS="1")
    artifact = tmp_path / "test" / "final_model.quantized.ptz"
    env = {**small_env, "EVAL_ONLY": "1", "ARTIFACT_PATH": str(artifact)}
    out = tg.run_eval_only(tg.Hyperparameters.from_env({**env, "RUN_ID": "eval"}), CPU)
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["mode"] == "eval_only"
    assert manifest["final_score"]["val_bpb"] == out["roundtrip"].val_bpb == trained["roundtrip"].val_bpb
    assert manifest["artifact"]["sha256"] == tg.file_sha256(artifact) and manifest["data"]["train_shards"] == 0
    assert manifest["data"]["tokenizer_sha256"] == tg.file_sha256(Path(small_env["TOKENIZER_PATH"]))
    with pytest.raises(rec.RecordError, match="an EVAL_ONLY run"):
        rec.load_run(tmp_path / "eval")
    # a vocabulary mismatch names the tokenizer, not VOCAB_SIZE (EVAL_ONLY takes it from the artifact),
    # and, found before the folder is claimed, leaves the RUN_ID free
    real_header = tg.read_artifact_header

    def other_vocab(blob):
        header, rest = real_header(blob)
        return dict(header, model=dict(header["model"], vocab_size=2048)), rest
    monkeypatch.setattr(tg, "read_artifact_header", other_vocab)
    with pytest.raises(tg.RunError) as err:
        tg.run_eval_only(tg.Hyperparameters.from_env({**env, "RUN_ID": "eval2"}), CPU)
    message = one_line(err.value)
    assert "trained with 2048 pieces" in message and "point TOKENIZER_PATH" in message and "set VOCAB_SIZE" not in message
    assert not (tmp_path / "eval2").exists()
    monkeypatch.setattr(tg, "read_artifact_header", real_header)
    # a failure once the folder exists: the manifest says failed, the message says how to re-run
    monkeypatch.setattr(tg, "score_artifact", lambda *a, **k: (_ for _ in ()).throw(tg.RunError("scoring broke")))
    with pytest.raises(tg.RunError) as err:
        tg.run_eval_only(tg.Hyperparameters.from_env({**env, "RUN_ID": "eval3"}), CPU)
    assert "scoring broke" in one_line(err.value) and "re-run with REPLACE_RUN=1 or a new RUN_ID" in str(err.value)
    failed = json.loads((tmp_path / "eval3" / "manifest.json").read_text())
    assert failed["status"] == "failed" and failed["mode"] == "eval_only" and "scoring broke" in failed["error"]
