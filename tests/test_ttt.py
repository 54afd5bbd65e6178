"""Score-first test-time training: legal by construction (ledger, flip test), rank-independent,
and it helps on text unlike the training text."""

import re
import socket

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import small_model
from ledger_probe import RecordingLedger

CPU = torch.device("cpu")


# A random 2-layer model (conftest.small_model: every weight non-zero, so attention really mixes positions).
TTT_MODEL = tg.ModelConfig(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                           tie_embeddings=True, rope_base=10000.0, logit_softcap=30.0, qk_gain_init=1.5,
                           tied_embed_init_std=0.02, train_seq_len=32, xsa_last_n=1, smear_gate_enabled=True)


def ttt_model() -> tg.GPT:
    return small_model(TTT_MODEL, noise=0.05)


SETTINGS = tg.TTTSettings(seq_len=32, eval_stride=8, ttt_chunk_tokens=96, ttt_epochs=2, ttt_lr=0.05, ttt_momentum=0.9, ttt_batch_seqs=3,
                          ttt_grad_clip=1.0, score_batch_seqs=4)


def ctx(rank: int = 0, world_size: int = 1, **kwargs) -> tg.EvalContext:
    """The evaluation context of rank `rank` of `world_size` CPU processes (no autocast, no loop)."""
    return tg.EvalContext(tg.Runtime(rank, world_size, 0, CPU, world_size > 1), **kwargs)


def luts_and_val(sample_dataset, n: int):
    sp = spm.SentencePieceProcessor(model_file=sample_dataset["tokenizer_path"])
    return tg.build_byte_luts(sp, 1024), tg.load_validation_tokens(sample_dataset["dataset_dir"])[:n]


# 5 documents in the first 701 tokens; 3 rounds of 2 documents; phases after 2 and 4 documents.
DOC_SETTINGS = {mode: tg.dataclasses.replace(SETTINGS, ttt_mode=mode, ttt_chunk_size=32, ttt_batch_size=2, phased_ttt_prefix_docs=4,
                                             phased_ttt_num_phases=2, global_ttt_lr=0.05, ttt_lora_lr=0.05) for mode in ("lora", "phased")}
# The R0427 adapter recipe: A kept warm across rounds, alpha/rank scaling, AdamW (beta1 0, decay).
DOC_SETTINGS["lora_warm"] = tg.dataclasses.replace(DOC_SETTINGS["lora"], ttt_warm_start_a=True, ttt_lora_alpha=16.0,
                                                   ttt_beta1=0.0, ttt_beta2=0.99, ttt_weight_decay=0.5)
MODES = {"chunked": SETTINGS, **DOC_SETTINGS}


def run_chunked(val, luts, rank=0, world_size=1, settings=SETTINGS, budget=None):
    model = ttt_model()
    model.eval()
    ledger = RecordingLedger(val, luts, CPU)
    info = tg.run_ttt(model, ledger, settings, ctx(rank, world_size, budget=budget))
    return ledger, info, model


def test_ledger_refuses_adaptation_on_uncommitted_targets(sample_dataset):
    luts, val = luts_and_val(sample_dataset, 201)
    ledger = tg.ScoreLedger(val, luts, CPU)
    tg.score_windows(lambda x: torch.zeros(*x.shape, 1024), ledger, [(0, 50)], ctx(), seq_len=64, batch_seqs=2)
    assert ledger.adaptation_tokens(0, 50).tolist() == val[:51].tolist()  # committed here
    with pytest.raises(tg.ScoreOrderError, match="target 51 before its score is committed"):
        ledger.adaptation_tokens(40, 51)
    with pytest.raises(tg.ScoreOrderError, match="outside"):
        ledger.adaptation_tokens(150, 201)
    # Another rank's commits count only once shared (here: simulated by that rank's bitmap).
    other = tg.ScoreLedger(val, luts, CPU)
    with pytest.raises(tg.ScoreOrderError, match="target 1 before"):
        other.adaptation_tokens(0, 10)
    other.shared[1:51] = ledger.scored[1:51]
    assert other.adaptation_tokens(0, 10).tolist() == val[:11].tolist()
    with pytest.raises(tg.ScoreOrderError, match="target 51 before"):
        other.adaptation_tokens(45, 60)


def test_chunked_ttt_scores_every_target_once_and_never_trains_the_last_chunk(sample_dataset, monkeypatch):
    luts, val = luts_and_val(sample_dataset, 701)
    handed_out = []
    real = tg.ScoreLedger.adaptation_tokens

    def spy(self, lo, hi):
        assert self.scored[lo + 1 : hi + 1].any() or self.shared[lo + 1 : hi + 1].all()
        handed_out.append((lo, hi))
        return real(self, lo, hi)

    monkeypatch.setattr(tg.ScoreLedger, "adaptation_tokens", spy)
    ledger, info, _ = run_chunked(val, luts)
    tg.check_scored_once(ledger)
    assert info.chunks == 8 and info.trained_chunks == 7  # 700 targets in chunks of 96
    assert max(hi for _, hi in handed_out) <= 7 * 96 < 700  # the last chunk's targets never train
    # The score equals what the ledger summed: the first pass, per target.
    res = ledger.result()
    assert res.val_loss == pytest.approx(np.nansum(ledger.per_target) / 700, rel=1e-9)


def test_flip_test_through_chunked_ttt_a_later_token_never_changes_an_earlier_score(sample_dataset):
    luts, val = luts_and_val(sample_dataset, 701)
    before, _, _ = run_chunked(val, luts)
    for p in (150, 400):  # inside chunk 2 and chunk 5: adaptation happened before and after p
        flipped = val.clone()
        flipped[p] = (int(val[p]) + 7) % 1024
        after, _, _ = run_chunked(flipped, luts)
        assert np.array_equal(before.per_target[1:p], after.per_target[1:p])  # bit-identical
        assert not np.array_equal(before.per_target[p:], after.per_target[p:])


@pytest.mark.parametrize("mode", ["lora", "phased", "lora_warm"])
def test_flip_test_through_document_ttt(sample_dataset, mode):
    """Changing token p changes no score committed before p's own score; with per-document LoRA it
    changes nothing outside p's document either (adapters never cross documents). With warm A, an
    adapter's A crosses to the next round's document at the same position: still only after p's score."""
    luts, val = luts_and_val(sample_dataset, 701)
    before, info, _ = run_chunked(val, luts, settings=DOC_SETTINGS[mode])
    tg.check_scored_once(before)
    assert info.steps > 0 and (mode != "phased") == (info.global_steps == 0)
    p = 470  # in document (413, 526], scored in the last round, after both global phases
    flipped = val.clone()
    flipped[p] = (int(val[p]) + 7) % 1024
    after, _, _ = run_chunked(flipped, luts, settings=DOC_SETTINGS[mode])
    earlier = before.commit_order < before.commit_order[p]
    earlier[0] = False
    assert earlier.sum() > 300
    assert np.array_equal(before.per_target[earlier], after.per_target[earlier])
    assert not np.array_equal(before.per_target[p:527], after.per_target[p:527])
    if mode == "lora":
        outside = np.ones(701, dtype=bool)
        outside[414:527] = False
        outside[0] = False
        assert np.array_equal(before.per_target[outside], after.per_target[outside])


@pytest.mark.parametrize("warm", [False, True])
def test_warm_start_a_carries_only_along_its_round_position(sample_dataset, warm):
    """TTT_WARM_START_A=1: the A a document trained is where the next round's document at the same
    position starts; without it, documents of later rounds never see an earlier one."""
    luts, val = luts_and_val(sample_dataset, 701)
    settings = DOC_SETTINGS["lora_warm"] if warm else DOC_SETTINGS["lora"]
    queue = sorted(tg.document_spans(val), key=lambda d: (-(d[1] - d[0]), d[0]))
    (first, other), (same_position, other_position) = queue[0:2], queue[2:4]
    assert first[1] - first[0] > settings.ttt_chunk_size  # its first chunk trains
    before, _, _ = run_chunked(val, luts, settings=settings)
    flipped = val.clone()
    p = first[0] + 5
    flipped[p] = (int(val[p]) + 7) % 1024
    after, _, _ = run_chunked(flipped, luts, settings=settings)

    def changed(span):
        a, b = span
        return not np.array_equal(before.per_target[a + 1 : b + 1], after.per_target[a + 1 : b + 1])

    assert changed(first) and not changed(other) and not changed(other_position)
    assert changed(same_position) == warm


def test_lora_adapters_one_per_virtual_slot_and_the_plain_model_at_start():
    """A looped block gets one adapter per pass (R0427), the head one more; with B = 0 the adapted
    logits equal the model's exactly; the switches drop k, o and the MLP adapters."""
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=64, num_layers=3, model_dim=16, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                         tie_embeddings=True, rope_base=10000.0, logit_softcap=30.0, qk_gain_init=1.5,
                         tied_embed_init_std=0.02, train_seq_len=16, num_loops=1, loop_start=1, loop_end=1)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    s = tg.dataclasses.replace(DOC_SETTINGS["lora"], ttt_lora_rank=4)
    x = torch.randint(0, 64, (2, 16))
    for looping, slots in ((True, [1, 2, 1]), (False, [1, 1, 1])):
        lora = tg.DocLoRA(model, 2, s, CPU, looping)
        assert lora.slots == [n for n in slots for _ in range(5)]  # q, v, k, o, mlp per block
        assert len(lora.a) == 5 * sum(slots) + 1 and lora.b[-1].shape == (2, 64, 4)  # + the head
        assert torch.equal(tg.lora_logits(lora, model, x, None, looping), model.forward_logits(x, looping))
        with torch.no_grad():
            for b in lora.b:
                b.normal_()
        adapted = tg.lora_logits(lora, model, x, None, looping)
        assert not torch.allclose(adapted, model.forward_logits(x, looping))
    # The second pass of the looped block has its own adapter: only that pass sees it.
    lora = tg.DocLoRA(model, 2, s, CPU, True)
    with torch.no_grad():
        lora.b[lora.first_slot[5] + 1].normal_()  # block 1's q adapter, second pass
    assert not torch.equal(tg.lora_logits(lora, model, x, None, True), model.forward_logits(x, True))
    assert torch.equal(tg.lora_logits(lora, model, x, None, False), model.forward_logits(x, False))  # one pass: never used
    few = tg.dataclasses.replace(s, ttt_k_lora=False, ttt_o_lora=False, ttt_mlp_lora=False)
    assert tg.lora_targets(model, few) == [f"blocks.{i}.attn.c_{w}" for i in range(3) for w in "qv"]
    assert len(tg.DocLoRA(model, 2, few, CPU, False).a) == 3 * 2 + 1
    assert tg.DocLoRA(model, 1, s, CPU, False).scale == 1.0  # alpha 0 = the rank
    # The eval plan counts the adapters' FLOPs: 2 * rank * (in + out) per adapter and token.
    for settings, looping in ((s, True), (s, False), (few, True)):
        lora = tg.DocLoRA(model, 1, settings, CPU, looping)
        counted = sum(2 * 4 * (a.shape[-1] + b.shape[1]) for a, b in zip(lora.a, lora.b))
        assert counted == tg.lora_flops_per_token(cfg, 4, looping, k=settings.ttt_k_lora, o=settings.ttt_o_lora,
                                                  mlp=settings.ttt_mlp_lora)
    assert tg.DocLoRA(model, 1, tg.dataclasses.replace(s, ttt_lora_alpha=8.0), CPU, False).scale == 2.0


def test_document_chunks_longer_than_the_window_are_cut_to_it(sample_dataset):
    """A chunk must fit in its window (EVAL_SEQ_LEN): a longer TTT_CHUNK_SIZE acts as EVAL_SEQ_LEN."""
    luts, val = luts_and_val(sample_dataset, 527)
    fitted, _, _ = run_chunked(val, luts, settings=DOC_SETTINGS["lora"])  # chunk 32 = seq_len
    longer, _, _ = run_chunked(val, luts, settings=tg.dataclasses.replace(DOC_SETTINGS["lora"], ttt_chunk_size=100))
    tg.check_scored_once(longer)
    assert np.array_equal(fitted.per_target, longer.per_target, equal_nan=True)
    with pytest.raises(tg.RunError, match="cannot score targets"):
        fitted.document_rows([(10, 50)], [15], rows=[0], num_rows=1, width=64, chunk=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_worker(rank, world_size, port, dataset, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        luts, val = luts_and_val(dataset, 701)
        out = {}
        for mode, settings in MODES.items():  # TTT_BATCH_SIZE counts documents per rank: the same rounds
            settings = tg.dataclasses.replace(settings, ttt_batch_size=settings.ttt_batch_size // world_size)
            ledger, info, model = run_chunked(val, luts, rank, world_size, settings=settings)
            tg.check_scored_once(ledger)
            out[mode] = dict(res=ledger.result(), state=model.state_dict(), info=info)
        if rank == 0:
            torch.save(out, out_path)
        dist.barrier()  # no rank tears down its gloo connections while the other still uses them (SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_in_every_ttt_mode(sample_dataset, tmp_path):
    out = tmp_path / "rank0.pt"
    mp.start_processes(gloo_worker, args=(2, free_port(), sample_dataset, str(out)), nprocs=2, start_method="spawn")
    two = torch.load(out, weights_only=False)
    luts, val = luts_and_val(sample_dataset, 701)
    for mode, settings in MODES.items():
        ledger, info, model = run_chunked(val, luts, settings=settings)
        single, got = ledger.result(), two[mode]
        assert got["res"].num_targets == single.num_targets == 700 and got["res"].num_bytes == single.num_bytes
        assert got["res"].val_loss == pytest.approx(single.val_loss, rel=1e-5), mode
        assert got["info"].steps <= info.steps if mode != "chunked" else got["info"].steps == info.steps
        for name, t in model.state_dict().items():  # the same base updates: ranks averaged their gradients
            assert torch.allclose(got["state"][name], t, atol=1e-5), (mode, name)


def test_budget_stops_adaptation_and_scores_the_rest_plainly(sample_dataset):
    luts, val = luts_and_val(sample_dataset, 701)
    model = ttt_model()
    model.eval()
    device = SimulatedDevice(model)  # the budget's clock: deterministic, whatever the machine's load
    budget = tg.EvalBudget(lambda: device.ms, cap_ms=4.0)
    ledger = tg.ScoreLedger(val, luts, CPU)
    info = tg.run_ttt(model, ledger, SETTINGS, ctx(budget=budget))
    tg.check_scored_once(ledger)
    assert 0 < info.trained_chunks < 7 and info.stopped_at == f"chunk {info.trained_chunks + 1}/8"
    assert device.ms <= 4.0
    # No budget: adaptation decisions are never taken away.
    assert tg.EvalBudget(lambda: 1e12, None).allows(1e12, 1e12, "x")
    plain = tg.EvalBudget(lambda: 100.0, 1000.0)
    assert plain.allows(400.0, 500.0, "a") and not plain.allows(400.0, 501.0, "b") and plain.stopped_at == "b"
    assert not plain.allows(0.0, 0.0, "c")  # once stopped, stopped for good


class SimulatedDevice:
    """A fake clock that advances only while the model computes: rows x width microseconds per forward
    and twice that per backward, so step costs are exact and a budget test is deterministic."""

    def __init__(self, model):
        self.ms = 0.0
        model.blocks[0].register_forward_pre_hook(lambda module, args: self.tick(args[0], 1.0))
        model.blocks[-1].register_full_backward_pre_hook(lambda module, grads: self.tick(grads[0], 2.0))

    def tick(self, x, cost):
        self.ms += cost * x.shape[0] * x.shape[1] / 1000


class RecordingBudget(tg.EvalBudget):
    """Notes each decision's elapsed + next step + plain rest, the sum the cap is held against."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace = []

    def allows(self, next_adapt_ms, remaining_plain_ms, where):
        if self.stopped_at is None:
            self.trace.append((where, self.elapsed_ms() + next_adapt_ms + remaining_plain_ms))
        return super().allows(next_adapt_ms, remaining_plain_ms, where)


@pytest.mark.parametrize("mode,inside", [("lora", "round 2/3 step "), ("phased", "global phase 2/2 step ")])
def test_document_ttt_budget_stops_inside_a_round_or_phase_and_finishes_within_the_cap(sample_dataset, mode, inside):
    """MAX_EVAL_SECONDS in lora and phased TTT, on a simulated device: the pass measures its step costs,
    stops adapting at the first chunk step (or global SGD step) whose cost plus scoring the rest plainly
    would pass the cap, and ends inside the cap with every target scored once."""
    luts, val = luts_and_val(sample_dataset, 701)
    settings = DOC_SETTINGS[mode]

    def run(cap_ms):
        model = ttt_model()
        model.eval()
        device = SimulatedDevice(model)
        budget = RecordingBudget(lambda: device.ms, cap_ms)
        ledger = tg.ScoreLedger(val, luts, CPU)
        info = tg.run_ttt(model, ledger, settings, ctx(budget=budget))
        tg.check_scored_once(ledger)
        return device.ms, info, budget.trace

    full_ms, info, trace = run(1e9)
    assert info.stopped_at is None and full_ms < 1e9
    assert any(w.startswith("round 1/3 step 2/") for w, _ in trace)  # decided per chunk step
    assert mode == "lora" or any(w.startswith("global phase 1/2 step 2") for w, _ in trace)  # and per SGD step
    # A cap the first decision at `inside` (with a step before it in its round/phase) cannot meet, all earlier can.
    k = next(k for k, (w, total) in enumerate(trace) if w.startswith(inside) and not w.endswith(" step 1")
             and not w.endswith("/1") and total > max(t for _, t in trace[:k]))
    cap = (max(t for _, t in trace[:k]) + trace[k][1]) / 2
    used_ms, capped, _ = run(cap)
    assert capped.stopped_at == trace[k][0], (capped.stopped_at, trace[k])
    assert used_ms <= cap < full_ms and 0 < capped.steps < info.steps


def test_a_pass_that_adapts_on_nothing_says_so_at_its_start(sample_dataset):
    luts, val = luts_and_val(sample_dataset, 701)
    queue = tg.document_spans(val)
    one_chunk = tg.dataclasses.replace(DOC_SETTINGS["lora"], seq_len=256, ttt_chunk_size=256)
    for settings, tokens, expected in (
            (SETTINGS, val[:90], "the 89 validation targets fit in one TTT_CHUNK_TOKENS=96 chunk, which is scored "
                                 "last and never trains (lower TTT_CHUNK_TOKENS)"),
            (one_chunk, val[:200], "every one of the 2 documents fits in one TTT_CHUNK_SIZE=256 chunk, which never "
                                   "trains (lower TTT_CHUNK_SIZE)")):
        lines = []
        tg.run_ttt(ttt_model(), tg.ScoreLedger(tokens, luts, CPU), settings, ctx(log=lines.append))
        assert lines[0].startswith("ttt:start ")  # then, before anything is scored, the warning
        assert lines[1] == f"ttt:warning this pass adapts on nothing: {expected}; its score is the plain score"
        assert not any("warning" in line for line in lines[2:])
    assert tg.nothing_to_adapt(SETTINGS, 700) is None and tg.nothing_to_adapt(DOC_SETTINGS["lora"], 700, queue, 2) is None
    assert "TTT_EPOCHS=0" in tg.nothing_to_adapt(tg.dataclasses.replace(SETTINGS, ttt_epochs=0), 700)
    big = tg.dataclasses.replace(DOC_SETTINGS["phased"], ttt_chunk_size=1024, seq_len=1024)  # every document one chunk
    assert "no global phase ends before the last round" in tg.nothing_to_adapt(big, 700, queue, 6)
    assert tg.nothing_to_adapt(big, 700, queue, 2) is None  # the first phase (2 documents) runs before round 3
    assert tg.nothing_to_adapt(tg.dataclasses.replace(big, global_ttt_epochs=0), 700, queue, 2) is not None


@pytest.mark.slow
def test_document_ttt_compiles_few_graphs_once_and_scores_as_eager(sample_dataset):
    """The per-document step under torch.compile (dynamo, counted): documents of many lengths compile
    at most len(window_widths) graphs (autograd always on), all in the warm-up; the pass itself (a new DocLoRA, as in a
    second evaluation) compiles nothing new, and its score equals eager's."""
    from torch._dynamo.testing import CompileCounter

    luts, _ = luts_and_val(sample_dataset, 2)
    g = torch.Generator().manual_seed(0)
    lengths = [2, 9, 20, 40, 70]  # 1 to 9 chunks of 8: every window width, a short last round
    tokens = torch.cat([torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(2, 1024, (n,), generator=g)])
                        for n in lengths] + [torch.tensor([tg.BOS_ID])])
    settings = tg.dataclasses.replace(DOC_SETTINGS["phased"], ttt_chunk_size=8, ttt_batch_size=3, phased_ttt_prefix_docs=3)
    widths = tg.window_widths(8, 32)
    assert widths == [8, 16, 32]
    counter = CompileCounter()
    forward = torch.compile(tg.lora_logits, backend=counter, dynamic=False)

    def evaluate(model, lora_forward):
        ledger = RecordingLedger(tokens, luts, CPU)
        info = tg.run_ttt(model, ledger, settings, ctx(), lora_forward=lora_forward)
        tg.check_scored_once(ledger)
        assert info.steps > info.global_steps > 0
        return ledger

    model = ttt_model()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tg.warm_up_evaluation(model, model.forward_logits, luts, ctx(), seq_len=32, batch_seqs=2, ttt=settings,
                          lora_forward=forward)
    after_warmup = counter.frame_count
    assert after_warmup == len(widths)  # one per width
    compiled = evaluate(model, forward)
    assert counter.frame_count == after_warmup  # nothing new
    model.load_state_dict(state)
    eager = evaluate(model, None)
    assert np.allclose(compiled.per_target[1:], eager.per_target[1:], rtol=1e-4, atol=1e-5)


def test_chunked_ttt_scoring_compiles_one_graph(sample_dataset):
    """Chunked TTT scores through the compiled forward with every batch padded to TTT scoring's batch
    shape (the last one too): one graph over the whole pass, none for a second pass."""
    from torch._dynamo.testing import CompileCounter

    luts, val = luts_and_val(sample_dataset, 701)
    model = ttt_model()
    model.eval()
    counter = CompileCounter()
    logits_fn = torch.compile(model.forward_logits, backend=counter, dynamic=False)
    for _ in range(2):
        ledger = tg.ScoreLedger(val, luts, CPU)
        tg.run_ttt(model, ledger, SETTINGS, ctx(), logits_fn=logits_fn)
        tg.check_scored_once(ledger)
        assert counter.frame_count == 1


@pytest.mark.slow
def test_run_logs_sliding_ttt_and_the_compliance_block(tiny_env, tmp_path):
    cpu = tg.Runtime(rank=0, world_size=1, local_rank=0, device=CPU, distributed=False)
    env = {**tiny_env, "ITERATIONS": "10", "EVAL_STRIDE": "32", "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "2048",
           "TTT_EPOCHS": "1", "TTT_LR": "0.002"}
    out = tg.run(tg.Hyperparameters.from_env(env), cpu)
    flat, sliding, ttt = (out["evals"][k] for k in ("roundtrip", "sliding", "ttt"))
    assert flat.num_targets == sliding.num_targets == ttt.num_targets
    assert flat.num_bytes == sliding.num_bytes == ttt.num_bytes
    assert out["final"] == ttt
    log = (tmp_path / "test" / "train.log").read_text()
    num = r"\d+\.\d{8}"
    assert re.search(rf"^final_int8_zlib_roundtrip_exact val_loss:{num} val_bpb:{flat.val_bpb:.8f}$", log, re.M)
    assert re.search(rf"^quantized_sliding_window val_loss:{num} val_bpb:{sliding.val_bpb:.8f} eval_time:\d+ms "
                     r"stride:32 seq_len:128$", log, re.M)
    assert re.search(rf"^final_sliding_window_exact val_loss:{num} val_bpb:{sliding.val_bpb:.8f}$", log, re.M)
    assert re.search(r"^ttt:start mode:chunked chunks:7 ", log, re.M)
    assert re.search(rf"^quantized_ttt val_loss:{num} val_bpb:{ttt.val_bpb:.8f} eval_time:\d+ms$", log, re.M)
    assert re.search(rf"^legal_ttt_exact val_loss:{ttt.val_loss:.8f} val_bpb:{ttt.val_bpb:.8f}$", log, re.M)
    # Logged before evaluating: the FLOPs of every pass; after: the time of every phase.
    assert re.search(r"^eval_plan: ttt_chunked forward_tokens:\d+ train_tokens:\d+ flops:", log, re.M)
    assert re.search(r"^eval_plan_total: flops:\S+ .* 8xH100 at_peak:\S+s at_40%_mfu:\S+s \| budget:600s$", log, re.M)
    assert log.index("eval_plan_total") < log.index("final_int8_zlib_roundtrip ")
    assert re.search(r"^eval_warmup: source:synthetic .* causal_self_test:ok .* weights_restored:1", log, re.M)
    assert re.search(r"^eval_phases: load:\d+ms warmup:\d+ms roundtrip:\d+ms sliding:\d+ms ttt:\d+ms total:\d+ms "
                     r"budget:600000ms$", log, re.M)
    block = log.split("\ncompliance:\n")[1].split("\nfinal_score")[0]
    n = flat.num_targets
    assert "track: B (adaptive, score-first)" in block
    assert f"C4 each target scored once: ok: roundtrip:{n}, sliding:{n}, ttt:{n}" in block
    assert re.search(r"C3 score before update: ok: \d+ adaptation targets", block)
    assert "adaptation:validation (already scored)" in block and "record_eligible: 1" in block
    assert re.search(rf"^final_score stage:ttt val_loss:{num} val_bpb:{ttt.val_bpb:.8f} total_eval_time:", log, re.M)


def test_eval_warmup_restores_every_weight_and_catches_a_non_causal_model(sample_dataset):
    luts, _ = luts_and_val(sample_dataset, 2)
    model = ttt_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = tg.warm_up_evaluation(model, model.forward_logits, luts, ctx(), seq_len=32, batch_seqs=2, ttt=SETTINGS)
    assert info["causal_diff"] == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the TTT warm-up trained, and everything was put back

    def leaky(x, looping):  # position j also sees the row's last token
        logits = model.forward_logits(x, looping)
        return logits + logits[:, -1:].detach()

    with pytest.raises(tg.RunError, match="causality self-test failed"):
        tg.warm_up_evaluation(model, leaky, luts, ctx(), seq_len=32, batch_seqs=2)


@pytest.fixture(scope="module")
def trained_and_shifted(sample_dataset):
    """A small model trained on the sample's training text, and a validation stream unlike it: the
    validation documents upper-cased (other tokens, other statistics)."""
    sp = spm.SentencePieceProcessor(model_file=sample_dataset["tokenizer_path"])
    luts = tg.build_byte_luts(sp, 1024)
    train = tg.load_data_shard(tg.shard_files(sample_dataset["dataset_dir"], "train")[0])
    model = ttt_model()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, train.numel() - 65, (16,), generator=g)
        batch = torch.stack([train[s : s + 65] for s in starts.tolist()])
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    val = tg.load_validation_tokens(sample_dataset["dataset_dir"])
    bos = (val == tg.BOS_ID).nonzero().flatten().tolist() + [val.numel()]
    ids = []
    for a, b in zip(bos, bos[1:]):
        ids += [tg.BOS_ID] + sp.encode(sp.decode(val[a + 1 : b].tolist()).upper())
        if len(ids) > 1500:
            break
    return model.state_dict(), torch.tensor(ids[:1501]), luts


SHIFTED = {"chunked": tg.dataclasses.replace(SETTINGS, ttt_chunk_tokens=256, ttt_lr=0.03, ttt_epochs=2),
           "lora": tg.dataclasses.replace(DOC_SETTINGS["lora"], ttt_lora_lr=0.03, ttt_batch_size=4),
           "phased": tg.dataclasses.replace(DOC_SETTINGS["phased"], ttt_lora_lr=0.03, global_ttt_lr=0.03, ttt_batch_size=4)}
NO_ADAPTATION = {"chunked": dict(ttt_epochs=0), "lora": dict(ttt_lora_lr=0.0),
                 "phased": dict(ttt_lora_lr=0.0, global_ttt_lr=0.0)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["chunked", "lora", "phased"])
def test_each_ttt_variant_lowers_val_bpb_on_shifted_text(trained_and_shifted, mode):
    state, shifted, luts = trained_and_shifted

    def bpb(settings):
        model = ttt_model()
        model.load_state_dict(state)
        model.eval()
        ledger = tg.ScoreLedger(shifted, luts, CPU)
        tg.run_ttt(model, ledger, settings, ctx())
        tg.check_scored_once(ledger)
        return ledger.result().val_bpb

    adapted = bpb(SHIFTED[mode])
    plain = bpb(tg.dataclasses.replace(SHIFTED[mode], **NO_ADAPTATION[mode]))  # same passes, nothing learnt
    print(f"{mode}: plain {plain:.4f} adapted {adapted:.4f}")
    assert adapted < plain - 0.3, (mode, adapted, plain)


@pytest.mark.slow
def test_prequant_ttt_on_training_data_is_reserved_from_the_training_budget(tiny_env, tmp_path):
    cpu = tg.Runtime(rank=0, world_size=1, local_rank=0, device=CPU, distributed=False)
    env = {**tiny_env, "ITERATIONS": "3", "MAX_WALLCLOCK_SECONDS": "300", "PREQUANT_TTT_ENABLED": "1",
           "PREQUANT_TTT_TOKENS": "4096", "PREQUANT_TTT_EPOCHS": "2", "PREQUANT_TTT_LR": "0.001",
           "TTT_BATCH_SEQS": "16"}
    out = tg.run(tg.Hyperparameters.from_env(env), cpu)
    pq = out["prequant_ttt"]
    assert pq["source"] == "train" and pq["steps_done"] == pq["steps"] == 4  # 2 epochs x 32 pieces of 128 / 16
    # The measured cost is reserved: the training budget is the cap minus it (training stops by it).
    assert out["reserve_ms"] == pytest.approx(pq["reserve_ms"]) and pq["reserve_ms"] > 0
    assert pq["data_access_end_ms"] == pytest.approx(out["training_time_ms"] + pq["time_ms"])
    log = (tmp_path / "test" / "train.log").read_text()
    budget = float(re.search(r"^clock: train_budget:([\d.]+)ms reserve:(\d+)ms", log, re.M).group(1))
    assert budget == pytest.approx(300_000 - pq["reserve_ms"])
    assert re.search(r"^prequant_ttt:reserving \d+ms for 4 steps source:train tokens:4097 ", log, re.M)
    assert re.search(r"^prequant_ttt: steps:4 source:train time:\d+ms reserved:\d+ms train_data_access_end:\d+ms "
                     r"cap:300000ms within_cap:1$", log, re.M)
    assert "pre_quant_ttt:train (4097 tokens, inside the training budget" in log
    assert not re.search(r"^non_record:|non_record:C3_violated$", log, re.M)
    # The slice is training data: its tokens are the tail of the training shard, never validation.
    train = tg.load_data_shard(tg.shard_files(tiny_env["DATA_PATH"], "train")[-1])
    assert torch.equal(pq["tokens"], train[-4097:])


@pytest.mark.slow
def test_validation_adaptation_is_refused_without_the_opt_in_and_stamped_with_it(tiny_env, tmp_path):
    with pytest.raises(tg.ConfigError, match="ALLOW_VAL_ADAPTATION=1"):
        tg.Hyperparameters.from_env({**tiny_env, "PREQUANT_TTT_SOURCE": "val"})
    hp = tg.Hyperparameters.from_env(tiny_env)
    refused = tg.dataclasses.replace(hp, prequant_ttt_source="train")
    object.__setattr__(refused, "prequant_ttt_source", "val")  # past the config check: the runtime check holds
    with pytest.raises(tg.RunError, match="ALLOW_VAL_ADAPTATION=1"):
        tg.prequant_ttt_tokens(refused, [], torch.zeros(10, dtype=torch.int64))
    cpu = tg.Runtime(rank=0, world_size=1, local_rank=0, device=CPU, distributed=False)
    env = {**tiny_env, "ITERATIONS": "3", "PREQUANT_TTT_ENABLED": "1", "PREQUANT_TTT_SOURCE": "val",
           "ALLOW_VAL_ADAPTATION": "1", "PREQUANT_TTT_TOKENS": "1024", "PREQUANT_TTT_EPOCHS": "1"}
    out = tg.run(tg.Hyperparameters.from_env(env), cpu)
    assert out["non_record"] and out["prequant_ttt"]["source"] == "validation"
    log = (tmp_path / "test" / "train.log").read_text()
    assert re.search(r"^non_record: ALLOW_VAL_ADAPTATION=1 ", log, re.M)
    score_lines = [line for line in log.splitlines() if re.search(r"val_bpb:\d+\.\d{8}", line)]
    assert len(score_lines) >= 3 and all(line.endswith(" non_record:C3_violated") for line in score_lines)
    block = log.split("\ncompliance:\n")[1].split("\nfinal_score")[0]
    assert "track: non-record (ALLOW_VAL_ADAPTATION=1)" in block
    assert "C3 score before update: VIOLATED: pre-quantization TTT adapted the weights on 1025 validation" in block
    assert "pre_quant_ttt:validation (before scoring: NON-RECORD)" in block
    assert "record_eligible: 0 non_record:C3_violated" in block
