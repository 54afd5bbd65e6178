"""End-to-end: a tiny run learns, the warm-up leaves no trace, 2 gloo ranks match 1 process."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ROOT, subprocess_env

CPU = tg.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)


def run_tiny(env: dict, **overrides) -> dict:
    return tg.run(tg.Hyperparameters.from_env({**env, **overrides}), CPU)


@pytest.mark.slow
def test_twenty_steps_lower_the_loss_and_the_artifact_scores_like_the_model(tiny_env, tmp_path):
    out = run_tiny(tiny_env, WARMDOWN_ITERS="5", VAL_LOSS_EVERY="20")
    assert out["steps"] == 20
    losses = out["train_losses"]
    assert losses[-1] < losses[0] - 0.3, losses
    pre, post = out["pre_quant"], out["roundtrip"]
    assert pre.num_targets == post.num_targets
    assert abs(post.val_bpb - pre.val_bpb) < 0.01 * pre.val_bpb  # int8 costs little
    assert out["total_bytes"] == out["code_bytes"] + (tmp_path / "test" / "final_model.quantized.ptz").stat().st_size
    assert out["code_bytes"] == len(tg.shipped_code((ROOT / "train_gpt.py").read_bytes()))  # the shipped form
    log = (tmp_path / "test" / "train.log").read_text()
    assert re.search(r"^final_int8_zlib_roundtrip_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$", log, re.M)
    assert re.search(r"^step:20/20 val_loss:[\d.]+ val_bpb:[\d.]+ train_time:\d+ms step_avg:[\d.]+ms$", log, re.M)
    assert "def main(" in log  # the log embeds the source that produced it


@pytest.mark.slow
def test_warmup_steps_leave_no_trace(tiny_env, tmp_path):
    a = run_tiny(tiny_env, ITERATIONS="4", RUN_ID="a")
    b = run_tiny(tiny_env, ITERATIONS="4", RUN_ID="b", WARMUP_STEPS="3")
    assert a["train_losses"] == b["train_losses"]
    assert a["roundtrip"].val_loss == b["roundtrip"].val_loss


@pytest.mark.slow
def test_wallclock_cap_stops_training_early(tiny_env):
    out = run_tiny(tiny_env, ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="1.5")
    assert out["stopped_early"] and 0 < out["steps"] < 100000
    # It stops before a step that would end past the cap, as predicted from the steps so far, so it
    # overruns by less than one step (a busy machine can make the last step longer than the ones
    # before, so the bound is the longest step). Exact stopping: test_schedule.py.
    longest = json.loads((Path(out["run_dir"]) / "manifest.json").read_text())["step_times_ms"]["max"]
    assert out["training_time_ms"] < 1500 + longest


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["baseline", "record"])
def test_two_gloo_ranks_match_one_process_at_the_same_global_batch(tiny_env, tmp_path, stack):
    """Same global batch, same seed: 2 ranks x 4 micro-steps equal 1 process x 8. With the record stack
    this also covers sharded Muon, gradient clipping after the cross-rank average (clipping each
    rank's own gradients would differ), EMA, and looping switched on at the same step on both ranks."""
    env = dict(tiny_env, ITERATIONS="6", WARMDOWN_ITERS="3", RUN_ID="single", GRAD_ACCUM_STEPS="0")
    if stack == "record":
        env.update(ALL_SWITCHES_SMALL, GRAD_ACCUM_STEPS="0", ITERATIONS="6", ENABLE_LOOPING_AT="0.5",
                   GRAD_CLIP_NORM="0.05", EMA_DECAY="0.5", WARMDOWN_FRAC="0.5", MIN_LR="0.1", MATRIX_BITS="6")
    single = run_tiny(env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt.py")]
    # An empty RUN_ID (baseline stack) makes rank 0 pick a uuid that every rank must agree on: rank 1 reads
    # the artifact back from the same run folder.
    run_id = "" if stack == "baseline" else "ddp"
    proc = subprocess.run(cmd, env=subprocess_env(dict(env, RUN_ID=run_id, OMP_NUM_THREADS="1")), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "single"]
    assert len(run_dirs) == 1 and '"status": "complete"' in (run_dirs[0] / "manifest.json").read_text()
    assert "world_size:2 grad_accum_steps:4" in proc.stdout
    if stack == "record":
        assert "layer_loop:enabled step:3 " in proc.stdout and "weights:exporting ema" in proc.stdout
        assert "sampler:shuffled" in proc.stdout  # the record recipe's loader, sliced by rank from one order
    line = re.search(r"final_int\d_\w+_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", proc.stdout)
    assert float(line.group(1)) == pytest.approx(single["roundtrip"].val_loss, abs=1e-5)
    assert float(line.group(2)) == pytest.approx(single["roundtrip"].val_bpb, abs=1e-5)


@pytest.mark.slow
def test_oversize_artifact_fails_with_one_line_and_keeps_results(tiny_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", 1000)
    for k, v in dict(tiny_env, ITERATIONS="2").items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert tg.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "over the 1000-byte limit" in err[0]
    assert (tmp_path / "test" / "final_model.quantized.ptz").exists() and (tmp_path / "test" / "train.log").exists()


def test_our_shards_load_in_the_training_script_and_back(tmp_path):
    from data.shards import read_shard, write_shard

    tokens = np.array([1, 0, 65535, 42, 1, 7], dtype=np.uint16)
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert tg.load_data_shard(tmp_path / "fineweb_train_000000.bin").tolist() == tokens.tolist()
    # A shard written by any other tool in the public layout (numpy by hand) loads in both readers.
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, 3)
    (tmp_path / "other.bin").write_bytes(header.tobytes() + np.array([1, 5, 9], dtype="<u2").tobytes())
    assert tg.load_data_shard(tmp_path / "other.bin").tolist() == [1, 5, 9]
    assert read_shard(tmp_path / "other.bin").tolist() == [1, 5, 9]
    (tmp_path / "bad.bin").write_bytes(header.tobytes() + b"\x00" * 4)
    with pytest.raises(tg.RunError, match="does not match header"):
        tg.load_data_shard(tmp_path / "bad.bin")


def test_loader_gives_each_rank_its_slice_of_the_same_stream(tmp_path):
    from data.shards import write_shard

    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(100) % 60000)
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(100, 150))
    files = tg.shard_files(str(tmp_path), "train")
    single = tg.DistributedTokenLoader(files, 0, 1, torch.device("cpu"), seed=5)
    ranks = [tg.DistributedTokenLoader(files, r, 2, torch.device("cpu"), seed=5) for r in range(2)]
    # global 16 tokens, seq 4: one process takes 2 micro-steps per step, two processes 1 each;
    # 14 micro-batches of 9 tokens cross from the 100-token first shard into the second.
    seen_single = [single.next_batch(16, 4, 2)[0] for _ in range(14)]
    seen_ranks = [ranks[r].next_batch(16, 4, 1)[0] for _ in range(7) for r in range(2)]
    for a, b in zip(seen_single, seen_ranks):
        assert torch.equal(a, b)
    seen = torch.cat([t.flatten() for t in seen_single])
    assert (seen >= 100).any() and (seen < 100).any()  # crossed from one shard into the other


ALL_SWITCHES_SMALL = {
    "RECIPE": "record", "VOCAB_SIZE": "1024", "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2", "XSA_LAST_N": "4", "ROPE_DIMS": "8", "LOOP_START": "1", "LOOP_END": "2", "NUM_LOOPS": "1",
    "PARALLEL_START_LAYER": "3", "BIGRAM_VOCAB_SIZE": "256", "BIGRAM_DIM": "32", "VALUE_RESIDUAL": "1",
    "BACKOUT_LAYER": "1", "TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "8192", "VAL_BATCH_SIZE": "8192",
    "GRAD_ACCUM_STEPS": "1", "MAX_WALLCLOCK_SECONDS": "0", "TRAIN_LOG_EVERY": "5",
    "GPTQ_CALIBRATION_BATCHES": "2", "GPTQ_CALIBRATION_SEQS": "2", "GPTQ_CALIBRATION_SEQ_LEN": "32",
    "TTT_ENABLED": "0",  # these tests are about training; the recipe's TTT runs in the smoke test below
    "AUTO_FIT_FILL": "0",  # and so does filling the bytes under the limit
}


@pytest.mark.slow
def test_all_switches_train_and_looping_turns_on_at_its_fraction(tiny_env, tmp_path):
    env = {**tiny_env, **ALL_SWITCHES_SMALL, "ITERATIONS": "20", "WARMDOWN_ITERS": "5", "WARMUP_STEPS": "2",
           "TRAIN_BATCH_TOKENS": "4096", "ENABLE_LOOPING_AT": "0.5", "VAL_LOSS_EVERY": "0", "EVAL_SEQ_LEN": "256"}
    out = run_tiny(env)
    losses = out["train_losses"]
    assert losses[-1] < losses[0] - 0.3, losses
    log = (tmp_path / "test" / "train.log").read_text()
    assert "warmup_step:2/2" in log and "loop_warmup_step:2/2" in log  # both graphs primed
    assert re.search(r"^layer_loop:enabled step:10 frac:0\.500 ", log, re.M)
    assert re.search(r"^model_params_detail: unique:\d+ per_block:\d+ virtual_layers:6 ", log, re.M)
    assert re.search(r"^flops_per_token: forward:\d+ train:\d+", log, re.M)
    assert re.search(r"^artifact_estimate: bitpacked_payload_bytes:\d+ ", log, re.M)
    assert abs(out["roundtrip"].val_bpb - out["pre_quant"].val_bpb) < 0.02 * out["pre_quant"].val_bpb


@pytest.mark.slow
def test_default_recipe_shrunk_by_depth_and_width_only_runs_end_to_end(small_val, tmp_path):
    """A user's smoke test of RECIPE=record: change NUM_LAYERS and MODEL_DIM (plus the data, the vocab and
    the run length), nothing about XSA, parallel residuals or the loop, and the script runs to its score.
    The validation set is the sample's first ~1,500 tokens: the phased TTT costs most of the run."""
    env = subprocess_env({
        "RECIPE": "record", "NUM_LAYERS": "4", "MODEL_DIM": "128", **small_val,
        "TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "4096", "VAL_BATCH_SIZE": "32768",
        "ITERATIONS": "6", "WARMUP_STEPS": "1", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0",
        "ARTIFACT_DIR": str(tmp_path), "RUN_ID": "smoke",
        # the recipe's GPTQ calibration on training data, sized for a CPU (its default is 16 x 8 sequences)
        "GPTQ_CALIBRATION_BATCHES": "1", "GPTQ_CALIBRATION_SEQS": "2", "GPTQ_CALIBRATION_SEQ_LEN": "32",
        # and its TTT sized for a CPU: 8 documents per rank (its 64 pad every step to 64 rows), no budget to time
        "TTT_BATCH_SIZE": "8", "MAX_EVAL_SECONDS": "0",
    })
    out = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^final_int6_ans_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+$", out.stdout, re.M)
    assert re.search(r"^final_sliding_window_exact val_loss:[\d.]+ val_bpb:[\d.]+$", out.stdout, re.M)
    # R0427's final pass: phased LoRA TTT with its run's adapter settings, the final score
    assert re.search(r"^ttt:start mode:phased .* lora_rank:80 lora_alpha:144 lora_lr:0.0001 warm_start_a:1 ",
                     out.stdout, re.M)
    assert re.search(r"^ttt:global_phase 3/3 ", out.stdout, re.M)  # run, or skipped when no document is left
    ttt = re.search(r"^quantized_ttt_phased val_loss:[\d.]+ val_bpb:([\d.]+) ", out.stdout, re.M)
    assert ttt and re.search(rf"^final_score stage:ttt val_loss:[\d.]+ val_bpb:{ttt.group(1)} ", out.stdout, re.M)
    assert "xsa_last_n: 4 (recipe: NUM_LAYERS)" in out.stdout
    assert "order:[0, 1, 2, 1, 2, 1, 2, 3]" in out.stdout  # the middle layers 1-2 are looped twice


def test_loader_prefetches_the_next_shard(tmp_path):
    from data.shards import write_shard

    for i in range(3):
        write_shard(tmp_path / f"fineweb_train_00000{i}.bin", np.full(50, i + 10))
    stream = tg.TokenStream(tg.shard_files(str(tmp_path), "train"), seed=3)
    current = int(stream.tokens[0])
    upcoming = stream.pending.result(timeout=10)  # already being read while `current` is consumed
    assert int(upcoming[0]) != current
    stream.take(50)
    assert int(stream.take(1)[0]) == int(upcoming[0])
    stream.take(49)
    seen = {current, int(upcoming[0]), int(stream.take(1)[0])}
    assert seen == {10, 11, 12}  # one pass visits every shard once


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
@pytest.mark.parametrize("kind", ["stream", "shuffled"])
def test_loader_prefetch_thread_starts_no_openmp_team(tmp_path, kind):
    """A torch operator in the prefetch thread would start a second OpenMP team; with more OpenMP
    threads than cores libgomp stops spin-waiting and every step's operators wait for sleeping
    threads (issue 12). The loader may add its one prefetch thread and nothing else."""
    from data.shards import write_shard

    for i in range(2):
        write_shard(tmp_path / f"fineweb_train_00000{i}.bin", np.arange(40_000) % 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(256, 256)
        (a @ a).sum()  # the main thread's team exists before counting
        before = len(os.listdir("/proc/self/task"))
        loader = tg.make_train_loader(kind, tg.shard_files(str(tmp_path), "train"), 0, 1, torch.device("cpu"),
                                      seed=1, seq_len=64)
        for _ in range(40):  # crosses shard boundaries, so the stream's prefetch reads a shard each time
            x, y = loader.next_batch(1024, 64, 1)
        assert x.dtype == y.dtype == torch.int64 and x.shape == (16, 64)
        time.sleep(0.1)
        during = len(os.listdir("/proc/self/task"))
        loader.close()
        assert during <= before + 1
    finally:
        torch.set_num_threads(threads)
