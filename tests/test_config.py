"""Env-var parsing and validation: bad values stop the run before any work, naming the variable."""

import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import ROOT, subprocess_env


def test_baseline_recipe_is_the_official_baseline():
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline"})
    assert hp == tg.Hyperparameters()  # the dataclass defaults are the baseline
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.mlp_mult) == (9, 512, 8, 4, 2.0)
    assert (hp.vocab_size, hp.train_seq_len, hp.train_batch_tokens, hp.iterations) == (1024, 1024, 524288, 20000)
    assert (hp.matrix_lr, hp.scalar_lr, hp.tied_embed_lr, hp.muon_momentum, hp.qk_gain_init) == (
        0.04, 0.04, 0.05, 0.95, 1.5)
    assert hp.max_wallclock_seconds == 600.0 and hp.warmdown_iters == 1200 and hp.tie_embeddings
    assert hp.grad_accum_for(8) == 1 and hp.grad_accum_for(1) == 8
    hp.check_world(8)
    assert not (hp.xsa_last_n or hp.num_loops or hp.rope_dims or hp.bigram_vocab_size or hp.smear_gate_enabled
                or hp.ln_scale or hp.skip_gates_enabled or hp.value_residual or hp.attn_out_gate_enabled
                or hp.sparse_attn_gate_enabled or hp.gated_attn_enabled) and hp.parallel_start_layer == -1
    assert hp.mlp_activation == "relu2" and hp.backout_layer == -1


def test_record_recipe_is_the_default_and_every_field_stays_overridable():
    hp = tg.Hyperparameters.from_env({})
    assert hp.recipe == "record" and hp.vocab_size == 8192 and hp.data_path.endswith("fineweb10B_sp8192")
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.mlp_mult) == (11, 512, 8, 4, 4.0)
    assert hp.mlp_activation == "leaky_relu2" and hp.xsa_last_n == 11 and hp.rope_dims == 16 and hp.ln_scale
    assert (hp.loop_start, hp.loop_end, hp.num_loops) == (3, 5, 2) and hp.parallel_start_layer == 8
    assert hp.qk_gain_init == 5.0 and hp.train_seq_len == 2048
    hp.check_world(8)
    over = tg.Hyperparameters.from_env({"XSA_LAST_N": "4", "NUM_LOOPS": "0", "VOCAB_SIZE": "1024"})
    assert over.xsa_last_n == 4 and over.num_loops == 0 and over.vocab_size == 1024 and over.rope_dims == 16
    lines = "\n".join(over.describe({"XSA_LAST_N": "4"}))
    assert "xsa_last_n: 4 (env)" in lines and "rope_dims: 16 (recipe)" in lines and "seed: 1337 (default)" in lines
    with pytest.raises(tg.ConfigError, match="RECIPE='fast' is not one of baseline, record"):
        tg.Hyperparameters.from_env({"RECIPE": "fast"})


def test_record_depth_choices_follow_num_layers_and_stay_overridable():
    at = {n: tg.Hyperparameters.from_env({"NUM_LAYERS": str(n)}) for n in range(1, 17)}
    full = at[11]  # exactly the public record's values at its own depth
    assert (full.xsa_last_n, full.parallel_start_layer, full.loop_start, full.loop_end) == (11, 8, 3, 5)
    for n, hp in at.items():  # every depth gives a valid recipe of the same shape
        assert hp.xsa_last_n == n  # XSA on all layers
        assert hp.parallel_start_layer == max(n - 3, 0)  # parallel residuals on the last 3
        assert 0 <= hp.loop_start <= hp.loop_end < n  # the loop stays inside the stack
    assert (at[4].loop_start, at[4].loop_end, at[4].parallel_start_layer) == (1, 2, 1)
    one = tg.Hyperparameters.from_env({"NUM_LAYERS": "6", "XSA_LAST_N": "2"})  # one override, the rest follow
    assert (one.xsa_last_n, one.parallel_start_layer, one.loop_start, one.loop_end) == (2, 3, 1, 3)
    lines = "\n".join(one.describe({"NUM_LAYERS": "6", "XSA_LAST_N": "2"}))
    assert "xsa_last_n: 2 (env)" in lines and "parallel_start_layer: 3 (recipe: max(NUM_LAYERS-3, 0))" in lines
    with pytest.raises(tg.ConfigError, match="XSA_LAST_N=7 must be <= NUM_LAYERS=6"):
        tg.Hyperparameters.from_env({"NUM_LAYERS": "6", "XSA_LAST_N": "7"})


def test_env_values_are_parsed_by_type():
    hp = tg.Hyperparameters.from_env({"MATRIX_LR": "0.02", "NUM_LAYERS": "11", "TIE_EMBEDDINGS": "false",
                                      "MLP_MULT": "3.5", "COMPILE": "0"})
    assert hp.matrix_lr == 0.02 and hp.num_layers == 11 and hp.tie_embeddings is False
    assert hp.mlp_mult == 3.5 and hp.compile == "0"


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"MATRIX_LR": "O.02"}, "MATRIX_LR='O.02' must be a number"),
        ({"ITERATIONS": "ten"}, "ITERATIONS='ten' must be an integer"),
        ({"ITERATIONS": "-5"}, "ITERATIONS=-5 must be > 0"),
        ({"MATRIX_LR": "-0.1"}, "MATRIX_LR=-0.1 must be >= 0"),
        ({"MATRIX_LR": "nan"}, "MATRIX_LR='nan' must be a finite number"),
        ({"TIE_EMBEDDINGS": "yes"}, "TIE_EMBEDDINGS='yes' must be a boolean"),
        ({"COMPILE": "maybe"}, "COMPILE='maybe' is not one of auto, 0, 1"),
        ({"COMPUTE_DTYPE": "fp8"}, "COMPUTE_DTYPE='fp8' is not one of"),
        ({"NUM_KV_HEADS": "3"}, "NUM_HEADS=8 must be divisible by NUM_KV_HEADS=3"),
        ({"MODEL_DIM": "500"}, "MODEL_DIM=500 must be divisible by NUM_HEADS=8"),
        ({"TOKENIZER_PATH": "tok.json"}, "TOKENIZER_PATH='tok.json' must be a SentencePiece .model"),
        ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE=70000 must be <= 65536"),
        ({"MUON_MOMENTUM": "1.0"}, "MUON_MOMENTUM"),
    ],
)
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(tg.ConfigError) as err:
        tg.Hyperparameters.from_env(env)
    assert needle in str(err.value)


def test_batch_must_divide_by_world_and_seq_len():
    hp = tg.Hyperparameters.from_env({"TRAIN_BATCH_TOKENS": "1000"})
    with pytest.raises(tg.ConfigError, match="TRAIN_BATCH_TOKENS=1000 must be divisible by"):
        hp.check_world(8)
    with pytest.raises(tg.ConfigError, match="WORLD_SIZE=3 must divide 8"):
        tg.Hyperparameters.from_env({}).check_world(3)
    tg.Hyperparameters.from_env({"RECIPE": "baseline", "GRAD_ACCUM_STEPS": "2",
                                 "TRAIN_BATCH_TOKENS": str(3 * 2 * 1024)}).check_world(3)


def test_cli_rejects_bad_env_with_one_line_before_any_work(tmp_path):
    env = subprocess_env({"MATRIX_LR": "abc", "ARTIFACT_DIR": str(tmp_path)})
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: MATRIX_LR='abc' must be a number"
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []  # not even a run folder


def test_cli_missing_data_is_one_line(tmp_path):
    env = subprocess_env({"DATA_PATH": str(tmp_path / "nope"), "TOKENIZER_PATH": str(tmp_path / "nope.model"),
                          "ARTIFACT_DIR": str(tmp_path)})
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TOKENIZER_PATH=" in lines[0] and "does not exist" in lines[0]


def test_importing_has_no_side_effects():
    code = "import os, train_gpt, torch.distributed as d; print(d.is_initialized(), sorted(os.listdir('.')))"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env({}), cwd=ROOT / "tests",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False") and "'logs'" not in proc.stdout and "'runs'" not in proc.stdout
