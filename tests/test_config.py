"""Env-var parsing and validation: bad values stop the run before any work, naming the variable."""

import re
import subprocess
import sys
import types

import pytest
import torch

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
    # R0427's final pass as its run used it: phased TTT, LoRA rank 80 / alpha 144, AdamW (0, 0.99), decay 0.5, warm A
    assert (hp.ttt_enabled, hp.ttt_mode, hp.eval_stride) == (True, "phased", 64)
    assert (hp.ttt_lora_rank, hp.ttt_lora_alpha, hp.ttt_lora_lr, hp.ttt_beta1, hp.ttt_beta2) == (80, 144.0, 1e-4, 0.0, 0.99)
    assert (hp.ttt_weight_decay, hp.ttt_warm_start_a, hp.ttt_chunk_size, hp.ttt_batch_size) == (0.5, True, 48, 64)
    assert (hp.phased_ttt_prefix_docs, hp.phased_ttt_num_phases, hp.global_ttt_lr) == (2500, 3, 0.001)
    assert hp.ttt_k_lora and hp.ttt_o_lora and hp.ttt_mlp_lora
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


@pytest.mark.slow
def test_cli_rejects_bad_env_with_one_line_before_any_work(tmp_path):
    env = subprocess_env({"MATRIX_LR": "abc", "ARTIFACT_DIR": str(tmp_path)})
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: MATRIX_LR='abc' must be a number"
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []  # not even a run folder


@pytest.mark.slow
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


# Public env names this script does not read (PUBLIC_ONLY_KNOBS) and near-miss typos of our knobs.
KNOBS = tg.Hyperparameters.knob_names()
ENV_NAME = r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b"


def test_public_only_table_reasons_are_one_line_fixes_that_name_real_knobs():
    assert not KNOBS & tg.PUBLIC_ONLY_KNOBS.keys()  # a knob of ours is never in the table
    for name, (harmless, reason) in tg.PUBLIC_ONLY_KNOBS.items():
        assert "\n" not in reason and len(reason) < 160, name
        assert any(fix in reason for fix in ("set ", "safe to drop", "edit it there")), name  # "unset" included
        mentioned = set(re.findall(ENV_NAME, reason))
        assert mentioned <= KNOBS | tg.PUBLIC_ONLY_KNOBS.keys() | {"CONTROL_TENSOR_NAMES"}, (name, mentioned)
        if reason.startswith("renamed: set "):  # the new name, and every NAME=value shown, are real settings
            assert re.match(r"renamed: set ([A-Z_]+)", reason).group(1) in KNOBS, name
            for knob, value in re.findall(r"\b([A-Z][A-Z0-9_]+)=([\w.]+)\b", reason):
                tg.Hyperparameters.from_env({knob: value})
        assert harmless == ("*",) or "*" not in harmless, name


@pytest.mark.parametrize("name", sorted(tg.PUBLIC_ONLY_KNOBS))
def test_public_only_name_is_refused_unless_harmless(name):
    harmless, reason = tg.PUBLIC_ONLY_KNOBS[name]
    if harmless == ("*",):  # ignored by the public script too: any value passes
        tg.Hyperparameters.from_env({name: "7"})
        return
    with pytest.raises(tg.ConfigError) as err:
        tg.Hyperparameters.from_env({name: "7"})
    assert str(err.value) == f"{name}=7 is the public scripts' knob, not read here; {reason}"
    for value in harmless:
        tg.Hyperparameters.from_env({name: value})


def test_public_only_harmless_values_and_several_names_in_one_line():
    ok = {"ETLB_ENABLED": "0", "ROPE_YARN": "1", "TTT_GRAD_STEPS": "1",
          "TTT_OPTIMIZER": "adam", "FUSED_CE_ENABLED": "0", "VAL_DOC_FRACTION": "1.0", "TTT_EVAL_BATCHES": "",
          "ATTN_OUT_GATE_SRC": "proj", "DATA_DIR": "./data/", "TTT_EVAL_ONLY": " 0 ", "MUON_BETA2": "0.95"}
    assert tg.Hyperparameters.from_env(ok) == tg.Hyperparameters.from_env({})
    for name, value in [("TTT_OPTIMIZER", "sgd"), ("ROPE_YARN", "0"), ("VAL_DOC_FRACTION", "0.1"),
                        ("ATTN_OUT_GATE_SRC", "q"), ("TTT_EVAL_BATCHES", "0:10"), ("DATA_DIR", "/data")]:
        with pytest.raises(tg.ConfigError, match=f"^{name}="):
            tg.Hyperparameters.from_env({**ok, name: value})
    with pytest.raises(tg.ConfigError) as err:
        tg.Hyperparameters.from_env({"TTT_EVAL_ONLY": "1", "NUM_LAYERS": "4", "PARALLEL_RESIDUAL_START": "7"})
    line = str(err.value)
    assert "\n" not in line and "TTT_EVAL_ONLY=1 " in line and "set EVAL_ONLY=1" in line
    assert "PARALLEL_RESIDUAL_START=7 " in line and "set PARALLEL_START_LAYER" in line


def test_a_knob_of_ours_is_never_refused_or_flagged(monkeypatch):
    every_knob = {name: "1" for name in KNOBS}
    assert tg.env_name_warnings(every_knob, KNOBS) == []
    # A public name that later becomes our knob (as at a merge) is read, not refused.
    monkeypatch.setitem(tg.PUBLIC_ONLY_KNOBS, "NUM_LAYERS", ((), "renamed: set NUM_LAYERS"))
    assert tg.Hyperparameters.from_env({"NUM_LAYERS": "4"}).num_layers == 4
    tg.refuse_public_only_knobs(dict.fromkeys(tg.PUBLIC_ONLY_KNOBS, "7"), KNOBS | tg.PUBLIC_ONLY_KNOBS.keys())


SYSTEM_NAMES = """PATH HOME USER SHELL PWD TERM LANG LC_ALL TMPDIR RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_NAME ROLE_WORLD_SIZE MASTER_ADDR MASTER_PORT NODE_RANK NNODES
NPROC_PER_NODE OMP_NUM_THREADS MKL_NUM_THREADS CUDA_VISIBLE_DEVICES CUDA_DEVICE_MAX_CONNECTIONS
CUDA_LAUNCH_BLOCKING TORCH_LOGS TORCH_COMPILE_DEBUG TORCH_CUDA_ARCH_LIST TORCH_DISTRIBUTED_DEBUG
TORCH_NCCL_ASYNC_ERROR_HANDLING TORCHINDUCTOR_CACHE_DIR TORCHELASTIC_RUN_ID TORCHELASTIC_RESTART_COUNT
TORCHELASTIC_MAX_RESTARTS TORCHELASTIC_ERROR_FILE TORCHELASTIC_USE_AGENT_STORE TRITON_CACHE_DIR
PYTORCH_CUDA_ALLOC_CONF NCCL_DEBUG NCCL_NET NCCL_IB_DISABLE NCCL_P2P_DISABLE NCCL_SOCKET_IFNAME PYTHONPATH
PYTHONHASHSEED PYTHONUNBUFFERED VIRTUAL_ENV LD_LIBRARY_PATH XDG_RUNTIME_DIR SSH_AUTH_SOCK CONDA_PREFIX
HF_HOME HF_TOKEN HF_HUB_OFFLINE MATCHED_FINEWEB_REPO_ID MATCHED_FINEWEB_REMOTE_ROOT_PREFIX
MATCHED_FINEWEB_SP_BATCH_SIZE MATCHED_FINEWEB_TOKENIZER_THREADS SLURM_PROCID SLURM_LOCALID SEEDS NUM_SEEDS
RUN_NAME LOG_DIR OUT_DIR DATA_ROOT""".split()
TYPOS = {"NUM_LAYER": "NUM_LAYERS", "MATRX_LR": "MATRIX_LR", "TTT_LORA_RANKS": "TTT_LORA_RANK",
         "MODEL_DIMS": "MODEL_DIM", "EMA_DEACY": "EMA_DECAY", "MUON_MOMENTUN": "MUON_MOMENTUM",
         "TRAIN_SEQLEN": "TRAIN_SEQ_LEN", "EVAL_STRID": "EVAL_STRIDE", "XSA_LAST": "XSA_LAST_N"}


def test_typo_warnings_hit_near_misses_and_spare_system_names():
    environ = dict.fromkeys([*SYSTEM_NAMES, *TYPOS, *tg.PUBLIC_ONLY_KNOBS, "NUM_LAYERS", "ETLB_ENABLED"], "1")
    warnings = tg.env_name_warnings(environ, KNOBS)
    assert warnings == [f"warning: env {typo} is not a knob of this script and is ignored; did you mean {knob}?"
                        for typo, knob in sorted(TYPOS.items())]
    assert tg.env_name_warnings({"num_layer": "1", "NUMLAYER": "1"}, KNOBS) == []  # not an all-caps NAME_X


def test_typo_warnings_are_logged_with_the_config(monkeypatch):
    monkeypatch.setenv("NUM_LAYER", "4")
    lines = []
    tg.log_run_header(tg.Hyperparameters.from_env({}), types.SimpleNamespace(device=torch.device("cpu")),
                      lambda msg, console=True: lines.append(msg))
    at = lines.index("Hyperparameters:")
    assert [line for line in lines if line.startswith("warning:")] == [
        "warning: env NUM_LAYER is not a knob of this script and is ignored; did you mean NUM_LAYERS?"]
    assert lines.index(next(line for line in lines if line.startswith("warning:"))) > at


@pytest.mark.slow
def test_cli_refuses_a_public_only_name_with_one_line(tmp_path):
    env = subprocess_env({"TTT_EVAL_ONLY": "1", "ARTIFACT_DIR": str(tmp_path)})
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and list(tmp_path.iterdir()) == []
    assert proc.stderr.strip() == f"error: TTT_EVAL_ONLY=1 is the public scripts' knob, not read here; " \
                                  f"{tg.PUBLIC_ONLY_KNOBS['TTT_EVAL_ONLY'][1]}"
