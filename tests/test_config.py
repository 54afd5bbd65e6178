"""Env-var parsing and validation: bad values stop the run before any work, naming the variable."""

import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import ROOT, subprocess_env


def test_defaults_are_the_official_baseline():
    hp = tg.Hyperparameters.from_env({})
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.mlp_mult) == (9, 512, 8, 4, 2.0)
    assert (hp.vocab_size, hp.train_seq_len, hp.train_batch_tokens, hp.iterations) == (1024, 1024, 524288, 20000)
    assert (hp.matrix_lr, hp.scalar_lr, hp.tied_embed_lr, hp.muon_momentum, hp.qk_gain_init) == (
        0.04, 0.04, 0.05, 0.95, 1.5)
    assert hp.max_wallclock_seconds == 600.0 and hp.warmdown_iters == 1200 and hp.tie_embeddings
    assert hp.grad_accum_for(8) == 1 and hp.grad_accum_for(1) == 8
    hp.check_world(8)


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
    tg.Hyperparameters.from_env({"GRAD_ACCUM_STEPS": "2", "TRAIN_BATCH_TOKENS": str(3 * 2 * 1024)}).check_world(3)


def test_cli_rejects_bad_env_with_one_line_before_any_work(tmp_path):
    env = subprocess_env({"MATRIX_LR": "abc", "ARTIFACT_DIR": str(tmp_path)})
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: MATRIX_LR='abc' must be a number"
    assert proc.stdout == "" and not (tmp_path / "logs").exists()


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
    assert proc.stdout.startswith("False") and "logs" not in proc.stdout
