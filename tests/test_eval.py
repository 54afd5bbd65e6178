"""Evaluation scores every validation target exactly once and counts its bytes exactly."""

import math
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import TINY_ENV
from test_train import run_tiny
from ledger_probe import RecordingLedger


def cpu_ctx(rank: int = 0, world_size: int = 1) -> tg.EvalContext:
    return tg.EvalContext(tg.Runtime(rank, world_size, 0, torch.device("cpu"), False))


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_windows_score_every_target_once_with_the_longest_context(world_size):
    """Over many (length, seq_len, stride, world size): every target 1..T is scored exactly once, by a
    window that ends at its last scored target and is as long as the stream allows."""
    rng = random.Random(world_size)
    cases = [(1, 7, 3), (7, 7, 3), (8, 7, 3), (64, 64, 64), (65, 64, 64), (2048 * 3 + 5, 2048, 64)]
    cases += [(rng.randint(1, 3000), rng.choice([1, 5, 64, 256]), rng.choice([1, 3, 16, 64, 300])) for _ in range(60)]
    for num_targets, seq_len, stride in cases:
        spans = tg.plan_windows(num_targets, seq_len, stride)
        scored, context = [], {}
        for rank in range(world_size):
            for batch in tg.plan_window_batches(tg.rank_share(spans, rank, world_size), seq_len, 4):
                assert len(batch) <= 4 and len({min(b, seq_len) for _, b in batch}) == 1  # one shape per batch
                for a, b in batch:
                    start = max(0, b - seq_len)
                    assert 0 <= start <= a < b <= num_targets
                    assert b - a <= max(min(stride, seq_len), min(seq_len, num_targets))
                    for t in range(a + 1, b + 1):
                        scored.append(t)
                        context[t] = t - start  # tokens start..t-1 are visible to target t
        assert sorted(scored) == list(range(1, num_targets + 1))
        # Longest causal context the window allows: all of it up to seq_len in the first window,
        # then at least seq_len - stride + 1 tokens (tail window included).
        for t, c in context.items():
            assert c == t if t <= seq_len else c >= seq_len - min(stride, seq_len) + 1


def test_stride_equal_to_seq_len_is_the_flat_evaluation_with_a_right_aligned_tail():
    assert tg.plan_windows(10, 4, 4) == [(0, 4), (4, 8), (8, 10)]  # last window reads tokens 6..9
    assert tg.plan_windows(10, 4, 0 or 4) == tg.plan_windows(10, 4, 99)
    assert tg.plan_windows(3, 4, 2) == [(0, 3)]
    assert tg.plan_windows(9, 4, 2) == [(0, 4), (4, 6), (6, 8), (8, 9)]


def uniform_logits(vocab):
    return lambda x: torch.zeros(*x.shape, vocab)


@pytest.mark.parametrize("n_tokens, seq_len, batch_seqs", [(1000, 128, 3), (1025, 128, 4), (2, 128, 1), (700, 700, 2)])
def test_evaluate_counts_every_target_and_its_bytes(sample_dataset, n_tokens, seq_len, batch_seqs):
    sp = spm.SentencePieceProcessor(model_file=sample_dataset["tokenizer_path"])
    luts = tg.build_byte_luts(sp, 1024)
    val = tg.load_validation_tokens(sample_dataset["dataset_dir"])[:n_tokens]
    seen = []

    def logits_fn(x):
        seen.append(x.shape)
        return torch.zeros(*x.shape, 1024)

    res = tg.evaluate(logits_fn, val, luts, cpu_ctx(), seq_len=seq_len, batch_seqs=batch_seqs)
    assert res.num_targets == n_tokens - 1
    assert res.num_bytes == int(tg.target_bytes(val[:-1], val[1:], luts).sum())
    assert res.val_loss == pytest.approx(math.log(1024), rel=1e-6)  # uniform logits: ln V per target (fp32 CE)
    assert res.val_bpb == pytest.approx(res.val_loss * res.num_targets / (math.log(2) * res.num_bytes))
    assert all(b <= batch_seqs for b, _ in seen)


@pytest.mark.parametrize("stride", [0, 5, 16, 48])
def test_sliding_evaluation_scores_each_target_once_with_its_window_context(sample_dataset, stride):
    """Per-target NLLs from the ledger equal a direct computation with each target's own context,
    for every rank split; a context-dependent scorer proves the windows really differ."""
    sp = spm.SentencePieceProcessor(model_file=sample_dataset["tokenizer_path"])
    luts = tg.build_byte_luts(sp, 1024)
    val = tg.load_validation_tokens(sample_dataset["dataset_dir"])[:301]
    torch.manual_seed(0)
    table = torch.randn(1024, 1024)

    shapes = set()

    def fn(x):  # logits of position j depend on token j and on how many tokens precede it in the row
        shapes.add(tuple(x.shape))
        return table[x] + 0.05 * torch.arange(x.size(1)).float()[None, :, None] * table[0][None, None, :]

    seq_len = 64
    for world_size in (1, 2, 3):
        per_target = np.full(301, np.nan)
        shapes.clear()
        for rank in range(world_size):
            ledger = RecordingLedger(val, luts, torch.device("cpu"))
            spans = tg.plan_windows(300, seq_len, stride or seq_len)
            tg.score_windows(fn, ledger, spans, cpu_ctx(rank, world_size), seq_len=seq_len, batch_seqs=3)
            mine = ~np.isnan(ledger.per_target)
            assert not (mine & ~np.isnan(per_target)).any()
            per_target[mine] = ledger.per_target[mine]
        assert not np.isnan(per_target[1:]).any()
        assert shapes == {(3, seq_len)}  # short batches are padded: a compiled forward sees one shape
        for t in (1, 2, 63, 64, 65, 100, 299, 300):
            a, b = next(s for s in spans if s[0] < t <= s[1])
            start = max(0, b - seq_len)
            logits = fn(val[None, start:b])[0, t - 1 - start]
            expect = float(torch.nn.functional.cross_entropy(logits[None], val[t : t + 1]))
            assert per_target[t] == pytest.approx(expect, rel=1e-5)


def test_ledger_refuses_a_second_commit_and_reports_gaps(sample_dataset):
    sp = spm.SentencePieceProcessor(model_file=sample_dataset["tokenizer_path"])
    luts = tg.build_byte_luts(sp, 1024)
    val = tg.load_validation_tokens(sample_dataset["dataset_dir"])[:101]
    ledger = tg.ScoreLedger(val, luts, torch.device("cpu"))
    tg.score_windows(uniform_logits(1024), ledger, [(0, 50)], cpu_ctx(), seq_len=64, batch_seqs=4)
    with pytest.raises(tg.RunError, match="scored twice"):
        tg.score_windows(uniform_logits(1024), ledger, [(40, 60)], cpu_ctx(), seq_len=64, batch_seqs=4)
    with pytest.raises(tg.RunError, match="unscored"):
        tg.check_scored_once(ledger)
    with pytest.raises(tg.RunError, match="full vocabulary"):  # C2: logits must cover the whole vocabulary
        tg.score_windows(uniform_logits(1000), tg.ScoreLedger(val, luts, torch.device("cpu")), [(0, 50)],
                         cpu_ctx(), seq_len=64, batch_seqs=4)


def test_evaluate_rank_shares_add_up_to_the_whole(sample_dataset):
    sp = spm.SentencePieceProcessor(model_file=sample_dataset["tokenizer_path"])
    luts = tg.build_byte_luts(sp, 1024)
    val = tg.load_validation_tokens(sample_dataset["dataset_dir"])[:3001]
    torch.manual_seed(0)
    table = torch.randn(1024, 1024)
    fn = lambda x: table[x]  # noqa: E731  (logits depend on the input token)
    whole = tg.evaluate(fn, val, luts, cpu_ctx(), seq_len=64, batch_seqs=5)
    parts = []
    for r in range(3):  # three ranks simulated in one process: each ledger holds one rank's share
        ledger = tg.ScoreLedger(val, luts, torch.device("cpu"))
        tg.score_windows(fn, ledger, tg.plan_windows(3000, 64, 64), cpu_ctx(r, 3), seq_len=64, batch_seqs=5)
        parts.append(ledger.result())
    assert sum(p.num_targets for p in parts) == whole.num_targets == 3000
    assert sum(p.num_bytes for p in parts) == whole.num_bytes
    loss_sum = sum(p.val_loss * p.num_targets for p in parts)
    assert loss_sum == pytest.approx(whole.val_loss * whole.num_targets, rel=1e-9)


def stream_of(sp, docs):
    ids = []
    for d in docs:
        ids += [tg.BOS_ID] + sp.encode(d)
    return torch.tensor(ids)


def test_byte_tables_match_the_text_with_byte_fallback_and_leading_spaces(sample_dataset):
    sp = spm.SentencePieceProcessor(model_file=sample_dataset["tokenizer_path"])
    luts = tg.build_byte_luts(sp, 1024)
    docs = ["Hello world, this is a test.", "Ünïcödé 漢字 and emoji 🙂🚀 mixed in", "x", "  leading spaces are stripped?",
            "tabs\tand  double  spaces", "Ω≈ç√∫˜µ≤≥÷ — “quotes”"]
    stream = stream_of(sp, docs)
    assert any(sp.is_byte(int(t)) for t in stream), "the test text must exercise byte-fallback tokens"
    assert any(luts.has_leading_space[int(t)] for t in stream)
    counted = int(tg.target_bytes(stream[:-1], stream[1:], luts).sum())
    decoded = sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)
    assert counted == decoded
    # The normalizer leaves this plain-ASCII text unchanged, so it is also the raw byte count.
    plain = ["Hello world, this is a test.", "x", "two words"]
    s = stream_of(sp, plain)
    assert int(tg.target_bytes(s[:-1], s[1:], luts).sum()) == sum(len(d.encode()) for d in plain)
    # A byte-fallback piece counts 1 byte; a leading space counts 1 except right after BOS.
    byte_id = next(t for t in range(1024) if sp.is_byte(t))
    assert luts.base_bytes[byte_id] == 1 and not luts.has_leading_space[byte_id]
    word = sp.piece_to_id("\u2581the")
    if word != sp.unk_id():
        pair = torch.tensor([tg.BOS_ID, word, word])
        assert tg.target_bytes(pair[:-1], pair[1:], luts).tolist() == [3, 4]


def test_startup_byte_check_passes_on_the_sample_and_fails_on_a_wrong_table(sample_dataset):
    sp = spm.SentencePieceProcessor(model_file=sample_dataset["tokenizer_path"])
    luts = tg.build_byte_luts(sp, 1024)
    val = tg.load_validation_tokens(sample_dataset["dataset_dir"])
    total = tg.check_validation_bytes(sp, val, luts)
    assert total == int(tg.target_bytes(val[:-1], val[1:], luts).sum())
    # Independent ground truth: the normalized text of every validation document, in UTF-8.
    bos = (val == tg.BOS_ID).nonzero().flatten().tolist() + [val.numel()]
    texts = [sp.decode(val[a + 1 : b].tolist()) for a, b in zip(bos, bos[1:])]
    assert total == sum(len(t.encode("utf-8")) for t in texts)
    # Doubling the leading-space byte (a known bug in public PRs) must be caught.
    bad = tg.ByteLuts(luts.base_bytes + luts.has_leading_space.to(torch.int16), luts.has_leading_space,
                      luts.is_boundary)
    with pytest.raises(tg.RunError, match="byte tables count"):
        tg.check_validation_bytes(sp, val, bad)


def test_validation_must_start_with_bos(tmp_path):
    from data.shards import write_shard

    write_shard(tmp_path / "fineweb_val_000000.bin", [5, 6, 7])
    with pytest.raises(tg.RunError, match="must start with BOS"):
        tg.load_validation_tokens(str(tmp_path))


@pytest.fixture(scope="module")
def sample_sp4096(tmp_path_factory) -> dict:
    """The same 1500 documents as `sample_dataset`, under a 4096-piece tokenizer."""
    from data.prepare_sample import prepare_sample

    root = tmp_path_factory.mktemp("sp4096")
    return prepare_sample(vocab_size=4096, datasets_root=root / "d", tokenizers_root=root / "t", max_docs=1500)


def test_validation_bytes_do_not_depend_on_the_tokenizer(sample_dataset, sample_sp4096):
    """The same validation documents under a 1024- and a 4096-piece tokenizer count the same bytes:
    bits per byte is tokenizer-agnostic only if this holds."""
    other = sample_sp4096
    totals = []
    for ds in (sample_dataset, other):
        sp = spm.SentencePieceProcessor(model_file=ds["tokenizer_path"])
        val = tg.load_validation_tokens(ds["dataset_dir"])
        totals.append((val.numel(), tg.check_validation_bytes(sp, val, tg.build_byte_luts(sp, sp.vocab_size()))))
    assert totals[0][0] != totals[1][0]  # different tokenizations...
    assert totals[0][1] == totals[1][1]  # ...of exactly the same bytes


def test_startup_byte_check_reduces_on_the_run_device(sample_dataset, monkeypatch):
    """NCCL reduces only CUDA tensors: the byte check must build its tensor on the run's device."""
    sp = spm.SentencePieceProcessor(model_file=sample_dataset["tokenizer_path"])
    val = tg.load_validation_tokens(sample_dataset["dataset_dir"])
    seen = []

    def fake_reduce(t):
        seen.append(t.device)
        return torch.zeros(2, dtype=torch.float64)

    monkeypatch.setattr(tg, "all_reduce_sum", fake_reduce)
    tg.check_validation_bytes(sp, val[:1], tg.build_byte_luts(sp, 1024), device=torch.device("meta"))
    assert seen == [torch.device("meta")]


@pytest.mark.slow
def test_a_tokenizer_that_is_not_the_shards_one_stops_the_run_with_one_line(sample_dataset, sample_sp4096, tmp_path):
    """The SP4096 tokenizer with the SP1024 shards: ids < 1024 decode to the same text under both, so the byte
    check alone passes and the run would train on garbage. The data manifest's sha256 catches it."""
    wrong = spm.SentencePieceProcessor(model_file=sample_sp4096["tokenizer_path"])
    val = tg.load_validation_tokens(sample_dataset["dataset_dir"])
    tg.check_validation_bytes(wrong, val, tg.build_byte_luts(wrong, 4096))  # passes: why the hash check exists
    env = dict(DATA_PATH=sample_dataset["dataset_dir"], TOKENIZER_PATH=sample_sp4096["tokenizer_path"],
               VOCAB_SIZE="4096", ARTIFACT_DIR=str(tmp_path), RUN_ID="wrong_tokenizer")
    with pytest.raises(tg.RunError) as err:
        run_tiny({**TINY_ENV, **env})
    message = str(err.value)
    assert "\n" not in message
    assert sample_sp4096["tokenizer_path"] in message and sample_dataset["dataset_dir"] in message
    assert "sample_1024_bpe.model" in message and "point TOKENIZER_PATH at that tokenizer" in message
    # the right tokenizer is verified, and without a manifest the log says the check did not happen
    assert tg.check_tokenizer_belongs_to_shards(sample_dataset["tokenizer_path"], sample_dataset["dataset_dir"]).startswith("ok")
    assert tg.check_tokenizer_belongs_to_shards(sample_dataset["tokenizer_path"], str(tmp_path)).startswith("not_verified")
