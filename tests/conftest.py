"""Shared fixtures: a small real-text dataset built by the same code path as the sample pipeline."""

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A model small enough that a 20-step run takes a few seconds on 2 CPU cores.
TINY_ENV = {
    "RECIPE": "baseline",
    "NUM_LAYERS": "2",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "128",
    "TRAIN_BATCH_TOKENS": "8192",
    "VAL_BATCH_SIZE": "8192",
    "WARMUP_STEPS": "0",
    "VAL_LOSS_EVERY": "0",
    "MAX_WALLCLOCK_SECONDS": "0",
    "ITERATIONS": "20",
    "TRAIN_LOG_EVERY": "5",
}


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> dict:
    """The first 1500 documents of the embedded corpus, tokenized with a 1024-piece BPE."""
    from data.prepare_sample import prepare_sample

    root = tmp_path_factory.mktemp("sample")
    return prepare_sample(
        vocab_size=1024, datasets_root=root / "datasets", tokenizers_root=root / "tokenizers", max_docs=1500
    )


@pytest.fixture(scope="session")
def small_val(sample_dataset, tmp_path_factory) -> dict:
    """Env for the sample's training shard and its first validation documents (~1,500 tokens): for runs
    whose assertions do not depend on the size of the validation set (bf16 matmuls are ~10x slower than
    fp32 on a CPU; the record recipe's phased TTT costs most of a run's time)."""
    import numpy as np

    import train_gpt as tg
    from data.shards import write_shard

    root = tmp_path_factory.mktemp("small_val")
    for f in tg.shard_files(sample_dataset["dataset_dir"], "train"):
        shutil.copy(f, root)
    val = tg.load_validation_tokens(sample_dataset["dataset_dir"]).numpy()
    bos = np.flatnonzero(val == tg.BOS_ID)
    write_shard(root / "fineweb_val_000000.bin", val[: bos[bos >= 1500][0]])
    return dict(DATA_PATH=str(root), TOKENIZER_PATH=sample_dataset["tokenizer_path"], VOCAB_SIZE="1024")


@pytest.fixture()
def tiny_env(sample_dataset, tmp_path) -> dict:
    """Env for a tiny run on the sample dataset, writing into tmp_path."""
    env = dict(TINY_ENV)
    env.update(
        DATA_PATH=sample_dataset["dataset_dir"],
        TOKENIZER_PATH=sample_dataset["tokenizer_path"],
        ARTIFACT_DIR=str(tmp_path),
        RUN_ID="test",
    )
    return env


def small_model(config, *, seed: int = 0, noise: float = 0.02):
    """A GPT built from torch seed `seed`, every weight then moved by `noise` x N(0, 1), so no weight is
    exactly zero (attention really mixes positions; every row quantizes to a spread of codes). `config`
    is a `ModelConfig`, or `Hyperparameters` for the model a run with those knobs builds."""
    import torch

    import train_gpt as tg

    if isinstance(config, tg.Hyperparameters):
        config = tg.ModelConfig.from_hparams(config)
    torch.manual_seed(seed)
    model = tg.GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


def uniform_plan(matrix_bits: int, embed_bits: int, method: str = "absmax", **fields):
    """A QuantPlan with embed_bits for the embedding and head, matrix_bits for every other group (the
    clip sigmas, and min_numel unless given, at the knobs' defaults)."""
    import train_gpt as tg

    bits = {g: embed_bits if g in ("embed", "head") else matrix_bits for g in tg.QUANT_GROUPS}
    return tg.QuantPlan(method=method, bits=bits, **fields)


def subprocess_env(extra: dict) -> dict:
    """The current environment minus torchrun/knob leftovers, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT)
    return env


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: an end-to-end run, a torch.compile or a multi-process test; `-m 'not slow'` skips them")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (tests/bench/bench_gpu.py runs them)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
