"""Schedules, the phase clock, weight averaging, QAT, seeded data order and the GPU-speed proxies."""

import re
import sys

import pytest
import torch

import train_gpt as tg
from conftest import uniform_plan
from test_train import CPU, run_tiny

# ---- schedules: pure functions of the training fraction ------------------------------------------


def test_training_fraction_by_time_or_steps():
    assert tg.training_fraction(50, 0.0, iterations=100, budget_ms=None) == 0.5
    assert tg.training_fraction(1, 300.0, iterations=100, budget_ms=600.0) == 0.5
    assert tg.training_fraction(1, 900.0, iterations=100, budget_ms=600.0) == 1.0


def test_lr_schedule_warmup_warmdown_and_floor():
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "LR_WARMUP_FRAC": "0.1", "WARMDOWN_FRAC": "0.5",
                                      "MIN_LR": "0.1"})

    def lr(fraction: float, settings=hp) -> float:  # by fraction alone: step and time do not matter
        return tg.lr_scale_at(settings, step=7, elapsed_ms=123.0, fraction=fraction, budget_ms=1000.0)

    assert lr(0.0) == 0.1  # the floor holds during warm-up too
    assert lr(0.05) == pytest.approx(0.5)
    assert lr(0.3) == lr(0.5) == 1.0
    assert lr(0.75) == pytest.approx(0.5)
    assert lr(0.99) == 0.1
    assert lr(1.0, tg.dataclasses.replace(hp, lr_warmup_frac=0.0, min_lr=0.0)) == 0.0
    # Warm-up with WARMDOWN_FRAC=0 keeps the baseline's WARMDOWN_ITERS warmdown (20 of 100 steps).
    steps = tg.Hyperparameters.from_env({"RECIPE": "baseline", "LR_WARMUP_FRAC": "0.1", "ITERATIONS": "100",
                                         "WARMDOWN_ITERS": "20"})
    assert tg.lr_scale_at(steps, 90, 0.0, 0.9, None) == pytest.approx(0.5)


def test_lr_scale_uses_the_fraction_when_warmdown_frac_is_set():
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "WARMDOWN_FRAC": "0.5", "MIN_LR": "0.2"})
    assert tg.lr_scale_at(hp, step=10, elapsed_ms=0, fraction=0.75, budget_ms=1000) == pytest.approx(0.5)
    base = tg.Hyperparameters.from_env({"RECIPE": "baseline", "ITERATIONS": "100", "WARMDOWN_ITERS": "20"})
    assert tg.lr_scale_at(base, step=90, elapsed_ms=0, fraction=0.9, budget_ms=None) == pytest.approx(0.5)


# ---- the clock -------------------------------------------------------------------------------------


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_phase_clock_accumulates_phases_and_subtracts_the_reserve():
    now = FakeTime()
    clock = tg.PhaseClock(cap_ms=10_000.0, eval_cap_ms=5_000.0, now=now)
    clock.start("train")
    now.t += 2.0
    clock.start("val")  # switching phases pauses training time
    now.t += 1.0
    assert clock.elapsed_ms("train") == 2000.0
    clock.start("train")
    now.t += 0.5
    assert clock.elapsed_ms("train") == 2500.0 and clock.elapsed_ms("val") == 1000.0
    clock.reserve_ms = 1500.0
    assert clock.train_budget_ms == 8500.0
    assert tg.PhaseClock(None, None).train_budget_ms is None
    assert "train:" in clock.summary() and "val:1000ms" in clock.summary()


def training_run(hp, model, clock, log) -> tg.TrainingRun:
    """What train() reads of a run: the settings, the model (uncompiled), its optimizers, the training
    shards, the log and the clock; no validation data, manifest or export plan."""
    return tg.TrainingRun(hp, CPU, False, None, log, None, None, None, tg.shard_files(hp.data_path, "train"), 0, model,
                          model, None, tg.build_optimizers(hp, model, CPU.device), [], None, clock)


def test_training_stops_before_the_budget_net_of_the_reserve(tiny_env, monkeypatch):
    """Each step costs 100 fake ms. Cap 1000 ms, reserve 300 ms: 7 steps fit, the 8th would not."""
    now = FakeTime()
    real_step = tg.train_step

    def slow_step(*args, **kwargs):
        now.t += 0.1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tg, "train_step", slow_step)
    # one small micro-batch a step: the test counts steps, their size does not matter
    hp = tg.Hyperparameters.from_env({**tiny_env, "ITERATIONS": "1000", "MAX_WALLCLOCK_SECONDS": "1",
                                      "TRAIN_BATCH_TOKENS": "1024", "GRAD_ACCUM_STEPS": "1"})
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    clock = tg.PhaseClock(1000.0, None, now=now)
    clock.reserve_ms = 300.0
    lines = []
    state = tg.train(training_run(hp, model, clock, lines.append),
                     tg.WeightAverager(model, ema_decay=0, swa_start_frac=1, swa_every=1))
    assert state.step == 7 and state.stopped_early
    assert clock.elapsed_ms("train") == pytest.approx(700.0) and clock.elapsed_ms("train") <= clock.train_budget_ms
    assert any(line.startswith("stopping_early: wallclock_cap train_time:700ms step:7/1000") for line in lines)
    assert any("budget_cut: training after step 7" in line and "reserve 300ms" in line for line in lines)


@pytest.mark.slow
def test_no_host_device_sync_inside_the_training_step(tiny_env, monkeypatch):
    """Reading a tensor's value on the host (.item, .tolist, bool) is a sync on a GPU: our step code never
    does it. (torch.optim's Adam reads its step counter, a CPU tensor: not a device sync.)"""
    calls = []
    in_step = [False]
    real_step = tg.train_step
    for name in ("item", "tolist", "__bool__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if in_step[0] and caller == tg.__file__:
                calls.append((_name, sys._getframe(1).f_lineno))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def watched_step(*args, **kwargs):
        in_step[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            in_step[0] = False

    monkeypatch.setattr(tg, "train_step", watched_step)
    run_tiny(tiny_env, ITERATIONS="3", GRAD_CLIP_NORM="0.3", EMA_DECAY="0.9")
    assert calls == []


# ---- weight averaging ------------------------------------------------------------------------------


def test_ema_and_swa_arithmetic():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    avg = tg.WeightAverager(model, ema_decay=0.5, swa_start_frac=0.5, swa_every=2)
    values = [1.0, 2.0, 3.0, 4.0]
    ema, ema_at = 0.0, {}
    for step, v in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(v)
        avg.update(step, fraction=step / 4)
        d = min(0.5, (1 + step) / (10 + step))  # warm-up: 2/11, 3/12, 4/13, 5/14 (all below 0.5)
        ema = d * ema + (1 - d) * v
        ema_at[step] = ema
    assert float(avg.ema[0][0, 0]) == pytest.approx(ema)
    # SWA samples the EMA at steps 2 and 4 (every 2 steps once fraction >= 0.5).
    assert avg.swa_count == 2 and float(avg.swa_sum[0][0, 0]) == pytest.approx(ema_at[2] + ema_at[4])
    assert avg.choose("auto") == "ema_swa"
    avg.apply("ema_swa")
    assert float(model.weight[0, 0]) == pytest.approx((ema_at[2] + ema_at[4]) / 2)
    with torch.no_grad():
        model.weight.fill_(0.0)
    long = tg.WeightAverager(model, ema_decay=0.9965, swa_start_frac=1, swa_every=1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    long.update(3000, fraction=0.5)  # late in a long run the decay is exactly EMA_DECAY
    assert float(long.ema[0][0, 0]) == pytest.approx(1 - 0.9965)
    plain = tg.WeightAverager(model, ema_decay=0.0, swa_start_frac=0.0, swa_every=1)
    for step, v in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(v)
        plain.update(step, fraction=1.0)
    assert plain.choose("auto") == "swa"
    plain.apply("swa")
    assert float(model.weight[0, 0]) == pytest.approx(2.5)  # uniform mean of the raw weights
    with pytest.raises(tg.RunError, match="EXPORT_WEIGHTS=ema"):
        plain.choose("ema")
    assert tg.WeightAverager(model, ema_decay=0, swa_start_frac=1, swa_every=1).choose("auto") == "raw"


def test_ema_without_warmup_keeps_the_initial_weights_share():
    """EMA_WARMUP=0 is the public scripts' EMA: constant decay from the initial weights, so after n steps
    the initial weights still hold decay**n of the average (0.9965**350 = 0.29 in a 350-step run)."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)  # the initial weights
    constant = tg.WeightAverager(model, ema_decay=0.9, swa_start_frac=1, swa_every=1, ema_warmup=False)
    ramped = tg.WeightAverager(model, ema_decay=0.9, swa_start_frac=1, swa_every=1)
    with torch.no_grad():
        model.weight.fill_(0.0)  # every trained step's weights
    for step in range(5):
        constant.update(step, fraction=step / 5)
        ramped.update(step, fraction=step / 5)
    assert float(constant.ema[0]) == pytest.approx(0.9 ** 5)
    share = 1.0
    for step in range(5):
        share *= min(0.9, (1 + step) / (10 + step))
    assert float(ramped.ema[0]) == pytest.approx(share) and share < 0.9 ** 5 / 50


@pytest.mark.slow
def test_exported_weights_are_the_logged_choice(tiny_env, tmp_path):
    out = run_tiny(tiny_env, ITERATIONS="6", EMA_DECAY="0.5", SWA_START_FRAC="0.5", SWA_EVERY="1")
    assert out["export_choice"] == "ema_swa"
    log = (tmp_path / "test" / "train.log").read_text()
    assert "weights:exporting ema_swa" in log and "pre-quantization post-ema_swa val_loss:" in log


# ---- QAT -------------------------------------------------------------------------------------------

QAT_ENV = {"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "160", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "MLP_MULT": "4", "VOCAB_SIZE": "97", "MATRIX_BITS": "6"}


def qat_model():
    torch.manual_seed(0)
    hp = tg.Hyperparameters.from_env(QAT_ENV)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    layers = tg.prepare_qat(model, uniform_plan(6, 8))
    return hp, model, layers


def dequantized_twin(hp, model):
    twin = tg.GPT(tg.ModelConfig.from_hparams(hp))
    entries = tg.quantize_state_dict(model.state_dict(), uniform_plan(6, 8))
    twin.load_state_dict(tg.dequantize_state_dict(entries))
    quantized = {e.name for e in entries if e.bits}
    # Tensors the export keeps in fp16 are rounded too: compare on the quantized matrices alone.
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name not in quantized:
                p.copy_(dict(model.named_parameters())[name])
    return twin


def test_qat_is_off_until_switched_then_equals_the_dequantized_forward():
    hp, model, layers = qat_model()
    assert {m.qat_bits for m in layers} == {6} and len(layers) == 4  # the two MLP matrices of each layer
    x = torch.randint(0, 97, (2, 16))
    plain = tg.GPT(tg.ModelConfig.from_hparams(hp))
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model.forward_logits(x), plain.forward_logits(x))  # inactive: exactly the float model
    tg.set_qat(layers, True)
    assert torch.allclose(model.forward_logits(x), dequantized_twin(hp, model).forward_logits(x), atol=1e-5)
    assert not torch.allclose(model.forward_logits(x), plain.forward_logits(x), atol=1e-3)
    loss = model(x, x)
    loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers)  # straight-through


@pytest.mark.slow
def test_qat_switch_is_live_under_torch_compile():
    torch._dynamo.reset()
    before = (torch._dynamo.config.suppress_errors, torch._inductor.config.emulate_precision_casts)
    with tg.compile_settings(qat=True, record=tg.CompileRecord()):  # what run() does when QAT and compile are on
        assert not torch._dynamo.config.suppress_errors and torch._inductor.config.emulate_precision_casts
        hp, model, layers = qat_model()
        x = torch.randint(0, 97, (2, 16))
        compiled = torch.compile(model.forward_logits, fullgraph=True, dynamic=False)
        off = compiled(x)
        assert torch.allclose(off, model.forward_logits(x), atol=1e-5)
        tg.set_qat(layers, True)  # a buffer write, not a Python flag: the compiled graph must see it
        on = compiled(x)
        assert torch.allclose(on, dequantized_twin(hp, model).forward_logits(x), atol=1e-5)
        assert not torch.allclose(on, off, atol=1e-3)
    # the settings are the run's, not the process's: they are back as they were
    assert (torch._dynamo.config.suppress_errors, torch._inductor.config.emulate_precision_casts) == before
    torch._dynamo.reset()



@pytest.mark.slow
def test_record_training_step_compiles_fullgraph_without_breaks():
    """The forward + loss + backward of the record recipe (small) as one graph, both loop graphs (traced
    through AOT autograd without inductor's code generation: the compiled runs test that)."""
    torch._dynamo.reset()
    hp = tg.Hyperparameters.from_env({"NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                      "VOCAB_SIZE": "97", "XSA_LAST_N": "4", "LOOP_START": "1", "LOOP_END": "2",
                                      "PARALLEL_START_LAYER": "3", "TRAIN_SEQ_LEN": "16", "QAT_ENABLED": "1"})
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    tg.prepare_qat(model, tg.QuantPlan.from_hparams(hp))
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.randint(0, 97, (2, 16))
    for looping in (False, True):
        loss = compiled(x, x, looping)
        loss.backward()
        assert torch.isfinite(loss) and model.tok_emb.weight.grad is not None


# ---- data order and logging --------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_first_losses_other_seed_other_data(tiny_env):
    a = run_tiny(tiny_env, ITERATIONS="3", RUN_ID="a", SEED="7")
    b = run_tiny(tiny_env, ITERATIONS="3", RUN_ID="b", SEED="7")
    assert a["train_losses"] == b["train_losses"]
    files = tg.shard_files(tiny_env["DATA_PATH"], "train")
    first = [tg.DistributedTokenLoader(files, 0, 1, CPU.device, seed=s).next_batch(1024, 128, 1)[0] for s in (7, 7, 8)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


@pytest.mark.slow
def test_step_lines_report_tokens_per_second_and_mfu(tiny_env, tmp_path):
    run_tiny(tiny_env, ITERATIONS="2", PEAK_TFLOPS="0.001")
    log = (tmp_path / "test" / "train.log").read_text()
    m = re.search(r"^step:2/2 train_loss:[\d.]+ train_time:\d+ms step_avg:[\d.]+ms tok/s:(\d+) mfu:([\d.]+)%$",
                  log, re.M)
    assert m and int(m.group(1)) > 0 and float(m.group(2)) > 0
    assert re.search(r"^phase_times: .*train:\d+ms.*eval:\d+ms process:\d+ms$", log, re.M)


@pytest.mark.slow
def test_qat_costs_nothing_when_off_and_switches_on_at_its_fraction(tiny_env, tmp_path, monkeypatch):
    calls = []
    real = tg.fake_quantize
    monkeypatch.setattr(tg, "fake_quantize", lambda w, bits, k=0.0: calls.append(bits) or real(w, bits, k))
    big = {"MODEL_DIM": "128", "MLP_MULT": "4.5", "ITERATIONS": "4"}  # MLP matrices over 65,536 values
    run_tiny(tiny_env, **big)
    assert calls == []  # QAT off: the forward never fake-quantizes
    out = run_tiny(tiny_env, **big, QAT_ENABLED="1", QAT_START_FRAC="0.5", MATRIX_BITS="6", RUN_ID="qat")
    assert calls and set(calls) == {6}
    log = (tmp_path / "qat" / "train.log").read_text()
    assert re.search(r"^qat:enabled step:2 frac:0\.500 layers:4 matrix_bits:6 ", log, re.M)
    assert out["roundtrip"].num_targets == out["pre_quant"].num_targets
