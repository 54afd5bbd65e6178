"""The CUDA path as far as a CPU can run it (issue 17): bf16 autocast through the whole pipeline of the
shrunk record recipe, loud compile failures, and bounded graph counts under CPU torch.compile."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg

CPU = tg.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)


# The record recipe shrunk by size only, with every stage of the pipeline on: EMA (recipe), pre-quant
# TTT on training data, GPTQ with LQER calibrated as the recipe says, sliding windows (recipe), the
# recipe's phased LoRA TTT. QUANT_MIN_NUMEL=4096 quantizes every matrix of this small model.
RECORD_SMALL = dict(
    RECIPE="record", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="64",
    TRAIN_BATCH_TOKENS="2048", VAL_BATCH_SIZE="4096", ITERATIONS="3", WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0",
    VAL_LOSS_EVERY="0", GPTQ_CALIBRATION_BATCHES="1", GPTQ_CALIBRATION_SEQS="2", GPTQ_CALIBRATION_SEQ_LEN="16",
    QUANT_MIN_NUMEL="4096", LQER_TOP_K="2", PREQUANT_TTT_ENABLED="1", PREQUANT_TTT_TOKENS="2048", TTT_LORA_RANK="4",
    TTT_BATCH_SIZE="4", PHASED_TTT_PREFIX_DOCS="4", PHASED_TTT_NUM_PHASES="2", TTT_CHUNK_TOKENS="512",
    EVAL_STRIDE="32", MAX_EVAL_SECONDS="0",  # the recipe's stride 64 is this whole window; no budget to time
    AUTO_FIT_FILL="0",  # filling 16 MB from a 0.2 MB model re-packs ~8 times; tests/test_quant.py tests filling
)


@pytest.mark.slow
def test_bf16_autocast_runs_the_whole_record_pipeline_and_eval_only_reproduces_it(small_val, tmp_path):
    env = dict(RECORD_SMALL, **small_val, ARTIFACT_DIR=str(tmp_path))
    bf16 = tg.run(tg.Hyperparameters.from_env(dict(env, COMPUTE_DTYPE="bfloat16", RUN_ID="bf16")), CPU)
    log = (tmp_path / "bf16" / "train.log").read_text()
    assert "compute_dtype:bfloat16" in log and "weights:exporting ema" in log
    assert re.search(r"^prequant_ttt: steps:[1-9]", log, re.M) and re.search(r"^lqer: ", log, re.M)
    assert set(bf16["evals"]) == {"roundtrip", "sliding", "ttt"}
    num_targets = tg.load_validation_tokens(small_val["DATA_PATH"]).numel() - 1
    for name, r in {"pre_quant": bf16["pre_quant"], **bf16["evals"]}.items():
        assert np.isfinite(r.val_loss) and np.isfinite(r.val_bpb), name
        assert r.num_targets == num_targets, name  # every target scored (once: each pass checks it per target)

    # the same run in float32 (without the evaluation passes that cannot change pre_quant)
    fp32 = tg.run(tg.Hyperparameters.from_env(dict(env, COMPUTE_DTYPE="float32", RUN_ID="fp32", TTT_ENABLED="0",
                                                   EVAL_STRIDE="0")), CPU)
    assert abs(bf16["pre_quant"].val_bpb - fp32["pre_quant"].val_bpb) < 0.01 * fp32["pre_quant"].val_bpb

    # EVAL_ONLY in bf16 reproduces the run's final score exactly; chunked TTT scores every target too (the
    # phased pass above is the per-document LoRA pass plus its global phases)
    artifact = str(next((tmp_path / "bf16").glob("final_model.*.ptz")))
    eval_env = dict(env, COMPUTE_DTYPE="bfloat16", EVAL_ONLY="1", ARTIFACT_PATH=artifact)
    again = tg.run(tg.Hyperparameters.from_env(dict(eval_env, RUN_ID="again", EVAL_STRIDE="0")), CPU)
    assert again["results"]["ttt"] == bf16["evals"]["ttt"]
    for mode in ("chunked",):
        other = tg.run(tg.Hyperparameters.from_env(dict(eval_env, RUN_ID=mode, TTT_MODE=mode, EVAL_STRIDE="0",
                                                        TTT_EPOCHS="1")), CPU)
        assert np.isfinite(other["results"]["ttt"].val_bpb) and other["results"]["ttt"].num_targets == num_targets

    # the bf16-trained weights pack and unpack bit-exactly with every compressor
    entries, header = tg.unpack_artifact(Path(artifact).read_bytes())
    for compressor in ("zlib", "lzma", "brotli", "ans"):
        blob = tg.pack_artifact(entries, compressor=compressor, model=header["model"], meta=header["meta"])
        back, _ = tg.unpack_artifact(blob)
        for a, b in zip(tg.dequantize_state_dict(entries).values(), tg.dequantize_state_dict(back).values()):
            assert torch.equal(a, b), compressor


def test_gptq_hessians_are_float32_under_bf16_autocast():
    """GPTQ accumulates x^T x in fp32 whatever the autocast: the bf16 Hessian is the fp32 Gram matrix of
    the bf16 activations, close to the fp32 run's."""
    hp = tg.Hyperparameters.from_env(dict(RECIPE="baseline", NUM_LAYERS="1", MODEL_DIM="256", NUM_HEADS="4",
                                          NUM_KV_HEADS="2", VOCAB_SIZE="256", QUANT_METHOD="gptq"))
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    plan = tg.QuantPlan.from_hparams(hp)
    batches = [torch.randint(0, 256, (2, 32))]
    fp32 = tg.collect_hessians(model, batches, plan, False)
    bf16 = tg.collect_hessians(model, batches, plan, False, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert fp32 and set(fp32) == set(bf16)
    for key in fp32:
        assert bf16[key].dtype == torch.float32
        assert torch.allclose(bf16[key], fp32[key], rtol=0.05, atol=0.05 * float(fp32[key].abs().max())), key


# ---- torch.compile: bounded graph counts, and never a silent fallback -----------------------------


def raise_for_test(gm, example_inputs):
    raise RuntimeError("deliberate backend failure\nwith a second line")


if "raise_for_test" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(raise_for_test, name="raise_for_test")


def run_tiny(env: dict, **overrides) -> dict:
    return tg.run(tg.Hyperparameters.from_env({**env, **overrides}), CPU)


@pytest.mark.slow
def test_compiled_run_matches_eager_and_compiles_one_graph_per_function(tiny_env, tmp_path):
    """COMPILE=1 on CPU: the compiled train step (with its warm-up and state reset), the compiled eval
    and the roundtrip agree with the eager run. Evaluation batches are padded to one shape, so flat and
    sliding windows share one graph; a second evaluation of the artifact (EVAL_ONLY, a fresh model)
    compiles nothing new."""
    torch._dynamo.reset()
    env = dict(tiny_env, ITERATIONS="3", WARMUP_STEPS="1", EVAL_STRIDE="64")
    eager = run_tiny(env, RUN_ID="eager", COMPILE="0")
    before = torch._dynamo.config.suppress_errors
    compiled = run_tiny(env, RUN_ID="compiled", COMPILE="1")
    assert torch._dynamo.config.suppress_errors == before  # the run's compiler settings did not leak
    assert compiled["train_losses"] == pytest.approx(eager["train_losses"], abs=2e-3)
    for stage in ("roundtrip", "sliding"):
        assert compiled["evals"][stage].val_bpb == pytest.approx(eager["evals"][stage].val_bpb, abs=2e-3)
    graphs = {"train_step": 1, "forward_logits": 1, "eval_forward_logits": 1}
    assert compiled["compile"]["graphs"] == graphs and compiled["compile"]["failures"] == []
    manifest = json.loads((tmp_path / "compiled" / "manifest.json").read_text())
    assert manifest["compile"]["graphs"] == graphs
    assert "compile:graphs train_step:1 forward_logits:1 eval_forward_logits:1 failures:0" in (
        tmp_path / "compiled" / "train.log").read_text()
    again = run_tiny(env, RUN_ID="again", COMPILE="1", EVAL_ONLY="1",
                     ARTIFACT_PATH=str(tmp_path / "compiled" / "final_model.quantized.ptz"))
    assert again["compile"]["graphs"] == {}
    assert again["results"]["sliding"] == compiled["evals"]["sliding"]


@pytest.mark.slow
def test_a_failed_compile_stops_the_run_at_start_with_one_line(tiny_env, tmp_path, monkeypatch, capsys):
    """COMPILE_FALLBACK=error (the CUDA default): the first graph that fails to compile, in the warm-up
    before training, stops the run with one line naming the function and the reason; the manifest
    records it."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(tiny_env, WARMUP_STEPS="1", COMPILE="1", COMPILE_BACKEND="raise_for_test",
                           COMPILE_FALLBACK="error", DEVICE="cpu").items():
        monkeypatch.setenv(key, value)
    assert tg.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: torch.compile failed in train_step (RuntimeError: deliberate backend failure); "
                       "COMPILE_FALLBACK=eager runs that graph uncompiled (slower), COMPILE=0 turns compile off")
    manifest = json.loads((tmp_path / "test" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "torch.compile failed in train_step" in manifest["error"]
    assert manifest["compile"]["failures"] == [{"function": "train_step",
                                                "reason": "RuntimeError: deliberate backend failure"}]
    log = (tmp_path / "test" / "train.log").read_text()
    assert "compile:failed function:train_step backend:raise_for_test fallback:error" in log
    assert not re.search(r"^step:1/", log, re.M)  # stopped before any training step


@pytest.mark.slow
def test_eager_fallback_is_logged_per_function_and_scores_like_eager(tiny_env, tmp_path):
    env = dict(tiny_env, ITERATIONS="2", WARMUP_STEPS="1")
    fallback = run_tiny(env, RUN_ID="fallback", COMPILE="1", COMPILE_BACKEND="raise_for_test",
                        COMPILE_FALLBACK="eager")
    eager = run_tiny(env, RUN_ID="eager", COMPILE="0")
    assert fallback["roundtrip"].val_bpb == pytest.approx(eager["roundtrip"].val_bpb, abs=1e-6)
    failed = [f["function"] for f in fallback["compile"]["failures"]]
    assert failed == ["train_step", "forward_logits", "eval_forward_logits"]
    log = (tmp_path / "fallback" / "train.log").read_text()
    for name in failed:
        assert f"compile:failed function:{name} backend:raise_for_test fallback:eager reason:RuntimeError: " \
               "deliberate backend failure" in log
    manifest = json.loads((tmp_path / "fallback" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["compile"]["failures"]) == 3


def test_compile_fallback_is_error_on_cuda_and_eager_on_cpu_unless_set():
    def record(device, **env):
        hp = tg.Hyperparameters.from_env(dict(RECIPE="baseline", COMPILE="1", **env))
        return tg.compile_record_for(hp, tg.Runtime(0, 1, 0, torch.device(device), False))

    assert record("cuda").fallback == "error" and record("cpu").fallback == "eager"
    assert record("cuda", COMPILE_FALLBACK="eager").fallback == "eager"
    assert record("cpu", COMPILE_FALLBACK="error").fallback == "error"
    assert tg.compile_record_for(tg.Hyperparameters.from_env(dict(RECIPE="baseline")), CPU) is None  # auto: off
    with pytest.raises(tg.ConfigError, match="COMPILE_BACKEND='nope' is not a torch.compile backend; known: "):
        tg.Hyperparameters.from_env(dict(COMPILE="1", COMPILE_BACKEND="nope"))


def test_dynamo_tracing_failures_are_one_line_and_recorded():
    """Errors dynamo raises itself (not the backend) become the same one-line CompileFailed; with the
    eager fallback dynamo suppresses them with a warning, and that warning is recorded as a failure."""
    import logging

    record = tg.CompileRecord("inductor", "error", log=lambda msg: None)
    with tg.compile_settings(False, record):
        failure = tg.compile_failure(torch._dynamo.exc.InternalTorchDynamoError("tracing broke\ndetails"))
        assert isinstance(failure, tg.CompileFailed) and "\n" not in str(failure)
        assert "(InternalTorchDynamoError: tracing broke)" in str(failure) and len(record.failures) == 1
        assert tg.compile_failure(ValueError("not a compile error")) is None
    eager = tg.CompileRecord("inductor", "eager", log=lambda msg: None)
    with tg.compile_settings(False, eager):
        assert torch._dynamo.config.suppress_errors
        logging.getLogger("torch._dynamo.convert_frame").warning("WON'T CONVERT forward_logits: boom")
    assert [f["reason"] for f in eager.failures] == ["RuntimeError: WON'T CONVERT forward_logits: boom"]
    logging.getLogger("torch._dynamo.convert_frame").warning("outside any run")  # handler removed
    assert len(eager.failures) == 1
