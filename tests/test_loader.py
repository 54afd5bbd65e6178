"""TRAIN_LOADER=shuffled: fixed-length windows of all shards in a seeded order, the same for any rank count."""

import re
import tracemalloc

import numpy as np
import pytest
import torch

import train_gpt as tg
from data.shards import write_shard
from test_train import run_tiny

CPU = torch.device("cpu")
SEQ = 16
SIZES = (1000, 737, 10, 400)  # the 10-token shard holds no window of SEQ + 1 tokens


@pytest.fixture()
def shard_files(tmp_path) -> list[str]:
    """Shards whose every token is its own (shard, position) label: token = 10000 * shard + position."""
    for i, n in enumerate(SIZES):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", (10000 * i + np.arange(n)).astype(np.uint16))
    return tg.shard_files(str(tmp_path), "train")


def label(window: torch.Tensor) -> tuple[int, int]:
    """(shard, start) of a window from its first token."""
    return int(window[0]) // 10000, int(window[0]) % 10000


def full_windows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, y[:, -1:]], dim=1)  # the seq_len + 1 tokens of each window


def test_every_window_is_visited_exactly_once_per_epoch(shard_files):
    loader = tg.ShuffledWindowLoader(shard_files, 0, 1, CPU, seed=3, seq_len=SEQ)
    per_epoch = loader.windows_per_epoch
    phases = loader.phases.copy()
    # every token is a target once: windows cover each shard from its phase, one shared token between neighbours
    assert per_epoch == sum((n - p - 1) // SEQ for n, p in zip(SIZES, phases) if n > SEQ)
    assert all(0 <= p < SEQ for p in phases)
    seen = []
    while len(seen) < per_epoch:
        x, y = loader.next_batch(4 * SEQ, SEQ, 1)  # 4 windows per batch
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one inside each window
        seen.extend(label(w) for w in full_windows(x, y))
    first_epoch = seen[:per_epoch]
    expected = {(i, int(phases[i]) + k * SEQ) for i, n in enumerate(SIZES) for k in range((n - phases[i] - 1) // SEQ)
                if n > SEQ}
    assert len(set(first_epoch)) == per_epoch and set(first_epoch) == expected
    assert all(start + SEQ < SIZES[shard] for shard, start in first_epoch)  # whole windows only
    assert loader.epochs_consumed() == pytest.approx(len(seen) / per_epoch)
    loader.close()


def test_each_epoch_is_a_new_permutation_and_the_order_depends_only_on_the_seed(shard_files):
    def order(seed: int, batches: int) -> list[tuple[int, int]]:
        loader = tg.ShuffledWindowLoader(shard_files, 0, 1, CPU, seed=seed, seq_len=SEQ)
        out = [label(w) for _ in range(batches) for w in full_windows(*loader.next_batch(2 * SEQ, SEQ, 1))]
        loader.close()
        return out

    a, b, c = order(7, 140), order(7, 140), order(8, 140)
    assert a == b and a != c
    loader = tg.ShuffledWindowLoader(shard_files, 0, 1, CPU, seed=7, seq_len=SEQ)
    per_epoch = loader.windows_per_epoch
    loader.close()
    assert len(a) > 2 * per_epoch
    epoch0, epoch1 = a[:per_epoch], a[per_epoch : 2 * per_epoch]
    assert epoch0 != epoch1 and len(set(epoch1)) == per_epoch  # a new permutation, again without replacement
    # neighbouring windows of a batch come from all over the data, not one contiguous region
    assert len({shard for shard, _ in epoch0[:12]}) >= 2


def test_one_process_with_8_micro_steps_equals_2_ranks_with_4(shard_files):
    single = tg.ShuffledWindowLoader(shard_files, 0, 1, CPU, seed=11, seq_len=SEQ)
    ranks = [tg.ShuffledWindowLoader(shard_files, r, 2, CPU, seed=11, seq_len=SEQ) for r in range(2)]
    global_tokens = 16 * SEQ  # 16 windows per optimizer step: 2 per micro-step alone, 2 per rank per micro-step
    for _ in range(10):  # several optimizer steps, crossing an epoch boundary
        alone = [single.next_batch(global_tokens, SEQ, 8) for _ in range(8)]
        shared = [ranks[r].next_batch(global_tokens, SEQ, 4) for _ in range(4) for r in range(2)]
        for (xa, ya), (xb, yb) in zip(alone, shared):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert single.epoch >= 1
    for loader in (single, *ranks):
        loader.close()


def test_shards_are_memory_mapped_so_memory_stays_flat_with_many_shards(tmp_path):
    tokens_per_shard, num_shards = 200_000, 40  # 16 MB of tokens on disk
    for i in range(num_shards):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.full(tokens_per_shard, i, dtype=np.uint16))
    files = tg.shard_files(str(tmp_path), "train")
    tracemalloc.start()
    loader = tg.ShuffledWindowLoader(files, 0, 1, CPU, seed=0, seq_len=128)
    for _ in range(20):
        loader.next_batch(8 * 128, 128, 1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    loader.close()
    assert all(isinstance(s, np.memmap) for s in loader.shards)
    assert peak < 0.1 * num_shards * tokens_per_shard * 2, peak  # far below the data's size: nothing read whole


def test_too_short_training_data_is_one_line(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(10, dtype=np.uint16))
    with pytest.raises(tg.RunError, match=r"no training shard holds TRAIN_SEQ_LEN\+1=17 tokens"):
        tg.ShuffledWindowLoader(tg.shard_files(str(tmp_path), "train"), 0, 1, CPU, seed=0, seq_len=16)


@pytest.mark.slow
def test_shuffled_run_warmup_leaves_no_trace_and_logs_the_epochs(tiny_env, tmp_path):
    """The compile warm-up uses its own loader; training starts from the loader's first batch again."""
    a = run_tiny(tiny_env, ITERATIONS="4", RUN_ID="a", TRAIN_LOADER="shuffled")
    b = run_tiny(tiny_env, ITERATIONS="4", RUN_ID="b", TRAIN_LOADER="shuffled", WARMUP_STEPS="3")
    assert a["train_losses"] == b["train_losses"]
    files = tg.shard_files(tiny_env["DATA_PATH"], "train")
    stream = tg.make_train_loader("stream", files, 0, 1, CPU, 1337, 128)
    shuffled = tg.make_train_loader("shuffled", files, 0, 1, CPU, 1337, 128)
    assert not torch.equal(stream.next_batch(8192, 128, 1)[0], shuffled.next_batch(8192, 128, 1)[0])
    stream.close()
    log = (tmp_path / "b" / "train.log").read_text()
    assert re.search(r"^train_loader:dataset:\S+ train_shards:1 sampler:shuffled$", log, re.M)
    epochs = float(re.search(r"^train_loader:epochs_consumed:([\d.]+) sampler:shuffled$", log, re.M).group(1))
    assert epochs == pytest.approx(b["epochs_consumed"], abs=1e-4) and 0 < epochs < 1
    assert b["epochs_consumed"] == pytest.approx(4 * 8192 / 128 / shuffled.windows_per_epoch)
    shuffled.close()


@pytest.mark.parametrize("kind", ["stream", "shuffled"])
def test_the_pre_quant_ttt_slice_is_held_out_of_training(shard_files, kind):
    """The last `holdout` tokens of the last shard (where pre-quant TTT reads) are never a training token."""
    holdout = 150
    loader = tg.make_train_loader(kind, shard_files, 0, 1, CPU, 5, SEQ, holdout)
    last = len(SIZES) - 1
    seen = set()
    for _ in range(200):  # several epochs of this small data
        x, y = loader.next_batch(4 * SEQ, SEQ, 1)
        seen.update(int(t) for t in torch.cat([x.flatten(), y.flatten()]))
    loader.close()
    held_out = {10000 * last + p for p in range(SIZES[last] - holdout, SIZES[last])}
    assert not seen & held_out
    last_seen = max(t for t in seen if t // 10000 == last) % 10000
    assert last_seen >= SIZES[last] - holdout - SEQ  # training still reaches up to the slice
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "PREQUANT_TTT_ENABLED": "1", "PREQUANT_TTT_TOKENS": "149"})
    assert tg.train_holdout_tokens(hp, shard_files) == holdout  # the slice prequant_ttt_tokens() takes
    tokens, source = tg.prequant_ttt_tokens(hp, shard_files, torch.zeros(2))
    assert source == "train" and set(tokens.tolist()) == held_out
