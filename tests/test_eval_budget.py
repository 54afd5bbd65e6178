"""MAX_EVAL_SECONDS always ends with a legal score: a pass that cannot fit is skipped, one that stops fitting
is cut, TTT first stops adapting, and the final score is the last pass that completed. Decided on a simulated
clock that advances only while the model computes, so every decision is exact whatever the machine's load."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from records import records as rec
from test_ttt import luts_and_val, ttt_model

RT = tg.Runtime(0, 1, 0, torch.device("cpu"), False)
# The model of test_ttt (2 layers x 32) as knobs; windows of 32 tokens, 4 per batch, sliding stride 8.
BASE = {"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
        "TRAIN_SEQ_LEN": "32", "VOCAB_SIZE": "1024", "EVAL_STRIDE": "8"}
TTT = {"chunked": {"TTT_ENABLED": "1", "TTT_MODE": "chunked", "TTT_CHUNK_TOKENS": "96", "TTT_EPOCHS": "2",
                   "TTT_LR": "0.05", "TTT_BATCH_SEQS": "3"},
       "phased": {"TTT_ENABLED": "1", "TTT_MODE": "phased", "TTT_CHUNK_SIZE": "32", "TTT_BATCH_SIZE": "2",
                  "PHASED_TTT_PREFIX_DOCS": "4", "PHASED_TTT_NUM_PHASES": "2", "GLOBAL_TTT_LR": "0.05",
                  "TTT_LORA_LR": "0.05", "TTT_BATCH_SEQS": "3"}}


UNBOUNDED = 1e12  # a budget that is never short: the passes are timed as under any budget


class SimulatedDevice:
    """1 ms per row position of each forward and 2 per backward; `factor` times that from `slow_from_ms` on
    (a machine that gets slower mid-pass)."""

    def __init__(self, model, slow_from_ms: float = math.inf, factor: float = 1.0):
        self.ms, self.slow_from_ms, self.factor = 0.0, slow_from_ms, factor
        model.blocks[0].register_forward_pre_hook(lambda module, args: self.tick(args[0], 1.0))
        model.blocks[-1].register_full_backward_pre_hook(lambda module, grads: self.tick(grads[0], 2.0))

    def tick(self, x, cost):
        self.ms += cost * x.shape[0] * x.shape[1] * (self.factor if self.ms >= self.slow_from_ms else 1.0)


def evaluate(sample_dataset, cap_ms, *, slow_from_ms=math.inf, factor=1.0, **env):
    luts, val = luts_and_val(sample_dataset, 701)
    model = ttt_model()
    device = SimulatedDevice(model, slow_from_ms, factor)
    clock = tg.PhaseClock(None, cap_ms, now=lambda: device.ms / 1000)
    clock.start("eval")
    lines = []
    passes = tg.evaluate_artifact(tg.Hyperparameters.from_env({**BASE, **env}), model, val, luts, clock,
                                  tg.EvalContext(RT, log=lines.append), use_compile=False, batch_seqs=4, tag="t")
    return passes, "\n".join(lines), device.ms


def phase_ms(log: str) -> dict[str, float]:
    line = re.search(r"^eval_phases: (.*) total:", log, re.M).group(1)
    return {k: float(v[:-2]) for k, v in (item.split(":") for item in line.split())}


def test_step_costs_charge_the_mean_plus_two_pooled_spreads():
    costs = tg.StepCosts(lambda: 0.0)
    assert costs.ms("window") == 0.0 and costs.spread() == 0.0  # never measured: nothing to charge
    for ms in (90.0, 110.0):
        costs.add("window", ms)
    costs.add(("adapt", 64), 300.0)  # one timing: a mean, no spread of its own
    cv = math.sqrt(2 * 10.0**2 / 100.0**2)  # sample std / mean of the window batches
    assert costs.spread() == pytest.approx(cv)
    assert costs.ms("window") == pytest.approx(100.0 * (1 + 2 * cv))
    assert costs.ms(("plain", 64)) == costs.ms(("adapt", 64)) == pytest.approx(300.0 * (1 + 2 * cv))  # never timed plain
    assert costs.plain_ms({64: 3}) == pytest.approx(3 * 300.0 * (1 + 2 * cv))


def test_a_sliding_pass_that_cannot_fit_is_skipped_and_the_roundtrip_score_is_final(sample_dataset):
    full, log, _ = evaluate(sample_dataset, UNBOUNDED)
    assert full.status == {"roundtrip": "complete", "sliding": "complete"} and full.final_stage == "sliding"
    ph = phase_ms(log)
    cap = ph["warmup"] + ph["roundtrip"] + ph["sliding"] / 2
    passes, log, used = evaluate(sample_dataset, cap)
    assert passes.status == {"roundtrip": "complete", "sliding": "skipped"}
    assert passes.final_stage == "roundtrip" and passes.fallback and used <= cap
    assert passes.results == {"roundtrip": full.results["roundtrip"]}  # the same exact score
    need, left = ph["sliding"] / 1000, ph["sliding"] / 2000  # nothing jitters here: the measured cost is exact
    assert re.search(rf"^eval:skipped sliding needs ~{need:.1f}s, {left:.1f}s left$", log, re.M)
    assert not re.search(r"^(quantized_sliding_window|final_sliding_window_exact) ", log, re.M)
    r = full.results["roundtrip"]
    assert re.search(rf"^final_t_roundtrip_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}$", log, re.M)
    assert re.search(rf"^final_score stage:roundtrip val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} "
                     r"total_eval_time:[\d.]+s fallback_from:sliding$", log, re.M)
    assert ("  eval_passes: roundtrip:complete sliding:skipped final:roundtrip (fallback: sliding did not complete "
            "within the budget)") in log.splitlines()
    assert "  eval_time: " in log and "within_budget:1" in log


def test_a_pass_that_stops_fitting_while_it_runs_is_cut_and_never_reported(sample_dataset):
    _, log, _ = evaluate(sample_dataset, UNBOUNDED)
    ph = phase_ms(log)
    start = ph["warmup"] + ph["roundtrip"]
    cap = start + 1.5 * ph["sliding"]  # fits at the measured cost, then the machine gets 3x slower a quarter in
    passes, log, used = evaluate(sample_dataset, cap, slow_from_ms=start + ph["sliding"] / 4, factor=3.0)
    assert passes.status == {"roundtrip": "complete", "sliding": "cut"} and passes.final_stage == "roundtrip"
    assert used <= cap
    assert re.search(r"^eval:cut sliding after \d+ of 22 batches: the rest needs ~[\d.]+s, [\d.]+s left; it is not "
                     r"scored \(time:\d+ms\)$", log, re.M)
    assert not re.search(r"^(quantized_sliding_window|final_sliding_window_exact) ", log, re.M)
    assert re.search(r"^final_score stage:roundtrip .* fallback_from:sliding$", log, re.M)


def test_a_budget_too_small_for_any_pass_reports_no_score(sample_dataset):
    _, log, _ = evaluate(sample_dataset, UNBOUNDED)
    ph = phase_ms(log)
    with pytest.raises(tg.RunError, match=r"evaluation budget \(MAX_EVAL_SECONDS=\d+\) ran out before any pass completed "
                                          r"\(roundtrip:skipped sliding:skipped\), so no score is reported"):
        evaluate(sample_dataset, ph["warmup"] + ph["roundtrip"] / 2, MAX_EVAL_SECONDS="1")


@pytest.mark.parametrize("mode", ["chunked", "phased"])
def test_ttt_stops_adapting_in_time_or_falls_back_to_the_sliding_score(sample_dataset, mode):
    full, log, _ = evaluate(sample_dataset, UNBOUNDED, **TTT[mode])
    assert full.status == dict.fromkeys(("roundtrip", "sliding", "ttt"), "complete") and full.ttt_info.stopped_at is None
    ph = phase_ms(log)
    before = ph["warmup"] + ph["roundtrip"] + ph["sliding"]
    # Too little room to score TTT's windows even plainly (at their measured cost): skipped before it starts.
    passes, log, used = evaluate(sample_dataset, before + 1.0, **TTT[mode])
    assert passes.status["ttt"] == "skipped" and passes.final_stage == "sliding" and passes.fallback
    plain_ms = 1000 * float(re.search(r"^eval:skipped ttt needs ~([\d.]+)s, 0\.0s left$", log, re.M).group(1))
    assert 0 < plain_ms < 0.8 * ph["ttt"]  # adapting is most of the pass
    passes, _, _ = evaluate(sample_dataset, before + 0.9 * plain_ms, **TTT[mode])
    assert passes.status["ttt"] == "skipped"
    # Room for that and a little adaptation: it stops adapting in time and is the final score.
    cap = before + 1.3 * plain_ms
    passes, log, used = evaluate(sample_dataset, cap, **TTT[mode])
    assert passes.status["ttt"] == "complete" and passes.final_stage == "ttt" and not passes.fallback
    assert passes.ttt_info.stopped_at is not None and re.search(r"^ttt:adaptation_stopped at ", log, re.M)
    assert used <= cap and passes.results["ttt"].num_targets == 700
    # The machine gets 3x slower inside TTT: it is cut, and the sliding score is final.
    passes, log, used = evaluate(sample_dataset, cap, slow_from_ms=before + 0.2 * plain_ms, factor=3.0, **TTT[mode])
    assert passes.status == {"roundtrip": "complete", "sliding": "complete", "ttt": "cut"}
    assert passes.final_stage == "sliding" and passes.fallback and used <= cap
    assert re.search(r"^eval:cut ttt .*; it is not scored", log, re.M) and not re.search(r"^legal_ttt_exact ", log, re.M)


class SimulatedClock(tg.PhaseClock):
    """The run's clock on simulated time: `ms_per_token` per input position of every model forward."""

    ms = 0.0

    def __init__(self, cap_ms, eval_cap_ms):
        super().__init__(cap_ms, eval_cap_ms, now=lambda: SimulatedClock.ms / 1000)


@pytest.mark.slow
def test_a_run_whose_budget_covers_only_the_roundtrip_ends_with_rc_0_and_that_score(small_val, tmp_path, monkeypatch,
                                                                                     capsys):
    """Through main(), on simulated time: the roundtrip fits, the sliding pass does not; exit code 0, the
    manifest's final score is the roundtrip's and the records tool reads it so. With a budget that fits no
    pass: exit code 2 and one line. And runs that ended at different stages are not one record."""
    forward = tg.GPT.forward_hidden

    def ticking(self, input_ids, looping=False):
        SimulatedClock.ms += input_ids.numel() * rate
        return forward(self, input_ids, looping)

    monkeypatch.setattr(tg.GPT, "forward_hidden", ticking)
    monkeypatch.setattr(tg, "PhaseClock", SimulatedClock)
    env = {"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "4096", "GRAD_ACCUM_STEPS": "1", "VAL_BATCH_SIZE": "1024",
           "ITERATIONS": "1",
           "WARMUP_STEPS": "0", "VAL_LOSS_EVERY": "0", "MAX_WALLCLOCK_SECONDS": "0", "EVAL_STRIDE": "64",
           "ARTIFACT_DIR": str(tmp_path), **small_val}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # The eval phases in simulated seconds at 1 ms per token: warm-up (2 + 3 batches of 8 x 128), the roundtrip's
    # and the sliding pass's batches (one rank).
    n = tg.load_validation_tokens(small_val["DATA_PATH"]).numel() - 1
    batches = {stride: len(tg.window_rounds(tg.plan_windows(n, 128, stride), 128, 8, 1)[0]) for stride in (128, 64)}
    batch_s = 8 * 128 / 1000
    roundtrip_s, sliding_s = batches[128] * batch_s, batches[64] * batch_s
    warmup_s = 5 * batch_s

    def main(run_id: str, max_eval_s: float, seed: str, ms_per_token: float = 1.0) -> int:
        nonlocal rate
        rate = ms_per_token
        monkeypatch.setenv("RUN_ID", run_id)
        monkeypatch.setenv("SEED", seed)
        monkeypatch.setenv("MAX_EVAL_SECONDS", str(max_eval_s))
        return tg.main()

    rate = 1.0
    assert main("roundtrip_only", warmup_s + roundtrip_s + sliding_s / 2, "1") == 0
    run = rec.load_run(tmp_path / "roundtrip_only")
    rec.check_log_matches_manifest(run)  # the log line the manifest names carries the roundtrip's score
    final = run.manifest["final_score"]
    assert final["stage"] == "roundtrip" and final["fallback"] and final["asked_stage"] == "sliding"
    assert final["log_key"] == "final_int8_zlib_roundtrip_exact" and final["passes"] == {"roundtrip": "complete",
                                                                                         "sliding": "skipped"}
    assert final["val_bpb"] == run.manifest["scores"]["roundtrip"]["val_bpb"] and "sliding" not in run.manifest["scores"]
    assert rec.final_stage_text(run) == "roundtrip (fallback from sliding)"
    # A second seed with time for both passes ends at the sliding stage: not one record with the first.
    assert main("both", warmup_s + roundtrip_s + sliding_s / 2, "2", ms_per_token=0.1) == 0
    both = rec.load_run(tmp_path / "both")
    assert both.final["stage"] == "sliding" and not both.final["fallback"]
    with pytest.raises(rec.RecordError, match=r"runs end at different evaluation stages \(both=sliding, "
                                              r"roundtrip_only=roundtrip \(fallback from sliding\)\)"):
        rec.check_submittable([both, run])
    assert "| final_score.stage | roundtrip (fallback from sliding) | sliding |" in rec.compare_table([run, both])
    capsys.readouterr()
    assert main("nothing", warmup_s + roundtrip_s / 2, "3") == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: evaluation budget \(MAX_EVAL_SECONDS=[\d.]+\) ran out before any pass completed "
                     r"\(roundtrip:skipped sliding:skipped\), so no score is reported", err, re.M)
    assert json.loads((tmp_path / "nothing" / "manifest.json").read_text())["status"] == "failed"
    assert Path(tmp_path / "nothing" / "train.log").is_file()
