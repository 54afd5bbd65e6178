"""Parameter Golf: train a small GPT under a 10-minute cap and ship it in 16,000,000 bytes.

Launch (every knob is an environment variable, see `Hyperparameters`):
    8 GPUs:    torchrun --standalone --nproc_per_node=8 train_gpt.py
    1 GPU:     python train_gpt.py                  (8 gradient-accumulation micro-steps)
    CPU smoke: NUM_LAYERS=2 MODEL_DIM=64 ... python train_gpt.py  (see README.md)

Sections, in the order a run meets them; each banner opens with what its section owns:
    HYPERPARAMETERS     every knob, parsed and validated from the environment; the two recipes
    RUNTIME & LOGGING   process group, device, autocast, the rank-0 log, atomic writes, stop signals
    DATA                shards, the two training loaders, validation tokens, byte tables, the CaseOps sidecar
    MODEL               the GPT and every leaderboard architecture switch
    OPTIMIZER           Muon (Newton-Schulz orthogonalised momentum, sharded over ranks), AdamW for the rest
    SCHEDULES           LR, momentum and phase switches as pure functions of the training fraction; the clock
    TRAINING            compile warm-up with state reset, the budgeted training loop
    WEIGHT AVERAGING    EMA and SWA of the weights, and which weights are exported
    QUANTIZATION & PACKING  SDClip / GPTQ / LQER per tensor group, calibration, the packer and its coders
                        (zlib, lzma, brotli, ans), fitting and filling the limit, writing the artifact
    EVALUATION          val_loss / val_bpb: flat or sliding windows, every validation target scored once
    TEST-TIME TRAINING  score-first adaptation (chunked SGD, per-document LoRA, phased), pre-quant TTT
    SCORING AN ARTIFACT  a fresh model from the artifact file, every evaluation stage, the compliance block
    RUN FOLDER & MANIFEST  runs/<RUN_ID>/ claimed at start, never overwritten; manifest.json; the shipped
                        code form (what is counted as code bytes)
    MAIN                main() and the run as named steps: train, calibrate, export, reload and score the
                        artifact, finish the manifest; EVAL_ONLY=1 scores an existing artifact

Importing this file has no side effects; `main()` runs only under `__main__`.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import copy
import dataclasses
import difflib
import errno
import fcntl
import functools
import glob
import hashlib
import io
import json
import logging
import lzma
import math
import os
import platform
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

# ==================================================================================================
# HYPERPARAMETERS
# ==================================================================================================
# Owns the configuration: `Hyperparameters` (one frozen dataclass of knobs), the two recipes, and the
# env checks. Field `matrix_lr` is read from env var `MATRIX_LR`, parsed by the type of its default;
# each `knob` carries its help text and its allowed values. The field defaults are the official naive
# baseline (RECIPE=baseline); RECIPE=record (the default) overlays the strongest legal configuration
# known for 8xH100, and any env var still overrides a single field. Bad values stop the run before any
# work with one line that names the variable, the value and what is allowed; the public scripts' env
# names that this script does not read are refused, and near-miss typos of a knob get a warning.

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal, code + compressed model


class ConfigError(ValueError):
    """A knob has a bad value; the message names the env var and what is allowed."""


class RunError(RuntimeError):
    """An expected failure (missing data, corrupt artifact, ...): reported as one line, exit code 2."""


def knob(default, help: str = "", *, choices: tuple | None = None, min: float | None = None, gt: float | None = None,
         max: float | str | None = None, lt: float | str | None = None):
    """A Hyperparameters field and its checks: the allowed choices, or bounds (max and lt may name another knob)."""
    return field(default=default, metadata=dict(help=help, choices=choices, min=min, gt=gt, max=max, lt=lt))


BOUND_CHECKS = (("min", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                ("max", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))


@dataclass(frozen=True)
class Hyperparameters:
    # data and run control
    recipe: str = knob("baseline", "field defaults: baseline or record (RECIPE unset = record)",
                       choices=("baseline", "record"))
    data_path: str = knob("./data/datasets/fineweb10B_sp1024", "folder holding fineweb_{train,val}_*.bin")
    tokenizer_path: str = knob("./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece .model file")
    caseops_enabled: bool = knob(False, "1 = the data is CaseOps (case-transformed text): require the byte sidecar "
                                 "fineweb_val_bytes_*.bin and a tokenizer with the operator pieces; bytes come from "
                                 "the sidecar whenever it is present, so 0 changes nothing on CaseOps data")
    run_id: str = knob("", "the run's name and folder; empty = a fresh uuid4")
    artifact_dir: str = knob("", "where run folders go: <ARTIFACT_DIR>/<RUN_ID>/; empty = ./runs")
    replace_run: bool = knob(False, "1 = delete an existing run folder of this RUN_ID and start over; "
                             "0 = refuse to touch it")
    seed: int = knob(1337, "seed for init and for the training data order", min=0)
    device: str = knob("auto", "auto = cuda if available else cpu", choices=("auto", "cpu", "cuda"))
    compute_dtype: str = knob("auto", "autocast dtype; auto = bfloat16 on cuda, float32 on cpu",
                              choices=("auto", "float32", "bfloat16"))
    compile: str = knob("auto", "torch.compile; auto = on for cuda, off for cpu", choices=("auto", "0", "1"))
    compile_fallback: str = knob("auto", "when torch.compile fails (always logged and kept in the manifest): error = "
                                 "stop the run, eager = run that graph uncompiled; auto = error on cuda, eager on cpu",
                                 choices=("auto", "error", "eager"))
    compile_backend: str = knob("inductor", "torch.compile backend (a name torch._dynamo.list_backends() knows, "
                                "e.g. inductor, aot_eager)")
    attn_backend: str = knob("auto", "attention kernel: auto = FlashAttention 3 on CUDA (its varlen kernel under "
                             "DOC_MASKED_ATTENTION) if installed and it passes a start-up check against SDPA, else SDPA",
                             choices=("auto", "sdpa", "fa3"))
    # validation and logging
    val_batch_size: int = knob(524_288, "validation tokens per batch, over all ranks", gt=0)
    val_loss_every: int = knob(1000, "validate every N steps; 0 = only at the end", min=0)
    train_log_every: int = knob(200, "log train loss every N steps (steps 1-10 always)", gt=0)
    # training length and batch
    iterations: int = knob(20_000, "hard step limit", gt=0)
    warmdown_iters: int = knob(1200, "linear LR warmdown length, in iterations (converted to time)", min=0)
    warmup_steps: int = knob(20, "compile warm-up steps; weights and optimizer state are reset after", min=0)
    train_batch_tokens: int = knob(524_288, "global tokens per optimizer step", gt=0)
    train_seq_len: int = knob(1024, "training sequence length (and evaluation's, unless EVAL_SEQ_LEN)", gt=0)
    eval_seq_len: int = knob(0, "evaluation sequence length; 0 = TRAIN_SEQ_LEN (longer uses NTK RoPE)", min=0)
    max_wallclock_seconds: float = knob(600.0, "training time cap; 0 = no cap (ITERATIONS rules)", min=0)
    grad_accum_steps: int = knob(0, "micro-steps per optimizer step; 0 = 8 // WORLD_SIZE as the baseline", min=0)
    train_loader: str = knob("stream", "training data order: stream (the baseline's contiguous seeded stream) or "
                             "shuffled (seq_len+1 windows of all shards in a seeded random order, new each epoch)",
                             choices=("stream", "shuffled"))
    # model shape
    vocab_size: int = knob(1024, "must equal the tokenizer's vocabulary size", gt=1, max=65536)  # uint16 shards
    num_layers: int = knob(9, "transformer blocks", gt=0)
    model_dim: int = knob(512, "residual width", gt=0)
    num_heads: int = knob(8, "query heads", gt=0)
    num_kv_heads: int = knob(4, "key/value heads (GQA); must divide NUM_HEADS", gt=0)
    mlp_mult: float = knob(2.0, "MLP hidden width = MLP_MULT * MODEL_DIM", gt=0)
    tie_embeddings: bool = knob(True, "output head shares the token embedding")
    rope_base: float = knob(10_000.0, "RoPE base frequency", gt=0)
    logit_softcap: float = knob(30.0, "logits = c * tanh(logits / c)", gt=0)
    qk_gain_init: float = knob(1.5, "initial per-head query gain after QK-norm", gt=0)
    # architecture switches (all off in the baseline; see the MODEL section)
    mlp_activation: str = knob("relu2", "relu2 or leaky_relu2 (LeakyReLU(slope)^2)", choices=("relu2", "leaky_relu2"))
    mlp_leaky_slope: float = knob(0.5, "negative slope of leaky_relu2", gt=0)
    rope_dims: int = knob(0, "partial RoPE: rotate the first N dims of each head; 0 = all", min=0)
    xsa_last_n: int = knob(0, "exclusive self-attention on the last N layers", min=0, max="num_layers")
    doc_masked_attention: bool = knob(False, "attention stays inside each document: every row is cut at BOS, in "
                                      "training and evaluation, and RoPE positions restart at each BOS")
    ortho_init: bool = knob(False, "orthogonal init (gain 1) of the attention q/k/v and MLP input matrices")
    value_residual: bool = knob(False, "later layers mix the first layer's values into theirs")
    attn_out_gate_enabled: bool = knob(False, "per-head output gate 2*sigmoid(w.x[:GATE_WINDOW]), identity at init")
    gated_attn_enabled: bool = knob(False, "per-head output gate sigmoid(W x) (Qwen gated attention)")
    gated_attn_init_std: float = knob(0.01, "init std of the gated-attention W", min=0)
    sparse_attn_gate_enabled: bool = knob(False, "per-head gate sigmoid(scale*w.x[:GATE_WINDOW]), 0.5 at zero init")
    sparse_attn_gate_scale: float = knob(1.0, "scale inside the sparse attention gate", gt=0)
    sparse_attn_gate_init_std: float = knob(0.0, "init std of the sparse gate weights", min=0)
    gate_window: int = knob(12, "input channels read by the out/sparse/smear gates", gt=0, max="model_dim")
    bigram_vocab_size: int = knob(0, "BigramHash buckets; 0 = off", min=0)
    bigram_dim: int = knob(128, "BigramHash embedding width", gt=0)
    smear_gate_enabled: bool = knob(False, "SmearGate: mix in the previous token's embedding (never across BOS)")
    skip_gates_enabled: bool = knob(False, "U-Net skips as a learned lerp instead of a sum")
    ln_scale: bool = knob(False, "scale each sub-layer input by 1/sqrt(layer+1)")
    parallel_start_layer: int = knob(-1, "attention and MLP in parallel from this layer; -1 = off", min=-1, lt="num_layers")
    parallel_mode: str = knob("two_lane", "parallel residual form", choices=("gptj", "two_lane"))
    parallel_final_lane: str = knob("mean", "two_lane: which lane feeds the head", choices=("mean", "attn", "mlp"))
    parallel_x0_mix: str = knob("read", "two_lane: resid_mix's blend with the embedding x0 feeds only the attention "
                                "read (read, the record) or also becomes the attention lane (lane)",
                                choices=("read", "lane"))
    backout_layer: int = knob(-1, "subtract lambda * (hidden after this virtual layer) at the end; -1 = off", min=-1,
                              lt="num_layers")
    num_loops: int = knob(0, "depth recurrence: extra passes over layers LOOP_START..LOOP_END; 0 = off", min=0)
    loop_start: int = knob(3, "first layer of the looped segment", min=0)
    loop_end: int = knob(5, "last layer of the looped segment (inclusive)", min=0)
    enable_looping_at: float = knob(0.35, "training fraction at which looping switches on", min=0, max=1)
    # optimizer
    embed_lr: float = knob(0.6, "Adam LR of an untied token embedding", min=0)
    head_lr: float = knob(0.008, "Adam LR of an untied output head", min=0)
    tied_embed_lr: float = knob(0.05, "Adam LR of the tied embedding/head", min=0)
    tied_embed_init_std: float = knob(0.005, "init std of the tied embedding", gt=0)
    matrix_lr: float = knob(0.04, "Muon LR of the block matrices", min=0)
    scalar_lr: float = knob(0.04, "Adam LR of gains, mixes and skip weights", min=0)
    muon_momentum: float = knob(0.95, "Muon momentum after warm-up", min=0, lt=1)
    muon_backend_steps: int = knob(5, "Newton-Schulz iterations", gt=0)
    muon_momentum_warmup_start: float = knob(0.85, "Muon momentum at step 0", min=0, lt=1)
    muon_momentum_warmup_steps: int = knob(500, "steps to ramp Muon momentum", min=0)
    beta1: float = knob(0.9, "Adam beta1", min=0, lt=1)
    beta2: float = knob(0.95, "Adam beta2", min=0, lt=1)
    adam_eps: float = knob(1e-8, "Adam epsilon", gt=0)
    grad_clip_norm: float = knob(0.0, "global grad-norm clip after the cross-rank average; 0 = off", min=0)
    muon_ns_coefficients: str = knob("quintic", "Newton-Schulz coefficients", choices=("quintic", "polar_express"))
    muon_row_normalize: bool = knob(False, "MuonEq-R: normalise each row of the update before Newton-Schulz")
    muon_wd: float = knob(0.0, "decoupled weight decay of Muon matrices (p *= 1 - lr*wd)", min=0)
    embed_wd: float = knob(0.0, "AdamW weight decay of embedding tables", min=0)
    adam_wd: float = knob(0.0, "AdamW weight decay of control tensors and an untied head", min=0)
    # schedules (fractions of the training budget; see SCHEDULES)
    warmdown_frac: float = knob(0.0, "LR warmdown over the last fraction of training; 0 = use WARMDOWN_ITERS", min=0, max=1)
    lr_warmup_frac: float = knob(0.0, "linear LR warm-up over the first fraction of training", min=0, max=1)
    min_lr: float = knob(0.0, "floor of the LR multiplier", min=0, max=1)
    # weight averaging and QAT
    ema_decay: float = knob(0.0, "EMA of the weights, updated every step; 0 = off", min=0, lt=1)
    ema_warmup: bool = knob(True, "EMA decay ramps as (1+t)/(10+t) up to EMA_DECAY; 0 = the public scripts' "
                            "constant decay from the initial weights")
    swa_start_frac: float = knob(1.0, "SWA from this training fraction on; 1 = off", min=0, max=1)
    swa_every: int = knob(50, "steps between SWA snapshots", gt=0)
    export_weights: str = knob("auto", "weights to export: auto (ema_swa > ema > swa > raw as enabled)",
                               choices=("auto", "raw", "ema", "swa", "ema_swa"))
    qat_enabled: bool = knob(False, "fake-quantize exported matrices to their export bits (STE) late in training")
    qat_start_frac: float = knob(0.85, "training fraction at which QAT switches on", min=0, max=1)
    # export and budgets
    matrix_bits: int = knob(8, "export bits of weight matrices (int8 containers)", min=2, max=8)
    embed_bits: int = knob(8, "export bits of embedding tables (and an untied head unless HEAD_BITS)", min=2, max=8)
    max_eval_seconds: float = knob(600.0, "evaluation budget, artifact load to final score; 0 = none", min=0)
    peak_tflops: float = knob(989.0, "peak TFLOP/s per device for the MFU estimate (H100 SXM bf16 dense)", gt=0)
    # evaluation of the reloaded artifact (see EVALUATION)
    eval_stride: int = knob(0, "sliding-window stride: each window scores this many new targets; 0 = flat only",
                            min=0)
    # score-first test-time training on already-scored validation tokens (see TEST-TIME TRAINING)
    ttt_enabled: bool = knob(False, "score-first test-time training as the final evaluation pass")
    ttt_mode: str = knob("chunked", "chunked: full-model SGD per scored chunk; lora: per-document adapters; "
                         "phased: global SGD phases on scored documents + per-document adapters",
                         choices=("chunked", "lora", "phased"))
    ttt_lr: float = knob(0.005, "chunked: SGD LR, cosine-decayed over the chunks", min=0)
    ttt_epochs: int = knob(3, "chunked: SGD passes over each scored chunk", min=0)
    ttt_momentum: float = knob(0.9, "SGD momentum of the TTT updates", min=0, lt=1)
    ttt_chunk_tokens: int = knob(32768, "chunked: validation targets per chunk", gt=0)
    ttt_batch_seqs: int = knob(32, "sequences per TTT SGD step, over all ranks", gt=0)
    ttt_grad_clip: float = knob(1.0, "global grad-norm clip of TTT SGD steps; 0 = off", min=0)
    ttt_freeze_blocks: int = knob(0, "chunked: the first N blocks stay frozen", min=0, max="num_layers")
    ttt_lora_rank: int = knob(8, "lora/phased: rank of the per-document adapters", gt=0)
    ttt_lora_lr: float = knob(0.01, "lora/phased: AdamW LR of the adapters", min=0)
    ttt_lora_alpha: float = knob(0.0, "lora/phased: adapter outputs scaled by alpha/rank; 0 = the rank (scale 1)",
                                 min=0)
    ttt_warm_start_a: bool = knob(False, "lora/phased: keep each round position's trained A for the next round's "
                                  "document (B and optimizer state still reset)")
    ttt_weight_decay: float = knob(0.0, "lora/phased: AdamW weight decay of the adapters", min=0)
    ttt_beta1: float = knob(0.9, "lora/phased: AdamW beta1 of the adapters", min=0, lt=1)
    ttt_beta2: float = knob(0.95, "lora/phased: AdamW beta2 of the adapters", min=0, lt=1)
    ttt_k_lora: bool = knob(True, "lora/phased: adapters on attention k (q, v and the head always)")
    ttt_o_lora: bool = knob(True, "lora/phased: adapters on the attention output projection")
    ttt_mlp_lora: bool = knob(True, "lora/phased: a dim->dim adapter beside each MLP, fed by its input")
    ttt_chunk_size: int = knob(48, "lora/phased: targets scored per adapter step inside a document (at most "
                               "EVAL_SEQ_LEN)", gt=0)
    ttt_batch_size: int = knob(64, "lora/phased: documents each rank holds at a time (R0427: 64); a round is "
                               "TTT_BATCH_SIZE x WORLD_SIZE documents", gt=0)
    phased_ttt_prefix_docs: int = knob(2000, "phased: scored documents (longest first) the global phases train on",
                                       min=0)
    phased_ttt_num_phases: int = knob(1, "phased: global SGD phases, evenly spaced over the prefix", gt=0)
    global_ttt_lr: float = knob(0.001, "phased: SGD LR of the global phases (cosine)", min=0)
    global_ttt_epochs: int = knob(1, "phased: SGD passes over the prefix per phase", min=0)
    # pre-quantization TTT: adapt the full-precision weights before export (see TEST-TIME TRAINING)
    prequant_ttt_enabled: bool = knob(False, "AdamW passes over a training-data slice before quantization, time "
                                      "reserved from the training budget")
    prequant_ttt_source: str = knob("train", "train: the tail of the last training shard, held out of training; "
                                    "val: validation tokens "
                                    "before scoring them (violates C3, needs ALLOW_VAL_ADAPTATION=1)",
                                    choices=("train", "val"))
    prequant_ttt_tokens: int = knob(1_048_576, "tokens of the pre-quantization TTT slice", gt=0)
    prequant_ttt_epochs: int = knob(1, "AdamW passes over the slice", min=0)
    prequant_ttt_lr: float = knob(1e-4, "AdamW LR of pre-quantization TTT", min=0)
    allow_val_adaptation: bool = knob(False, "permit adapting on validation tokens before scoring them; stamps "
                                      "every score line, the compliance block and the results non-record")
    # quantization and packing (see QUANTIZATION)
    quant_method: str = knob("absmax", "absmax (row max grid), sdclip (k * row std grid, k = *_CLIP_SIGMAS) or gptq "
                             "(sdclip grid, Hessian-aware rounding)", choices=("absmax", "sdclip", "gptq"))
    attn_bits: int = knob(0, "export bits of attention matrices; 0 = MATRIX_BITS", min=0, max=8)
    mlp_bits: int = knob(0, "export bits of MLP matrices; 0 = MATRIX_BITS", min=0, max=8)
    head_bits: int = knob(0, "export bits of an untied output head; 0 = EMBED_BITS", min=0, max=8)
    quant_min_numel: int = knob(65_537, "smallest tensor (in values) the export quantizes; smaller float tensors and "
                                "control tensors stay float (65,537 = the public scripts' rule: at most 65,536 stay "
                                "fp16); GPTQ, RTN, QAT and the packer all follow it", gt=0)
    matrix_clip_sigmas: float = knob(12.85, "SDClip k of weight matrices: clip at k row stds; 0 = row absmax", min=0)
    attn_clip_sigmas: float = knob(0.0, "SDClip k of attention matrices; 0 = MATRIX_CLIP_SIGMAS", min=0)
    mlp_clip_sigmas: float = knob(0.0, "SDClip k of MLP matrices; 0 = MATRIX_CLIP_SIGMAS", min=0)
    embed_clip_sigmas: float = knob(20.0, "SDClip k of embedding tables and an untied head; 0 = row absmax", min=0)
    gptq_calibration_source: str = knob("selfgen", "GPTQ inputs: selfgen (sampled by the model, no data read) or "
                                        "train (training shards, inside the training budget)",
                                        choices=("selfgen", "train"))
    gptq_calibration_batches: int = knob(16, "calibration batches over all ranks", gt=0)
    gptq_calibration_seqs: int = knob(8, "sequences per calibration batch", gt=0)
    gptq_calibration_seq_len: int = knob(0, "calibration sequence length; 0 = TRAIN_SEQ_LEN", min=0)
    gptq_selfgen_temperature: float = knob(0.8, "sampling temperature of selfgen calibration", gt=0)
    gptq_damping: float = knob(0.01, "added to the Hessian diagonal, times its mean", gt=0)
    gptq_tied_embed_damping: float = knob(0.5, "the same for the tied embedding: its Hessian is the head's input "
                                          "only, and the larger diagonal stands for its use as the input table, "
                                          "where plain weight error counts", gt=0)
    gptq_block_size: int = knob(128, "columns per GPTQ block", gt=0)
    gptq_act_order: bool = knob(True, "quantize columns with the largest Hessian diagonal first")
    compressor: str = knob("zlib", "artifact coder: zlib (level 9), lzma (9e), brotli (byte shuffle + quality 11), "
                           "ans (context-modelled rANS for the codes, fp16 tensors and scales where it beats "
                           "brotli; brotli for the rest)",
                           choices=("zlib", "lzma", "brotli", "ans"))
    lqer_enabled: bool = knob(False, "low-rank correction of the quantization error on the LQER_TOP_K "
                              "costliest tensors")
    lqer_rank: int = knob(4, "rank of the LQER correction", gt=0)
    lqer_top_k: int = knob(3, "tensors that get an LQER correction", gt=0)
    lqer_factor_bits: int = knob(4, "bits of the LQER factors", min=2, max=8)
    lqer_a_bits: int = knob(0, "bits of the LQER A factor (R0427: 2); 0 = LQER_FACTOR_BITS", min=0, max=8)
    lqer_asym_enabled: bool = knob(True, "LQER factor scales: per column of A and per group of B (else per row)")
    lqer_asym_group: int = knob(64, "values of B per scale in the asymmetric form", gt=0)
    artifact_margin_bytes: int = knob(0, "auto-fit target: code + model bytes <= 16,000,000 minus this", min=0)
    auto_fit: bool = knob(True, "shrink an over-limit model until it fits (clip sigmas, one group's bits, +-1 "
                          "pruning); fill an under-limit one unless AUTO_FIT_FILL=0")
    auto_fit_fill: bool = knob(True, "with AUTO_FIT, spend the bytes an under-limit model leaves (sdclip/gptq): a "
                               "finer grid, or a bit more, on the group where a byte buys the most weighted error")
    eval_only: bool = knob(False, "no training: score the artifact at ARTIFACT_PATH (model settings come from it)")
    artifact_path: str = knob("", "artifact scored by EVAL_ONLY: the final_model.*.ptz of a run folder")

    def __post_init__(self) -> None:
        for f in fields(self):  # each knob's own rules, in field order
            value, meta, name = getattr(self, f.name), f.metadata, f.name.upper()
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(meta['choices'])}")
            for key, relation, holds in BOUND_CHECKS:
                bound = shown = meta[key]
                if isinstance(bound, str):  # a bound set by another knob
                    bound = getattr(self, bound)
                    shown = f"{shown.upper()}={bound}"
                if bound is not None and not holds(value, bound):
                    raise ConfigError(f"{name}={value} must be {relation} {shown}")
        for name in ("attn_bits", "mlp_bits", "head_bits", "lqer_a_bits"):
            if getattr(self, name) == 1:
                raise ConfigError(f"{name.upper()}=1 must be in [2, 8] (0 = inherit)")
        if self.bigram_vocab_size == 1:
            raise ConfigError("BIGRAM_VOCAB_SIZE=1 must be 0 (off) or >= 2")
        for big, small in (("model_dim", "num_heads"), ("num_heads", "num_kv_heads")):
            if getattr(self, big) % getattr(self, small):
                raise ConfigError(f"{big.upper()}={getattr(self, big)} must be divisible by "
                                  f"{small.upper()}={getattr(self, small)}")
        if self.head_dim % 2:
            raise ConfigError(f"head dim MODEL_DIM/NUM_HEADS={self.head_dim} must be even for RoPE")
        if not self.tokenizer_path.endswith(".model"):
            raise ConfigError(f"TOKENIZER_PATH={self.tokenizer_path!r} must be a SentencePiece .model file")
        if self.rope_dims and (self.rope_dims % 2 or self.rope_dims > self.head_dim):
            raise ConfigError(f"ROPE_DIMS={self.rope_dims} must be even and <= the head dim {self.head_dim} (0 = all)")
        gates = [n for n in ("attn_out_gate_enabled", "gated_attn_enabled", "sparse_attn_gate_enabled") if getattr(self, n)]
        if len(gates) > 1:
            raise ConfigError(f"{' and '.join(g.upper() for g in gates)} are mutually exclusive; enable at most one")
        if self.num_loops and not (self.loop_start <= self.loop_end < self.num_layers):
            raise ConfigError(f"LOOP_START={self.loop_start} <= LOOP_END={self.loop_end} < NUM_LAYERS={self.num_layers} "
                              "must hold when NUM_LOOPS > 0")
        if self.lr_warmup_frac + self.warmdown_frac > 1:
            raise ConfigError(f"LR_WARMUP_FRAC + WARMDOWN_FRAC = {self.lr_warmup_frac + self.warmdown_frac} must be <= 1")
        if self.prequant_ttt_source == "val" and not self.allow_val_adaptation:
            raise ConfigError("PREQUANT_TTT_SOURCE=val adapts on validation tokens before scoring them (C3): set "
                              "ALLOW_VAL_ADAPTATION=1 (a non-record run)")
        if self.compile != "0" and self.compile_backend != "inductor":  # listing the backends takes ~1.5 s
            known = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in known:
                raise ConfigError(f"COMPILE_BACKEND={self.compile_backend!r} is not a torch.compile backend; known: "
                                  f"{', '.join(known)}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def effective_eval_seq_len(self) -> int:
        return self.eval_seq_len or self.train_seq_len

    @property
    def max_wallclock_ms(self) -> float | None:
        return 1000.0 * self.max_wallclock_seconds if self.max_wallclock_seconds > 0 else None

    def grad_accum_for(self, world_size: int) -> int:
        if self.grad_accum_steps:
            return self.grad_accum_steps
        if 8 % world_size:
            raise ConfigError(f"WORLD_SIZE={world_size} must divide 8 when GRAD_ACCUM_STEPS=0; set GRAD_ACCUM_STEPS "
                              "explicitly")
        return 8 // world_size

    def check_world(self, world_size: int) -> None:
        """The batch rules that depend on the number of ranks."""
        accum = self.grad_accum_for(world_size)
        unit = world_size * accum * self.train_seq_len
        if self.train_batch_tokens % unit:
            raise ConfigError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be divisible by WORLD_SIZE*"
                              f"grad_accum*TRAIN_SEQ_LEN={world_size}*{accum}*{self.train_seq_len}={unit}")
        if self.val_batch_size < unit:
            raise ConfigError(f"VAL_BATCH_SIZE={self.val_batch_size} must be >= WORLD_SIZE*grad_accum*"
                              f"TRAIN_SEQ_LEN={unit}")

    @classmethod
    def from_env(cls, environ=os.environ) -> "Hyperparameters":
        refuse_public_only_knobs(environ, cls.knob_names())
        recipe = environ.get("RECIPE", DEFAULT_RECIPE).strip()  # an unknown one fails the `recipe` knob's check
        values = dict(RECIPES.get(recipe, {}), recipe=recipe)
        for f in fields(cls):
            name = f.name.upper()
            if name in environ:
                values[f.name] = parse_env_value(name, environ[name], type(f.default))
        num_layers = values.get("num_layers", cls.num_layers)
        values = {k: v(num_layers) if isinstance(v, PerDepth) else v for k, v in values.items()}
        return cls(**values)

    @classmethod
    def knob_names(cls) -> set[str]:
        return {f.name.upper() for f in fields(cls)}

    def describe(self, environ=os.environ) -> list[str]:
        """One line per knob with where its value came from: env, recipe or default."""
        recipe = RECIPES[self.recipe]

        def source(name: str) -> str:
            if name.upper() in environ:
                return "env"
            if isinstance(recipe.get(name), PerDepth):
                return f"recipe: {recipe[name].formula}"
            return "recipe" if name in recipe else "default"

        return [f"  {f.name}: {getattr(self, f.name)!r} ({source(f.name)})" for f in fields(self)]


def knob_view(*names: str):
    """Class decorator: a frozen dataclass whose fields are these Hyperparameters knobs, under their own
    names, types and defaults (declared once, in Hyperparameters), after the class's own fields (values
    computed from the knobs); `from_hparams(hp, **computed)` reads them off."""
    def make(cls):
        knobs = {f.name: f for f in fields(Hyperparameters)}
        cls.__annotations__ = dict(cls.__dict__.get("__annotations__", {}), **{n: knobs[n].type for n in names})
        for n in names:
            setattr(cls, n, knobs[n].default)
        cls.from_hparams = classmethod(lambda c, hp, **values: c(**{n: getattr(hp, n) for n in names} | values))
        return dataclass(frozen=True)(cls)
    return make


@dataclass(frozen=True)
class PerDepth:
    """A recipe value that follows NUM_LAYERS, so shrinking the recipe (NUM_LAYERS=4 for a smoke test)
    keeps it valid and keeps its shape: resolved after the env is read, unless the env sets the knob."""

    formula: str  # as shown in the README and the config log
    rule: object  # num_layers -> value

    def __call__(self, num_layers: int) -> int:
        return self.rule(num_layers)


# RECIPE=record: the strongest legal 8xH100 stack known (public records R0409/R0427 lineage):
# SP8192 data, 11x512 with MLP 4x LeakyReLU^2, XSA everywhere, partial RoPE 16, LN scale, skip
# gates, layers 3-5 looped twice from 35% of training, two-lane parallel residuals from layer 8,
# SmearGate with the BOS fix, sparse attention gate, QK-gain 5, attention masked to each document
# (R0427's varlen attention), orthogonal init, seq 2048 x 786,432-token batches;
# scored by sliding windows (stride 64) and finally by phased score-first TTT with LoRA (R0427).
# The depth-dependent choices are rules of NUM_LAYERS that give exactly those values at 11 layers:
# XSA on all layers, parallel residuals on the last 3, the loop over the middle (3/11 to 6/11).
DEFAULT_RECIPE = "record"
RECIPES = {  # name -> {knob field: value or PerDepth}
    "baseline": {},
    "record": dict(
        data_path="./data/datasets/fineweb10B_sp8192", tokenizer_path="./data/tokenizers/fineweb_8192_bpe.model",
        vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
        mlp_activation="leaky_relu2", xsa_last_n=PerDepth("NUM_LAYERS", lambda n: n), rope_dims=16,
        ln_scale=True, skip_gates_enabled=True, num_loops=2, enable_looping_at=0.35,
        loop_start=PerDepth("3*NUM_LAYERS//11", lambda n: 3 * n // 11),
        loop_end=PerDepth("ceil(6*NUM_LAYERS/11)-1", lambda n: -(-6 * n // 11) - 1),
        parallel_start_layer=PerDepth("max(NUM_LAYERS-3, 0)", lambda n: max(n - 3, 0)), parallel_mode="two_lane",
        parallel_final_lane="mean", parallel_x0_mix="read", doc_masked_attention=True, ortho_init=True,
        smear_gate_enabled=True, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5, qk_gain_init=5.0,
        train_seq_len=2048, train_batch_tokens=786_432, train_loader="shuffled", val_loss_every=4000,
        train_log_every=500,
        tied_embed_lr=0.03, matrix_lr=0.026, scalar_lr=0.02, beta2=0.99, muon_momentum=0.97,
        muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500, grad_clip_norm=0.3,
        muon_ns_coefficients="polar_express", muon_row_normalize=True, muon_wd=0.095, embed_wd=0.085, adam_wd=0.02,
        warmdown_frac=0.85, min_lr=0.1, ema_decay=0.9965, eval_stride=64,
        # R0427's export: GPTQ int6 matrices (MLP k=11.5, attention k=13), int7 embedding (k=14), LQER
        # rank 4 on the top 3 tensors (A int2, B int4 in groups of 64), calibrated on 16 batches of
        # training data inside the training budget
        quant_method="gptq", matrix_bits=6, embed_bits=7, mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0,
        embed_clip_sigmas=14.0, lqer_enabled=True, lqer_rank=4, lqer_top_k=3, lqer_a_bits=2, lqer_factor_bits=4,
        lqer_asym_enabled=True, lqer_asym_group=64, gptq_calibration_source="train", gptq_calibration_batches=16,
        compressor="ans",  # 1-2% smaller than brotli on trained models, ~2 s to decode at full size (docs/RESULTS.md)
        # R0427's final evaluation pass: phased TTT with per-document LoRA (its run's values)
        ttt_enabled=True, ttt_mode="phased", ttt_lora_rank=80, ttt_lora_lr=1e-4, ttt_lora_alpha=144.0,
        ttt_warm_start_a=True, ttt_weight_decay=0.5, ttt_beta1=0.0, ttt_beta2=0.99,
        phased_ttt_prefix_docs=2500, phased_ttt_num_phases=3,
    ),
}


def parse_env_value(name: str, raw: str, kind: type):
    """An env value as the knob's type (that of its default): str, bool, int or a finite float."""
    text = raw.strip()
    if kind is str:
        return text
    if kind is bool:
        if text.lower() not in ("0", "1", "false", "true"):
            raise ConfigError(f"{name}={raw!r} must be a boolean: 0, 1, true or false")
        return text.lower() in ("1", "true")
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} must be {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):  # float only: int() refuses "inf" and "nan"
        raise ConfigError(f"{name}={raw!r} must be a finite number")
    return value


# Env names of the public scripts (BASE, R0409, R0427) that this script does not read. A command
# copied from a public record must not silently run something else, so `from_env` refuses them,
# except for the listed values, which ask for what this script does anyway ("*" = any value: the
# public script ignores it too). Each reason says what to set instead. A name that is also one of our
# knobs is never refused. The data scripts' names (MATCHED_FINEWEB_*) are not train_gpt.py's.
PUBLIC_ONLY_KNOBS = {  # env name -> (harmless values, reason: what to do instead, and why where it helps)
    # paths and run control
    "DATA_DIR": (("./data", "./data/"), "set DATA_PATH (the shard folder) and TOKENIZER_PATH"),
    "TTT_EVAL_ONLY": (("0",), "renamed: set EVAL_ONLY=1 ARTIFACT_PATH=<run folder>/final_model.*.ptz (TTT included)"),
    "PREQUANT_ONLY": (("0",), "every run quantizes: unset it and read the 'pre-quantization' log line"),
    # validation: the score always covers the whole validation set (spec 9, bug 19)
    "VAL_BATCH_TOKENS": ((), "renamed: set VAL_BATCH_SIZE (tokens over all ranks)"),
    "VAL_DOC_FRACTION": (("1",), "a partial validation set gives a wrong score: unset it (quick runs: "
                         "data/prepare_sample.py)"),
    "TTT_EVAL_BATCHES": (("",), "a partial validation set gives a wrong score: unset it (quick runs: "
                         "data/prepare_sample.py)"),
    "SLIDING_WINDOW_ENABLED": ((), "renamed: set EVAL_STRIDE=64 (sliding windows) or 0 (flat only)"),
    "FUSED_CE_ENABLED": (("*",), "a GPU kernel choice, no effect on the score: safe to drop"),
    # architecture
    "EMBEDDING_DIM": ((), "no factorised embedding here: unset it"),
    "PARALLEL_RESIDUAL_START": ((), "renamed: set PARALLEL_START_LAYER (PARALLEL_MODE=gptj for R0409's form)"),
    "ROPE_TRAIN_SEQ_LEN": ((), "the NTK RoPE rescale is relative to TRAIN_SEQ_LEN: unset it"),
    "ROPE_YARN": (("1",), "the NTK rescale past TRAIN_SEQ_LEN is always on: unset it"),
    "ATTN_OUT_GATE_SRC": (("proj",), "the output gate always reads the attention input (proj): unset it"),
    "GATED_ATTN_QUANT_GATE": (("0",), "gate weights are control tensors, never quantized: unset it"),
    # optimizer
    "MUON_BETA2": (("*",), "unused in R0409 too: safe to drop"),
    # evaluation-time logit bias (breaks C2; R0409's ETLB_ENABLED=1 path crashes, spec 9 bug 4)
    "ETLB_ENABLED": (("0",), "a logit bias is not a normalised model (C2): unset it"),
    "ETLB_LR": (("*",), "read only with ETLB_ENABLED=1 (not built): safe to drop"),
    "ETLB_STEPS": (("*",), "read only with ETLB_ENABLED=1 (not built): safe to drop"),
    "ETLB_CLIP": (("*",), "read only with ETLB_ENABLED=1 (not built): safe to drop"),
    # test-time training
    "PHASED_TTT_ENABLED": ((), "renamed: set TTT_ENABLED=1 TTT_MODE=phased"),
    "TTT_OPTIMIZER": (("adam",), "the adapters always use AdamW (TTT_BETA1, TTT_BETA2, TTT_WEIGHT_DECAY): unset it"),
    "TTT_GRAD_STEPS": (("1",), "one adapter step per scored chunk: unset it"),
    "TTT_EVAL_SEQ_LEN": ((), "renamed: set EVAL_SEQ_LEN (every evaluation pass)"),
    "GLOBAL_TTT_MOMENTUM": ((), "renamed: set TTT_MOMENTUM (shared by all TTT SGD)"),
    "GLOBAL_TTT_CHUNK_TOKENS": ((), "renamed: set TTT_CHUNK_TOKENS (the global phases' cosine-LR groups)"),
    "GLOBAL_TTT_BATCH_SEQS": ((), "renamed: set TTT_BATCH_SEQS, over all ranks (R0427: per rank)"),
    "GLOBAL_TTT_GRAD_CLIP": ((), "renamed: set TTT_GRAD_CLIP (shared by all TTT SGD)"),
    "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES": (("1",), "global-phase sequences never cross a document: unset it"),
    "GLOBAL_TTT_WARMUP_CHUNKS": (("0",), "the global phases have no LR warm-up: unset it"),
    "GLOBAL_TTT_WARMUP_START_LR": (("*",), "read only with GLOBAL_TTT_WARMUP_CHUNKS > 0 (not built): safe to drop"),
    # quantization
    "GPTQ_RESERVE_SECONDS": ((), "the reserve is measured (GPTQ_CALIBRATION_SOURCE=train) or not needed (selfgen): "
                             "unset it"),
    "CONTROL_TENSOR_NAME_PATTERNS": ((), "the list is CONTROL_TENSOR_NAMES in train_gpt.py: edit it there"),
    "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS": ((), "fp32 passthrough follows CONTROL_TENSOR_NAMES in train_gpt.py: "
                                           "edit it there"),
}


def _same_value(raw: str, wanted: str) -> bool:
    text = raw.strip()
    try:
        return float(text) == float(wanted)
    except ValueError:
        return text == wanted


def refuse_public_only_knobs(environ, knob_names: set[str]) -> None:
    """ConfigError naming every public-only env name set to a value this script would not honour."""
    bad = [f"{name}={environ[name].strip()} is the public scripts' knob, not read here; {reason}"
           for name, (harmless, reason) in PUBLIC_ONLY_KNOBS.items()
           if name in environ and name not in knob_names
           and not any(h == "*" or _same_value(environ[name], h) for h in harmless)]
    if bad:
        raise ConfigError(" | ".join(bad))


# difflib ratio: one-letter typos of our names score >= 0.88; system and launcher names (OMP_NUM_THREADS,
# LOCAL_RANK, WORLD_SIZE, ...) stay below 0.8 (tests/test_config.py lists them).
TYPO_CUTOFF = 0.85


def env_name_warnings(environ, knob_names: set[str]) -> list[str]:
    """Warnings for env names that look like a mistyped knob (NUM_LAYER for NUM_LAYERS): close to one
    of ours, strictly enough that system, torchrun, CUDA and shell names stay quiet. Never an error."""
    return [f"warning: env {name} is not a knob of this script and is ignored; did you mean {match}?"
            for name in sorted(environ)
            if name not in knob_names and name not in PUBLIC_ONLY_KNOBS and re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", name)
            for match in difflib.get_close_matches(name, knob_names, n=1, cutoff=TYPO_CUTOFF)]


# ==================================================================================================
# RUNTIME & LOGGING
# ==================================================================================================
# Owns the process: `Runtime` (rank, device: facts, not hyperparameters), autocast, the collectives,
# the rank-0 `RunLog`, atomic writes with one-line file-system errors, and the stop signals. A single
# process runs without a process group; under torchrun it is NCCL on CUDA and gloo on CPU.


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    control_group: object = None  # a gloo group for host-side agreements (no GPU sync); None = default

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(hp: Hyperparameters, environ=os.environ) -> Runtime:
    distributed = "RANK" in environ and "WORLD_SIZE" in environ
    local_rank = int(environ.get("LOCAL_RANK", 0))
    cuda = hp.device == "cuda" or (hp.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ConfigError("DEVICE=cuda but no CUDA device is available; use DEVICE=cpu or auto")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    control_group = dist.new_group(backend="gloo") if distributed and cuda else None
    return Runtime(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), local_rank, device, distributed,
                   control_group)


def shutdown_runtime(rt: Runtime, clean: bool = True) -> None:
    if rt.distributed and dist.is_initialized():
        if clean:  # after a stop signal the ranks may be in different collectives: just leave
            barrier()  # no rank tears down its connections while another is still using them
        dist.destroy_process_group()


def autocast_context(hp: Hyperparameters, device: torch.device):
    """bf16 autocast on CUDA; float32 on CPU by default (bf16 matmuls are ~10x slower on our CPUs)."""
    if resolved_compute_dtype(hp, device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolved_compute_dtype(hp: Hyperparameters, device: torch.device) -> str:
    if hp.compute_dtype != "auto":
        return hp.compute_dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def agree_max(values: list[float], rt: Runtime) -> list[float]:
    """The max over ranks of each host-side value, through a CPU gloo group: no device sync."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=rt.control_group)
    return t.tolist()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class RunLog:
    """Rank-0 log: `key:value` lines to stdout and to the run folder's train.log."""

    def __init__(self, path: Path | None, is_main: bool):
        self.path, self.is_main = path, is_main
        if path is not None and is_main:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.is_main:
            return
        if console:
            print(msg, flush=True)
        if self.path is not None:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(msg + "\n")
            except OSError as e:
                raise filesystem_error(e, self.path) from None


# What to do about a failed write, by errno (the run folder is the usual place).
FILESYSTEM_FIXES = {
    errno.ENOSPC: "the disk is full: free space or set ARTIFACT_DIR to a disk with room",
    errno.EDQUOT: "the disk quota is used up: free space or set ARTIFACT_DIR to a disk with room",
    errno.EROFS: "the file system is read-only: set ARTIFACT_DIR to a writable folder",
    errno.EACCES: "no write permission: set ARTIFACT_DIR to a folder you can write",
    errno.EPERM: "no write permission: set ARTIFACT_DIR to a folder you can write",
    errno.ENOTDIR: "a file stands where a folder should be: remove it or set ARTIFACT_DIR elsewhere",
    errno.EEXIST: "a file stands where a folder should be: remove it or set ARTIFACT_DIR elsewhere",
    errno.ENAMETOOLONG: "the name is too long: use a shorter RUN_ID or ARTIFACT_DIR",
}


def filesystem_error(e: OSError, path: Path | str) -> RunError:
    """One line for a failed file-system call: the path, the cause and the fix."""
    fix = FILESYSTEM_FIXES.get(e.errno, "check that ARTIFACT_DIR is a writable folder with free space")
    return RunError(f"cannot write {e.filename or path}: {e.strerror or e.__class__.__name__}; {fix}")


def write_atomic(path: Path, payload: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a truncated file behind."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise filesystem_error(e, path) from None
        raise


# SIGTERM (schedulers, torchrun stopping its workers) and SIGHUP (a closed terminal) stop a run the way
# Ctrl-C does: `RunStopped` is raised in the main thread, so the manifest records "failed" with the
# signal and no half-written file is left under its final name. A repeat while the run records its
# failure is ignored. `main()` installs the handlers on every rank.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class RunStopped(BaseException):  # like KeyboardInterrupt: no `except Exception` may swallow it
    """A stop signal arrived; the message is the signal's name."""


STOP_SIGNAL_RECEIVED = []  # the name of the signal that stopped this process's run, if any


@contextlib.contextmanager
def stop_signals_raise(restore: bool = True):
    """While active, SIGTERM and SIGHUP raise RunStopped (in the main thread only, as Python requires).
    After it, they get their previous handlers back, or with restore=False are ignored: a process that
    is about to exit has nothing left to stop (torchrun signals the other workers once one has exited)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP_SIGNAL_RECEIVED.clear()

    def handler(signum, frame):
        if not STOP_SIGNAL_RECEIVED:
            STOP_SIGNAL_RECEIVED.append(signal.Signals(signum).name)
            raise RunStopped(STOP_SIGNAL_RECEIVED[0])

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if restore else signal.SIG_IGN)
        STOP_SIGNAL_RECEIVED.clear()


# ==================================================================================================
# DATA
# ==================================================================================================
# Owns the tokens and their bytes: the shard reader, the two training loaders (TRAIN_LOADER), the
# validation tokens, the tokenizer checks and byte tables, and the CaseOps byte sidecar.
#
# Shards: 256 little-endian int32 header (magic 20240520, version 1, token count) then uint16
# tokens; every document is BOS (id 1) + its tokens. This reader duplicates data/shards.py on
# purpose: only this file counts as code in a submission, so it imports nothing from data/.
#
# Bits per byte is tokenizer-agnostic: the summed NLL in nats over every validation target,
# divided by ln 2 and by the number of UTF-8 bytes those targets stand for. Bytes come from
# SentencePiece lookup tables, or from the validation byte sidecar when the data has one (CaseOps,
# below), and are checked at start against the decoded validation text.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
BOS_ID = 1


def shard_token_count(path: str | Path) -> int:
    """The token count of a shard, after checking its header and size (a corrupt file stops the run)."""
    header_bytes = SHARD_HEADER_INTS * 4
    size = os.path.getsize(path)
    if size < header_bytes:
        raise RunError(f"{path}: {size} bytes is shorter than a shard header; re-create or re-download it")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise RunError(f"{path}: bad shard magic/version {header[0]}/{header[1]}, expected {SHARD_MAGIC}/1")
    num_tokens = int(header[2])
    if size != header_bytes + 2 * num_tokens:
        raise RunError(f"{path}: size {size} does not match header token count {num_tokens}; file is corrupt")
    return num_tokens


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as uint16 (numpy only: safe in a prefetch thread, see TokenStream)."""
    return np.fromfile(path, dtype="<u2", count=shard_token_count(path), offset=SHARD_HEADER_INTS * 4)


def load_data_shard(path: str | Path) -> torch.Tensor:
    return torch.from_numpy(read_shard(path).astype(np.int64))


def memmap_data_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only memory map: nothing is read until a window is taken."""
    num_tokens = shard_token_count(path)
    if num_tokens == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(num_tokens,))


def check_token_ids(tokens: np.ndarray, vocab_size: int | None, path: str | Path) -> None:
    """Stop unless every id is below VOCAB_SIZE (numpy only: runs in the loaders' prefetch threads)."""
    if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
        raise RunError(f"training shard {path} holds token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size} (another "
                       "tokenizer's data); make DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE match")


def shard_files(data_path: str, split: str) -> list[str]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(f for f in glob.glob(pattern) if "_bytes_" not in os.path.basename(f))
    if not files:
        raise RunError(f"no {split} shards match {pattern}; set DATA_PATH (data/cached_challenge_fineweb.py fetches "
                       "shards)")
    return files


# The loaders' prefetch threads do numpy work only, never a torch operator: a torch op in a second
# thread starts a second OpenMP team, and once a process has more OpenMP threads than cores, libgomp
# stops spin-waiting between parallel regions, so the training step's threads go to sleep after every
# operator and must be woken for the next (measured: 1.3x slower per step at the tiny shape on 2
# cores, the gap issue 12 found; tests/test_train.py checks no OpenMP thread is added).


class TokenStream:
    """Reads training shards forever, in an order set by the seed: each pass visits the shards in a
    seeded permutation and starts each shard at a seeded offset (wrapping around to its start).
    The next shard is read in a background thread while the current one is consumed; tokens stay
    uint16 until a batch is taken. The last `holdout_tokens` of the last shard are never read (the
    pre-quantization TTT slice). Each shard's ids are checked against `vocab_size` as it is read."""

    def __init__(self, files: list[str], seed: int, holdout_tokens: int = 0, vocab_size: int | None = None):
        self.files, self.holdout_tokens, self.vocab_size = files, holdout_tokens, vocab_size
        self.total_tokens = sum(shard_token_count(f) for f in files) - holdout_tokens
        self.tokens_taken = 0
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = self.pool.submit(self._load_next)
        self.tokens, self.pos = self._next_shard(), 0

    def _load_next(self) -> np.ndarray:  # runs in the prefetch thread: numpy only
        if not self.order:
            self.order = self.rng.permutation(len(self.files)).tolist()
        index = self.order.pop(0)
        tokens = read_shard(self.files[index])
        check_token_ids(tokens, self.vocab_size, self.files[index])
        if index == len(self.files) - 1:
            tokens = tokens[: len(tokens) - self.holdout_tokens]
        offset = int(self.rng.integers(0, len(tokens))) if len(tokens) else 0
        return np.roll(tokens, -offset)  # starts at the offset, wraps around to the shard's start

    def _next_shard(self) -> np.ndarray:
        tokens = self.pending.result()
        self.pending = self.pool.submit(self._load_next)  # prefetch the one after
        return tokens

    def close(self) -> None:
        """Stop prefetching (a pending read is abandoned) and release the thread."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def take(self, n: int) -> torch.Tensor:
        """The next n tokens, as int64."""
        self.tokens_taken += n
        chunks = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.tokens, self.pos = self._next_shard(), 0
                continue
            k = min(n, len(self.tokens) - self.pos)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos, n = self.pos + k, n - k
        return torch.from_numpy(np.concatenate(chunks).astype(np.int64))


class DistributedTokenLoader(TokenStream):
    """All ranks read the same seeded stream in lock-step; rank r keeps its slice of each chunk.

    One micro-step consumes (local_tokens + 1) * world_size tokens, so a single process with 8
    micro-steps and 2 processes with 4 micro-steps each see exactly the same sequence blocks.
    """

    def __init__(self, files: list[str], rank: int, world_size: int, device: torch.device, seed: int = 0,
                 holdout_tokens: int = 0, vocab_size: int | None = None):
        super().__init__(files, seed, holdout_tokens, vocab_size)
        self.rank, self.world_size, self.device = rank, world_size, device

    def epochs_consumed(self) -> float:
        """Training data seen, in epochs (tokens read over tokens in the training shards)."""
        return self.tokens_taken / max(self.total_tokens, 1)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = global_tokens // (self.world_size * grad_accum) + 1  # this rank's tokens and the next target
        mine = self.take(span * self.world_size)[self.rank * span : (self.rank + 1) * span]
        return tuple(t.reshape(-1, seq_len).to(self.device, non_blocking=True) for t in (mine[:-1], mine[1:]))


class ShuffledWindowLoader:
    """TRAIN_LOADER=shuffled: fixed-length sequences from all over the training data, in a seeded order.

    Each epoch, every shard gets a seeded random phase in [0, seq_len) and is cut into windows of
    seq_len + 1 tokens starting at phase + k * seq_len (each token is a target once per epoch); all
    windows of all shards are then visited in one seeded random permutation, without replacement, and
    the next epoch draws new phases and a new permutation. The order depends only on the seed and the
    epoch. Every micro-step takes the next world_size * n windows of that one global order and rank r
    keeps windows [r * n, (r + 1) * n), so 1 process x 8 micro-steps and 2 ranks x 4 micro-steps see
    the same sequences. Shards are memory-mapped; the next batch is gathered in a background thread.
    No window reaches into the last `holdout_tokens` of the last shard (the pre-quantization TTT slice).
    Shards are never read whole, so the ids are checked against `vocab_size` per batch: the windows of
    all ranks, so that every rank stops at the same batch.
    """

    def __init__(self, files: list[str], rank: int, world_size: int, device: torch.device, seed: int, seq_len: int,
                 holdout_tokens: int = 0, vocab_size: int | None = None):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.seed, self.seq_len, self.files, self.vocab_size = seed, seq_len, files, vocab_size
        self.shards = [memmap_data_shard(f) for f in files]
        self.sizes = np.array([len(t) for t in self.shards], dtype=np.int64)
        self.sizes[-1] -= holdout_tokens  # windows are cut from the sizes, so the held-out tail is never read
        self.windows_delivered = 0
        self._start_epoch(0)
        if self.windows_per_epoch == 0:
            raise RunError(f"no training shard holds TRAIN_SEQ_LEN+1={seq_len + 1} tokens; lower TRAIN_SEQ_LEN")
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None  # (request, future) of the prefetched batch

    def _start_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        max_phase = np.minimum(self.seq_len - 1, self.sizes - self.seq_len - 1)  # < 0: no window fits
        self.phases = np.floor(rng.random(len(self.sizes)) * (np.maximum(max_phase, 0) + 1)).astype(np.int64)
        counts = np.where(max_phase >= 0, (self.sizes - self.phases - 1) // self.seq_len, 0)
        self.first_window = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's window 0
        self.windows_per_epoch = int(self.first_window[-1])
        self.order = rng.permutation(self.windows_per_epoch)
        self.epoch, self.cursor = epoch, 0

    def _take_windows(self, n: int) -> list[tuple[int, int]]:
        """The next n windows of the global order as (shard, start token), crossing into new epochs."""
        taken: list[tuple[int, int]] = []
        while len(taken) < n:
            if self.cursor == self.windows_per_epoch:
                self._start_epoch(self.epoch + 1)
            ids = self.order[self.cursor : self.cursor + n - len(taken)]
            self.cursor += len(ids)
            shard = np.searchsorted(self.first_window, ids, side="right") - 1
            start = self.phases[shard] + (ids - self.first_window[shard]) * self.seq_len
            taken.extend(zip(shard.tolist(), start.tolist()))
        return taken

    def _gather(self, request: tuple[int, int, int]) -> np.ndarray:  # runs in the prefetch thread
        global_tokens, seq_len, grad_accum = request
        per_rank = global_tokens // (self.world_size * grad_accum * seq_len)
        everyone = self._take_windows(per_rank * self.world_size)
        for s, start in everyone:
            check_token_ids(self.shards[s][start : start + seq_len + 1], self.vocab_size, self.files[s])
        windows = everyone[self.rank * per_rank : (self.rank + 1) * per_rank]
        return np.stack([self.shards[s][start : start + seq_len + 1] for s, start in windows])  # numpy only

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert seq_len == self.seq_len, "the windows are cut for TRAIN_SEQ_LEN"
        request = (global_tokens, seq_len, grad_accum)
        if self.pending is None or self.pending[0] != request:
            if self.pending:  # a different request: the prefetched windows are skipped, in order
                self.pending[1].result()
            self.pending = (request, self.pool.submit(self._gather, request))
        batch = torch.from_numpy(self.pending[1].result().astype(np.int64))
        self.pending = (request, self.pool.submit(self._gather, request))  # prefetch the next one
        self.windows_delivered += batch.size(0) * self.world_size
        return tuple(t.to(self.device, non_blocking=True) for t in (batch[:, :-1], batch[:, 1:]))

    def epochs_consumed(self) -> float:
        """Training data seen, in epochs (windows delivered to all ranks over windows per epoch)."""
        return self.windows_delivered / self.windows_per_epoch

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def make_train_loader(kind: str, files: list[str], rank: int, world_size: int, device: torch.device, seed: int,
                      seq_len: int, holdout_tokens: int = 0, vocab_size: int | None = None):
    if kind == "shuffled":
        return ShuffledWindowLoader(files, rank, world_size, device, seed, seq_len, holdout_tokens, vocab_size)
    return DistributedTokenLoader(files, rank, world_size, device, seed, holdout_tokens, vocab_size)


def train_holdout_tokens(hp: Hyperparameters, train_files: list[str]) -> int:
    """Tokens at the end of the last training shard that training never reads: the pre-quantization
    TTT slice (see prequant_ttt_tokens), so that TTT adapts on data the model has not trained on."""
    if not (hp.prequant_ttt_enabled and hp.prequant_ttt_source == "train"):
        return 0
    last = shard_token_count(train_files[-1])
    holdout = min(hp.prequant_ttt_tokens + 1, last)
    if holdout >= last and len(train_files) == 1:
        raise RunError(f"PREQUANT_TTT_TOKENS={hp.prequant_ttt_tokens} holds out the whole training shard; lower it")
    return holdout


def load_validation_tokens(data_path: str) -> torch.Tensor:
    """Every validation token, in order. Nothing is trimmed: all len-1 targets get scored."""
    tokens = torch.cat([load_data_shard(f) for f in shard_files(data_path, "val")])
    if tokens.numel() < 2:
        raise RunError(f"validation shards under {data_path} hold {tokens.numel()} tokens, < 2")
    if int(tokens[0]) != BOS_ID:
        raise RunError("validation stream must start with BOS (id 1)")
    return tokens


@dataclass(frozen=True)
class ByteLuts:
    """Per-token byte tables, indexed by token id (see `target_bytes`), and the validation byte sidecar,
    indexed by token position: when present, every pass counts target t's bytes as `val_bytes[t]`."""

    base_bytes: torch.Tensor  # int16: UTF-8 bytes of the piece without its leading "▁"; 1 for <0xNN>
    has_leading_space: torch.Tensor  # bool: the piece starts with "▁"
    is_boundary: torch.Tensor  # bool: control/unknown/unused pieces (BOS, ...) and ids past the vocab
    val_bytes: np.ndarray | None = None  # uint16 per validation token (host memory), or None: the tables count

    def to(self, device: torch.device) -> "ByteLuts":
        tables = (t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary))
        return ByteLuts(*tables, self.val_bytes)


def build_byte_luts(sp: spm.SentencePieceProcessor, table_size: int) -> ByteLuts:
    n = max(int(sp.vocab_size()), table_size)
    base_bytes = torch.zeros(n, dtype=torch.int16)
    has_leading_space = torch.zeros(n, dtype=torch.bool)
    is_boundary = torch.ones(n, dtype=torch.bool)
    for tid in range(int(sp.vocab_size())):
        if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
            continue
        is_boundary[tid] = False
        if sp.is_byte(tid):
            base_bytes[tid] = 1
            continue
        piece = sp.id_to_piece(tid)
        if piece.startswith("\u2581"):
            has_leading_space[tid] = True
            piece = piece[1:]
        base_bytes[tid] = len(piece.encode("utf-8"))
    return ByteLuts(base_bytes, has_leading_space, is_boundary)


def target_bytes(prev_ids: torch.Tensor, target_ids: torch.Tensor, luts: ByteLuts) -> torch.Tensor:
    """UTF-8 bytes each target stands for: its piece, plus 1 for a leading space unless it follows
    BOS/control (the decoder drops a document's first space). The one byte-count used by every eval."""
    extra_space = luts.has_leading_space[target_ids] & ~luts.is_boundary[prev_ids]
    return luts.base_bytes[target_ids].to(torch.int64) + extra_space.to(torch.int64)


def load_tokenizer(hp: Hyperparameters) -> spm.SentencePieceProcessor:
    if not os.path.isfile(hp.tokenizer_path):
        raise RunError(f"TOKENIZER_PATH={hp.tokenizer_path} does not exist; fetch or build it first")
    try:
        sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
    except (RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError (or OSError) with a C++ trace
        raise RunError(f"TOKENIZER_PATH={hp.tokenizer_path} is not a SentencePiece model ({str(e).splitlines()[0][:80]}"
                       "); point TOKENIZER_PATH at the shards' tokenizer") from None
    if int(sp.vocab_size()) != hp.vocab_size:
        if hp.eval_only:  # EVAL_ONLY takes VOCAB_SIZE from the artifact: the tokenizer is what is wrong
            raise RunError(f"the artifact was trained with {hp.vocab_size} pieces but TOKENIZER_PATH={hp.tokenizer_path} "
                           f"has {sp.vocab_size()}; point TOKENIZER_PATH and DATA_PATH at the artifact's data")
        raise RunError(
            f"VOCAB_SIZE={hp.vocab_size} but {hp.tokenizer_path} has {sp.vocab_size()} pieces; set VOCAB_SIZE to match"
        )
    if sp.piece_to_id("\u2581") == sp.unk_id():
        raise RunError(f"{hp.tokenizer_path} has no standalone '\u2581' piece: val_bpb would miscount spaces")
    return sp


DATA_MANIFEST_NAME = "manifest.json"  # written beside the shards by data/export_shards.py


def check_tokenizer_belongs_to_shards(tokenizer_path: str, data_path: str) -> str:
    """Stop unless the tokenizer is the one the shards were made with, when the data manifest says which.

    The byte check below cannot catch every mismatch: a larger tokenizer whose pieces decode the same
    ids to the same text (SP8192 with SP1024 shards) passes it and would train on garbage. Without a
    manifest (e.g. shards fetched from the hub) only the byte check runs; the returned text says so."""
    manifest_path = Path(data_path) / DATA_MANIFEST_NAME
    if not manifest_path.is_file():
        return f"not_verified (no {DATA_MANIFEST_NAME}; the byte check still runs)"
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8"))["tokenizer"]
        want, name = str(recorded["model_sha256"]), recorded.get("model_file", "?")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{manifest_path} has no tokenizer.model_sha256 ({e.__class__.__name__}); re-export the data "
                       "(data/export_shards.py) or remove the file") from None
    have = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    if have != want:
        raise RunError(f"TOKENIZER_PATH={tokenizer_path} (sha256 {have[:12]}) is not the tokenizer of DATA_PATH: "
                       f"{manifest_path} records {name} (sha256 {want[:12]}); point TOKENIZER_PATH at that tokenizer")
    return f"ok (sha256 {have[:12]} matches {manifest_path})"


def validation_byte_totals(sp: spm.SentencePieceProcessor, val_tokens: torch.Tensor, luts: ByteLuts,
                           rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"), *,
                           caseops: bool = False) -> tuple[int, int]:
    """(UTF-8 bytes of the decoded validation text, bytes the evaluation counts), summed over ranks.

    Each rank decodes its share of the documents; CaseOps text is inverted first (`caseops_decode`),
    so the first number is the original text's length. The count is the sidecar's when there is one."""
    bos_positions = (val_tokens == BOS_ID).nonzero().flatten().tolist() + [val_tokens.numel()]
    num_docs = len(bos_positions) - 1
    lo, hi = num_docs * rank // world_size, num_docs * (rank + 1) // world_size
    docs = [val_tokens[bos_positions[i] + 1 : bos_positions[i + 1]].tolist() for i in range(lo, hi)]
    texts = sp.decode(docs) if docs else []
    decoded = sum(len((caseops_decode(text) if caseops else text).encode("utf-8")) for text in texts)
    start, end = bos_positions[lo], bos_positions[hi]  # an empty share counts 0
    if luts.val_bytes is not None:
        counted = int(luts.val_bytes[start:end].sum(dtype=np.int64))
    else:
        seg = val_tokens[start:end]
        prev = torch.cat([seg.new_tensor([BOS_ID]), seg[:-1]])  # each share starts at a BOS, never a target
        counted = int(target_bytes(prev, seg, luts).sum())
    # On the run's device: NCCL reduces only CUDA tensors.
    totals = all_reduce_sum(torch.tensor([decoded, counted], dtype=torch.float64, device=device))
    return int(totals[0]), int(totals[1])


def byte_mismatch(counted: int, decoded: int, luts: ByteLuts) -> RunError:
    if luts.val_bytes is not None:
        return RunError(f"the byte sidecar counts {counted} validation bytes but the decoded text has {decoded}: "
                        "re-download or re-export the data")
    return RunError(f"byte tables count {counted} validation bytes but the decoded text has {decoded}; point "
                    "TOKENIZER_PATH at DATA_PATH's tokenizer")


def check_validation_bytes(sp: spm.SentencePieceProcessor, val_tokens: torch.Tensor, luts: ByteLuts,
                           rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu")) -> int:
    """Fail loudly unless the byte tables count exactly the UTF-8 bytes of the decoded validation text.
    Returns the total number of validation bytes."""
    decoded, counted = validation_byte_totals(sp, val_tokens, luts, rank, world_size, device)
    if decoded != counted:
        raise byte_mismatch(counted, decoded, luts)
    return counted


# CaseOps data (data/caseops.py; the public "lossless_caps_caseops_v1"): in the text, capitals became
# lowercase letters plus operator characters, TITLE / ALLCAPS / CAPNEXT (the next word, the next word all,
# the next letter is uppercase) and ESC (the next character is a literal operator). A piece's bytes are then
# not the original text's (an operator is 3 UTF-8 bytes that never existed), so such data comes with a byte
# sidecar beside the validation shards, fineweb_val_bytes_NNNNNN.bin: the shard format, one count per
# validation token, the original UTF-8 bytes it stands for (BOS and operators 0). Whenever the sidecar is
# there, every pass counts target t's bytes as its entry t; a CaseOps tokenizer without one stops the run.
CASEOPS_OPERATORS = "\ue001\ue002\ue003\ue004"  # TITLE, ALLCAPS, CAPNEXT, ESC
# Each operator with what it applies to; a bare one (the last branch) is malformed. NFKC may make the
# character before an operator an ASCII letter (fullwidth Ａ -> A), so that side is not checked.
_CASEOPS_DECODE_RE = re.compile(r"\ue004([\ue001-\ue004])|\ue002([a-z][A-Za-z]+)|[\ue001\ue003]([a-z])|[\ue001-\ue004]")
# The public sidecar counts the tokenizer's input (SentencePiece surfaces), which the normaliser shrinks
# (newlines and repeated spaces become one space, NFKC), so it may exceed the decoded text by that much.
RAW_SIDECAR_SLACK = 0.05


def _caseops_decode_match(m: re.Match) -> str:
    literal, caps, letter = m.groups()
    if literal or caps or letter:
        return literal or (caps or letter).upper()
    raise RunError(f"validation text is not valid CaseOps: operator U+{ord(m.group()):04X} at character {m.start()} "
                   f"is followed by {m.string[m.end() : m.end() + 1]!r}; re-export the data with data/export_shards.py "
                   "--caseops")


def caseops_decode(text: str) -> str:
    """The original text of CaseOps text (the inverse of data/caseops.py `encode`, same as its `decode`)."""
    return _CASEOPS_DECODE_RE.sub(_caseops_decode_match, text)


def caseops_operator_ids(sp: spm.SentencePieceProcessor) -> dict[str, int] | None:
    """{operator: id} of the tokenizer's single-operator pieces; None unless some piece holds an operator."""
    pieces = [sp.id_to_piece(i) for i in range(int(sp.vocab_size()))]
    operators = set(CASEOPS_OPERATORS)
    if not any(operators.intersection(piece) for piece in pieces):
        return None
    return {piece: i for i, piece in enumerate(pieces) if piece in operators}


def load_validation_byte_sidecar(data_path: str) -> np.ndarray | None:
    """The byte sidecar as one uint16 array aligned with the validation tokens, or None if there is none.
    Each fineweb_val_bytes_NNNNNN.bin must pair with fineweb_val_NNNNNN.bin and hold one count per token."""
    sidecars = sorted(glob.glob(os.path.join(data_path, "fineweb_val_bytes_*.bin")))
    if not sidecars:
        return None
    val_files = shard_files(data_path, "val")
    wanted = [os.path.join(data_path, os.path.basename(f).replace("fineweb_val_", "fineweb_val_bytes_", 1))
              for f in val_files]
    if sorted(wanted) != sidecars:
        have, need = (",".join(map(os.path.basename, files)) for files in (sidecars, val_files))
        raise RunError(f"byte sidecar {have} does not pair with the validation shards {need} in {data_path}; "
                       "re-download or re-export the data")
    for shard, sidecar in zip(val_files, wanted):
        if shard_token_count(sidecar) != shard_token_count(shard):
            raise RunError(f"{sidecar} holds {shard_token_count(sidecar)} byte counts but {shard} holds "
                           f"{shard_token_count(shard)} tokens; re-download or re-export the data")
    return np.concatenate([read_shard(f) for f in wanted])


def check_sidecar_structure(val_tokens: torch.Tensor, val_bytes: np.ndarray, operators: dict[str, int]) -> None:
    """Every BOS, and every operator piece not right after an ESC (so one the transform added), stands for
    0 bytes: a sidecar of the pieces' own bytes, the mistake that inflates CaseOps bytes, fails here."""
    tokens = val_tokens.numpy()
    if int(val_bytes[tokens == BOS_ID].max(initial=0)) != 0:
        raise RunError("the byte sidecar gives BOS tokens a nonzero byte count (misaligned); re-download or "
                       "re-export the data")
    if operators:
        after_esc = np.zeros(len(tokens), dtype=bool)
        after_esc[1:] = tokens[:-1] == operators.get("\ue004", -1)
        added = np.isin(tokens, list(operators.values())) & ~after_esc
        if int(val_bytes[added].max(initial=0)) != 0:
            raise RunError("the byte sidecar counts bytes for CaseOps operator tokens; re-export the data with "
                           "data/export_shards.py --caseops")


def manifest_records_sidecar(data_path: str) -> bool:
    """Whether the data manifest beside the shards (data/export_shards.py) lists a byte sidecar."""
    try:
        return "byte_sidecar" in json.loads((Path(data_path) / DATA_MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def normalizes_whitespace(sp: spm.SentencePieceProcessor) -> bool:
    """Whether decoding loses input bytes: the tokenizer's normaliser collapses newlines and spaces."""
    probe = "a\n\nb  c"
    return sp.normalize(probe).replace("\u2581", " ") != probe


# ==================================================================================================
# MODEL
# ==================================================================================================
# Owns the network: `ModelConfig`, the GPT and its blocks, the attention kernels and document masking,
# QAT's fake-quantized linear layers, and the size and FLOP estimates logged before training.
#
# The official baseline is: token embedding -> RMSNorm -> blocks with U-Net skips -> RMSNorm -> tied
# head with a tanh logit softcap. Each block mixes in the embedding (resid_mix), then pre-norm GQA
# attention (QK-norm, RoPE, per-head q gain) and a relu^2 MLP, each with a per-channel scale.
# Output projections start at zero, so every block starts as the identity. No biases anywhere.
#
# Every leaderboard technique is a switch on top (all off in RECIPE=baseline):
#   MLP_ACTIVATION=leaky_relu2   h = leaky_relu(x, 0.5)^2, no dead units
#   ROPE_DIMS=16                 rotate only the first 16 head dims; NTK base rescale past TRAIN_SEQ_LEN
#   XSA_LAST_N=N                 exclusive self-attention: remove each head's component along its own value
#   DOC_MASKED_ATTENTION=1       attend only within the document (rows cut at BOS; RoPE restarts there)
#   ORTHO_INIT=1                 orthogonal init of the q/k/v and MLP input matrices
#   VALUE_RESIDUAL=1             v <- a*v_first_layer + b*v
#   ATTN_OUT_GATE / GATED_ATTN / SPARSE_ATTN_GATE   per-head output gates (at most one)
#   BIGRAM_VOCAB_SIZE=B          hashed (prev, cur) token-pair embedding added to the token embedding
#   SMEAR_GATE_ENABLED=1         mix the previous token's embedding in, never across a BOS
#   SKIP_GATES_ENABLED=1         U-Net skips as a learned lerp
#   LN_SCALE=1                   sub-layer inputs scaled by 1/sqrt(layer+1)
#   PARALLEL_START_LAYER=K       attention and MLP in parallel from layer K (gptj or two_lane form)
#   PARALLEL_X0_MIX=read         two_lane: the x0 blend feeds only the attention read (the record's form)
#   BACKOUT_LAYER=K              final hidden -= lambda * hidden after virtual layer K
#   NUM_LOOPS=N                  run layers LOOP_START..LOOP_END N extra times once looping is on
# State-dict names are stable (tests pin them): quantization and packing key on them.

CONTROL_TENSOR_NAMES = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "skip_gates",
                        "attn_gate_w", "value_lambdas", "smear_gate_w", "smear_lambda", "bigram.scale",
                        "parallel_resid_lambdas", "parallel_post_lambdas", "backout_lambda")


@knob_view("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "tie_embeddings",
           "rope_base", "logit_softcap", "qk_gain_init", "tied_embed_init_std", "train_seq_len", "mlp_activation",
           "mlp_leaky_slope", "rope_dims", "xsa_last_n", "value_residual", "attn_out_gate_enabled",
           "gated_attn_enabled", "sparse_attn_gate_enabled", "gate_window", "gated_attn_init_std",
           "sparse_attn_gate_scale", "sparse_attn_gate_init_std", "bigram_vocab_size", "bigram_dim",
           "smear_gate_enabled", "skip_gates_enabled", "ln_scale", "parallel_start_layer", "parallel_mode",
           "parallel_final_lane", "backout_layer", "num_loops", "loop_start", "loop_end", "attn_backend",
           "doc_masked_attention", "ortho_init", "parallel_x0_mix")
class ModelConfig:
    """The knobs the model is built from, as the artifact records them (attn_backend: resolved on the
    device, see select_attention_backend; "auto" builds SDPA)."""

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def attn_gate(self) -> str:
        return ("out" if self.attn_out_gate_enabled else "gated" if self.gated_attn_enabled
                else "sparse" if self.sparse_attn_gate_enabled else "none")

    def layer_order(self, looping: bool) -> list[int]:
        """Physical block index of each virtual layer: the loop segment repeats when looping is on."""
        order = list(range(self.num_layers))
        if looping and self.num_loops > 0:
            segment = order[self.loop_start : self.loop_end + 1]
            order = order[: self.loop_start] + segment * (self.num_loops + 1) + order[self.loop_end + 1 :]
        return order

    @property
    def max_virtual_layers(self) -> int:
        return len(self.layer_order(looping=True))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """A bias-free linear layer whose weight can be fake-quantized to the export grid (QAT).

    The switch is a tensor buffer, not a Python flag: torch.compile cannot constant-fold it, so
    turning QAT on mid-run really changes the compiled forward. Straight-through gradient.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        # set by prepare_qat: the export's bits (0 = never quantized) and SDClip k (0 = absmax)
        self.qat_bits, self.qat_clip_sigmas = 0, 0.0
        self.register_buffer("qat_active", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat_bits:
            w = w + (self.qat_active * (fake_quantize(w, self.qat_bits, self.qat_clip_sigmas) - w)).detach()
        return F.linear(x, w)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.size(-1) dims (first half paired with second half); leave the rest."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


class Rotary(nn.Module):
    def __init__(self, rope_dims: int, base: float, train_seq_len: int):
        super().__init__()
        self.rope_dims, self.base, self.train_seq_len = rope_dims, base, train_seq_len
        # Up to the training length the tables never change: computed once, sliced per call (fewer
        # small operators per step); row t depends on t only, so a slice equals a fresh table.
        cos, sin = self.tables(train_seq_len, base)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def tables(self, seq_len: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (1, 1, T, rope_dims/2) of positions 0..seq_len-1; the frequencies are computed on
        the host (as at init, so that every table has the same values), the tables on `device`."""
        inv_freq = (1.0 / base ** (torch.arange(0, self.rope_dims, 2, dtype=torch.float32) / self.rope_dims)).to(device)
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (T, rope_dims/2)
        return freqs.cos()[None, None], freqs.sin()[None, None]

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len <= self.train_seq_len:
            return self.cos_cached[:, :, :seq_len].to(dtype), self.sin_cached[:, :, :seq_len].to(dtype)
        base = self.base
        if self.rope_dims > 2:  # NTK-style rescale for evaluation past the training length: base * s^(d/(d-2))
            base *= (seq_len / self.train_seq_len) ** (self.rope_dims / (self.rope_dims - 2))
        cos, sin = self.tables(seq_len, base, self.cos_cached.device)
        return cos.to(dtype), sin.to(dtype)


def load_flash_attention():
    """FlashAttention 3's module `flash_attn_interface` (Hopper GPUs, optional), or None."""
    try:
        import flash_attn_interface
    except ImportError:
        return None
    return flash_attn_interface


def flash_attend(flash_attn_func, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention 3's dense causal kernel on (B, H, T, D) tensors: it takes (B, T, H, D), handles GQA
    itself, and some versions return (out, lse)."""
    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return (y[0] if isinstance(y, tuple) else y).transpose(1, 2)


def kernel_mismatch(attend, reference, q_shape, kv_shape, dtype, device) -> str | None:
    """Why `attend(q, k, v)` is not `reference(q, k, v)` (forward within 2e-2, backward into q, k and v
    within 5e-2) on seeded random (B, H, T, D) inputs, or None."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).to(device, dtype).requires_grad_() for shape in (q_shape, kv_shape, kv_shape))
    out, ref = attend(q, k, v), reference(q, k, v)
    grads, ref_grads = (torch.autograd.grad(o.float().square().sum(), (q, k, v)) for o in (out, ref))
    if not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
        return "output differs from SDPA"
    if not all(torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2) for a, b in zip(grads, ref_grads)):
        return "gradients differ from SDPA"
    return None


def select_attention_backend(requested: str, device: torch.device, doc_masked: bool = False) -> tuple[str, str]:
    """The attention kernel to use and why. FA3 is used only after it matches SDPA (forward and
    backward) on this device, so a broken or mismatched install falls back instead of training wrong;
    under DOC_MASKED_ATTENTION that is its varlen kernel against the document-masked SDPA."""
    if requested == "sdpa":
        return "sdpa", "requested"
    flash = load_flash_attention()
    if flash is None:
        if requested == "fa3":
            raise ConfigError("ATTN_BACKEND=fa3 but flash_attn_interface is not installed; install FlashAttention 3 "
                              "or use ATTN_BACKEND=auto")
        return "sdpa", "flash_attn_interface not installed"
    if requested == "auto" and device.type != "cuda":
        return "sdpa", "FlashAttention 3 needs a CUDA device"
    # The reference is SDPA under the documents' mask. Masked, the rows hold every document layout a
    # batch can: row 0 starts inside a document (its leading tail is one) and has two more, row 1 has
    # no BOS, row 2 is one-token documents; unmasked, no row has a BOS (one causal sequence each).
    ids = torch.randint(2, 97, (3, 64), generator=torch.Generator().manual_seed(0))
    if doc_masked:
        ids[0, [20, 41]] = BOS_ID
        ids[2] = BOS_ID
    ids = ids.to(device)
    try:
        attend = (DocumentLayout(ids, "varlen", flash.flash_attn_varlen_func).attend if doc_masked
                  else functools.partial(flash_attend, flash.flash_attn_func))
        reason = kernel_mismatch(attend, DocumentLayout(ids, "sdpa").attend, (3, 8, 64, 64), (3, 4, 64, 64),
                                 torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    except Exception as e:  # any failure of an optional kernel means: do not use it
        reason = f"start-up check raised {e.__class__.__name__}"
    if reason is None:
        return "fa3", ("flash_attn_varlen_func matches the document-masked SDPA" if doc_masked else "matches SDPA")
    if requested == "fa3":
        raise RunError(f"ATTN_BACKEND=fa3 but FlashAttention 3 failed its start-up check ({reason}); use ATTN_BACKEND=auto")
    return "sdpa", reason


class DocumentLayout:
    """The documents of every row of a batch, for DOC_MASKED_ATTENTION. A BOS opens a document; a row's
    tokens before its first BOS are the tail of an earlier document and form one of their own. Built
    once per forward from the token ids and read by every layer. A position's document and its RoPE
    offset (distance from its document's first token) depend only on tokens at or before it, so the
    model stays causal.

    Attention is causal and same-document, by one of three kernels with the same result (tests check):
    - varlen: FlashAttention 3's flash_attn_varlen_func (ATTN_BACKEND=fa3 or auto, when it passed its
      start-up check): the batch flattened to one stream of B*T positions cut into documents by
      `cu_seqlens` (every row start and every BOS, then B*T: int32). Its length is data-dependent; under
      torch.compile that is an unbacked size (compile_settings captures nonzero), so one graph serves
      every layout. `max_seqlen` is the row length T, a bound no document passes: one value per shape.
    - flex: FlexAttention with a block mask when compiled on CUDA, a fused kernel that skips the blocks
      between documents;
    - sdpa: otherwise, SDPA with the dense (B, 1, T, T) boolean mask (eager FlexAttention would
      materialise every score anyway, and on CPU it has no backward)."""

    def __init__(self, input_ids: torch.Tensor, kernel: str, varlen=None):
        B, T = input_ids.shape
        is_bos = input_ids == BOS_ID
        self.doc = torch.cumsum(is_bos, dim=1)  # (B, T) document number within the row
        t = torch.arange(T, device=input_ids.device)
        self.positions = t - torch.cummax(torch.where(is_bos, t, 0), dim=1).values  # (B, T)
        self.kernel, self.varlen = kernel, varlen
        if kernel == "varlen":
            starts = (is_bos | (t == 0)).flatten().nonzero().flatten()
            self.cu_seqlens = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
        elif kernel == "flex":
            doc = self.doc

            def same_document_causal(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

            self.mask = create_block_mask(same_document_causal, B, None, T, T, device=input_ids.device)
        else:
            causal = t[:, None] >= t[None, :]
            self.mask = (causal & (self.doc[:, :, None] == self.doc[:, None, :]))[:, None]  # (B, 1, T, T)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) queries, (B, KV, T, D) keys and values -> (B, H, T, D)."""
        q, k, gqa = q.to(v.dtype), k.to(v.dtype), q.size(1) != k.size(1)  # flex wants one dtype (autocast)
        if self.kernel == "varlen":  # (B*T, heads, D) streams; FA3 handles GQA itself
            B, H, T, D = q.shape
            q, k, v = (x.transpose(1, 2).reshape(B * T, x.size(1), D) for x in (q, k, v))
            y = self.varlen(q, k, v, self.cu_seqlens, self.cu_seqlens, T, T, causal=True)
            return (y[0] if isinstance(y, tuple) else y).view(B, T, H, D).transpose(1, 2)
        if self.kernel == "flex":
            return flex_attention(q, k, v, block_mask=self.mask, enable_gqa=gqa)
        # Heads expanded by hand: CUDA's masked (memory-efficient) SDPA kernel does not take enable_gqa.
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_k = CastedLinear(cfg.model_dim, kv_dim)
        self.c_v = CastedLinear(cfg.model_dim, kv_dim)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim)
        nn.init.zeros_(self.proj.weight)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(cfg.rope_dims or self.head_dim, cfg.rope_base, cfg.train_seq_len)
        # FA3's dense kernel; under DOC_MASKED_ATTENTION its varlen kernel runs instead (GPT.varlen_attention)
        self.flash = load_flash_attention().flash_attn_func if cfg.attn_backend == "fa3" else None
        self.xsa = layer_idx >= cfg.num_layers - cfg.xsa_last_n
        self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if cfg.value_residual and layer_idx > 0 else None
        self.gate_kind, self.gate_window = cfg.attn_gate, cfg.gate_window
        self.sparse_gate_scale = cfg.sparse_attn_gate_scale
        if cfg.attn_gate == "out":  # y_h *= 2 sigmoid(w_h . x[:window]): identity at init
            self.attn_gate_w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.gate_window))
        elif cfg.attn_gate == "sparse":  # y_h *= sigmoid(scale * w_h . x[:window]): 0.5 at zero init
            self.attn_gate_w = nn.Parameter(torch.randn(cfg.num_heads, cfg.gate_window) * cfg.sparse_attn_gate_init_std)
        elif cfg.attn_gate == "gated":  # y_h *= sigmoid(w_h . x) (Qwen G1)
            self.attn_gate_w = nn.Parameter(torch.randn(cfg.num_heads, cfg.model_dim) * cfg.gated_attn_init_std)

    def project(self, x: torch.Tensor, v_first: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """q (B, H, T, D); k, v (B, KV, T, D), v mixed with the first layer's under VALUE_RESIDUAL; raw v."""
        B, T, _ = x.shape
        q, k, v_raw = (f(x).view(B, T, -1, self.head_dim).transpose(1, 2) for f in (self.c_q, self.c_k, self.c_v))
        v = v_raw
        if self.value_lambdas is not None and v_first is not None:
            lam = self.value_lambdas.to(v.dtype)
            v = lam[0] * v_first + lam[1] * v_raw
        return q, k, v, v_raw

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """QK-norm, RoPE, and the per-head query gain."""
        q = apply_rotary(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[None, :, None, None]
        return q, apply_rotary(rms_norm(k), cos, sin)

    def finish(self, y: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """XSA, the output gate and the output projection on the attention output y (B, H, T, D) of the
        normalised input x (B, T, C); returns (B, T, C)."""
        if self.xsa:  # drop each head's component along its own position's value direction
            v_dir = F.normalize(v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1), dim=-1)
            y = y - (y * v_dir).sum(-1, keepdim=True) * v_dir
        if self.gate_kind != "none":
            logits = (x if self.gate_kind == "gated" else x[..., : self.gate_window]) @ self.attn_gate_w.to(x.dtype).T
            scaled = self.sparse_gate_scale * logits if self.gate_kind == "sparse" else logits  # (B, T, H)
            gate = 2 * torch.sigmoid(logits) if self.gate_kind == "out" else torch.sigmoid(scaled)
            y = y * gate.transpose(1, 2)[..., None]  # (B, H, T, 1)
        return self.proj(y.transpose(1, 2).reshape(x.shape))

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None,
                docs: DocumentLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x is the normalised input; `docs` masks attention to each document (DOC_MASKED_ATTENTION).
        Returns the output and this layer's raw values (for VALUE_RESIDUAL)."""
        T = x.size(1)
        q, k, v, v_raw = self.project(x, v_first)
        cos_sin = self.rotary(T, q.dtype)
        if docs is not None:  # positions restart at every document's first token: (B, 1, T, r/2)
            cos_sin = [t[0, 0][docs.positions][:, None] for t in cos_sin]
        q, k = self.rotate(q, k, *cos_sin)
        if docs is not None:
            y = docs.attend(q, k, v)
        elif self.flash is not None:
            y = flash_attend(self.flash, q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=self.num_kv_heads != self.num_heads)  # (B, H, T, D)
        return self.finish(y, x, v), v_raw

    def forward_last_cached(self, x: torch.Tensor, v_first: torch.Tensor | None, cache: list,
                            pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Incremental decoding (calibration sampling): `forward` for the last position of x only, which is
        sequence position `pos`; its keys and values are appended to `cache` ([k, v] of earlier positions
        for this layer pass) and it attends to all of them. The other rows of the output are 0 (their
        keys are cached already). Equal to `forward` while pos < TRAIN_SEQ_LEN (the RoPE tables are fixed)."""
        T = x.size(1)
        x = x[:, -1:]
        q, k, v, v_raw = self.project(x, v_first)
        q, k = self.rotate(q, k, *(t[:, :, pos : pos + 1] for t in self.rotary(pos + 1, q.dtype)))
        cache[:] = [torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)] if cache else [k, v]
        y = F.scaled_dot_product_attention(q, *cache, enable_gqa=self.num_kv_heads != self.num_heads)  # (B, H, 1, D)
        return F.pad(self.finish(y, x, v), (0, 0, T - 1, 0)), v_raw


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden)
        self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim)
        nn.init.zeros_(self.proj.weight)
        self.leaky_slope = cfg.mlp_leaky_slope if cfg.mlp_activation == "leaky_relu2" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.relu(h) if self.leaky_slope is None else F.leaky_relu(h, self.leaky_slope)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim)]))
        self.input_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else None
        self.form = cfg.parallel_mode if 0 <= cfg.parallel_start_layer <= layer_idx else "serial"
        # The record's two-lane form blends x0 into the attention read only; elsewhere the blend is the residual.
        self.x0_into_read_only = self.form == "two_lane" and cfg.parallel_x0_mix == "read"
        if self.form == "two_lane":
            self.parallel_resid_lambdas = nn.Parameter(torch.full((2,), 1.1))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(2, 2))

    def sublayer_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm input of attention or MLP, scaled by 1/sqrt(layer+1) under LN_SCALE (no op otherwise)."""
        return rms_norm(x) if self.input_scale is None else rms_norm(x) * self.input_scale

    def forward(self, x: torch.Tensor, x0: torch.Tensor, v_first: torch.Tensor | None,
                mlp_lane: torch.Tensor | None = None,
                docs: DocumentLayout | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns (residual, MLP lane of the two-lane form or None, raw attention values)."""
        mix = self.resid_mix.to(x.dtype)
        read = mix[0] * x + mix[1] * x0
        x = x if self.x0_into_read_only else read
        a, v_raw = self.attn(self.sublayer_input(read), v_first, docs)
        a = self.attn_scale.to(x.dtype) * a
        if self.form != "two_lane":  # serial: the MLP reads x + a; gptj: both branches read x
            h = x + a
            m = self.mlp(self.sublayer_input(h if self.form == "serial" else x))
            return h + self.mlp_scale.to(x.dtype) * m, None, v_raw
        # two_lane: attention reads the attention lane, the MLP reads its own lane; both lanes get both.
        lane = x if mlp_lane is None else mlp_lane
        m = self.mlp_scale.to(x.dtype) * self.mlp(self.sublayer_input(lane))
        r, p = self.parallel_resid_lambdas.to(x.dtype), self.parallel_post_lambdas.to(x.dtype)
        return r[0] * x + p[0, 0] * a + p[0, 1] * m, r[1] * lane + p[1, 0] * a + p[1, 1] * m, v_raw


class BigramHash(nn.Module):
    """Embedding of a hash of (previous token, token). A BOS (and position 0) uses its own bucket,
    so a document's first position never sees the previous document."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.buckets = cfg.bigram_vocab_size
        self.embed = nn.Embedding(self.buckets, cfg.bigram_dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.proj = CastedLinear(cfg.bigram_dim, cfg.model_dim)
        nn.init.zeros_(self.proj.weight)  # identity at init; the table still gets gradients via proj
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        prev = F.pad(ids[:, :-1], (1, 0))
        h = torch.bitwise_xor(36313 * ids, 27191 * prev) % (self.buckets - 1)
        first = F.pad(torch.ones_like(ids[:, :1], dtype=torch.bool), (0, ids.size(1) - 1)) | (ids == BOS_ID)
        h = torch.where(first, self.buckets - 1, h)
        return self.scale.to(self.proj.weight.dtype) * self.proj(self.embed(h))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.bigram = BigramHash(cfg) if cfg.bigram_vocab_size > 0 else None
        if cfg.smear_gate_enabled:  # x_t += lambda * sigmoid(w . x_t[:window]) * x_{t-1}: identity at init
            self.smear_gate_w = nn.Parameter(torch.zeros(cfg.gate_window))
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        if cfg.ortho_init:  # the records' init of every input matrix (output projections stay zero)
            for block in self.blocks:
                for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
                    nn.init.orthogonal_(linear.weight)
        # None: varlen with FA3, else flex when compiled on CUDA, else sdpa (tests pin one)
        self.doc_attention_kernel: str | None = None
        self.varlen_attention = load_flash_attention().flash_attn_varlen_func if (
            cfg.attn_backend == "fa3" and cfg.doc_masked_attention) else None
        # U-Net skips, one per encoder layer (the first half; the decoder is as long or one longer), sized
        # for the longest (looped) layer order; the plain order uses a prefix.
        num_skips = cfg.max_virtual_layers // 2
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        if cfg.skip_gates_enabled:  # x <- lerp(w * skip, x, sigmoid(g)), g = 0 at init
            self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.model_dim))
        if cfg.backout_layer >= 0:
            self.backout_lambda = nn.Parameter(torch.zeros(()))
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size)
            nn.init.zeros_(self.lm_head.weight)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state entering the first block."""
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        if self.cfg.smear_gate_enabled:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # x_{t-1}, zero at t = 0
            gate = torch.sigmoid(x[..., : self.cfg.gate_window] @ self.smear_gate_w.to(x.dtype))[..., None]
            not_bos = (input_ids != BOS_ID)[..., None].to(x.dtype)  # a BOS never takes the previous doc in
            x = x + self.smear_lambda.to(x.dtype) * gate * not_bos * prev
        return rms_norm(x)

    def document_layout(self, input_ids: torch.Tensor) -> DocumentLayout | None:
        """Each row's documents under DOC_MASKED_ATTENTION (None: attention spans the whole row)."""
        if not self.cfg.doc_masked_attention:
            return None
        fused = torch.compiler.is_compiling() and input_ids.is_cuda  # CPU FlexAttention has no backward
        kernel = self.doc_attention_kernel or ("varlen" if self.varlen_attention else "flex" if fused else "sdpa")
        return DocumentLayout(input_ids, kernel, self.varlen_attention)

    def forward_hidden(self, input_ids: torch.Tensor, looping: bool = False) -> torch.Tensor:
        x = x0 = self.embed(input_ids)
        docs = self.document_layout(input_ids)
        order = self.cfg.layer_order(looping)
        num_encoder = len(order) // 2  # each encoder layer's output feeds a decoder layer's input
        skips, mlp_lane, v_first, backout = [], None, None, None
        for i, layer in enumerate(order):
            j = i - num_encoder
            if 0 <= j < num_encoder:
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype)) if self.cfg.skip_gates_enabled else x + skip
            x, mlp_lane, v_raw = self.blocks[layer](x, x0, v_first, mlp_lane, docs)
            v_first = v_raw if v_first is None else v_first
            if i < num_encoder:
                skips.append(x)
            if i == self.cfg.backout_layer:
                backout = x
        if mlp_lane is not None:
            final = self.cfg.parallel_final_lane
            x = x if final == "attn" else mlp_lane if final == "mlp" else 0.5 * (x + mlp_lane)
        if backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * backout
        return rms_norm(x)

    def forward_logits(self, input_ids: torch.Tensor, looping: bool = False) -> torch.Tensor:
        return self.head(self.forward_hidden(input_ids, looping))

    def head(self, h: torch.Tensor, logit_delta: torch.Tensor | None = None) -> torch.Tensor:
        """Soft-capped logits of final hidden states (plus an adapter's `logit_delta` before the cap)."""
        logits = F.linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)
        if logit_delta is not None:
            logits = logits + logit_delta.to(logits.dtype)
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits.float() / c)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor, looping: bool = False) -> torch.Tensor:
        logits = self.forward_logits(input_ids, looping)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))


def is_control_tensor(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_TENSOR_NAMES)


def prepare_qat(model: nn.Module, plan: "QuantPlan") -> list[CastedLinear]:
    """Give every linear layer the export quantizes its bits and clip; returns them (QAT still off)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            module.qat_bits, module.qat_clip_sigmas = plan.spec(f"{name}.weight", module.weight) or (0, 0.0)
            if module.qat_bits:
                layers.append(module)
    return layers


def set_qat(layers: list[CastedLinear], active: bool) -> None:
    for layer in layers:
        layer.qat_active.fill_(float(active))


def estimate_flops_per_token(cfg: ModelConfig, seq_len: int, looping: bool) -> int:
    """Forward matmul FLOPs per token (2 per multiply-add): weights of every virtual layer, the head,
    and causal attention over an average context of (seq_len + 1) / 2."""
    d, kv = cfg.model_dim, cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
    per_layer = 2 * (2 * d * d + 2 * d * kv + 2 * d * cfg.mlp_hidden)
    attention = 2 * 2 * d * (seq_len + 1) / 2
    flops = len(cfg.layer_order(looping)) * (per_layer + attention) + 2 * d * cfg.vocab_size
    if cfg.bigram_vocab_size:
        flops += 2 * cfg.bigram_dim * d
    return int(flops)


def lora_flops_per_token(cfg: ModelConfig, rank: int, looping: bool, *, k: bool, o: bool, mlp: bool) -> int:
    """Forward FLOPs per token of the TTT adapters (x A^T then B): 2 * rank * (in + out) per adapter, one
    adapter per virtual layer slot for q, v (and k, o, the MLP under their switches), and the head."""
    d, kv = cfg.model_dim, cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
    per_layer = (d + d) + (d + kv) + k * (d + kv) + o * (d + d) + mlp * (d + d)
    return 2 * rank * (len(cfg.layer_order(looping)) * per_layer + d + cfg.vocab_size)


def model_report(model: GPT, hp: Hyperparameters, n_code_bytes: int) -> list[str]:
    """Size and cost known before training: parameters, FLOPs per token, artifact estimate."""
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    cfg, unique, per_block = model.cfg, count(model), count(model.blocks[0])
    order = cfg.layer_order(looping=cfg.num_loops > 0)
    effective = unique + sum(count(model.blocks[i]) for i in order) - count(model.blocks)
    fwd = estimate_flops_per_token(cfg, hp.train_seq_len, looping=cfg.num_loops > 0)
    payload = estimate_payload_bytes(model.state_dict(), QuantPlan.from_hparams(hp))
    return [
        f"model_params:{unique}",
        f"model_params_detail: unique:{unique} per_block:{per_block} virtual_layers:{len(order)} "
        f"effective_per_token:{effective} order:{order}",
        f"flops_per_token: forward:{fwd} train:{3 * fwd} seq_len:{hp.train_seq_len}",
        # An upper bound before compression (the public baseline's zlib made 15,815,847 model bytes
        # of a model this estimates at 17,178,912).
        f"artifact_estimate: bitpacked_payload_bytes:{payload} matrix_bits:{hp.matrix_bits} "
        f"embed_bits:{hp.embed_bits} code_bytes:{n_code_bytes} upper_bound_total:{payload + n_code_bytes} "
        f"limit:{ARTIFACT_LIMIT_BYTES} fits_before_compression:{int(payload + n_code_bytes <= ARTIFACT_LIMIT_BYTES)}",
    ]


# ==================================================================================================
# OPTIMIZER
# ==================================================================================================
# Owns the weight updates: Muon for the block matrices, AdamW for the rest, and who gets which.
#
# Muon: SGD-momentum (Nesterov) whose update for each 2-D matrix is replaced by the nearest
# semi-orthogonal matrix, computed with a few Newton-Schulz iterations: the classic quintic
# (one fixed coefficient triple) or Polar Express (a minimax-tuned triple per iteration). MuonEq-R
# normalises each row of the momentum update first. Weight decay is decoupled: p *= 1 - lr * wd.
#
# Several ranks share the work ("parallel Muon"): the matrices are dealt out by size, each rank
# orthogonalises its share (and keeps only its share's momentum), then one all-gather hands every
# rank every update. The result is the same update the single process computes.
# Embedding tables, an untied head and the small control tensors use AdamW.

NS_COEFFICIENTS = {
    "quintic": ((3.4445, -4.7750, 2.0315),),
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}


def newton_schulz(G: torch.Tensor, steps: int, dtype: torch.dtype = torch.float32,
                  coefficients: str = "quintic") -> torch.Tensor:
    """Approximate U V^T of G = U S V^T with X <- aX + (bA + cA^2)X, A = XX^T; iteration i uses
    triple i of the set (the last one repeats)."""
    triples = NS_COEFFICIENTS[coefficients]
    X = G.to(dtype)
    X = X / (X.norm() + 1e-7)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    for i in range(steps):
        a, b, c = triples[min(i, len(triples) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transposed else X).to(G.dtype)


def assign_shards(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each matrix: largest first, each to the least-loaded rank (deterministic)."""
    owners, load = [0] * len(sizes), [0] * world_size
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i], load[rank] = rank, load[rank] + sizes[i]
    return owners


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, ns_dtype: torch.dtype,
                 coefficients: str = "quintic", row_normalize: bool = False, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay))
        self.ns_dtype, self.coefficients, self.row_normalize = ns_dtype, coefficients, row_normalize

    def _update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The orthogonalised Nesterov update of one matrix (its momentum lives on this rank)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
        if self.row_normalize:  # MuonEq-R
            update = update / update.norm(dim=1, keepdim=True).clamp_min(1e-7)
        update = newton_schulz(update, group["backend_steps"], self.ns_dtype, self.coefficients)
        return update * max(1.0, p.size(0) / p.size(1)) ** 0.5

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # Each rank's updates in one flat fp32 buffer, padded to the largest share, then all-gathered
            # (a single process uses its buffer as it is: the same values, fp32 holds every update exactly).
            owners = assign_shards([p.numel() for p in params], world_size)
            shard = max(sum(p.numel() for p, o in zip(params, owners) if o == r) for r in range(world_size))
            local = torch.zeros(shard, device=params[0].device, dtype=torch.float32)
            mine = [self._update(p, group).flatten().float() for p, o in zip(params, owners) if o == rank]
            if mine:
                local[: sum(u.numel() for u in mine)] = torch.cat(mine)
            gathered = local
            if distributed:
                gathered = local.new_empty(world_size * shard)
                dist.all_gather_into_tensor(gathered, local)
            offsets = [r * shard for r in range(world_size)]
            for p, o in zip(params, owners):
                update = gathered[offsets[o] : offsets[o] + p.numel()].view_as(p)
                offsets[o] += p.numel()
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])


def build_optimizers(hp: Hyperparameters, model: GPT, device: torch.device) -> list[torch.optim.Optimizer]:
    """Muon for 2-D weight matrices; AdamW for embedding tables, an untied head and control tensors."""
    by_kind = {"embed": [], "head": [], "matrix": [], "scalar": []}  # each parameter in exactly one
    for name, p in model.named_parameters():
        kind = "embed" if name in EMBEDDING_NAMES else "head" if name == "lm_head.weight" else (
            "scalar" if p.ndim < 2 or is_control_tensor(name) else "matrix")
        by_kind[kind].append(p)
    # Fused AdamW (one kernel per group instead of ~10 small operators per tensor) on CUDA and CPU alike.
    adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=device.type in ("cuda", "cpu"))

    def adamw(params: list, lr: float, wd: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW([dict(params=params, lr=lr, base_lr=lr)], weight_decay=wd, **adam)

    optimizers: list[torch.optim.Optimizer] = [
        adamw(by_kind["embed"], hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr, hp.embed_wd),
        Muon([dict(params=by_kind["matrix"], lr=hp.matrix_lr, base_lr=hp.matrix_lr)], lr=hp.matrix_lr,
             momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps,
             ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
             coefficients=hp.muon_ns_coefficients, row_normalize=hp.muon_row_normalize, weight_decay=hp.muon_wd),
        adamw(by_kind["scalar"], hp.scalar_lr, hp.adam_wd),
    ]
    if by_kind["head"]:
        optimizers.append(adamw(by_kind["head"], hp.head_lr, hp.adam_wd))
    return optimizers


# ==================================================================================================
# SCHEDULES
# ==================================================================================================
# Owns time: pure functions of the training fraction, and `PhaseClock`, which measures it.
# Everything that changes during training (LR warm-up and warmdown, depth recurrence, QAT, SWA)
# reads one number: the training fraction, elapsed training time over the training budget (the
# wallclock cap minus the reserve for post-training training-data access), or step / ITERATIONS
# without a cap. Ranks agree on it every step, so they switch together.


def training_fraction(step: int, elapsed_ms: float, *, iterations: int, budget_ms: float | None) -> float:
    """How far training is, in [0, 1]: by time under a budget, else by steps."""
    if budget_ms is None:
        return min(step / iterations, 1.0)
    return min(elapsed_ms / budget_ms, 1.0) if budget_ms > 0 else 1.0


def lr_scale_at(hp: Hyperparameters, step: int, elapsed_ms: float, fraction: float, budget_ms: float | None) -> float:
    """The LR multiplier: a linear warm-up over the first LR_WARMUP_FRAC of training, 1.0, then a linear
    warmdown to 0 over the last WARMDOWN_FRAC of it, or (WARMDOWN_FRAC=0, the official baseline) over
    its last WARMDOWN_ITERS steps, as time at the average step time so far under a budget; never below
    MIN_LR."""
    if hp.lr_warmup_frac > 0 and fraction < hp.lr_warmup_frac:
        return max(fraction / hp.lr_warmup_frac, hp.min_lr)
    if hp.warmdown_frac > 0:
        left, length = 1 - fraction, hp.warmdown_frac
    elif budget_ms is None:
        left, length = hp.iterations - step, hp.warmdown_iters
    else:
        left, length = budget_ms - elapsed_ms, hp.warmdown_iters * (elapsed_ms / max(step, 1))
    return max(min(max(left, 0) / length, 1.0) if length > 0 else 1.0, hp.min_lr)


def looping_active(fraction: float, *, num_loops: int, enable_at: float) -> bool:
    return num_loops > 0 and fraction >= enable_at


def muon_momentum_at(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


class PhaseClock:
    """Wallclock per phase, one phase running at a time.

    `train` is training time as the rules count it (no compile warm-up, no periodic validation).
    The training budget is the cap minus `reserve_ms`, the time kept for anything after training
    that still reads training data; training data access must end by the cap. Evaluation (artifact
    load to final score) has its own budget.
    """

    def __init__(self, cap_ms: float | None, eval_cap_ms: float | None, now=time.perf_counter):
        self.cap_ms, self.eval_cap_ms, self.now = cap_ms, eval_cap_ms, now
        self.reserve_ms = 0.0
        self.totals: dict[str, float] = {}
        self.current: str | None = None
        self.started = 0.0
        self.process_start = now()

    def start(self, phase: str) -> None:
        self.stop()
        self.current, self.started = phase, self.now()

    def stop(self) -> None:
        if self.current is not None:
            self.totals[self.current] = self.totals.get(self.current, 0.0) + 1000.0 * (self.now() - self.started)
            self.current = None

    def elapsed_ms(self, phase: str) -> float:
        running = 1000.0 * (self.now() - self.started) if self.current == phase else 0.0
        return self.totals.get(phase, 0.0) + running

    @property
    def train_budget_ms(self) -> float | None:
        return None if self.cap_ms is None else max(self.cap_ms - self.reserve_ms, 0.0)

    def summary(self) -> str:
        phases = " ".join(f"{k}:{v:.0f}ms" for k, v in self.totals.items())
        return f"phase_times: {phases} process:{1000.0 * (self.now() - self.process_start):.0f}ms"


# ==================================================================================================
# TRAINING
# ==================================================================================================
# The timed loop runs on the compiled model. Before it, WARMUP_STEPS real steps trigger compilation
# and then every weight and optimizer state is put back exactly as it was and the loader restarts,
# so the warm-up changes nothing but the compile cache. It reads training data only. Training time
# excludes warm-up and periodic validation, as the public rules count it. Inside the loop the only
# host-device syncs are on logging steps (and validation).


def train_step(run: TrainingRun, loader: DistributedTokenLoader | ShuffledWindowLoader, lr_scale: float, step: int,
               looping: bool = False) -> torch.Tensor:
    """One optimizer step of the run's model over `grad_accum` micro-batches; returns the mean loss (a
    tensor, no sync)."""
    hp, model, optimizers, grad_accum = run.hp, run.model, run.optimizers, run.grad_accum
    total = torch.zeros((), device=run.rt.device)
    for micro in range(grad_accum):
        x, y = loader.next_batch(hp.train_batch_tokens, hp.train_seq_len, grad_accum)
        if isinstance(model, DDP):
            model.require_backward_grad_sync = micro == grad_accum - 1
        with run.autocast():
            loss = model(x, y, looping)
        (loss / grad_accum).backward()
        total += loss.detach()
    momentum = muon_momentum_at(step, start=hp.muon_momentum_warmup_start, end=hp.muon_momentum,
                                warmup_steps=hp.muon_momentum_warmup_steps)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
            if isinstance(opt, Muon):
                group["momentum"] = momentum
    if hp.grad_clip_norm > 0:  # grads are already averaged across ranks here: a global-norm clip
        torch.nn.utils.clip_grad_norm_([p for opt in optimizers for g in opt.param_groups for p in g["params"]],
                                       hp.grad_clip_norm)
    for opt in optimizers:  # each parameter has one optimizer, so stepping one never reads another's grads
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total / grad_accum


def warmup_and_reset(run: TrainingRun) -> None:
    """Run WARMUP_STEPS steps to compile every kernel (and as many again with looping on, so both
    graphs exist before the clock starts), then restore the initial weights and optimizer state.
    Not training: nothing it learned survives, and it reads only training data."""
    hp, optimizers = run.hp, run.optimizers
    if hp.warmup_steps <= 0:
        return
    initial_model = copy.deepcopy(run.base_model.state_dict())
    initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loader = run.make_loader()
    for looping in (False, True) if hp.num_loops > 0 else (False,):
        prefix = "loop_warmup_step" if looping else "warmup_step"
        for step in range(hp.warmup_steps):
            train_step(run, loader, 1.0, step, looping)
            if step + 1 in (1, hp.warmup_steps) or (step + 1) % 10 == 0:
                run.log(f"{prefix}:{step + 1}/{hp.warmup_steps}")
    loader.close()
    run.base_model.load_state_dict(initial_model)
    for opt, state in zip(optimizers, initial_opts):
        opt.load_state_dict(state)
    barrier()


# A diverged run stops at the first checked step whose loss is not finite or above this many times the
# loss of a uniform guess, ln(VOCAB_SIZE). The loss is checked where the loop already syncs it (logged
# steps) and at the last step, as the global mean over ranks, so every rank stops at the same step.
DIVERGED_LOSS_FACTOR = 2.0


def check_training_loss(loss: float, step: int, vocab_size: int) -> None:
    limit = DIVERGED_LOSS_FACTOR * math.log(vocab_size)
    if not math.isfinite(loss) or loss > limit:
        raise RunError(f"training diverged: train_loss {loss:.4g} at step {step} (limit {limit:.2f} = 2 x ln "
                       "VOCAB_SIZE); lower MATRIX_LR, SCALAR_LR, TIED_EMBED_LR or set GRAD_CLIP_NORM")


@dataclass
class TrainState:
    step: int = 0
    stopped_early: bool = False
    last_val: EvalResult | None = None
    looping: bool = False
    qat: bool = False
    epochs_consumed: float = 0.0  # of the training data, as the loader counts it
    step_ms: list[float] = field(default_factory=list)  # host wallclock of every timed step
    train_losses: list[float] = field(default_factory=list)


def train(run: TrainingRun, averager: WeightAverager) -> TrainState:
    """The timed loop. Each step, ranks agree on the elapsed training time (host clocks, CPU
    collective), and every decision (LR, looping, QAT, SWA, stopping) is a function of it. Training
    stops before a step that would end past the budget, never in the middle of one."""
    hp, rt, base_model, log, clock = run.hp, run.rt, run.base_model, run.log, run.clock
    state = TrainState()
    loader = run.make_loader()
    budget_ms = clock.train_budget_ms
    step_ms = 0.0
    unchecked_loss = None  # the last step's loss, when it was not a logged (checked) step
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    sync()
    clock.start("train")
    while state.step < hp.iterations:
        if hp.val_loss_every > 0 and state.step % hp.val_loss_every == 0:
            sync()
            clock.start("val")  # the training clock pauses for validation
            state.last_val = run.evaluate_model(state.looping)
            train_ms = clock.elapsed_ms("train")
            log(f"step:{state.step}/{hp.iterations} val_loss:{state.last_val.val_loss:.4f} "
                f"val_bpb:{state.last_val.val_bpb:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{train_ms / max(state.step, 1):.2f}ms")
            sync()
            clock.start("train")
        elapsed_ms, step_ms = agree_max([clock.elapsed_ms("train"), step_ms], rt)
        if budget_ms is not None and elapsed_ms + max(step_ms, elapsed_ms / max(state.step, 1)) > budget_ms:
            state.stopped_early = True
            break
        fraction = training_fraction(state.step, elapsed_ms, iterations=hp.iterations, budget_ms=budget_ms)
        if not state.looping and looping_active(fraction, num_loops=hp.num_loops, enable_at=hp.enable_looping_at):
            state.looping = True
            log(f"layer_loop:enabled step:{state.step} frac:{fraction:.3f} order:{base_model.cfg.layer_order(True)}")
        if hp.qat_enabled and not state.qat and fraction >= hp.qat_start_frac:
            set_qat(run.qat_layers, True)
            state.qat = True
            log(f"qat:enabled step:{state.step} frac:{fraction:.3f} layers:{len(run.qat_layers)} "
                f"matrix_bits:{hp.matrix_bits} embed_bits:{hp.embed_bits}")
        scale = lr_scale_at(hp, state.step, elapsed_ms, fraction, budget_ms)
        t_step = clock.now()
        unchecked_loss = train_step(run, loader, scale, state.step, state.looping)
        state.step += 1
        averager.update(state.step, fraction)
        step_ms = 1000.0 * (clock.now() - t_step)
        state.step_ms.append(step_ms)
        if state.step <= 10 or state.step % hp.train_log_every == 0:  # the only host-device syncs
            loss_value = float(all_reduce_sum(unchecked_loss).item()) / rt.world_size  # global mean
            unchecked_loss = None
            state.train_losses.append(loss_value)
            train_ms = clock.elapsed_ms("train")
            tokens_per_s = state.step * hp.train_batch_tokens / max(train_ms / 1000.0, 1e-9)
            flops = 3 * estimate_flops_per_token(base_model.cfg, hp.train_seq_len, state.looping)
            mfu = 100.0 * flops * tokens_per_s / (hp.peak_tflops * 1e12 * rt.world_size)
            log(f"step:{state.step}/{hp.iterations} train_loss:{loss_value:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{train_ms / state.step:.2f}ms tok/s:{tokens_per_s:.0f} mfu:{mfu:.2f}%")
            check_training_loss(loss_value, state.step, hp.vocab_size)
    sync()
    clock.stop()
    if unchecked_loss is not None:
        check_training_loss(float(all_reduce_sum(unchecked_loss).item()) / rt.world_size, state.step, hp.vocab_size)
    state.epochs_consumed = loader.epochs_consumed()
    loader.close()
    log(f"train_loader:epochs_consumed:{state.epochs_consumed:.4f} sampler:{hp.train_loader}")
    if state.stopped_early:
        log(f"stopping_early: wallclock_cap train_time:{clock.elapsed_ms('train'):.0f}ms step:{state.step}/{hp.iterations}")
        log(f"budget_cut: training after step {state.step} (the next step would end past the {budget_ms:.0f}ms "
            f"training budget = cap {clock.cap_ms:.0f}ms - reserve {clock.reserve_ms:.0f}ms)")
    return state


class CompileRecord:
    """What torch.compile did in one run: graphs compiled per function, and every failure. A failure
    is never silent: it is logged as one line naming the function and the reason, kept for the
    manifest, and then either the failed graph runs eagerly (COMPILE_FALLBACK=eager) or the run stops
    with a RunError (COMPILE_FALLBACK=error, the CUDA default: an eager 8xH100 run loses a large share
    of its steps)."""

    def __init__(self, backend: str = "inductor", fallback: str = "error", log=None):
        self.backend, self.fallback = backend, fallback
        self.graphs: dict[str, int] = {}
        self.failures: list[dict] = []
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def failed(self, name: str, e: BaseException) -> str:
        """Record and log a failure; returns the one-line error a run stopped by it reports."""
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        self.failures.append(dict(function=name, reason=reason))
        self.log(f"compile:failed function:{name} backend:{self.backend} fallback:{self.fallback} reason:{reason}")
        return (f"torch.compile failed in {name} ({reason}); COMPILE_FALLBACK=eager runs that graph uncompiled "
                "(slower), COMPILE=0 turns compile off")

    def summary(self) -> dict:
        return dict(enabled=True, backend=self.backend, fallback=self.fallback, graphs=dict(self.graphs),
                    failures=[dict(f) for f in self.failures])

    def line(self) -> str:
        graphs = " ".join(f"{k}:{v}" for k, v in self.graphs.items()) or "none"
        return f"compile:graphs {graphs} failures:{len(self.failures)}"


_active_compile = None  # the running run's CompileRecord (set by compile_settings), or None


@functools.cache
def compile_backend(backend: str, name: str):
    """The torch.compile backend for function `name`: `backend` wrapped to count each graph it compiles
    and to handle a failure as the running run's CompileRecord says. One object per pair for the whole
    process (cached), because dynamo reuses a compiled graph only under the same backend: a second
    evaluation (a fresh model of the same shapes) then compiles nothing new."""
    inner = torch._dynamo.lookup_backend(backend)

    def compile_graph(gm, example_inputs):
        record = _active_compile or CompileRecord(backend)
        record.graphs[name] = record.graphs.get(name, 0) + 1
        try:
            return inner(gm, example_inputs)
        except Exception as e:  # noqa: BLE001 - every backend failure is reported, then handled below
            message = record.failed(name, e)
            if record.fallback == "eager":
                return gm.forward  # this graph runs uncompiled; the rest of the run is unaffected
            raise CompileFailed(message) from e

    compile_graph.__name__ = f"{backend}_for_{name}"
    return compile_graph


class CompileFailed(RunError):
    """torch.compile could not compile a function and COMPILE_FALLBACK=error."""


def maybe_compile(fn, enabled: bool, name: str):
    """`fn` compiled through the run's CompileRecord (graph counts, loud failures) and counted under
    `name`, or `fn` itself."""
    if not enabled:
        return fn
    backend = _active_compile.backend if _active_compile is not None else "inductor"
    return torch.compile(fn, dynamic=False, backend=compile_backend(backend, name))


def compile_failure(e: BaseException) -> CompileFailed | None:
    """The one-line CompileFailed behind an exception torch.compile raised, if it is one: ours from
    the backend wrapper (dynamo wraps it), or dynamo's own (tracing) error, named by its frame."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, CompileFailed):
            return x
        todo += [getattr(x, "inner_exception", None), x.__cause__, x.__context__]
    if isinstance(e, torch._dynamo.exc.TorchDynamoException):
        if not hasattr(e, "as_compile_failure"):  # recorded once, however often it is asked
            record = _active_compile or CompileRecord()
            e.as_compile_failure = CompileFailed(record.failed("a compiled function (dynamo tracing)", e))
        return e.as_compile_failure
    return None


@contextlib.contextmanager
def compile_settings(qat: bool, record: CompileRecord):
    """Compiler settings for one run, undone when the run ends (nothing leaks into the process). A
    failed compile is recorded (see CompileRecord); only with COMPILE_FALLBACK=eager does dynamo
    suppress its own errors. With QAT inductor rounds the fake quantizer's scales to fp16 exactly as
    the export does (by default it skips such casts)."""
    global _active_compile
    eager = record.fallback == "eager"
    # With COMPILE_FALLBACK=eager dynamo suppresses its own tracing errors (the frame runs eagerly) and
    # says so in a warning: this handler turns each into a recorded failure.
    handler, dynamo_log = logging.Handler(logging.WARNING), logging.getLogger("torch._dynamo.convert_frame")
    handler.emit = lambda entry: record.failed("a compiled function (dynamo tracing)", RuntimeError(entry.getMessage()))
    # nonzero inside a graph (the varlen cu_seqlens) is an unbacked size, not a graph break
    dynamo = torch._dynamo.config.patch(suppress_errors=eager, capture_dynamic_output_shape_ops=True)
    inductor = torch._inductor.config.patch(emulate_precision_casts=True) if qat else contextlib.nullcontext()
    previous, _active_compile = _active_compile, record
    try:
        with dynamo, inductor:
            if eager:
                dynamo_log.addHandler(handler)
            yield record
    finally:
        dynamo_log.removeHandler(handler)  # a no-op unless it was added
        _active_compile = previous


# ==================================================================================================
# WEIGHT AVERAGING
# ==================================================================================================
# Owns the choice of weights to export: `WeightAverager` collects the averages during training.
#
# EMA: an fp32 copy updated every step, ema = d * ema + (1 - d) * w, with the usual warm-up
# d_t = min(EMA_DECAY, (1 + t) / (10 + t)): without it a short run would export mostly its initial
# weights (0.9965^150 = 0.59); from step ~2,560 on d_t = 0.9965, so full-length runs are unchanged.
# EMA_WARMUP=0 is the public scripts' constant decay from the initial weights (for comparisons).
# SWA: the uniform mean of snapshots taken every SWA_EVERY steps once the training fraction passes
# SWA_START_FRAC (of the EMA weights when both are on: "ema_swa"). Which weights are exported is logged.


class WeightAverager:
    def __init__(self, model: nn.Module, *, ema_decay: float, swa_start_frac: float, swa_every: int,
                 ema_warmup: bool = True):
        self.params = list(model.parameters())
        self.ema_decay, self.swa_start_frac, self.swa_every = ema_decay, swa_start_frac, swa_every
        self.ema_warmup = ema_warmup
        self.ema = [p.detach().float().clone() for p in self.params] if ema_decay > 0 else None
        self.swa_enabled = swa_start_frac < 1.0
        self.swa_sum: list[torch.Tensor] | None = None
        self.swa_count = 0

    @torch.no_grad()
    def update(self, step: int, fraction: float) -> None:
        if self.ema is not None:
            decay = min(self.ema_decay, (1 + step) / (10 + step)) if self.ema_warmup else self.ema_decay
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1.0 - decay)
        if self.swa_enabled and fraction >= self.swa_start_frac and step % self.swa_every == 0:
            source = self.ema if self.ema is not None else [p.detach().float() for p in self.params]
            if self.swa_sum is None:
                self.swa_sum = [t.clone() for t in source]
            else:
                torch._foreach_add_(self.swa_sum, source)
            self.swa_count += 1

    def choose(self, requested: str) -> str:
        """The weights to export: `auto` = ema_swa, ema or swa as enabled (and collected), else raw."""
        have_ema, have_swa = self.ema is not None, self.swa_count > 0
        if requested == "auto":
            return "ema_swa" if have_ema and have_swa else "ema" if have_ema else "swa" if have_swa else "raw"
        if "ema" in requested and not have_ema or "swa" in requested and not have_swa:
            raise RunError(f"EXPORT_WEIGHTS={requested} but those averages were not collected "
                           "(check EMA_DECAY / SWA_START_FRAC)")
        return requested

    @torch.no_grad()
    def apply(self, choice: str) -> None:
        """Copy the chosen averaged weights into the model."""
        if choice == "raw":
            return
        values = self.ema if choice == "ema" else [t / self.swa_count for t in self.swa_sum]
        for p, v in zip(self.params, values):
            p.copy_(v.to(p.dtype))


# ==================================================================================================
# QUANTIZATION & PACKING
# ==================================================================================================
# Every float tensor of at least QUANT_MIN_NUMEL values (65,537 by default: the public scripts keep
# tensors of at most 65,536 values float) is exported as integers in int8 containers with one fp16
# scale per row; smaller ones stay fp16, control tensors fp32 whatever their size. Tensors fall into groups with
# their own bits and clip: `embed` (token and bigram tables), `head` (an untied output head), `attn`,
# `mlp` and `other` matrices (these two follow MATRIX_BITS unless ATTN_BITS / MLP_BITS say otherwise).
#
# Row scales (QUANT_METHOD):
#   absmax   s = max|w_row| / L,             L = 2^(bits-1) - 1 (the baseline's grid)
#   sdclip   s = k * std(w_row) / L,         k = the group's *_CLIP_SIGMAS; values past k std clip to +-L
#   gptq     the sdclip grid, values chosen column by column to cancel the layer-output error on
#            calibration activations (see GPTQ below)
# Scales are rounded to fp16 first and clamped after the cast, so no row ever gets a zero scale. QAT
# fakes exactly the exported grid (same scale function, same rounding).
#
# The artifact ("packer") is self-describing:
#   b"PGQA" | version u16 | header coder u8 | sha256 of everything after it (32 B) | header length u32
#   | header (compressed JSON: model config, streams, per-tensor name/shape/dtype/bits/scale layout/
#   coder) | streams
# Tensors contribute arrays to a few typed streams (codes and LQER factors int8, scales fp16, float16,
# float32, raw); each stream is compressed on its own: COMPRESSOR=zlib (level 9, the baseline's), lzma
# (preset 9e), brotli (quality 11 after a byte shuffle: all first bytes of each element, then all
# second bytes, ...), or ans (the context-modelled entropy coders below: always for the codes; for the
# float16 tensors and the scales when smaller than brotli; brotli for the rest). The same weights
# always give the same bytes, and any damage is refused on load with one line.
#
# Subsections: quantizers and the plan | GPTQ and calibration | LQER | the packer | the ans coder |
# fitting under the limit | the shipped code form.

FP16_MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal): a scale never rounds to 0
# Each tensor group: the knobs its bits come from, then those its SDClip k comes from, in precedence order.
GROUP_KNOBS = {"embed": (("embed_bits",), ("embed_clip_sigmas",)),
               "head": (("head_bits", "embed_bits"), ("embed_clip_sigmas",)),
               "attn": (("attn_bits", "matrix_bits"), ("attn_clip_sigmas", "matrix_clip_sigmas")),
               "mlp": (("mlp_bits", "matrix_bits"), ("mlp_clip_sigmas", "matrix_clip_sigmas")),
               "other": (("matrix_bits",), ("matrix_clip_sigmas",))}
QUANT_GROUPS = tuple(GROUP_KNOBS)
EMBEDDING_NAMES = ("tok_emb.weight", "bigram.embed.weight")
CALIBRATION_RESERVE_MARGIN = 1.25  # reserve = measured calibration time x this
ARTIFACT_MAGIC = b"PGQA"
ARTIFACT_VERSION = 4  # 4: ans also predicts the embedding's columns from columns (3: rows only)


def tensor_group(name: str) -> str:
    if name in EMBEDDING_NAMES:
        return "embed"
    if name == "lm_head.weight":
        return "head"
    return next((group for group in ("attn", "mlp") if f".{group}." in name), "other")


@dataclass(frozen=True)
class QuantPlan:
    """How each tensor is exported: the method and, per group, bits and SDClip k."""

    method: str = Hyperparameters.quant_method  # the knobs' defaults, as Hyperparameters declares them
    bits: dict = field(default_factory=lambda: QuantPlan.from_hparams(Hyperparameters()).bits)
    clip_sigmas: dict = field(default_factory=lambda: QuantPlan.from_hparams(Hyperparameters()).clip_sigmas)
    min_numel: int = Hyperparameters.quant_min_numel  # smaller tensors stay float

    @classmethod
    def from_hparams(cls, hp: Hyperparameters) -> "QuantPlan":
        """Each group's bits and k from the first of its GROUP_KNOBS that is set (non-zero), else the last."""
        first_set = lambda knobs: next((getattr(hp, k) for k in knobs if getattr(hp, k)), getattr(hp, knobs[-1]))
        return cls(method=hp.quant_method, min_numel=hp.quant_min_numel,
                   bits={g: first_set(bits) for g, (bits, _) in GROUP_KNOBS.items()},
                   clip_sigmas={g: first_set(sigmas) for g, (_, sigmas) in GROUP_KNOBS.items()})

    def spec(self, name: str, t: torch.Tensor) -> tuple[int, float] | None:
        """(bits, clip sigmas; 0 = absmax) if the export quantizes this tensor, else None (kept float)."""
        if not t.is_floating_point() or t.numel() < self.min_numel or is_control_tensor(name):
            return None
        group = tensor_group(name)
        return self.bits[group], (0.0 if self.method == "absmax" else self.clip_sigmas[group])


def clip_range(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def row_scales(w: torch.Tensor, bits: int, clip_sigmas: float = 0.0) -> torch.Tensor:
    """fp16 scale per row (one for a non-2-D tensor): absmax / L, or k * std / L with SDClip (k > 0).
    Clamped after the fp16 cast, so it is never 0 (an all-zero row quantizes to zeros)."""
    w = w.float()
    dims = -1 if w.ndim == 2 else tuple(range(w.ndim))
    spread = w.abs().amax(dim=dims) if clip_sigmas <= 0 else clip_sigmas * w.std(dim=dims, correction=0)
    return (spread / clip_range(bits)).to(torch.float16).clamp_min(FP16_MIN_SCALE)


def _broadcast(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return scale.float()[:, None] if w.ndim == 2 else scale.float()


def _round_to_grid(w: torch.Tensor, bits: int, clip_sigmas: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest integers in [-L, L] (as floats) on the row grid, and the fp16 scales."""
    scale = row_scales(w, bits, clip_sigmas)
    limit = clip_range(bits)
    return torch.round(w.float() / _broadcast(scale, w)).clamp(-limit, limit), scale


def quantize_rows(w: torch.Tensor, bits: int, clip_sigmas: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's integers (int8) and the fp16 scales."""
    q, scale = _round_to_grid(w, bits, clip_sigmas)
    return q.to(torch.int8).contiguous(), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * _broadcast(scale, q)


def fake_quantize(w: torch.Tensor, bits: int, clip_sigmas: float = 0.0) -> torch.Tensor:
    """What the export's grid turns `w` into, computed in float: the QAT forward uses this. (Not via
    quantize_rows: the int8 codes would turn a -0 into +0, so QAT's weights would differ in sign bits.)"""
    q, scale = _round_to_grid(w, bits, clip_sigmas)
    return (q * _broadcast(scale, w)).to(w.dtype)


@dataclass
class ExportedTensor:
    """One state-dict entry as the artifact stores it. `codes`/`scales` for quantized tensors,
    `value` for everything kept as is (already cast to its storage dtype)."""

    name: str
    shape: tuple
    dtype: str  # the dtype to restore
    bits: int = 0  # 0 = not quantized
    codes: torch.Tensor | None = None  # int8, rows x cols (a non-2-D tensor is one row)
    scales: torch.Tensor | None = None  # fp16, one per row
    value: torch.Tensor | None = None
    method: str = ""
    lqer: "LowRankFactors | None" = None  # a low-rank correction added on dequantization

    def dequantize(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        if not self.bits:
            return self.value.to(dtype)
        w = dequantize_rows(self.codes, self.scales)
        if self.lqer is not None:
            w = w + self.lqer.product()
        return w.reshape(self.shape).to(dtype)


def storage_dtype(name: str, t: torch.Tensor) -> torch.dtype:
    """Unquantized tensors: fp32 for control tensors, fp16 for other floats, non-floats as they are."""
    if not t.is_floating_point():
        return t.dtype
    return torch.float32 if is_control_tensor(name) else torch.float16


def quantize_tensor(name: str, t: torch.Tensor, plan: QuantPlan, hessian: torch.Tensor | None = None,
                    gptq: dict | None = None) -> ExportedTensor:
    """One state-dict entry as exported; GPTQ where the plan says so and a Hessian exists (tensors
    without one, like an input-only embedding whose inputs are one-hot, get the same grid rounded)."""
    t = t.detach().cpu()
    spec = plan.spec(name, t)
    dtype = str(t.dtype).removeprefix("torch.")
    if spec is None:
        return ExportedTensor(name, tuple(t.shape), dtype, value=t.to(storage_dtype(name, t)).contiguous())
    bits, sigmas = spec
    w = t.float().reshape(_rows_cols(t.shape))
    if plan.method == "gptq" and hessian is not None:  # on the Hessian's device: the GPU in a CUDA run
        options = dict(gptq or {})
        tied_damping = options.pop("tied_damping", Hyperparameters.gptq_tied_embed_damping)
        if name == "tok_emb.weight":  # only a tied embedding has a Hessian (the head's input)
            options["damping"] = tied_damping
        # fp32 matmuls without TF32 (on for training, see init_runtime): GPTQ's error feedback at 10
        # mantissa bits would round differently from the CPU's.
        tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
        try:
            codes, scales = gptq_quantize(w.to(hessian.device), hessian, bits, sigmas, **options)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        method = "gptq"
    else:
        codes, scales = quantize_rows(w, bits, sigmas)
        method = "sdclip" if plan.method == "gptq" else plan.method
    return ExportedTensor(name, tuple(t.shape), dtype, bits, codes, scales, method=method)


def quantize_state_dict(state_dict: dict[str, torch.Tensor], plan: QuantPlan,
                        hessians: dict[str, torch.Tensor] | None = None,
                        gptq: dict | None = None) -> list[ExportedTensor]:
    hessians = hessians or {}
    return [quantize_tensor(n, t, plan, hessians.get(n), gptq) for n, t in state_dict.items()]


def dequantize_state_dict(entries: list[ExportedTensor]) -> dict[str, torch.Tensor]:
    return {e.name: e.dequantize() for e in entries}


def estimate_payload_bytes(state_dict: dict[str, torch.Tensor], plan: QuantPlan) -> int:
    """Payload bytes before compression if values were bit-packed: `bits` per value plus fp16 scales."""
    def payload(name: str, t: torch.Tensor) -> int:
        spec = plan.spec(name, t)
        if spec is None:
            return t.numel() * storage_dtype(name, t).itemsize
        return math.ceil(t.numel() * spec[0] / 8) + 2 * _rows_cols(t.shape)[0]

    return sum(payload(name, t) for name, t in state_dict.items())


# ---- GPTQ ----------------------------------------------------------------------------------------
# Rounding each weight to its nearest grid point ignores that a layer's output error is what
# matters: y = x W^T, so the error is E = W - W_q weighted by H = sum x^T x over calibration inputs.
# GPTQ quantizes one input column at a time and spreads that column's rounding error over the
# columns not yet quantized, in the proportions H^-1 says cancel it best (Frantar et al. 2022).
# Here: the SDClip grid of the original row (so QAT's grid is still the exported one), damping
# `GPTQ_DAMPING * mean(diag H)` on the diagonal, columns in blocks of GPTQ_BLOCK_SIZE with the
# block's error pushed to later columns in one matmul, optional act-order (columns with the largest
# H_jj first), and inputs that never fire (H_jj = 0) get a zero column. Hessians come from forward
# hooks on every quantized CastedLinear, plus the final hidden state for the tied embedding (it is
# the output head's weight). That Hessian sees only the head: GPTQ lowers the head's error by raising
# the plain weight error, which the embedding's other use, the input table, pays (issue 19: on the
# tiny model, input-side loss +67%, head-side -57% at damping 0.01). So the tied embedding is damped
# by GPTQ_TIED_EMBED_DAMPING (0.5) instead: val_bpb gap 0.00207 -> 0.00165-0.00167 at 0.3-1.0.
# Calibration is GPTQ_CALIBRATION_SOURCE: `selfgen` (sequences the trained model samples itself,
# decoded with a key/value cache: no data is read, so it may run after the training cap) or `train`
# (training shards: that is training-data access, so it runs inside the training budget; its time,
# measured before training starts, is reserved). Validation shards are never a source.


def upper_cholesky_of_inverse(H: torch.Tensor, damping: float) -> torch.Tensor:
    """U with U^T U = (H + damping * mean(diag H) * I)^-1; the damping grows 10x until H is positive definite."""
    eye = torch.eye(H.size(0), dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal().mean().clamp_min(1e-12)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + damping * 10**attempt * mean_diag * eye)
        if not info:  # info = 0: factorized
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if not info:
                return U
    raise RunError(f"GPTQ: a Hessian is singular even at damping {damping * 1e5:g} x its mean diagonal; "
                   "raise GPTQ_DAMPING or use QUANT_METHOD=sdclip")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, clip_sigmas: float, *, damping: float = 0.01,
                  block_size: int = 128, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, rows x cols) and fp16 row scales of `w` (rows x cols) for inputs with Hessian (cols x cols)."""
    W = w.float().clone()
    scale = row_scales(W, bits, clip_sigmas)  # on W's device
    s = scale.float()
    limit = clip_range(bits)
    H = hessian.to(W.device).float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = upper_cholesky_of_inverse(H, damping)
    Q = torch.zeros_like(W)
    for i1 in range(0, W.size(1), block_size):
        i2 = min(i1 + block_size, W.size(1))
        block, errors, Hb = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            q = torch.round(block[:, j] / s).clamp(-limit, limit)
            Q[:, i1 + j] = q
            err = (block[:, j] - q * s) / Hb[j, j]
            block[:, j:] -= err[:, None] * Hb[j, j:][None, :]
            errors[:, j] = err
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8).cpu().contiguous(), scale.cpu()


def check_calibration_files(files: list[str]) -> None:
    """Calibration reads training shards only: a validation shard here is a bug, never a choice."""
    bad = [f for f in files if not Path(f).name.startswith("fineweb_train_")]
    if bad:
        raise RunError(f"validation or unknown shards can never be calibration data: {bad[0]}; "
                       "GPTQ_CALIBRATION_SOURCE=train reads fineweb_train_*.bin only")


# Rows of context `forward_hidden` needs for a correct last position: BigramHash reads the previous
# token, and SmearGate mixes in the previous position's embedding, which itself holds a bigram.
DECODE_WINDOW = 3


@torch.no_grad()
def sample_sequences(model: GPT, num_seqs: int, seq_len: int, *, temperature: float, seed: int, looping: bool,
                     device: torch.device, autocast=contextlib.nullcontext, kv_cache: bool = True) -> torch.Tensor:
    """Sequences the model writes itself from a BOS, sampled at `temperature`. With `kv_cache` each token
    costs one position's forward (the last DECODE_WINDOW tokens, attention against cached keys): linear
    in seq_len, the same tokens as a full forward per token (kv_cache=False, quadratic). Past
    TRAIN_SEQ_LEN the RoPE tables rescale every position, so there the full forward is used. BOS is never
    sampled after the first position, so a sample is one document (document masking changes nothing)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.full((num_seqs, 1), BOS_ID, dtype=torch.int64, device=device)
    cached = kv_cache and seq_len <= model.cfg.train_seq_len
    # Cached: every attention layer runs `forward_last_cached` at position `pos`, one key/value cache per
    # layer pass (a looped block runs several passes per forward; `calls` counts them at this position).
    caches, layers = collections.defaultdict(list), [block.attn for block in model.blocks] if cached else []

    def cached_forward(attn: CausalSelfAttention):
        def forward(x, v_first, docs=None):  # a sample is one document (no BOS after the first): no mask
            calls[attn] += 1
            return attn.forward_last_cached(x, v_first, caches[attn, calls[attn]], pos)
        return forward

    for attn in layers:
        attn.forward = cached_forward(attn)  # an instance attribute shadows the class's forward
    try:
        for pos in range(seq_len - 1):
            calls = collections.Counter()
            with autocast():
                h = model.forward_hidden(ids[:, -DECODE_WINDOW:] if cached else ids, looping)
                logits = model.head(h[:, -1]).float()
            logits[:, BOS_ID] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
    finally:
        for attn in layers:
            del attn.forward
    return ids


def calibration_batch_count(requested: int, world_size: int) -> int:
    """GPTQ_CALIBRATION_BATCHES over all ranks, rounded up to a multiple of the world size so every rank
    reads as many (the deadline check is collective). So 1 process and N ranks calibrate alike only
    when N divides it (the record's 16 on 8 ranks does)."""
    return world_size * math.ceil(requested / world_size)


def calibration_inputs(hp: Hyperparameters, rt: Runtime, model: GPT, train_files: list[str], looping: bool,
                       autocast=contextlib.nullcontext):
    """This rank's calibration batches, one at a time (calibration_batch_count over all ranks)."""
    seq_len = hp.gptq_calibration_seq_len or hp.train_seq_len
    mine = range(rt.rank, calibration_batch_count(hp.gptq_calibration_batches, rt.world_size), rt.world_size)
    if hp.gptq_calibration_source == "train":
        check_calibration_files(train_files)
        with contextlib.closing(DistributedTokenLoader(train_files, rt.rank, rt.world_size, rt.device,
                                                       seed=hp.seed)) as loader:
            for _ in mine:
                yield loader.next_batch(hp.gptq_calibration_seqs * seq_len * rt.world_size, seq_len, 1)[0]
    else:
        for i in mine:
            yield sample_sequences(model, hp.gptq_calibration_seqs, seq_len, temperature=hp.gptq_selfgen_temperature,
                                   seed=hp.seed + 1000 + i, looping=looping, device=rt.device, autocast=autocast)


@torch.no_grad()
def collect_hessians(model: GPT, batches, plan: QuantPlan, looping: bool, autocast=contextlib.nullcontext,
                     stop=None) -> dict[str, torch.Tensor]:
    """H = sum of x^T x over every input row each quantized matrix sees (fp32), summed over ranks.
    `stop()`, asked before each batch is read, ends the collection early (a deadline)."""
    hessians: dict[str, torch.Tensor] = {}

    def accumulate(key: str, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.size(-1))
        if key not in hessians:
            hessians[key] = torch.zeros(x.size(1), x.size(1), device=x.device)
        hessians[key].addmm_(x.T, x)

    hooks = [module.register_forward_hook(lambda mod, inputs, output, key=f"{name}.weight": accumulate(key, inputs[0]))
             for name, module in model.named_modules()
             if isinstance(module, CastedLinear) and plan.spec(f"{name}.weight", module.weight) is not None]
    tied_head = model.lm_head is None and plan.spec("tok_emb.weight", model.tok_emb.weight) is not None
    was_training = model.training
    model.eval()
    try:
        batches = iter(batches)
        while not (stop and stop()) and (x := next(batches, None)) is not None:  # asks stop() before reading
            with autocast():
                h = model.forward_hidden(x, looping)
                if model.lm_head is not None:
                    model.lm_head(h)
            if tied_head:  # the head's input is the final hidden state
                accumulate("tok_emb.weight", h)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for key in sorted(hessians):  # same order on every rank
        all_reduce_sum(hessians[key])
    return hessians


# ---- LQER ------------------------------------------------------------------------------------------
# Low-rank correction of the quantization error (LQER_ENABLED): for the LQER_TOP_K quantized tensors
# whose error costs the most, store E ~ A B with rank LQER_RANK, so W = q s + A B. With a Hessian the
# fit is in the layer-output metric (SVD of E L with H = L L^T, then B = V^T L^-1), otherwise plain
# SVD. The factors are integers too, at LQER_FACTOR_BITS (A at LQER_A_BITS if set: R0427 stores A in
# 2 bits, B in 4): symmetric form = per-row fp16 scales for A and B; asymmetric form
# (LQER_ASYM_ENABLED) = one scale per column of A (each carries one singular value) and one per
# LQER_ASYM_GROUP values of B.


def _in_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """The flattened tensor, zero-padded, as rows of `group` consecutive values."""
    flat = x.reshape(-1)
    return torch.cat([flat, flat.new_zeros(-flat.numel() % group)]).reshape(-1, group)


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax integers with one fp16 scale per `group` consecutive values of the flattened tensor."""
    codes, scales = quantize_rows(_in_groups(x, group), bits)
    return codes.reshape(-1)[: x.numel()].reshape(x.shape).contiguous(), scales


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    return dequantize_rows(_in_groups(codes.float(), group), scales).reshape(-1)[: codes.numel()].reshape(codes.shape)


@dataclass
class LowRankFactors:
    """A (rows x rank) and B (rank x cols) as integers with fp16 scales; `group` 0 = symmetric form."""

    a_codes: torch.Tensor
    a_scales: torch.Tensor
    b_codes: torch.Tensor
    b_scales: torch.Tensor
    group: int
    bits: int  # of B (and of A unless a_bits)
    a_bits: int  # 0 = bits

    def product(self) -> torch.Tensor:
        if self.group:  # asymmetric: A by column, B by groups
            a = self.a_codes.float() * self.a_scales.float()[None, :]
            b = dequantize_groups(self.b_codes, self.b_scales, self.group)
        else:
            a, b = dequantize_rows(self.a_codes, self.a_scales), dequantize_rows(self.b_codes, self.b_scales)
        return a @ b

    @classmethod
    def fit(cls, error: torch.Tensor, rank: int, bits: int, group: int,
            hessian: torch.Tensor | None = None, a_bits: int = 0) -> "LowRankFactors":
        E = error.double()
        if hessian is not None:  # in the output metric: E L with H = L L^T, then B = V^T L^-1
            H = hessian.double()
            L = torch.linalg.cholesky(H + 0.01 * H.diagonal().mean().clamp_min(1e-12) * torch.eye(H.size(0),
                                                                                              dtype=H.dtype))
            E = E @ L
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        a, b = U[:, :rank] * S[:rank], Vh[:rank]
        if hessian is not None:
            b = torch.linalg.solve_triangular(L, b, upper=False, left=False)
        a, b = a.float(), b.float()
        a_bits = a_bits or bits
        if group:
            a_codes, a_scales = quantize_rows(a.T.contiguous(), a_bits)
            b_codes, b_scales = quantize_groups(b, bits, group)
            return cls(a_codes.T.contiguous(), a_scales, b_codes, b_scales, group, bits, a_bits)
        return cls(*quantize_rows(a, a_bits), *quantize_rows(b, bits), 0, bits, a_bits)


def apply_lqer(state_dict: dict[str, torch.Tensor], entries: list[ExportedTensor], *, rank: int, top_k: int,
               factor_bits: int, group: int = 64, hessians: dict | None = None,
               a_bits: int = 0) -> list[ExportedTensor]:
    """A copy of `entries` where the top_k quantized 2-D tensors with the largest error cost carry a
    low-rank correction (cost = ||E X^T||^2 with a Hessian, else ||E||^2)."""
    hessians = hessians or {}
    costs = []
    for i, e in enumerate(entries):
        if e.bits and len(e.shape) == 2 and min(e.shape) > rank:
            err = state_dict[e.name].detach().float().cpu() - dequantize_rows(e.codes, e.scales)
            h = hessians.get(e.name)
            h = None if h is None else h.cpu()
            costs.append((output_energy(err, h), i, err, h))
    out = list(entries)
    for _, i, err, h in sorted(costs, key=lambda c: -c[0])[:top_k]:
        out[i] = dataclasses.replace(entries[i], lqer=LowRankFactors.fit(err, rank, factor_bits, group, h, a_bits))
    return out


# ---- the packer --------------------------------------------------------------------------------------

def byte_shuffle(data: bytes, stride: int) -> bytes:
    """All first bytes of each `stride`-byte element, then all second bytes, ...: the exponent bytes of
    fp16 values end up together, where a general-purpose compressor finds them (stride 1: `data`)."""
    return np.frombuffer(data, np.uint8).reshape(-1, stride).T.tobytes()


def byte_unshuffle(data: bytes, stride: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(stride, -1).T.tobytes()


def compress_bytes(data: bytes, coder: str, stride: int) -> bytes:
    """zlib, lzma or brotli (the coder a knob or the packer picked); lzma and brotli after byte_shuffle."""
    if coder == "zlib":
        return zlib.compress(data, level=9)
    data = byte_shuffle(data, stride)
    if coder == "lzma":
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    import brotli
    return brotli.compress(data, quality=11)


def decompress_bytes(data: bytes, coder: str, stride: int) -> bytes:
    """compress_bytes undone; a coder name it does not know (only a damaged header has one) reads as brotli,
    which then fails on the bytes."""
    if coder == "zlib":
        return zlib.decompress(data)
    if coder == "lzma":
        return byte_unshuffle(lzma.decompress(data), stride)
    import brotli
    return byte_unshuffle(brotli.decompress(data), stride)


# Stream name -> numpy dtype of its elements (the byte-shuffle stride is its itemsize).
STREAM_DTYPES = {"codes": np.int8, "lqer": np.int8, "scales": np.float16, "float16": np.float16,
                 "float32": np.float32}
HEADER_CODERS = ("zlib", "lzma", "brotli")


def stream_dtype(name: str) -> np.dtype:
    """A `raw:<dtype>` stream holds that dtype, any other stream its STREAM_DTYPES entry (bytes if none)."""
    return np.dtype(name[4:]) if name.startswith("raw:") else np.dtype(STREAM_DTYPES.get(name, np.uint8))


def _rows_cols(shape) -> tuple[int, int]:
    """A tensor as quantizers and coders see it: 2-D as rows x cols, anything else as one row."""
    numel = math.prod(shape)
    return (shape[0], numel // shape[0]) if len(shape) == 2 else (1, numel)


def _tensor_parts(e: ExportedTensor) -> list[tuple[str, np.ndarray]]:
    """The arrays a tensor contributes, in order, each to its named stream."""
    if e.bits:
        parts = [("codes", e.codes.numpy()), ("scales", e.scales.numpy())]
        if e.lqer is not None:
            f = e.lqer
            parts += [("lqer", f.a_codes.numpy()), ("lqer", f.b_codes.numpy()), ("scales", f.a_scales.numpy()),
                      ("scales", f.b_scales.numpy())]
        return parts
    arr = e.value.numpy()
    return [(arr.dtype.name if arr.dtype.name in ("float16", "float32") else "raw:" + arr.dtype.str, arr)]


def pack_artifact(entries: list[ExportedTensor], *, compressor: str, model: dict | None = None,
                  meta: dict | None = None, stats: dict | None = None) -> bytes:
    """The artifact bytes. `model` (the ModelConfig as a dict) is what a loader checks it against;
    `stats`, if given, receives the compressed bytes of each stream."""
    general = "brotli" if compressor == "ans" else compressor  # ans codes the codes; brotli the rest
    stats = {} if stats is None else stats
    streams, tensors = collections.defaultdict(list), []
    for e in entries:
        parts = _tensor_parts(e)
        for stream, arr in parts:
            streams[stream].append(arr)
        tensors.append(dict(name=e.name, shape=list(e.shape), dtype=e.dtype, bits=e.bits, method=e.method,
                            scale="row_fp16" if e.bits else "none", stream=parts[0][0]))
        if (f := e.lqer) is not None:  # layout: A rows x rank, B rank x cols, int8 codes then fp16 scales
            tensors[-1]["lqer"] = dict(rank=f.b_codes.shape[0], group=f.group, bits=f.bits,
                                       **({"a_bits": f.a_bits} if f.a_bits != f.bits else {}))
    stream_info, payloads, quantized = [], [], [e for e in entries if e.bits]
    for name in sorted(streams):
        arrays, stride = streams[name], stream_dtype(name).itemsize
        if name == "codes" and compressor == "ans":
            ans_stats: dict = {}
            coder, data = "ans", ans_encode(arrays, [e.bits for e in quantized], ans_stats,
                                            [tensor_group(e.name) for e in quantized])
            stats["codes_model_ce"] = ans_stats["model_ce"]  # not a stream: export_artifact takes it out
        else:  # tobytes(): C order, whatever the array's strides
            coder, data = general, compress_bytes(b"".join(a.tobytes() for a in arrays), general, stride)
            if compressor == "ans" and name in ("float16", "scales"):  # the ans model, unless brotli is smaller
                modelled = ans_encode_fp16(arrays) if name == "float16" else ans_encode_fp16_vectors(arrays)
                if len(modelled) < len(data):
                    coder, data = "ans", modelled
        stream_info.append(dict(name=name, coder=coder, length=len(data), stride=stride))
        payloads.append(data)
        stats[name] = len(data)
    coders = {s["name"]: s["coder"] for s in stream_info}
    header = dict(format="parameter-golf-quantized", model=model or {}, meta=meta or {}, streams=stream_info,
                  tensors=[dict(t, coder=coders[t["stream"]]) for t in tensors])
    header_bytes = compress_bytes(json.dumps(header, sort_keys=True, separators=(",", ":")).encode(), general, 1)
    body = struct.pack("<I", len(header_bytes)) + header_bytes + b"".join(payloads)
    prefix = ARTIFACT_MAGIC + struct.pack("<HB", ARTIFACT_VERSION, HEADER_CODERS.index(general))
    stats["header"] = len(prefix) + 32 + 4 + len(header_bytes)
    return prefix + hashlib.sha256(body).digest() + body


def _header_parts(t: dict) -> list[tuple[str, int]]:
    """(stream, element count) of each array of the header's tensor `t`, in the order of _tensor_parts."""
    if not t["bits"]:
        return [(t["stream"], math.prod(t["shape"]))]
    rows, cols = _rows_cols(t["shape"])
    parts = [("codes", rows * cols), ("scales", rows)]
    if "lqer" in t:  # A, B, then their scales: per row, or (asymmetric) per column of A and per group of B
        rank, group = t["lqer"]["rank"], t["lqer"]["group"]
        parts += [("lqer", rows * rank), ("lqer", rank * cols), ("scales", rank if group else rows),
                  ("scales", -(-rank * cols // group) if group else rank)]
    return parts


def _scale_vector_lengths(tensors: list[dict]) -> list[int]:
    """Lengths of the arrays in the `scales` stream."""
    return [n for t in tensors for stream, n in _header_parts(t) if stream == "scales"]


def _flat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate([np.zeros(0, dtype)] + [a.reshape(-1) for a in arrays])


def _ans_decode_stream(name: str, data: bytes, tensors: list[dict]) -> np.ndarray:
    """The values of a stream the packer ans-coded (the codes, float16 or scales), flat."""
    mine = [t for t in tensors if t["stream"] == name]  # the quantized tensors for the codes
    shapes = [_rows_cols(t["shape"]) for t in mine]
    if name == "codes":
        return _flat(ans_decode(data, shapes, [t["bits"] for t in mine], [tensor_group(t["name"]) for t in mine]), np.int8)
    if name == "float16":
        return _flat(ans_decode_fp16(data, shapes), np.float16)
    return _flat(ans_decode_fp16_vectors(data, _scale_vector_lengths(tensors)), np.float16)


def _corrupt(why: str) -> RunError:
    return RunError(f"model artifact is corrupt or truncated ({why}); re-run training to re-create it")


def read_artifact_header(blob: bytes) -> tuple[dict, bytes]:
    """The header dict and the stream bytes, after checking magic, version and checksum."""
    if blob[:4] != ARTIFACT_MAGIC:
        raise RunError("model artifact is corrupt or not a Parameter Golf artifact (bad magic bytes); "
                       "pass the final_model.*.ptz file a run wrote")
    if len(blob) < 43:
        raise _corrupt(f"{len(blob)} bytes: no complete fixed header")
    version, header_coder = struct.unpack("<HB", blob[4:7])
    if version != ARTIFACT_VERSION:
        raise RunError(f"model artifact has format version {version}, this script reads version {ARTIFACT_VERSION}; "
                       "score it with the train_gpt.py that wrote it")
    digest, body = blob[7:39], blob[39:]
    if hashlib.sha256(body).digest() != digest or header_coder >= len(HEADER_CODERS):
        raise _corrupt("sha256 of the payload does not match")
    (header_len,) = struct.unpack("<I", body[:4])
    try:
        header = json.loads(decompress_bytes(body[4 : 4 + header_len], HEADER_CODERS[header_coder], 1))
    except Exception as e:  # zlib.error, lzma.LZMAError, brotli.error (a plain Exception subclass), ValueError
        raise _corrupt(f"header does not decode: {e.__class__.__name__}") from None
    return header, body[4 + header_len :]


def unpack_artifact(blob: bytes, expect_model: dict | None = None) -> tuple[list[ExportedTensor], dict]:
    """The exported tensors and the header. With `expect_model`, a file made for another model
    configuration is refused (before any tensor is decoded)."""
    header, payload = read_artifact_header(blob)
    if expect_model is not None:
        diffs = [f"{k}={header['model'].get(k)!r} (expected {v!r})" for k, v in expect_model.items()
                 if k != "attn_backend" and header["model"].get(k) != v]
        if diffs:
            raise RunError(f"model artifact was made for another model: {', '.join(diffs[:4])}; "
                           "score it with its training settings (EVAL_ONLY=1 reads them from it)")
    arrays, offset = {}, 0
    try:
        for s in header["streams"]:
            data = payload[offset : offset + s["length"]]
            offset += s["length"]
            arrays[s["name"]] = (_ans_decode_stream(s["name"], data, header["tensors"]) if s["coder"] == "ans" else
                                 np.frombuffer(decompress_bytes(data, s["coder"], s["stride"]), stream_dtype(s["name"])))
    except Exception as e:  # any decoder failure on damaged bytes
        raise _corrupt(f"stream does not decode: {e.__class__.__name__}") from None
    if offset != len(payload):
        raise _corrupt(f"{len(payload) - offset} unexpected trailing bytes")
    cursors = collections.Counter()  # values of each stream taken so far

    def take(stream: str, count: int) -> torch.Tensor:
        start = cursors[stream]
        if start + count > len(arrays.get(stream, ())):
            raise _corrupt(f"stream {stream} is shorter than its tensors")
        cursors[stream] += count
        return torch.from_numpy(arrays[stream][start : start + count].copy())

    entries = []
    for t in header["tensors"]:
        shape, bits = tuple(t["shape"]), t["bits"]
        parts = [take(stream, n) for stream, n in _header_parts(t)]
        if not bits:
            entries.append(ExportedTensor(t["name"], shape, t["dtype"], value=parts[0].reshape(shape)))
            continue
        rows, cols = _rows_cols(shape)
        lqer = None
        if "lqer" in t:
            rank, factor_bits = t["lqer"]["rank"], t["lqer"]["bits"]
            a, b, a_scales, b_scales = parts[2:]
            lqer = LowRankFactors(a.reshape(rows, rank), a_scales, b.reshape(rank, cols), b_scales, t["lqer"]["group"],
                                  factor_bits, t["lqer"].get("a_bits", factor_bits))
        entries.append(ExportedTensor(t["name"], shape, t["dtype"], bits, parts[0].reshape(rows, cols), parts[1],
                                      method=t["method"], lqer=lqer))
    return entries, header


# ---- the ans coder ----------------------------------------------------------------------------------
# brotli-11 already sits near the order-0 entropy of the codes, so beating it takes what a byte-wise
# compressor cannot see. Three things, each kept because it measurably paid on trained codes
# (docs/RESULTS.md):
# 1. Neighbouring rows (the embedding): a trained embedding holds clusters of nearly equal rows (tokens
#    the data rarely shows get nearly the same updates). In row order, each row may be replaced by
#    itself minus round(beta * the mean of a pointed-to earlier row and up to 7 of that row's own
#    pointed-to rows), beta in quarters, the pointer one of the row's 8 nearest earlier rows, where
#    that is estimated to cost fewer bits than the row alone plus its pointer (and the whole tensor's
#    estimate confirms it). The mean of a chain of cluster members predicts better than one neighbour
#    (its noise averages out), and pointing backwards needs no row order and decodes row by row.
#    Stored (byte-shuffled brotli u32): per tensor n, then per predicted row its step from the
#    previous one, its steps back to the pointer, and (rows averaged, beta). In attention and MLP
#    matrices no row paid for its pointer, so only the embedding is tried.
#    Then, in the same tensors, columns from columns: a trained embedding is far from a random matrix
#    (its top 64 of 256 directions hold about 60% of its variance), so what is left of each row still
#    has columns that predict one another. Column j may become itself minus a rounded integer
#    combination (coefficients in 64ths) of up to 32 earlier columns of the row residuals, chosen
#    greedily on their covariance while a column is estimated to save at least 14 bits; kept where
#    the tensor's estimate confirms it. Decoded column by column, each a whole column at once.
#    Stored after the row predictions: per column its term count, then all steps back to the terms,
#    then all coefficients + 128.
# 2. Columns and rows: the magnitude of a value is predicted from its row and column: per tensor,
#    rho_i = mean |x| of row i and gamma_j = mean |x| of column j / mean |x| (a rank-1 model, one log2
#    byte each: the side information; a GPTQ column's spread follows its Hessian diagonal, while SDClip
#    gives every row about the same spread). The context of a value is log2(rho_i * gamma_j) in buckets
#    of `width` side-information steps. Per coding group the encoder picks the mode: rows and columns
#    (0), columns only (1: no row bytes stored) or one context without side information (2: order 0,
#    so the codes never cost more than their order-0 entropy plus a table), the one with the fewest
#    estimated bytes, side bytes counted.
# 3. The tensor family: tables are shared per (family, bits), a coding group, not across families
#    whose grids and tails differ (the record's attention k = 13 and MLP k = 11.5 at the same 6 bits).
# The encoder also tries side-information resolutions (ANS_LOG_STEPS) and keeps the shortest bytes.
# Values are modelled sign-symmetric: each (group, context) stores one byte per magnitude |x| = 0..top
# (top = the group's largest |x|: the grid's L, or more after prediction), its count relative to
# the context's most frequent magnitude in 1/16-octave log steps (0 = never occurs), which costs
# ~0.0005 bits per value against exact counts. The values of a context are coded with that table by
# constriction's rANS coder (Rust, whole numpy arrays per call); the side bytes are rANS-coded too,
# each row or column vector with a two-sided geometric law fitted to it (center and decay, 2 bytes).
# Contexts, probabilities and predictions are integers computed from stored bytes, so the decoder
# derives exactly the encoder's model. Everything the decoder needs is in the counted bytes.
#   layout: n_groups u8 | (family u8, bits u8, mode u8, width u8, top u16) per group | side length u32 |
#           table length u32 | prediction length u32 | side | tables (brotli) | predictions (rows, then
#           columns) | rANS words (u32)
ANS_LOG_STEPS = (3, 4, 6, 8)  # side-information resolutions tried (steps per octave); the smallest output wins
ANS_CONTEXT_WIDTHS = (1, 2, 3, 4, 6, 8)  # candidate context widths, in side-information steps
ANS_TABLE_STEPS = 16  # table entries: log2 steps per octave
ANS_PREDICTED_FAMILIES = ("embed",)  # where predicting rows from rows and columns from columns paid (docs/RESULTS.md)
ANS_CANDIDATES = 8  # a row's pointer goes to one of its 8 nearest earlier rows
ANS_CHAIN_DEPTH = 8  # and it averages that row and up to 7 of its parents
ANS_COLUMN_TERMS = 32  # a column is predicted from up to 32 earlier columns,
ANS_COLUMN_SHIFT = 6  # with integer coefficients in 64ths,
ANS_COLUMN_MIN_BITS = 14  # each term estimated to save at least 14 bits over all rows


def _ans_check(ok) -> None:
    """Every inconsistency a decoder finds in ans bytes is this one error (the packer calls it corrupt)."""
    if not ok:
        raise ValueError("ans data does not match the tensor list")


# Probability weight of each table byte: 2^(t/16) with 8 fractional bits, as exact integers (0 = absent).
# No value lies near a rounding boundary, so every machine computes the same integers.
_ANS_TABLE_WEIGHTS = np.concatenate([[0.0], np.round(np.exp2(np.arange(1, 256) / ANS_TABLE_STEPS + 8))])


def _log_bytes(values: np.ndarray, steps: int) -> np.ndarray:
    """Values > 0 as uint8 log2 steps of 1/steps octave around 128 (clipped to the byte)."""
    return np.clip(np.round(np.log2(np.maximum(values, 1e-9)) * steps) + 128, 0, 255).astype(np.uint8)


def _magnitude_side_info(codes: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    magnitude = np.abs(codes.astype(np.float32))
    overall = max(float(magnitude.mean()), 1e-6)
    return (_log_bytes(magnitude.mean(axis=1) + 1e-3, steps),
            _log_bytes(magnitude.mean(axis=0) / overall + 1e-3, steps))


def _side_weights(center: int, decay: int) -> np.ndarray:
    """Integer weights over the 256 side bytes: a two-sided geometric law around `center`, falling by
    2^(-decay/64) per step (in whole table steps, so encoder and decoder get the same integers)."""
    steps = (np.abs(np.arange(256) - center) * decay) >> 2
    return _ANS_TABLE_WEIGHTS[np.clip(255 - steps, 1, 255)]


@dataclass(frozen=True)
class _FittedLawCoder:
    """Vectors coded by rANS, each under its own law fitted to it: the bit pattern of every element is a
    symbol, `fit` chooses the law's few parameters (center, decay, ...: stored as `law_format`), and
    `weights(*law)` derives the same integer weights from them on both sides. The laws come first,
    then the rANS words; an empty vector takes no bytes."""

    dtype: type
    law_format: str
    fit: collections.abc.Callable  # symbols (int64) -> the law's parameters
    weights: collections.abc.Callable  # the law's parameters -> integer weights over the symbols

    def encode(self, vectors: list[np.ndarray]) -> bytes:
        laws, jobs = [], []
        for v in vectors:
            x = np.ascontiguousarray(v, dtype=self.dtype).reshape(-1)
            x = x.view(f"u{x.itemsize}").astype(np.int64)  # the bit patterns
            if len(x):
                law = self.fit(x)
                laws.append(struct.pack(self.law_format, *law))
                jobs.append((x.astype(np.int32), self.weights(*law)))
        return b"".join(laws) + _ans_words(jobs)

    def decode(self, data: bytes, lengths: list[int]) -> list[np.ndarray]:
        size, n_laws = struct.calcsize(self.law_format), np.count_nonzero(lengths)
        _ans_check(len(data) >= size * n_laws)
        coder = _ans_reader(data[size * n_laws :])
        laws, out = struct.iter_unpack(self.law_format, data[: size * n_laws]), []
        for n in lengths:
            symbols = np.zeros(0, np.int32)
            if n:
                law = next(laws)
                _ans_check(law[1] >= 1)  # every law is (center, decay, ...)
                symbols = coder.decode(_categorical(self.weights(*law)), n)
            out.append(symbols.astype(f"u{np.dtype(self.dtype).itemsize}").view(self.dtype))
        _ans_check(coder.is_empty())
        return out


def _fit_side_law(x: np.ndarray) -> tuple[int, int]:
    """(center, decay): the median, and the decay that codes the vector in the fewest bits."""
    center, decays = int(np.median(x)), np.arange(1, 256)
    weights = _side_weights(center, decays[:, None])  # every decay at once, one row each
    counts = np.bincount(x, minlength=256)
    costs = -(counts * np.log2(np.where(counts > 0, weights, 1) / weights.sum(axis=1, keepdims=True))).sum(axis=1)
    return center, int(decays[np.argmin(costs)])


# Side-information bytes, one vector per tensor row or column set, each with its own geometric law.
SIDE_CODER = _FittedLawCoder(np.uint8, "<BB", _fit_side_law, _side_weights)


def _predicted_steps(side: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """log2(rho_i * gamma_j) of every code of the given tensors, flattened and concatenated, in
    side-information steps (0..510)."""
    return _flat([r.astype(np.int16)[:, None] + c.astype(np.int16)[None, :] for r, c in side], np.int16)


def _ans_table(magnitude_counts: np.ndarray) -> np.ndarray:
    """Counts of each magnitude -> the stored bytes: 255 for the most frequent, one less per 1/16 octave
    below it (at least 1), 0 for a magnitude that never occurs."""
    table = np.zeros(magnitude_counts.shape, np.uint8)
    present = magnitude_counts > 0
    peak = magnitude_counts.max(axis=-1, keepdims=True).clip(min=1)
    steps = np.round(ANS_TABLE_STEPS * np.log2(peak / np.maximum(magnitude_counts, 1)))
    table[present] = np.clip(255 - steps, 1, 255)[present]
    return table


@dataclass(frozen=True)
class _Alphabet:
    """The symbols one coder sees and how a stored table models them. `codes`: q + L for q = -L..L,
    sign-symmetric: one table entry per magnitude |q| (zero counted once, each sign of |q| gets half of
    its weight). `signed`: the same symbols, one entry each (the order-0 mode: a skewed stream costs no
    sign bit). `fp16`: the high byte of an fp16 value (sign bit, 5 exponent bits, 2 mantissa bits), one
    entry per low 7 bits (a quarter-octave bucket of |value|), both signs get its weight."""

    kind: str
    L: int = 0

    @property
    def size(self) -> int:
        return 256 if self.kind == "fp16" else 2 * self.L + 1

    @property
    def magnitudes(self) -> int:
        return {"codes": self.L + 1, "signed": 2 * self.L + 1}.get(self.kind, 128)

    def fold(self, hist: np.ndarray) -> np.ndarray:
        """Symbol histogram(s) (..., size) -> table-entry histogram(s) (..., magnitudes)."""
        if self.kind == "codes":
            L = self.L
            return np.concatenate([hist[..., L : L + 1], hist[..., L + 1 :] + hist[..., L - 1 :: -1]], axis=-1)
        return hist if self.kind == "signed" else hist[..., :128] + hist[..., 128:]

    def weights(self, table: np.ndarray) -> np.ndarray:
        """Stored table(s) -> integer symbol weights (..., size)."""
        w = _ANS_TABLE_WEIGHTS[table]
        if self.kind == "codes":
            return np.concatenate([w[..., :0:-1], 2 * w[..., :1], w[..., 1:]], axis=-1)
        return w if self.kind == "signed" else np.concatenate([w, w], axis=-1)


def _ans_plan_width(symbols: np.ndarray, steps: np.ndarray, alphabet: _Alphabet) -> tuple[float, int, float]:
    """(estimated bytes, width, cross-entropy in bytes) of the context width (of ANS_CONTEXT_WIDTHS) with the
    fewest estimated bytes: symbols at their cross-entropy under the stored tables, plus the tables as
    brotli (quality 5, a quick estimate of the quality 11 they are packed with) leaves them."""
    import brotli

    fine = np.bincount(steps.astype(np.int64) * alphabet.size + symbols,
                       minlength=511 * alphabet.size).reshape(511, alphabet.size)
    best = None
    for width in ANS_CONTEXT_WIDTHS:
        merged = np.add.reduceat(fine, np.arange(0, fine.shape[0], width), axis=0)
        merged = merged[merged.sum(axis=1) > 0]
        table = _ans_table(alphabet.fold(merged))
        p = alphabet.weights(table)
        p = p / p.sum(axis=1, keepdims=True)
        ce = float(-(merged * np.log2(np.where(merged > 0, p, 1.0))).sum()) / 8
        cost = ce + len(brotli.compress(table.tobytes(), quality=5))
        if best is None or cost < best[0]:
            best = (cost, width, ce)
    return best


def _ans_contexts(steps: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions sorted by context, symbol count of each context 0..510)."""
    context = steps // width
    return np.argsort(context, kind="stable"), np.bincount(context, minlength=511)  # radix sort: linear time


def _ans_model_group(symbols: np.ndarray, steps: np.ndarray, alphabet: _Alphabet, width: int):
    """(tables, [(symbols, weights)] per context in decode order) for one group at this context width."""
    order, counts = _ans_contexts(steps, width)
    tables, jobs = [], []
    for group in np.split(symbols[order].astype(np.int32), np.cumsum(counts)[:-1]):
        if len(group):  # a context that occurs
            table = _ans_table(alphabet.fold(np.bincount(group, minlength=alphabet.size)))
            tables.append(table)
            jobs.append((group, alphabet.weights(table)))
    return tables, jobs


def _categorical(weights: np.ndarray):
    """constriction's model of one symbol with these integer weights."""
    import constriction

    return constriction.stream.model.Categorical(weights, perfect=False)


def _ans_words(jobs) -> bytes:
    """[(symbols, integer weights)] coded in that order by one rANS coder, as little-endian u32 words."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    for symbols, weights in reversed(jobs):  # a stack: the last context first
        coder.encode_reverse(symbols, _categorical(weights))
    return coder.get_compressed().astype("<u4").tobytes()


def _ans_reader(words: bytes):
    """The rANS decoder of _ans_words' bytes."""
    import constriction

    return constriction.stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4").astype(np.uint32))


def _ans_sections(side: list[np.ndarray], tables: list[np.ndarray], jobs, stats: dict) -> tuple[bytes, bytes, bytes]:
    """What a coder stores after its header: the side bytes, the tables (brotli) and the rANS words of
    `jobs`; their byte counts (and the number of contexts) go into `stats`."""
    packed = SIDE_CODER.encode(side), compress_bytes(_flat(tables, np.uint8).tobytes(), "brotli", 1), _ans_words(jobs)
    stats.update(zip(("side", "tables", "words"), map(len, packed)), contexts=len(tables))
    return packed


class _ContextReader:
    """Decodes what the contexts of _ans_model_group coded, group after group: each context's table from
    the stored tables in order, its symbols from the rANS words."""

    def __init__(self, packed_tables: bytes, words: bytes):
        self.tables, self.at = np.frombuffer(decompress_bytes(packed_tables, "brotli", 1), np.uint8), 0
        self.coder = _ans_reader(words)

    def group(self, steps: np.ndarray, width: int, alphabet: _Alphabet) -> np.ndarray:
        """The group's symbols in their original order."""
        _ans_check(width >= 1)
        order, counts = _ans_contexts(steps, width)
        decoded = []
        for count in counts[counts > 0].tolist():
            table = self.tables[self.at : self.at + alphabet.magnitudes]
            self.at += alphabet.magnitudes
            _ans_check(len(table) == alphabet.magnitudes)
            decoded.append(self.coder.decode(_categorical(alphabet.weights(table)), count))
        symbols = np.zeros(len(steps), np.int32)
        symbols[order] = _flat(decoded, np.int32)
        return symbols

    def finish(self) -> None:
        _ans_check(self.at == len(self.tables) and self.coder.is_empty())


def _split_flat(flat: np.ndarray, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """`flat` cut into arrays of the given shapes (rows, cols), in order."""
    ends = np.cumsum([rows * cols for rows, cols in shapes], dtype=np.int64)
    return [piece.reshape(shape) for piece, shape in zip(np.split(flat, ends[:-1]), shapes)]


def _split_sections(data: bytes, lengths: list[int]) -> list[bytes]:
    """`data` cut into pieces of the given lengths, then the rest; refuses data that is too short."""
    out, at = [], 0
    for n in lengths:
        _ans_check(at + n <= len(data))
        out.append(data[at : at + n])
        at += n
    return out + [data[at:]]


def _smallest_encoding(encode, stats: dict | None) -> bytes:
    """encode(steps, stats) at every side-information resolution of ANS_LOG_STEPS: the shortest bytes
    (the first on a tie). The decoder needs only the stored side bytes, not the resolution."""
    trials = []
    for steps in ANS_LOG_STEPS:
        trial = {"log_steps": steps}
        trials.append((encode(steps, trial), trial))
    data, trial = min(trials, key=lambda t: len(t[0]))
    if stats is not None:
        stats.update(trial)
    return data


def _predict_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(residual, plan): in row order, each row may become itself minus round(beta * the mean of an earlier
    row p and up to ANS_CHAIN_DEPTH - 1 of p's own parents), p one of the ANS_CANDIDATES nearest earlier
    rows (squared L2), where that is estimated to cost fewer bits than the row alone plus its pointer.
    plan: (child, p, rows averaged, beta in quarters) per predicted row. Distances are integer products
    summed in floats whose mantissa holds every partial sum (float32 if it can), so every machine
    chooses the same."""
    rows, cols = x.shape
    x = x.astype(np.int64)
    f = x.astype(np.float32 if int(np.abs(x).max(initial=0)) ** 2 * cols < 2**24 else np.float64)
    norms, parent, residual, plan = (x * x).sum(axis=1).astype(np.float64), np.full(rows, -1), x.copy(), []
    bits = lambda v: cols * np.log2(np.abs(v).mean(axis=-1) + 0.3)  # about a row of Laplace-like values
    for a in range(0, rows, 1024):  # distances in blocks: a full-size embedding's whole matrix is 256 MB
        distance = norms[None, :] - 2 * (f[a : a + 1024] @ f.T).astype(np.float64)  # + |row|^2, constant per row
        for i in range(max(a, 1), min(a + 1024, rows)):
            options, sums = [], []  # (pointer, rows averaged) and their sums
            near = np.argpartition(distance[i - a, :i], min(ANS_CANDIDATES, i) - 1)[:ANS_CANDIDATES]
            for p in near[np.argsort(distance[i - a, near], kind="stable")]:
                chain = _chain(parent, p, ANS_CHAIN_DEPTH)
                options += [(p, k) for k in range(1, len(chain) + 1)]
                sums.append(np.cumsum(x[chain], axis=0))
            count = np.array([k for _, k in options])[None, :, None]
            predictions = _chain_prediction(np.concatenate(sums)[None], count, np.arange(1, 5)[:, None, None])
            costs = bits(x[i] - predictions)  # quarters x options
            q, best = np.unravel_index(np.argmin(costs), costs.shape)
            if costs[q, best] + math.log2(rows) + 4 < bits(x[i]):
                residual[i], parent[i] = x[i] - predictions[q, best], options[best][0]
                plan.append((i, *options[best], q + 1))
    return residual, np.array(plan, np.int64).reshape(-1, 4)


def _chain(parent: np.ndarray, p: int, depth: int) -> list[int]:
    """Row p and up to depth - 1 of its parents, nearest first."""
    chain = [p]
    while len(chain) < depth and parent[chain[-1]] >= 0:
        chain.append(parent[chain[-1]])
    return chain


def _chain_prediction(total: np.ndarray, count, quarters) -> np.ndarray:
    """round(quarters / 4 * total / count), halves up: floor((2 q total + 4 count) / (8 count)) of integers,
    exact in float64 (a quotient is never within 1/64 of the integer above it), faster than // on int64."""
    return np.floor((2 * quarters * total + 4 * count) / (8 * count)).astype(np.int64)


def _unpredict_rows(residual: np.ndarray, plan: np.ndarray) -> np.ndarray:
    """_predict_rows undone, row by row in order (each row's chain is decoded before it)."""
    x, parent = residual.astype(np.int64), np.full(len(residual), -1)
    for i, p, k, q in plan.tolist():
        chain = _chain(parent, p, k)
        _ans_check(len(chain) == k)
        x[i] += _chain_prediction(x[chain].sum(axis=0), k, q)
        parent[i] = p
    return x


def _predict_columns(y: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(residual, terms): column j of y minus _column_prediction from its terms (earlier columns, integer
    coefficients in 2^-ANS_COLUMN_SHIFT units), each term chosen greedily on the covariance of y (partial
    covariances by Cholesky-like updates) while it saves an estimated ANS_COLUMN_MIN_BITS over all rows.
    Only the encoder computes in floats: the decoder reads the stored terms."""
    rows, cols = y.shape
    cov = np.cov(y.T.astype(np.float64)).reshape(cols, cols) if rows > 1 else np.zeros((cols, cols))
    residual, terms = y.astype(np.int64), []
    for j in range(cols):
        chosen, basis = [], np.zeros((0, j + 1))
        partial = cov[: j + 1, j].copy()  # covariance with column j given the chosen columns; [j]: its variance
        spread = cov.diagonal()[:j].copy()  # the variance of each candidate given the chosen columns
        while len(chosen) < min(ANS_COLUMN_TERMS, j):
            score = np.where(spread > 1e-9, partial[:j] ** 2 / np.maximum(spread, 1e-9), -1.0)
            score[chosen] = -1
            c = int(np.argmax(score))
            left = partial[j] - score[c]  # column j's variance given the chosen columns and c
            if score[c] <= 0 or left <= 1e-9 or rows / 2 * math.log2(partial[j] / left) < ANS_COLUMN_MIN_BITS:
                break
            u = cov[: j + 1, c] - basis.T @ basis[:, c]
            basis = np.vstack([basis, u / math.sqrt(u[c])])
            partial -= basis[-1] * basis[-1, j]
            spread -= basis[-1, :j] ** 2
            chosen.append(c)
        fit = np.linalg.lstsq(y[:, chosen].astype(np.float64), y[:, j].astype(np.float64), rcond=None)[0]
        coef = np.clip(np.round(fit * 2**ANS_COLUMN_SHIFT), -127, 127).astype(np.int64)
        terms.append((np.array(chosen, np.int64)[coef != 0], coef[coef != 0]))
        residual[:, j] -= _column_prediction(y, *terms[-1])
    return residual, terms


def _column_prediction(y: np.ndarray, idx: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """round(y[:, idx] @ coef / 2^ANS_COLUMN_SHIFT), halves up, in exact integers."""
    return (y[:, idx].astype(np.int64) @ coef + (1 << ANS_COLUMN_SHIFT - 1)) >> ANS_COLUMN_SHIFT


def _unpredict_columns(residual: np.ndarray, terms) -> np.ndarray:
    """_predict_columns undone, column by column in order (each column's terms are decoded before it)."""
    y = residual.astype(np.int64)
    for j, term in enumerate(terms):  # a column without terms adds 0
        y[:, j] += _column_prediction(y, *term)
    return y


def _no_terms(cols: int) -> list:
    return [(np.zeros(0, np.int64),) * 2] * cols


def _pack_plans(plans: list[np.ndarray], terms: list[list]) -> bytes:
    """Row predictions and column terms as one u32 array, per tensor: n, then n children (as steps from the
    previous one), n steps back to their pointers, n (rows averaged - 1) * 4 + quarters - 1; then each
    column's term count, all steps back to the terms, all coefficients + 128. Byte-shuffled brotli
    (smaller than bit-packing). No bytes at all when nothing is predicted."""
    if not sum(map(len, plans)) and not any(len(i) for t in terms for i, _ in t):
        return b""
    fields = [np.concatenate([[len(p)], np.diff(p[:, 0], prepend=0), p[:, 0] - p[:, 1], 4 * p[:, 2] + p[:, 3] - 5,
                              [len(i) for i, _ in t], *[j - i for j, (i, _) in enumerate(t)], *[c + 128 for _, c in t]])
              for p, t in zip(plans, terms)]
    return compress_bytes(_flat(fields, np.int64).astype("<u4").tobytes(), "brotli", 4)


def _unpack_plans(data: bytes, shapes: list[tuple[int, int]]) -> tuple[list[np.ndarray], list[list]]:
    if not data:
        return [np.zeros((0, 4), np.int64) for _ in shapes], [_no_terms(cols) for _, cols in shapes]
    values, at, plans, terms = np.frombuffer(decompress_bytes(data, "brotli", 4), "<u4").astype(np.int64), 0, [], []
    for r, cols in shapes:
        _ans_check(at < len(values))
        n = int(values[at])
        child, back, kind = values[at + 1 : at + 1 + 3 * n].reshape(3, n)  # a ValueError if short
        child = np.cumsum(child)
        _ans_check(not n or (child.max() < r and kind.max() < 4 * ANS_CHAIN_DEPTH and back.min() >= 1
                             and (child - back).min() >= 0))
        plans.append(np.stack([child, child - back, kind // 4 + 1, kind % 4 + 1], axis=1))
        at += 1 + 3 * n
        counts = values[at : at + cols]
        total = int(counts.sum())
        back, coef = values[at + cols : at + cols + 2 * total].reshape(2, total) - [[0], [128]]  # a ValueError if short
        idx = np.repeat(np.arange(cols), counts) - back
        _ans_check(len(counts) == cols and (not total or (back.min() >= 1 and idx.min() >= 0)))
        terms.append(list(zip(*(np.split(v, np.cumsum(counts)[:-1]) for v in (idx, coef)))))
        at += cols + 2 * total
    _ans_check(at == len(values))
    return plans, terms


def _side_used(side: tuple[np.ndarray, np.ndarray], mode: int) -> tuple:
    """The (row, column) bytes the contexts of a group in `mode` use: 0 both, 1 columns only, 2 none (one
    context: order 0). A mode stores side[mode:]; what it does not store counts as 128, the mean."""
    return tuple(np.full(len(v), 128, np.uint8) if k < mode else v for k, v in enumerate(side))


def _mode_alphabet(mode: int, top: int) -> _Alphabet:
    return _Alphabet("signed" if mode == 2 else "codes", top)


def _code_groups(bits: list[int], families: list[str]) -> list[tuple[str, int, list[int]]]:
    """(family, bits, member tensors) of each coding group: a group shares its tables."""
    keys = sorted(set(zip(families, bits)), key=lambda k: (QUANT_GROUPS.index(k[0]), k[1]))
    return [(f, b, [i for i, k in enumerate(zip(families, bits)) if k == (f, b)]) for f, b in keys]


def _predicted(families: list[str]) -> list[int]:
    return [i for i, f in enumerate(families) if f in ANS_PREDICTED_FAMILIES]


def _plan_group(residuals: list[np.ndarray], sides: list[tuple]) -> tuple:
    """(estimated bytes, mode, width, cross-entropy, top, symbols) of a coding group in its cheapest mode,
    side bytes counted (the first on a tie)."""
    top = max(1, max(int(np.abs(r).max(initial=0)) for r in residuals))
    symbols, best = _flat(residuals, np.int64) + top, None
    for mode in (0, 1, 2):
        cost, width, ce = _ans_plan_width(symbols, _predicted_steps([_side_used(s, mode) for s in sides]),
                                          _mode_alphabet(mode, top))
        best = min(best or (math.inf,),
                   (cost + len(SIDE_CODER.encode([v for s in sides for v in s[mode:]])), mode, width, ce))
    return best + (top, symbols)


def _estimated_bytes(x: np.ndarray) -> float:
    return _plan_group([x], [_magnitude_side_info(x, 4)])[0]


@functools.lru_cache(maxsize=2)  # the filler re-packs an unchanged embedding: predicted once
def _prediction(codes: bytes, dtype: str, shape: tuple) -> tuple[np.ndarray, np.ndarray, list]:
    """(residual, row plan, column terms): _predict_rows, then _predict_columns on what it leaves, each
    kept only where the context model says it pays (else no plan, or no terms)."""
    x, none = np.frombuffer(codes, dtype).reshape(shape), _no_terms(shape[1])
    (residual, plan), cost = _predict_rows(x), _estimated_bytes(x)
    if len(plan) and (rows := _estimated_bytes(residual) + len(_pack_plans([plan], [none]))) < cost:
        cost = rows
    else:
        residual, plan = x, plan[:0]
    after, terms = _predict_columns(residual)
    if _estimated_bytes(after) + len(_pack_plans([plan], [terms])) >= cost:
        return residual, plan, none
    return after, plan, terms


def ans_encode(arrays: list[np.ndarray], bits: list[int], stats: dict | None = None,
               families: list[str] | None = None) -> bytes:
    """The codes of the quantized tensors (rows x cols each, int8) as ans bytes; `families` (tensor
    groups, as tensor_group names them) pick tables and row and column prediction. `stats`, if given, receives the
    byte count of each part and the model's cross-entropy (`model_ce`, bytes)."""
    families = families or ["other"] * len(arrays)
    residuals, plans, terms, groups = [a.reshape(a.shape[0], -1) for a in arrays], [], [], _code_groups(bits, families)
    for i in _predicted(families):
        residuals[i], plan, columns = _prediction(residuals[i].tobytes(), residuals[i].dtype.str, residuals[i].shape)
        plans.append(plan)
        terms.append(columns)
    packed_plans = _pack_plans(plans, terms)

    def encode(log_steps: int, stats: dict) -> bytes:
        side = [_magnitude_side_info(r, log_steps) for r in residuals]
        header, tables, jobs, model_ce, modes = [struct.pack("<B", len(groups))], [], [], 0.0, {}
        for family, b, members in groups:
            _, mode, width, ce, top, symbols = _plan_group([residuals[i] for i in members], [side[i] for i in members])
            modes.update({i: mode for i in members})
            group_tables, group_jobs = _ans_model_group(
                symbols, _predicted_steps([_side_used(side[i], mode) for i in members]), _mode_alphabet(mode, top), width)
            header.append(struct.pack("<BBBBH", QUANT_GROUPS.index(family), b, mode, width, top))
            tables += group_tables
            jobs += group_jobs
            model_ce += ce
        packed_side, packed_tables, words = _ans_sections([v for i, pair in enumerate(side) for v in pair[modes[i]:]],
                                                          tables, jobs, stats)
        head = b"".join(header) + struct.pack("<III", len(packed_side), len(packed_tables), len(packed_plans))
        stats.update(rows=len(packed_plans), header=len(head), model_ce=model_ce)
        return head + packed_side + packed_tables + packed_plans + words

    return _smallest_encoding(encode, stats)


def ans_decode(data: bytes, shapes: list[tuple[int, int]], bits: list[int], families: list[str]) -> list[np.ndarray]:
    groups = _code_groups(bits, families)
    n_groups = len(groups)
    _ans_check(len(shapes) == len(bits) and data and data[0] == n_groups)
    params = list(struct.iter_unpack("<BBBBH", data[1 : 1 + 6 * n_groups]))
    packed_side, packed_tables, packed_plans, words = _split_sections(
        data[13 + 6 * n_groups :], struct.unpack("<III", data[1 + 6 * n_groups : 13 + 6 * n_groups]))
    _ans_check([p[:2] for p in params] == [(QUANT_GROUPS.index(f), b) for f, b, _ in groups]
               and all(p[2] <= 2 for p in params))
    modes = {i: p[2] for p, (_, _, members) in zip(params, groups) for i in members}
    vectors = iter(SIDE_CODER.decode(packed_side, [n for i, shape in enumerate(shapes) for n in shape[modes[i]:]]))
    side = [tuple(np.full(n, 128, np.uint8) if k < modes[i] else next(vectors) for k, n in enumerate(shape))
            for i, shape in enumerate(shapes)]  # as _side_used: what a mode does not store is 128
    reader, residuals = _ContextReader(packed_tables, words), [None] * len(shapes)
    for (_, _, members), (_, _, mode, width, top) in zip(groups, params):
        symbols = reader.group(_predicted_steps([side[i] for i in members]), width, _mode_alphabet(mode, top))
        for i, residual in zip(members, _split_flat(symbols.astype(np.int64) - top, [shapes[i] for i in members])):
            residuals[i] = residual
    reader.finish()
    predicted = _predicted(families)
    for i, plan, terms in zip(predicted, *_unpack_plans(packed_plans, [shapes[i] for i in predicted])):
        residuals[i] = _unpredict_rows(_unpredict_columns(residuals[i], terms), plan)
    out = [r.astype(np.int8) for r in residuals]
    _ans_check(all(np.array_equal(o, r) for o, r in zip(out, residuals)))
    return out


# fp16 tensors kept as floats (the `float16` stream) get the same treatment: the high byte of each
# value (sign, exponent, top 2 mantissa bits: a quarter-octave bucket of |w|) is coded in the context
# of the rank-1 magnitude prediction mean|w| of its row x mean|w| of its column (one byte each, as for
# the codes; a tensor with one row gets no column bytes); the low byte, the remaining mantissa bits,
# is noise and stored as it is.
#   layout: width u8 | side length u32 | table length u32 | side | tables (brotli) |
#           low bytes | rANS words (u32)

def _fp16_side_info(values: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    magnitude = np.abs(values.astype(np.float32))
    magnitude[~np.isfinite(magnitude)] = 0.0  # inf / nan carry no magnitude information
    overall = max(float(magnitude.mean()), 1e-9)
    cols = _log_bytes(magnitude.mean(axis=0) / overall, steps) if values.shape[0] > 1 else np.zeros(0, np.uint8)
    return _log_bytes(magnitude.mean(axis=1), steps), cols


def _fp16_steps(side: list[tuple[np.ndarray, np.ndarray]], shapes: list[tuple[int, int]]) -> np.ndarray:
    """A one-row tensor has no column bytes: every column counts as the mean (128)."""
    return _predicted_steps([(r, c if len(c) else np.full(cols, 128, np.uint8))
                             for (r, c), (_, cols) in zip(side, shapes)])


def ans_encode_fp16(arrays: list[np.ndarray]) -> bytes:
    """fp16 arrays (2-D as rows x cols, anything else as one row) as ans bytes."""
    values = [a.reshape(_rows_cols(a.shape)) for a in arrays]
    bits16 = _flat([v.view(np.uint16) for v in values], np.uint16)
    high, low, alphabet = (bits16 >> 8).astype(np.int64), (bits16 & 0xFF).astype(np.uint8).tobytes(), _Alphabet("fp16")

    def encode(log_steps: int, stats: dict) -> bytes:
        side = [_fp16_side_info(v, log_steps) for v in values]
        steps = _fp16_steps(side, [v.shape for v in values])
        width = _ans_plan_width(high, steps, alphabet)[1]
        packed_side, packed_tables, words = _ans_sections([v for pair in side for v in pair],
                                                          *_ans_model_group(high, steps, alphabet, width), stats)
        return struct.pack("<BII", width, len(packed_side), len(packed_tables)) + packed_side + packed_tables + low + words

    return _smallest_encoding(encode, None)


def ans_decode_fp16(data: bytes, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    width, side_len, table_len = struct.unpack("<BII", data[:9])
    packed_side, packed_tables, low, words = _split_sections(data[9:], [side_len, table_len,
                                                                        sum(rows * cols for rows, cols in shapes)])
    vectors = SIDE_CODER.decode(packed_side, [n for rows, cols in shapes for n in (rows, cols if rows > 1 else 0)])
    reader = _ContextReader(packed_tables, words)
    high = reader.group(_fp16_steps(list(zip(vectors[0::2], vectors[1::2])), shapes), width, _Alphabet("fp16"))
    reader.finish()
    return _split_flat(((high.astype(np.uint16) << 8) | np.frombuffer(low, np.uint8)).view(np.float16), shapes)


# The fp16 row scales (the `scales` stream) vary little within a tensor, so their 16-bit patterns sit
# in a narrow band: each tensor's scale vector (and each LQER factor's) is coded as the integers
# `bits - center` with a two-sided geometric law fitted to it (center u16, decay u8, radius u16: the
# band's half width, outside which nothing is coded). The packer keeps this only when it is smaller
# than brotli.

def _band_weights(center: int, decay: int, radius: int) -> np.ndarray:
    """Integer weights over all 65,536 fp16 bit patterns: 2^(-|x - center| * decay / 4096) within the
    band, 0 outside (whole table steps, as _side_weights)."""
    distance = np.abs(np.arange(65536) - center)
    steps = np.minimum((distance * decay) >> 8, 254)
    return np.where(distance <= radius, _ANS_TABLE_WEIGHTS[255 - steps], 0.0)


def _fit_band_law(x: np.ndarray) -> tuple[int, int, int]:
    """(center, decay, radius): the median, the decay that codes the vector in the fewest bits, and the
    largest distance from the center."""
    center = int(np.median(x))
    radius = int(np.abs(x - center).max())
    distance, band = np.abs(x - center), np.abs(np.arange(-radius, radius + 1))
    costs = []  # bits of the vector under each decay
    for decay in range(1, 256):
        weight = lambda dist: _ANS_TABLE_WEIGHTS[255 - np.minimum((dist * decay) >> 8, 254)]
        costs.append(len(x) * np.log2(weight(band).sum()) - np.log2(weight(distance)).sum())
    return center, 1 + int(np.argmin(costs)), radius


SCALE_CODER = _FittedLawCoder(np.float16, "<HBH", _fit_band_law, _band_weights)
ans_encode_fp16_vectors, ans_decode_fp16_vectors = SCALE_CODER.encode, SCALE_CODER.decode


def code_counts(codes) -> torch.Tensor:
    """How often each code value occurs in these int8 arrays (index = code + 128), as float64."""
    return sum((torch.bincount(torch.as_tensor(c).reshape(-1).long() + 128, minlength=256).double() for c in codes),
               torch.zeros(256, dtype=torch.float64))


def order0_bytes(counts: torch.Tensor) -> float:
    """The order-0 entropy, in bytes, of values with these counts: what a byte-wise compressor approaches."""
    nz = counts[counts > 0]
    return float(-(nz * torch.log2(nz / nz.sum())).sum() / 8)


def code_entropy_report(arrays: list[np.ndarray], bits: list[int], model_ce: float | None = None) -> tuple[float, float]:
    """(order-0 entropy of all codes, the ans model's cross-entropy), in bytes, without side information
    and tables. `model_ce`: already known from packing with ans (else the codes are encoded once more)."""
    if model_ce is None:
        stats: dict = {}
        ans_encode(arrays, bits, stats)
        model_ce = stats["model_ce"]
    return order0_bytes(code_counts(arrays)), model_ce


# ---- fitting under the limit ----------------------------------------------------------------------
# Before writing, code + model bytes are known exactly. If they exceed 16,000,000 minus
# ARTIFACT_MARGIN_BYTES, AUTO_FIT shrinks the model, in this order, stopping as soon as it fits:
#   1. raise every group's clip sigmas by one common factor (sdclip / gptq only): the code entropy
#      falls by about log2(factor) bits per weight, which sets the factor; re-packed to check, up to
#      AUTO_FIT_TRIES times and at most AUTO_FIT_MAX_SIGMA_SCALE;
#   2. only if zeroing every +-1 code (step 3) could not cover what is left: lower the bits of the
#      group holding the most quantized values by one (MLP in the record), and again while needed,
#      down to AUTO_FIT_MIN_BITS; each group at most once before any group twice;
#   3. zero the +-1 codes of the rows with the smallest scales (each costs that row's scale^2 of
#      squared error), as many as the order-0 entropy of the codes says, re-packed to check.
# Pruning is cheapest for the usual small excess; one bit fewer on a whole group costs less than
# zeroing most of the +-1 codes when the excess is large. Each step logs its factor, bits or count,
# the bytes, and what it cost: the relative squared error of the quantized weights against the
# pre-quant ones. It never writes an over-limit artifact silently: if all steps fail, the run ends
# with an error naming the sizes.
#
# The other way (sdclip / gptq): a model that comes out under the target spends the bytes left. The
# weighted error of a group is the sum over its tensors of the relative layer-output error
# tr(E H E^T) / tr(W H W^T) (E = W - W_q with LQER, H = the tensor's Hessian, I without one). A finer
# grid by a factor f costs about log2(1/f) bits per value and cuts a group's error by about 1 - f^2,
# so a byte buys the most where the weighted error per value is largest: each fill step refines that
# group's grid (its clip sigmas times f, f sized to spend half of the bytes left, as the entropy
# predicts them, corrected by how many real bytes a predicted byte cost so far); a k below
# AUTO_FIT_FILL_MIN_SIGMAS would clip the tails, so that group gets one bit more at twice the k (the
# same grid step, a wider range) instead. A step is kept only if it fits and lowers the weighted
# error; each logs its group, k and bits, its cost in bytes and its gain. It stops when less than
# max(AUTO_FIT_FILL_SLACK_BYTES, target / 1000) is left, after AUTO_FIT_FILL_STEPS steps, or when no
# group can be refined.
AUTO_FIT_TRIES = 4
AUTO_FIT_MAX_SIGMA_SCALE = 2.0
AUTO_FIT_MIN_BITS = 4
AUTO_FIT_FILL_STEPS = 8
AUTO_FIT_FILL_SLACK_BYTES = 512
AUTO_FIT_FILL_MIN_SIGMAS = 6.0


def weights_and_errors(state_dict: dict[str, torch.Tensor], entries: list[ExportedTensor]):
    """(entry, W, E = W - W_q) of every quantized tensor, W and E as rows x cols (float, on the CPU)."""
    for e in entries:
        if e.bits:
            w = state_dict[e.name].detach().float().cpu().reshape(e.codes.shape)
            yield e, w, w - e.dequantize().float().reshape(w.shape)


def output_energy(x: torch.Tensor, hessian: torch.Tensor | None = None) -> float:
    """||x||^2, or with a Hessian H = sum of input x^T x: tr(x H x^T), the energy of the layer outputs x makes."""
    return float(x.square().sum()) if hessian is None else float((x @ hessian.cpu().float() * x).sum())


def quantization_error(state_dict: dict[str, torch.Tensor], entries: list[ExportedTensor]) -> float:
    """sum ||W - W_q||^2 / sum ||W||^2 over the quantized tensors."""
    terms = list(weights_and_errors(state_dict, entries))
    return sum(output_energy(err) for _, _, err in terms) / max(sum(output_energy(w) for _, w, _ in terms), 1e-30)


def unit_codes_by_cost(entries: list[ExportedTensor]) -> list[torch.Tensor]:
    """Every +-1 code as (tensor index, row, column, code, scale^2 = about the squared error zeroing it
    adds), cheapest first: smallest row scale, ties in tensor, row, column order (deterministic)."""
    parts = []  # per tensor: (sort key, then the five columns)
    for i, e in enumerate(entries):
        if e.bits:
            rows, cols = torch.nonzero(e.codes.abs() == 1, as_tuple=True)
            scale = e.scales.float()[rows]
            parts.append((scale, torch.full_like(rows, i), rows, cols, e.codes[rows, cols].long(), scale.double().square()))
    if not parts:
        return [torch.zeros(0, dtype=torch.long)] * 5
    keys, *columns = (torch.cat(column) for column in zip(*parts))
    order = torch.argsort(keys, stable=True)
    return [column[order] for column in columns]


def prune_unit_codes(entries: list[ExportedTensor], units, count: int) -> list[ExportedTensor]:
    """A copy with the first `count` codes of `units` (from unit_codes_by_cost) set to 0."""
    out = list(entries)
    tensor_idx, rows, cols = (u[:count] for u in units[:3])
    for i in torch.unique(tensor_idx).tolist():
        mask = tensor_idx == i
        codes = entries[i].codes.clone()
        codes[rows[mask], cols[mask]] = 0
        out[i] = dataclasses.replace(entries[i], codes=codes)
    return out


def values_by_group(entries: list[ExportedTensor]) -> collections.Counter:
    """How many quantized values each tensor group holds."""
    values = collections.Counter()
    for e in entries:
        if e.bits:
            values[tensor_group(e.name)] += e.codes.numel()
    return values


def weighted_error_by_group(state_dict: dict[str, torch.Tensor], entries: list[ExportedTensor],
                            hessians: dict | None = None) -> collections.Counter:
    """Per group, the sum over its quantized tensors of tr(E H E^T) / tr(W H W^T) (H = I without a Hessian)."""
    hessians = hessians or {}
    out = collections.Counter()
    for e, w, err in weights_and_errors(state_dict, entries):
        h = hessians.get(e.name)
        out[tensor_group(e.name)] += output_energy(err, h) / max(output_energy(w, h), 1e-30)
    return out


def fill_budget(state_dict, plan: QuantPlan, entries: list[ExportedTensor], blob: bytes, *, target_bytes: int,
                quantize, pack, hessians: dict | None, log) -> tuple[bytes, list[ExportedTensor]]:
    """Refine the grid of the group where a byte buys the most weighted error until the artifact just
    fits `target_bytes` (documented above). Returns the last fitting (blob, entries)."""
    values = values_by_group(entries)
    errors = weighted_error_by_group(state_dict, entries, hessians)
    slack_goal = max(AUTO_FIT_FILL_SLACK_BYTES, target_bytes // 1000)
    log(f"auto_fit: model_bytes {len(blob)} <= target {target_bytes}: filling {target_bytes - len(blob)} bytes; "
        f"weighted_error {sum(errors.values()):.4e} ({' '.join(f'{g}:{v:.3e}' for g, v in sorted(errors.items()))})")
    bytes_per_predicted, done = 1.0, set()
    for step in range(1, AUTO_FIT_FILL_STEPS + 1):
        slack = target_bytes - len(blob)
        open_groups = [g for g in values if g not in done]
        if slack <= slack_goal or not open_groups:
            break
        group = max(open_groups, key=lambda g: (errors[g] / values[g], g))
        bits_per_value = min(4 * slack / bytes_per_predicted / values[group], 1.0)  # half the slack, in bits
        for _ in range(AUTO_FIT_TRIES):
            k, bits = plan.clip_sigmas[group] * 2.0**-bits_per_value, plan.bits[group]
            if k < AUTO_FIT_FILL_MIN_SIGMAS and bits < 8:
                k, bits = 2 * k, bits + 1
            trial = dataclasses.replace(plan, bits={**plan.bits, group: bits},
                                        clip_sigmas={**plan.clip_sigmas, group: k})
            trial_blob = pack(trial_entries := quantize(trial))
            if len(trial_blob) <= target_bytes:
                break
            bits_per_value *= 0.5 * slack / max(len(trial_blob) - len(blob), 1)  # overshot: aim at half again
        trial_errors = weighted_error_by_group(state_dict, trial_entries, hessians)
        cost, gain = len(trial_blob) - len(blob), sum(errors.values()) - sum(trial_errors.values())
        verdict = "kept" if len(trial_blob) <= target_bytes and gain > 0 and k >= AUTO_FIT_FILL_MIN_SIGMAS else "refused"
        log(f"auto_fit: fill step {step} {group} clip_sigmas {plan.clip_sigmas[group]:.3f}->{k:.3f} bits "
            f"{plan.bits[group]}->{bits} cost {cost} bytes gain {gain:.3e} -> model_bytes {len(trial_blob)} "
            f"weighted_error {sum(trial_errors.values()):.4e} {verdict}")
        if verdict == "refused":
            done.add(group)
            continue
        if cost > 0:  # bytes per predicted byte (bits_per_value > 0 always)
            bytes_per_predicted = cost / (values[group] * bits_per_value / 8)
        plan, entries, blob, errors = trial, trial_entries, trial_blob, trial_errors
    log(f"auto_fit: filled model_bytes {len(blob)} target {target_bytes} ({target_bytes - len(blob)} bytes left) "
        f"weighted_error {sum(errors.values()):.4e}")
    return blob, entries


def fit_artifact(state_dict: dict[str, torch.Tensor], plan: QuantPlan, *, target_bytes: int,
                 pack, hessians: dict | None = None, gptq: dict | None = None, lqer: dict | None = None,
                 auto_fit: bool = True, fill: bool = True,
                 log=lambda msg: None) -> tuple[bytes, list[ExportedTensor]]:
    """The packed artifact (pack(entries) -> bytes) at most `target_bytes` long if auto-fit can get it
    there, shrinking in the order documented above, or (`fill`) spending the bytes left when it comes out under.
    `lqer`: apply_lqer's options, or None for no low-rank correction."""
    hessians = hessians or {}
    quantized: dict[tuple, ExportedTensor] = {}  # (name, method, bits and k): each tensor quantized once

    def quantize(p: QuantPlan) -> list[ExportedTensor]:
        entries = []
        for name, t in state_dict.items():
            key = (name, p.method, p.spec(name, t))
            if key not in quantized:
                quantized[key] = quantize_tensor(name, t, p, hessians.get(name), gptq)
            entries.append(quantized[key])
        return apply_lqer(state_dict, entries, hessians=hessians, **lqer) if lqer else entries

    blob = pack(entries := quantize(plan))
    if len(blob) <= target_bytes and auto_fit and fill and plan.method != "absmax":
        return fill_budget(state_dict, plan, entries, blob, target_bytes=target_bytes, quantize=quantize, pack=pack,
                           hessians=hessians, log=log)
    if len(blob) <= target_bytes or not auto_fit:
        return blob, entries
    n_codes = sum(values_by_group(entries).values())
    log(f"auto_fit: model_bytes {len(blob)} > target {target_bytes} (limit {ARTIFACT_LIMIT_BYTES} - margin - code); "
        f"quant_error {quantization_error(state_dict, entries):.3e} (relative squared weight error)")
    if plan.method != "absmax" and n_codes:
        factor, unscaled = 1.0, plan
        for _ in range(AUTO_FIT_TRIES):
            factor = min(factor * 2 ** (8 * (len(blob) - target_bytes) / n_codes + 1e-4), AUTO_FIT_MAX_SIGMA_SCALE)
            plan = dataclasses.replace(unscaled, clip_sigmas={g: k * factor for g, k in unscaled.clip_sigmas.items()})
            blob = pack(entries := quantize(plan))
            log(f"auto_fit: step 1 clip_sigmas x{factor:.4f} -> model_bytes {len(blob)} "
                f"quant_error {quantization_error(state_dict, entries):.3e}")
            if len(blob) <= target_bytes or factor >= AUTO_FIT_MAX_SIGMA_SCALE:
                break
    lowered: list[str] = []
    while len(blob) > target_bytes and (group := group_to_lower(state_dict, entries, plan, lowered,
                                                                excess=len(blob) - target_bytes)):
        lowered.append(group)
        plan = dataclasses.replace(plan, bits={**plan.bits, group: plan.bits[group] - 1})
        blob = pack(entries := quantize(plan))
        log(f"auto_fit: step 2 {group} bits {plan.bits[group] + 1}->{plan.bits[group]} -> model_bytes {len(blob)} "
            f"quant_error {quantization_error(state_dict, entries):.3e}")
    if len(blob) > target_bytes:
        blob, entries = prune_to_fit(state_dict, entries, blob, target_bytes, pack, log)
    log(f"auto_fit: {'fits' if len(blob) <= target_bytes else 'FAILED'} model_bytes {len(blob)} target {target_bytes}")
    return blob, entries


def pruning_plan(entries: list[ExportedTensor]):
    """(units, entropy_after): the +-1 codes cheapest first, and the codes' order-0 entropy in bytes
    after zeroing the first n of them, computed exactly from the histogram."""
    units = unit_codes_by_cost(entries)
    counts = code_counts(e.codes for e in entries if e.bits)
    plus = torch.cumsum((units[3] > 0).double(), 0)  # how many of the first n are +1

    def entropy_after(n: int) -> float:
        c = counts.clone()
        n_plus = float(plus[n - 1]) if n else 0.0
        c[129] -= n_plus
        c[127] -= n - n_plus
        c[128] += n
        return order0_bytes(c)

    return units, entropy_after


def fewest_units_saving(entropy_after, start: int, n_units: int, goal_bytes: float) -> int:
    """The smallest n >= start with entropy_after(n) <= goal_bytes (n_units if none)."""
    lo, hi = start, n_units
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if entropy_after(mid) <= goal_bytes else (mid + 1, hi)
    return lo


def group_to_lower(state_dict, entries: list[ExportedTensor], plan: QuantPlan, lowered: list[str], *,
                   excess: int) -> str | None:
    """Step 2's choice: the group with the most quantized values (among those lowered least often, above
    AUTO_FIT_MIN_BITS), or None when pruning +-1 codes is predicted to cover `excess` for less squared
    error than one bit fewer on that group (about 4x its squared error: the grid step doubles)."""
    values = {g: n for g, n in values_by_group(entries).items() if plan.bits[g] > AUTO_FIT_MIN_BITS}
    if not values:
        return None
    group = min(values, key=lambda g: (lowered.count(g), -values[g], g))
    units, entropy_after = pruning_plan(entries)
    goal = entropy_after(0) - excess
    needed = fewest_units_saving(entropy_after, 0, len(units[0]), goal)
    if entropy_after(needed) <= goal and float(units[4][:needed].sum()) <= 3.0 * sum(
            output_energy(err) for e, _, err in weights_and_errors(state_dict, entries) if tensor_group(e.name) == group):
        return None  # pruning covers the excess for no more squared error than lowering the group
    return group


def prune_to_fit(state_dict, entries: list[ExportedTensor], blob: bytes, target_bytes: int, pack, log):
    """Step 3: zero the cheapest +-1 codes of `entries` (packed: `blob`), as many as the entropy predicts,
    corrected by how many real bytes one entropy byte saved in the previous try."""
    units, entropy_after = pruning_plan(entries)
    n_units = len(units[0])
    excess, pruned, bytes_per_entropy_byte = len(blob) - target_bytes, 0, 1.0
    for _ in range(AUTO_FIT_TRIES):
        previous_bytes, previous_entropy = len(blob), entropy_after(pruned)
        pruned = fewest_units_saving(entropy_after, pruned, n_units,
                                     previous_entropy - excess / bytes_per_entropy_byte * 1.002)
        pruned_entries = prune_unit_codes(entries, units, pruned)
        blob = pack(pruned_entries)
        log(f"auto_fit: step 3 pruned {pruned} of {n_units} +-1 codes -> model_bytes {len(blob)} "
            f"quant_error {quantization_error(state_dict, pruned_entries):.3e}")
        excess = len(blob) - target_bytes
        if excess <= 0 or pruned >= n_units:
            break
        predicted = previous_entropy - entropy_after(pruned)
        if predicted > 0 and previous_bytes > len(blob):
            bytes_per_entropy_byte = max((previous_bytes - len(blob)) / predicted, 0.05)
    return blob, pruned_entries


FP16_MAX = 65504.0


def check_exportable(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights no artifact can hold: non-finite values, or values past the fp16 range (the
    artifact's floats and row scales are fp16, so they would turn into inf and the model into NaN)."""
    for name, t in state_dict.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        peak = float(t.detach().abs().max())  # NaN or inf when any value is
        if not peak <= FP16_MAX:
            bad = int((~torch.isfinite(t)).sum())
            what = f"holds {bad} non-finite values" if bad else f"reaches |w| = {peak:.4g}, past the fp16 range ({FP16_MAX:.0f})"
            raise RunError(f"refusing to export: weight {name} {what} (training diverged); nothing was written; lower "
                           "MATRIX_LR, SCALAR_LR and TIED_EMBED_LR or set GRAD_CLIP_NORM")


def export_artifact(hp: Hyperparameters, rt: Runtime, model: GPT, out_dir: Path, log, *, looping: bool,
                    hessians: dict[str, torch.Tensor] | None = None) -> Path:
    """Rank 0 writes the raw weights, the shipped code form and the quantized, packed artifact (fitted
    under the limit), each atomically, once every rank has checked that the weights are sound."""
    state_dict = model.state_dict()
    check_exportable(state_dict)  # the same weights on every rank, so every rank refuses together
    if rt.is_main:
        n_code = code_bytes()
        raw = io.BytesIO()
        torch.save(state_dict, raw)
        write_atomic(out_dir / "final_model.pt", raw.getvalue())
        log(f"Serialized model: {raw.tell()} bytes")
        log(f"Code size: {len(readable_source())} bytes (uncompressed), {n_code} bytes (compressed, shipped as "
            f"{RUN_CODE_NAME} in the run folder)")
        log(f"Total submission size: {raw.tell() + n_code} bytes")
        plan = QuantPlan.from_hparams(hp)
        packed_stats: dict[bytes, dict] = {}  # by the blob's sha256: the filler's last pack may be a refused trial
        meta = dict(looping=looping, quant_method=plan.method, tag=f"int{hp.matrix_bits}_{hp.compressor}")

        def pack(entries: list[ExportedTensor]) -> bytes:
            stats: dict = {}
            blob = pack_artifact(entries, compressor=hp.compressor, model=dataclasses.asdict(model.cfg), meta=meta,
                                 stats=stats)
            packed_stats[hashlib.sha256(blob).digest()] = stats
            return blob

        target = ARTIFACT_LIMIT_BYTES - hp.artifact_margin_bytes - n_code
        lqer = dict(rank=hp.lqer_rank, top_k=hp.lqer_top_k, factor_bits=hp.lqer_factor_bits, a_bits=hp.lqer_a_bits,
                    group=hp.lqer_asym_group if hp.lqer_asym_enabled else 0) if hp.lqer_enabled else None
        blob, entries = fit_artifact(state_dict, plan, target_bytes=target, pack=pack, hessians=hessians,
                                     gptq=gptq_options(hp), lqer=lqer, auto_fit=hp.auto_fit, fill=hp.auto_fit_fill,
                                     log=log)
        for e in entries:
            if e.lqer is not None:
                log(f"lqer: {e.name} rank:{hp.lqer_rank} factor_bits:{hp.lqer_factor_bits} a_bits:{e.lqer.a_bits} "
                    f"form:{'asymmetric group ' + str(e.lqer.group) if e.lqer.group else 'symmetric'}")
        write_atomic(out_dir / ARTIFACT_NAME, blob)
        stats = packed_stats[hashlib.sha256(blob).digest()]
        label = f"int{hp.matrix_bits}+{hp.compressor}"
        quantized = [e for e in entries if e.bits]
        groups = {g: members for g in QUANT_GROUPS  # bits after auto-fit, not as planned:
                  if (members := [e for e in quantized if tensor_group(e.name) == g])}
        log(f"Serialized model {label}: {len(blob)} bytes (raw_torch:{raw.tell()} method:{plan.method} "
            f"bits:{','.join(f'{g}={members[-1].bits}' for g, members in groups.items())})")
        known_ce = stats.pop("codes_model_ce", None)
        log("artifact_streams: " + " ".join(f"{k}:{v}" for k, v in sorted(stats.items())))
        order0, model_ce = code_entropy_report([e.codes.numpy() for e in quantized], [e.bits for e in quantized],
                                               known_ce)
        log(f"artifact_entropy: codes_bytes:{stats.get('codes', 0)} order0_entropy_bytes:{order0:.0f} "
            f"ans_model_cross_entropy_bytes:{model_ce:.0f} (side information not included) coder:{hp.compressor}")
        for group, members in groups.items():
            log(f"Quantized weights: {group} tensors:{len(members)} values:{sum(e.codes.numel() for e in members)} "
                f"bits:{sorted({e.bits for e in members})} method:{members[0].method}")
        log(f"Total submission size {label}: {len(blob) + n_code} bytes")
    barrier()
    return out_dir / ARTIFACT_NAME


def gptq_options(hp: Hyperparameters) -> dict:
    return dict(damping=hp.gptq_damping, block_size=hp.gptq_block_size, act_order=hp.gptq_act_order,
                tied_damping=hp.gptq_tied_embed_damping)


# ==================================================================================================
# EVALUATION
# ==================================================================================================
# One scorer for every reported number (periodic validation, pre-quantization, the roundtrip, the
# sliding window and every TTT form). The stream of N validation tokens has N-1 targets; target t
# (1 <= t <= N-1) is token t predicted from tokens 0..t-1. A window is a scored span (a, b]: it reads
# tokens max(0, b - L)..b-1 (L = EVAL_SEQ_LEN) and scores targets a+1..b, which are always the last
# positions of its row, so each gets the longest causal context the window allows. The first window
# scores (0, L]; later windows score EVAL_STRIDE targets each, the last one whatever is left (nothing
# is dropped). Stride L is the flat evaluation. Windows are split contiguously across ranks.
#
# Every score goes into a `ScoreLedger`: it commits each target once (a second commit raises), sums
# loss, targets and bytes in float64, and is the only way adaptation code can read validation tokens:
# `adaptation_tokens` hands out a span only once every target in it is committed on some rank (C3).
# What the passes share (ranks, device, autocast, looping, the budget's checks, the log) is one `EvalContext`.


class ScoreOrderError(RunError):
    """Adaptation asked for a validation target whose score is not committed yet (rule C3)."""


@dataclass(frozen=True)
class EvalResult:
    val_loss: float  # mean NLL in nats per target token
    val_bpb: float  # bits per UTF-8 byte
    num_targets: int
    num_bytes: int


@dataclass(frozen=True)
class EvalContext:
    """What every evaluation and TTT pass of one model shares, passed as one argument: the process
    (`rt`: rank, world size, device, control group), the autocast context factory, whether the model
    runs its loop, the evaluation budget (None: no budget, nothing timed) and the log."""

    rt: Runtime
    autocast: Callable = contextlib.nullcontext
    looping: bool = False
    budget: EvalBudget | None = None
    log: Callable[[str], None] = lambda msg: None

    @property
    def costs(self) -> StepCosts | None:
        """The budget's step costs when it has a cap (only then is anything timed), else None."""
        return self.budget.costs if self.budget is not None and self.budget.cap_ms is not None else None


# The evaluation budget (MAX_EVAL_SECONDS) decides from measured step costs, never from a guess. Every
# kind of step (a window batch, a TTT chunk step of a width, plain or adapting, a global SGD step, a
# chunk's adaptation) is timed where it runs, the warm-up first; the budget charges a step its kind's
# mean plus MARGIN_SIGMAS spreads, the spread being the steps' pooled coefficient of variation (a
# machine that jitters jitters for every shape), so a loaded machine gets a wider margin. Before a
# pass, its plain cost must fit in what is left, or it is skipped; while it runs, the rest of it is
# re-checked before every batch (TTT: every step), and a pass that can no longer fit is cut. A cut or
# skipped pass leaves the final score with the last complete pass; TTT first stops adapting.
MARGIN_SIGMAS = 2.0


class StepCosts:
    """Measured milliseconds of each kind of step, and what the budget charges for one (`ms`). A plain
    step never measured is charged as the adapting step of its width; a kind never measured costs 0."""

    def __init__(self, now):
        self.now = now  # the pass's clock (ms)
        self.sums: dict = {}  # kind -> [count, sum, sum of squares]
        self.running = None  # (kind, start) of the step being timed

    def add(self, kind, ms: float) -> None:
        n, total, squares = self.sums.get(kind, (0, 0.0, 0.0))
        self.sums[kind] = (n + 1, total + ms, squares + ms * ms)

    def lap(self, kind) -> None:
        """Close the timing of the step in flight, if any, and open one of `kind` (None: nothing)."""
        now = self.now()
        if self.running is not None:
            self.add(self.running[0], now - self.running[1])
        self.running = None if kind is None else (kind, now)

    def spread(self) -> float:
        """The pooled coefficient of variation of every kind timed at least twice (0 if none)."""
        var = dof = 0.0
        for n, total, squares in self.sums.values():
            if n > 1 and total > 0:
                mean = total / n
                var, dof = var + max(squares - n * mean * mean, 0.0) / (mean * mean), dof + n - 1
        return math.sqrt(var / dof) if dof else 0.0

    def mean(self, kind) -> float:
        if kind not in self.sums and isinstance(kind, tuple) and kind[0] == "plain":
            kind = ("adapt", kind[1])
        n, total, _ = self.sums.get(kind, (1, 0.0, 0.0))
        return total / n

    def ms(self, kind) -> float:
        return self.mean(kind) * (1 + MARGIN_SIGMAS * self.spread())

    def plain_ms(self, widths: collections.Counter) -> float:
        return sum(self.ms(("plain", w)) * n for w, n in widths.items())


class EvalPassCut(RunError):
    """A pass that can no longer finish within MAX_EVAL_SECONDS: it is dropped, never reported partially."""


class EvalBudget:
    """The evaluation budget as every pass sees it: the clock (ms, read after the device's queued work),
    the cap (None = no budget: nothing is timed or decided), the step costs, and decisions taken alike
    on every rank (their largest elapsed time and estimates). `stopped_at` says where TTT stopped adapting."""

    def __init__(self, elapsed_ms, cap_ms: float | None, rt: Runtime | None = None):
        self.elapsed_ms, self.cap_ms, self.rt = elapsed_ms, cap_ms, rt
        self.costs = StepCosts(self.now)
        self.stopped_at: str | None = None

    def now(self) -> float:
        if self.rt is not None and self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)  # a host clock read then measures the queued GPU work
        return self.elapsed_ms()

    def require(self, need_ms: float, what: str, step_ms: float = 0.0) -> bool:
        """Cut the running pass (EvalPassCut "<what> needs ~..") if the `need_ms` it still needs no longer
        fits; returns whether `step_ms` more fits as well. Agreed over ranks; always True without a cap."""
        if self.cap_ms is None:
            return True
        values = [self.elapsed_ms(), need_ms, step_ms]
        elapsed, need, step = values if self.rt is None else agree_max(values, self.rt)
        left = self.cap_ms - elapsed
        if need > left:
            raise EvalPassCut(f"{what} needs ~{need / 1000:.1f}s, {max(left, 0) / 1000:.1f}s left")
        return need + step <= left

    def allows(self, next_adapt_ms: float, remaining_plain_ms: float, where: str) -> bool:
        """Whether one more adaptation step fits with everything still unscored scored plainly after it;
        once refused, refused for good. Cuts the pass if even the plain rest no longer fits."""
        fits = self.require(remaining_plain_ms, f"at {where}: the rest", next_adapt_ms)
        if self.stopped_at is None and not fits:
            self.stopped_at = where
        return self.stopped_at is None


def plan_windows(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """Scored spans (a, b] covering targets 1..num_targets exactly once, in stream order."""
    first, stride = min(seq_len, num_targets), min(stride, seq_len)
    return [(0, first)] + [(a, min(a + stride, num_targets)) for a in range(first, num_targets, stride)]


def rank_share(items: list, rank: int, world_size: int) -> list:
    """Rank r's contiguous share of `items` (shares differ in size by at most one)."""
    return items[len(items) * rank // world_size : len(items) * (rank + 1) // world_size]


def plan_window_batches(spans: list[tuple[int, int]], seq_len: int, batch_seqs: int) -> list[list[tuple[int, int]]]:
    """Consecutive spans with the same row length min(b, L), at most `batch_seqs` per batch. Every row
    is L long except when the whole stream is shorter than L, so batches have one shape."""
    batches: list[list[tuple[int, int]]] = []
    for span in spans:
        if batches and len(batches[-1]) < batch_seqs and min(batches[-1][0][1], seq_len) == min(span[1], seq_len):
            batches[-1].append(span)
        else:
            batches.append([span])
    return batches


class ScoreLedger:
    """The committed scores of one evaluation pass on one rank, and the gate adaptation goes through.

    Host-side bookkeeping only (no device sync per batch): `scored` marks the targets this rank
    committed, `shared` the targets known (after `share`) to be committed on some rank. `commit`
    returns each target's NLL (tests keep them per target)."""

    def __init__(self, tokens: torch.Tensor, luts: ByteLuts, device: torch.device, *, group=None):
        self.tokens, self.device, self.group = tokens, device, group
        self.num_targets = tokens.numel() - 1
        self.luts = luts.to(device)
        if luts.val_bytes is not None and len(luts.val_bytes) != tokens.numel():
            raise RunError(f"the byte sidecar covers {len(luts.val_bytes)} tokens, this stream {tokens.numel()}: it "
                           "belongs to the validation stream only")
        self.scored = np.zeros(self.num_targets + 1, dtype=bool)  # index = target position; 0 unused
        self.shared = np.zeros(self.num_targets + 1, dtype=bool)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss (nats), targets, bytes
        self.adapted_targets = 0  # target positions handed out for adaptation (with repeats)
        self.full_softmax_checked = False

    def window_rows(self, spans: list[tuple[int, int]], seq_len: int, pad_rows: int):
        """Inputs, targets and the scored-position mask of a batch of windows (on the device). A batch
        shorter than `pad_rows` is filled up with copies of its first row that score nothing, so a
        compiled forward sees one shape."""
        length = min(spans[0][1], seq_len)
        rows = spans + [spans[0]] * (pad_rows - len(spans))
        x = torch.stack([self.tokens[b - length : b] for _, b in rows])
        y = torch.stack([self.tokens[b - length + 1 : b + 1] for _, b in rows])
        first_scored = torch.tensor([length - (b - a) for a, b in spans] + [length] * (len(rows) - len(spans)))
        mask = torch.arange(length)[None, :] >= first_scored[:, None]
        return x.to(self.device), y.to(self.device), mask.to(self.device)

    def document_rows(self, spans: list[tuple[int, int]], starts: list[int], *, rows: list[int], num_rows: int,
                      width: int, chunk: int):
        """A fixed-shape batch of document windows: row rows[i] reads tokens starts[i]..b-1 (right-padded
        with id 0 to `width`) and scores targets a+1..b of spans[i] = (a, b]; every row has `chunk` scored
        positions (a short chunk repeats its last one, masked out), and rows holding no window read zeros
        and score nothing. Returns, on the device, the inputs (num_rows, width), the scored positions
        (num_rows, chunk), and the inputs, targets and mask at those positions (num_rows, chunk)."""
        x = torch.zeros(num_rows, width, dtype=torch.int64)
        y = torch.zeros(num_rows, width, dtype=torch.int64)
        positions = torch.zeros(num_rows, chunk, dtype=torch.int64)
        mask = torch.zeros(num_rows, chunk, dtype=torch.bool)
        for r, (a, b), st in zip(rows, spans, starts):
            if not (0 <= st <= a < b and b - st <= width and b - a <= chunk):
                raise RunError(f"window from token {st} cannot score targets ({a}, {b}] in {width} columns: a broken "
                               "TTT plan")
            x[r, : b - st], y[r, : b - st] = self.tokens[st:b], self.tokens[st + 1 : b + 1]
            positions[r, : b - a] = torch.arange(a - st, b - st)
            positions[r, b - a :] = b - st - 1
            mask[r, : b - a] = True
        return tuple(t.to(self.device) for t in (x, positions, x.gather(1, positions), y.gather(1, positions), mask))

    def commit(self, spans: list[tuple[int, int]], logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Score the masked positions (row i scores targets a_i+1..b_i, in order) with the full
        softmax over the vocabulary; each target may be committed only once. Returns the NLL (B, T)."""
        for a, b in spans:
            if self.scored[a + 1 : b + 1].any():
                raise RunError(f"target in ({a}, {b}] scored twice; the evaluation plan is broken (C4)")
            self.scored[a + 1 : b + 1] = True
        if not self.full_softmax_checked:  # C2: a distribution over the whole vocabulary, summing to 1
            probs = torch.softmax(logits[:, -1].float(), dim=-1).sum(-1)
            if logits.size(-1) != self.luts.base_bytes.numel() or not torch.allclose(probs, torch.ones_like(probs),
                                                                                      atol=1e-4):
                raise RunError("logits are not a normalized distribution over the full vocabulary (C2)")
            self.full_softmax_checked = True
        nll = token_nll(logits, y).view(y.shape)
        m = mask.to(torch.float64)
        self.sums[0] += (nll.double() * m).sum()
        self.sums[1] += m.sum()
        if self.luts.val_bytes is None:
            self.sums[2] += (target_bytes(x, y, self.luts).double() * m).sum()
        else:  # the sidecar: target t stands for entry t (summed on the host, no device work)
            self.sums[2] += float(sum(int(self.luts.val_bytes[a + 1 : b + 1].sum(dtype=np.int64)) for a, b in spans))
        return nll

    def over_ranks(self, flags: np.ndarray, op) -> np.ndarray:
        """`flags` reduced over ranks with `op`, as uint8 (a host-side collective)."""
        counts = torch.from_numpy(flags.astype(np.uint8))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=op, group=self.group)
        return counts.numpy()

    def share(self, lo: int, hi: int) -> None:
        """Learn which targets in (lo, hi] are committed on any rank."""
        self.shared[lo + 1 : hi + 1] |= self.over_ranks(self.scored[lo + 1 : hi + 1], dist.ReduceOp.MAX).astype(bool)

    def adaptation_tokens(self, lo: int, hi: int) -> torch.Tensor:
        """Tokens lo..hi, i.e. inputs for targets lo+1..hi, if every one of those targets is committed
        (by this rank, or by any rank as learnt through `share`)."""
        if not (0 <= lo < hi <= self.num_targets):
            raise ScoreOrderError(f"adaptation span ({lo}, {hi}] is outside the {self.num_targets} targets")
        committed = self.scored[lo + 1 : hi + 1] | self.shared[lo + 1 : hi + 1]
        if not committed.all():
            first = lo + 1 + int(np.argmin(committed))
            raise ScoreOrderError(f"adaptation on target {first} before its score is committed (C3)")
        self.adapted_targets += hi - lo
        return self.tokens[lo : hi + 1]

    def result(self) -> EvalResult:
        sums = all_reduce_sum(self.sums.clone())
        loss_sum, num_targets, num_bytes = sums.tolist()
        return EvalResult(loss_sum / num_targets, loss_sum / (math.log(2) * num_bytes), int(num_targets),
                          int(num_bytes))

    def times_scored(self) -> np.ndarray:
        """How often each target 1..N-1 was committed, over all ranks (C4 wants all ones)."""
        return self.over_ranks(self.scored[1:], dist.ReduceOp.SUM)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy over the full vocabulary (in float32) of each target, flattened."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


def window_rounds(spans: list[tuple[int, int]], seq_len: int, batch_seqs: int, world_size: int) -> list[list]:
    """Each rank's batches of `spans` (its contiguous share); every rank runs the longest list's rounds."""
    return [plan_window_batches(rank_share(spans, r, world_size), seq_len, batch_seqs) for r in range(world_size)]


@torch.no_grad()
def score_windows(logits_fn, ledger: ScoreLedger, spans: list[tuple[int, int]], ctx: EvalContext, *, seq_len: int,
                  batch_seqs: int, rounds_after: int = 0) -> None:
    """Score the windows `spans` (split across ranks, batched) into `ledger`. Under a budget each batch
    is timed, and before it the rest of the pass (this call's rounds and `rounds_after` more) must fit."""
    plans = window_rounds(spans, seq_len, batch_seqs, ctx.rt.world_size)
    num_rounds = max(map(len, plans))  # every rank runs as many rounds, so budget checks stay collective
    mine, costs = plans[ctx.rt.rank], ctx.costs
    for round_idx in range(num_rounds):
        if costs is not None:
            costs.lap("window" if round_idx < len(mine) else None)
            ctx.budget.require((num_rounds - round_idx + rounds_after) * costs.ms("window"),
                               f"after {round_idx} of {num_rounds} batches: the rest")
        if round_idx < len(mine):
            x, y, mask = ledger.window_rows(mine[round_idx], seq_len, batch_seqs)
            with ctx.autocast():
                logits = logits_fn(x)
            ledger.commit(mine[round_idx], logits, x, y, mask)
    if costs is not None:
        costs.lap(None)


def evaluate(logits_fn, val_tokens: torch.Tensor, luts: ByteLuts, ctx: EvalContext, *, seq_len: int, batch_seqs: int,
             stride: int = 0) -> EvalResult:
    """Score every validation target once with `logits_fn(input_ids) -> logits` (B, T, V): flat
    windows (stride 0 or >= seq_len) or sliding ones; checks that every target was scored once."""
    ledger = ScoreLedger(val_tokens, luts, ctx.rt.device, group=ctx.rt.control_group)
    spans = plan_windows(ledger.num_targets, seq_len, stride or seq_len)
    score_windows(logits_fn, ledger, spans, ctx, seq_len=seq_len, batch_seqs=batch_seqs)
    check_scored_once(ledger)
    return ledger.result()


def check_scored_once(ledger: ScoreLedger) -> None:
    counts = ledger.times_scored()
    if not (counts == 1).all():
        raise RunError(f"{int((counts == 0).sum())} of {ledger.num_targets} targets unscored, "
                       f"{int((counts > 1).sum())} scored twice or more: the evaluation plan is broken (C4)")


# ==================================================================================================
# TEST-TIME TRAINING
# ==================================================================================================
# Score-first adaptation on validation tokens, legal by construction: a chunk is scored and its
# losses committed to the ledger before any update, and the updates read tokens only through
# `ScoreLedger.adaptation_tokens`, which refuses an uncommitted target. The reported score is the sum
# of those first-pass scores. The last chunk never trains (nothing is left to score with it).
#
# TTT_MODE=chunked (the R0409 form): the sliding windows are grouped into chunks of TTT_CHUNK_TOKENS
# targets (by their first scored target). Chunk c is scored, then the whole model takes TTT_EPOCHS
# SGD passes over exactly the targets scored so far and not yet trained on, with the LR on a cosine
# over the chunks, gradients averaged over ranks and clipped by global norm, the first
# TTT_FREEZE_BLOCKS blocks frozen. Each SGD step covers TTT_BATCH_SEQS sequences over all ranks, so
# the result does not depend on the number of ranks.
#
# The evaluation budget (EvalBudget): before each update the run checks that the update plus scoring
# everything left without adaptation still fits in MAX_EVAL_SECONDS (from step costs measured so far);
# if not, adaptation stops for good and the rest is scored plainly. A chunk never timed is charged as
# three window batches' worth per trained token.


@knob_view("eval_stride", "ttt_mode", "ttt_chunk_tokens", "ttt_epochs", "ttt_lr", "ttt_momentum", "ttt_batch_seqs",
           "ttt_grad_clip", "ttt_freeze_blocks", "ttt_lora_rank", "ttt_lora_lr", "ttt_lora_alpha", "ttt_beta1",
           "ttt_beta2", "ttt_weight_decay", "ttt_warm_start_a", "ttt_k_lora", "ttt_o_lora", "ttt_mlp_lora",
           "ttt_chunk_size", "ttt_batch_size", "phased_ttt_prefix_docs", "phased_ttt_num_phases", "global_ttt_lr",
           "global_ttt_epochs")
class TTTSettings:
    """A TTT pass's settings: its knobs, and the window length and scoring batch it runs with.
    ttt_batch_size is the documents a rank holds at a time (a round: that times the world size)."""

    seq_len: int  # EVAL_SEQ_LEN
    score_batch_seqs: int = 32  # windows per scoring forward, per rank

    @property
    def chunk(self) -> int:
        """Targets a per-document step scores: TTT_CHUNK_SIZE, at most a window (which holds its whole chunk)."""
        return min(self.ttt_chunk_size, self.seq_len)


@dataclass(frozen=True)
class TTTResult:
    """What a TTT pass did, for the log and the compliance block."""

    chunks: int  # chunks (chunked) or rounds (lora, phased)
    trained_chunks: int  # of them, those that adapted
    steps: int  # optimizer steps, global SGD steps included
    score_ms: float  # time of plain scoring
    adapt_ms: float  # time of adapting (chunks, rounds and global phases that adapted)
    stopped_at: str | None  # where the budget stopped adaptation; None = never
    global_steps: int = 0
    adapted_targets: int = 0  # over all ranks (set by `evaluate_artifact`)


class TTTTracker:
    """What both TTT forms share: the pass's clock in ms (the budget's when it has a cap, read after
    the device's queued work; else the host's), the budget's step costs (None without a cap), the time
    spent scoring and adapting, the budget decisions (logging where adaptation stops for good), and
    the result."""

    def __init__(self, ctx: EvalContext, settings: str, nothing_to_adapt: str | None):
        self.ctx, self.costs = ctx, ctx.costs
        self.ms = {"score_ms": 0.0, "adapt_ms": 0.0}
        ctx.log(f"ttt:start {settings}")
        if nothing_to_adapt is not None:
            ctx.log(f"ttt:warning this pass adapts on nothing: {nothing_to_adapt}; its score is the plain score")

    def now(self) -> float:
        return self.ctx.budget.now() if self.costs is not None else 1000.0 * time.perf_counter()

    def add(self, kind: str, since_ms: float) -> float:
        """Count the time since `since_ms` as scoring or adapting (`kind`); returns it."""
        ms = self.now() - since_ms
        self.ms[f"{kind}_ms"] += ms
        return ms

    @property
    def stopped_at(self) -> str | None:
        return None if self.ctx.budget is None else self.ctx.budget.stopped_at

    def allows(self, next_ms: float, plain_ms_left: float, where: str) -> bool:
        """Whether the next adaptation step fits (always, without a budget)."""
        budget = self.ctx.budget
        if budget is None or budget.allows(next_ms, plain_ms_left, where):
            return True
        if budget.stopped_at == where:  # it stopped here, now: said once
            self.ctx.log(f"ttt:adaptation_stopped at {where}: the eval budget leaves room only for plain scoring")
        return False

    def result(self, chunks: int, trained_chunks: int, steps: int, global_steps: int = 0) -> TTTResult:
        return TTTResult(chunks, trained_chunks, steps, **self.ms, stopped_at=self.stopped_at,
                         global_steps=global_steps)


@contextlib.contextmanager
def frozen(params):
    """`params` take no gradient inside the block (those that did get it back after)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def cosine_lr(lr: float, i: int, n: int) -> float:
    """`lr` cosine-decayed from step 0 to 0 at step n - 1."""
    return lr * 0.5 * (1 + math.cos(math.pi * i / max(n - 1, 1)))


@contextlib.contextmanager
def weights_restored(model: nn.Module):
    """Every weight and buffer of `model` is put back as it was when the block ends."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    yield
    model.load_state_dict(saved)


def chunk_windows(spans: list[tuple[int, int]], chunk_tokens: int) -> list[list[tuple[int, int]]]:
    """Windows grouped by the chunk holding their first scored target, in stream order."""
    groups: list[list[tuple[int, int]]] = []
    for a, b in spans:
        if not groups or a // chunk_tokens != groups[-1][0][0] // chunk_tokens:
            groups.append([])
        groups[-1].append((a, b))
    return groups


def sequence_pieces(spans: list[tuple[int, int]], seq_len: int) -> list[tuple[int, int]]:
    """Target spans cut into pieces of at most seq_len targets, in order (also a document's chunks)."""
    return [(p, min(p + seq_len, hi)) for lo, hi in spans for p in range(lo, hi, seq_len)]


def average_gradients(params: list[torch.Tensor]) -> None:
    """Sum every gradient over ranks in one flat buffer (the loss is already divided by the global
    target count, so the sum is the average). A rank with no data contributes zeros."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    for p, grad in zip(params, flat.split([p.numel() for p in params])):
        p.grad = grad.view_as(p).clone()


def adapt_full_model(model: GPT, ledger: ScoreLedger, spans: list[tuple[int, int]], optimizer, ctx: EvalContext, *,
                     lr: float, epochs: int, seq_len: int, batch_seqs: int, grad_clip: float, before_step=None) -> int:
    """Full-model SGD on the committed targets `spans`, `epochs` passes; returns the steps taken.

    Step j takes pieces [j*B, (j+1)*B) of all ranks' pieces; each rank its contiguous share. The
    loss is the mean over the step's targets on all ranks, so any world size computes the same step.
    `before_step()` (called on every rank before each step) returning False ends the passes there."""
    pieces = sequence_pieces(spans, seq_len)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for g in optimizer.param_groups:
        g["lr"] = lr
    steps = 0
    model.train()
    for step_pieces in [pieces[j : j + batch_seqs] for _ in range(epochs) for j in range(0, len(pieces), batch_seqs)]:
        if before_step is not None and not before_step():
            break
        mine = rank_share(step_pieces, ctx.rt.rank, ctx.rt.world_size)
        if mine:
            width = max(hi - lo for lo, hi in mine)
            x = torch.zeros(len(mine), width, dtype=torch.int64)
            y = torch.full((len(mine), width), -100, dtype=torch.int64)  # no target here (cross_entropy ignores -100)
            for i, (lo, hi) in enumerate(mine):
                tokens = ledger.adaptation_tokens(lo, hi)
                x[i, : hi - lo], y[i, : hi - lo] = tokens[:-1], tokens[1:]
            x, y = x.to(ledger.device), y.to(ledger.device)
            with ctx.autocast():
                logits = model.forward_logits(x, ctx.looping)
            (token_nll(logits, y, "sum") / sum(hi - lo for lo, hi in step_pieces)).backward()
        average_gradients(params)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    model.eval()
    return steps


def chunk_rounds(groups: list[list[tuple[int, int]]], s: TTTSettings, world_size: int) -> list[int]:
    """The scoring rounds (batches per rank) of each chunk."""
    return [max(map(len, window_rounds(g, s.seq_len, s.score_batch_seqs, world_size))) for g in groups]


def ttt_chunked(model: GPT, ledger: ScoreLedger, s: TTTSettings, ctx: EvalContext, logits_fn=None) -> TTTResult:
    """Score-first chunked TTT over the whole stream (R0409 form). Scores go into `ledger`."""
    logits_fn = logits_fn or model.forward_logits
    groups = chunk_windows(plan_windows(ledger.num_targets, s.seq_len, s.eval_stride or s.seq_len), s.ttt_chunk_tokens)
    rounds = chunk_rounds(groups, s, ctx.rt.world_size)
    with frozen(p for block in model.blocks[: s.ttt_freeze_blocks] for p in block.parameters()):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=s.ttt_lr, momentum=s.ttt_momentum)
        tracker = TTTTracker(ctx, f"mode:chunked chunks:{len(groups)} params:{sum(p.numel() for p in params)}",
                             nothing_to_adapt(s, ledger.num_targets))
        # no budget: nothing is timed or refused, the costs are zeros; later: scoring rounds of the chunks not scored yet
        costs, later = tracker.costs or StepCosts(tracker.now), sum(rounds)
        steps = trained_chunks = trained_upto = 0  # targets 1..trained_upto have been (or will never be) trained on
        for ci, group in enumerate(groups):
            later -= rounds[ci]
            t0 = tracker.now()
            score_windows(lambda x: logits_fn(x, ctx.looping), ledger, group, ctx, seq_len=s.seq_len,
                          batch_seqs=s.score_batch_seqs, rounds_after=later)
            tracker.add("score", t0)
            lo, hi = trained_upto, group[-1][1]
            if ci == len(groups) - 1 or s.ttt_epochs == 0:
                continue  # the last chunk never trains: nothing is left to score with what it would teach
            # a chunk never timed: ~3 forward tokens per trained token, as window batches cost
            adapt_ms = costs.ms("chunk") if "chunk" in costs.sums else costs.ms("window") * 3 * s.ttt_epochs * (
                hi - lo) / (ctx.rt.world_size * s.score_batch_seqs * s.seq_len)
            if not tracker.allows(adapt_ms, later * costs.ms("window"), f"chunk {ci + 1}/{len(groups)}"):
                continue
            t0 = tracker.now()
            ledger.share(lo, hi)
            steps += adapt_full_model(model, ledger, [(lo, hi)], optimizer, ctx, lr=cosine_lr(s.ttt_lr, ci, len(groups)),
                                      epochs=s.ttt_epochs, seq_len=s.seq_len, batch_seqs=s.ttt_batch_seqs,
                                      grad_clip=s.ttt_grad_clip)
            trained_upto, trained_chunks = hi, trained_chunks + 1
            costs.add("chunk", tracker.add("adapt", t0))
    return tracker.result(len(groups), trained_chunks, steps)


# TTT_MODE=lora (R0317/R0427 form): every document gets its own low-rank adapters, one per virtual
# layer slot (a looped block has one per pass), on attention q and v, optionally k (TTT_K_LORA) and the
# output projection (TTT_O_LORA), a dim->dim adapter beside the MLP fed by the MLP's input
# (TTT_MLP_LORA), and the head (dim->vocab, added to the logits before the softcap). Each output is
# scaled by TTT_LORA_ALPHA/TTT_LORA_RANK. B starts at 0, so every document starts as the plain model.
# A document's targets are scored in chunks of TTT_CHUNK_SIZE from a window clipped at its BOS (no
# context from other documents); after a chunk is committed, one AdamW step on that chunk's loss
# updates that document's adapters, so its next chunk is scored by adapters trained on its earlier
# chunks only. The document's last chunk never trains. Documents are queued longest first and
# processed in rounds of TTT_BATCH_SIZE documents per rank (R0427's 64): a round is TTT_BATCH_SIZE x
# WORLD_SIZE documents and rank r holds its positions r*TTT_BATCH_SIZE.. onwards, so the score depends
# on the world size only through the round size (1 process with TTT_BATCH_SIZE=2B equals 2 ranks with
# B, tested). Each round zeroes B and the optimizer state; A is redrawn (the same seeded draw for every
# position), or with TTT_WARM_START_A=1 kept from the document at the same position of the previous
# round: trained on already-scored tokens only, so still score-first.
#
# Fixed shapes, so a compiled step sees few graphs: every step of a rank has TTT_BATCH_SIZE rows (rows
# of finished documents read zeros and score nothing), its window is padded to a width of
# `window_widths` (powers of two from the chunk size up, then EVAL_SEQ_LEN: six for the record) chosen
# by the step's index alone, and the head runs only at the chunk's TTT_CHUNK_SIZE positions. The
# adapters are applied by forward hooks registered once per model (`AdapterHooks`), inert outside
# `lora_logits`. Every step runs with autograd on (a step that trains no row skips the backward), so
# the LoRA step compiles at most len(window_widths) graphs, once per process.
#
# TTT_MODE=phased (R0413/R0427 form): LoRA TTT as above, plus PHASED_TTT_NUM_PHASES global phases:
# once the first PHASED_TTT_PREFIX_DOCS*(k+1)/K documents of the queue are scored, the base model
# takes GLOBAL_TTT_EPOCHS SGD passes over those (already committed) documents, LR cosine-decayed over
# groups of TTT_CHUNK_TOKENS targets, gradients averaged over ranks; later documents are scored by the
# updated model.
#
# The evaluation budget, measured: with MAX_EVAL_SECONDS set, a plain and an adapting step at every
# window width and a global SGD step are timed on synthetic tokens (in the evaluation warm-up, or at
# the pass's start for what it has not timed), then every real step. Before each chunk step and each
# global SGD step the pass checks that the step plus scoring every remaining step plainly (at its
# measured width cost) still fits; if not, adaptation stops for good.


def lora_targets(model: GPT, s: "TTTSettings") -> list[str]:
    """Names of the block submodules that get adapters under the TTT_*_LORA switches (q and v always)."""
    switches = (True, True, s.ttt_k_lora, s.ttt_o_lora, s.ttt_mlp_lora)  # one per AdapterHooks.SUFFIXES
    return [f"blocks.{i}.{suffix}" for i in range(len(model.blocks))
            for suffix, on in zip(AdapterHooks.SUFFIXES, switches) if on]


def document_spans(tokens: torch.Tensor) -> list[tuple[int, int]]:
    """Target spans (a, b] of each document: from its BOS to the next BOS (included) or the end."""
    bos = (tokens == BOS_ID).nonzero().flatten().tolist() + [tokens.numel() - 1]
    return [(a, b) for a, b in zip(bos, bos[1:]) if b > a]


def document_queue(tokens: torch.Tensor) -> list[tuple[int, int]]:
    """The documents in the order document TTT takes them: longest first, then in stream order."""
    return sorted(document_spans(tokens), key=lambda d: (-(d[1] - d[0]), d[0]))


def phase_boundaries(prefix_docs: int, num_phases: int) -> list[int]:
    """Phased TTT: global phase k trains on the first boundaries[k] documents of the queue."""
    return [prefix_docs * (k + 1) // num_phases for k in range(num_phases)]


class AdapterHooks:
    """Forward hooks on every module that can get an adapter, registered once per model and kept (so
    compiled graphs never see hooks come and go). Inert unless `lora_logits` has set `lora`; a hook
    counts its calls within a forward to find its virtual slot."""

    SUFFIXES = ("attn.c_q", "attn.c_v", "attn.c_k", "attn.proj", "mlp")

    def __init__(self, model: GPT):
        self.names = [f"blocks.{i}.{suffix}" for i in range(len(model.blocks)) for suffix in self.SUFFIXES]
        self.lora: "DocLoRA | None" = None
        self.calls: list[int] | None = None
        for k, name in enumerate(self.names):
            model.get_submodule(name).register_forward_hook(self._hook(k))

    def _hook(self, k: int):
        def add_delta(module, inputs, output):
            lora = self.lora
            if lora is None or lora.module_of_hook[k] < 0:
                return output
            m = lora.module_of_hook[k]
            slot = self.calls[k]
            if slot >= lora.slots[m]:
                raise RunError(f"LoRA adapter {m} called {slot + 1} times in one forward: a broken slot plan")
            self.calls[k] = slot + 1
            return output + lora.delta(lora.first_slot[m] + slot, inputs[0]).to(output.dtype)
        return add_delta


_ADAPTER_HOOKS = weakref.WeakKeyDictionary()  # GPT -> its AdapterHooks


def adapter_hooks(model: GPT) -> AdapterHooks:
    if model not in _ADAPTER_HOOKS:
        _ADAPTER_HOOKS[model] = AdapterHooks(model)
    return _ADAPTER_HOOKS[model]


class DocLoRA:
    """Per-document adapters: for adapter j and row i, output += scale * x A_j[i]^T B_j[i]^T, one
    [rows, ...] tensor per adapter. Rows are independent under AdamW (elementwise; a row trains at every
    step from a round's start until its document's last trained chunk, so its step count is the same on
    any number of ranks). After that a row keeps moving with the others' steps (decay, momentum), which
    no score sees; the A that warm starts the next round is the one saved at the row's last own step
    (`keep_warm`). Applied through the model's `AdapterHooks`, so the model code is untouched. A is
    drawn from one seeded generator, the same for every row."""

    def __init__(self, model: GPT, num_rows: int, s: "TTTSettings", device: torch.device, looping: bool):
        order = model.cfg.layer_order(looping)
        names = lora_targets(model, s)
        self.hooks = adapter_hooks(model)
        self.module_of_hook = [names.index(n) if n in names else -1 for n in self.hooks.names]
        self.slots = [order.count(int(name.split(".")[1])) for name in names]
        self.first_slot = [sum(self.slots[:k]) for k in range(len(self.slots))]  # adapter of module k's slot 0
        self.scale = (s.ttt_lora_alpha or s.ttt_lora_rank) / s.ttt_lora_rank
        self.num_rows = num_rows
        shapes = []  # (in, out) per adapter: every slot of every module (an MLP's adapter is dim->dim), then the head
        for name, n in zip(names, self.slots):
            m = model.get_submodule(name)
            shapes += [(model.cfg.model_dim,) * 2 if isinstance(m, MLP) else (m.in_features, m.out_features)] * n
        shapes.append((model.cfg.model_dim, model.cfg.vocab_size))
        g = torch.Generator().manual_seed(0)
        a_init = [(torch.rand(s.ttt_lora_rank, i, generator=g) * 2 - 1) / math.sqrt(i) for i, _ in shapes]
        self.a_init = [a.expand(num_rows, -1, -1).clone().to(device) for a in a_init]
        self.warm_a = [a.clone() for a in self.a_init]  # per row: the A the next round starts from
        self.a = [a.clone().requires_grad_() for a in self.a_init]
        self.b = [torch.zeros(num_rows, o, s.ttt_lora_rank, device=device, requires_grad=True) for _, o in shapes]

    @property
    def params(self) -> list[torch.Tensor]:
        return self.a + self.b

    def reset(self, warm_a: bool) -> None:
        """A new round: B = 0 (each document starts as the plain model); A redrawn, or with `warm_a`
        the A each row kept at its previous document's last own step."""
        with torch.no_grad():
            for b in self.b:
                b.zero_()
            for a, start in zip(self.a, self.warm_a if warm_a else self.a_init):
                a.copy_(start)

    def keep_warm(self, rows: list[int]) -> None:
        """These rows' documents take no more steps: their current A is what the next round inherits."""
        if not rows:
            return
        index = torch.tensor(rows, device=self.a[0].device)
        with torch.no_grad():
            for a, warm in zip(self.a, self.warm_a):
                warm[index] = a[index]

    def delta(self, j: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a[j].to(x.dtype), self.b[j].to(x.dtype)
        return self.scale * torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


def lora_logits(lora: DocLoRA, model: GPT, x: torch.Tensor, positions: torch.Tensor | None,
                looping: bool) -> torch.Tensor:
    """Logits of rows x (num_rows, W) at `positions` (num_rows, C; None = all) with every adapter of
    `lora` applied: the per-document step that torch.compile sees."""
    hooks = lora.hooks
    hooks.lora, hooks.calls = lora, [0] * len(hooks.names)
    try:
        h = model.forward_hidden(x, looping)
    finally:
        hooks.lora, hooks.calls = None, None
    if positions is not None:
        h = h.gather(1, positions[..., None].expand(-1, -1, h.size(-1)))
    return model.head(h, lora.delta(len(lora.a) - 1, h))


def window_widths(chunk: int, seq_len: int) -> list[int]:
    """The padded window widths of the per-document steps: powers of two from the chunk size up, then
    seq_len (48 and 2048: 64, 128, ..., 2048)."""
    return [1 << k for k in range((chunk - 1).bit_length(), (seq_len - 1).bit_length())] + [seq_len]


def step_width(step: int, chunk: int, seq_len: int) -> int:
    """The padded window of chunk step `step`: it holds the window of every document's chunk `step`."""
    return next(w for w in window_widths(chunk, seq_len) if w >= min((step + 1) * chunk, seq_len))


def round_steps(docs: list[tuple[int, int]], chunk: int, seq_len: int) -> list[tuple[int, bool]]:
    """(padded width, whether some document trains) of each chunk step of one rank's documents of a round."""
    counts = [len(sequence_pieces([d], chunk)) for d in docs]
    return [(step_width(i, chunk, seq_len), any(i < n - 1 for n in counts)) for i in range(max(counts, default=0))]


def lora_round(model: GPT, ledger: ScoreLedger, docs: list[tuple[int, int]], lora: DocLoRA, s: TTTSettings,
               ctx: EvalContext, *, num_steps: int, forward, before_step) -> tuple[int, int]:
    """Score this rank's documents of one round, document i on adapter row i, and train their adapters
    at each step `before_step(i, kind)` allows (kind: (plain or adapt, padded width), None where this rank
    holds no document; called on every rank for each of the round's `num_steps`, so budget decisions
    stay collective; once it refuses, it refuses for good). Returns (AdamW steps, steps scored with
    adaptation allowed)."""
    lora.reset(s.ttt_warm_start_a)
    optimizer = torch.optim.AdamW(lora.params, lr=s.ttt_lora_lr, betas=(s.ttt_beta1, s.ttt_beta2), eps=1e-10,
                                  weight_decay=s.ttt_weight_decay)
    chunks = [sequence_pieces([d], s.chunk) for d in docs]
    steps = adapting = 0
    for i in range(num_steps):
        rows = [d for d in range(len(docs)) if i < len(chunks[d])]
        train_rows = [d for d in rows if i < len(chunks[d]) - 1]
        width = step_width(i, s.chunk, s.seq_len)
        if not before_step(i, ("adapt" if train_rows else "plain", width) if rows else None):
            train_rows = []
        elif rows:
            adapting += 1
        if not rows:
            continue
        lora.keep_warm([d for d in rows if i == len(chunks[d]) - 1])  # their last own step is done
        spans = [chunks[d][i] for d in rows]
        starts = [max(docs[d][0], b - s.seq_len) for d, (_, b) in zip(rows, spans)]
        x, positions, x_at, y_at, mask = ledger.document_rows(spans, starts, rows=rows, num_rows=lora.num_rows,
                                                              width=width, chunk=s.chunk)
        with torch.enable_grad(), ctx.autocast():  # one graph per width: steps that train nothing skip the backward
            logits = forward(lora, model, x, positions, ctx.looping)
        ledger.commit(spans, logits.detach(), x_at, y_at, mask)  # scores fixed before the update below
        if not train_rows:
            continue
        labels, weights = torch.zeros(lora.num_rows, s.chunk, dtype=torch.int64), torch.zeros(lora.num_rows, s.chunk)
        for d in train_rows:  # each document's mean loss over the chunk it just committed
            a, b = chunks[d][i]
            labels[d, : b - a] = ledger.adaptation_tokens(a, b)[1:]
            weights[d, : b - a] = 1.0 / (b - a)
        (token_nll(logits, labels.to(ledger.device)) * weights.to(ledger.device).reshape(-1)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    return steps, adapting


def global_sgd_phase(model: GPT, ledger: ScoreLedger, docs: list[tuple[int, int]], s: TTTSettings, ctx: EvalContext,
                     *, before_step) -> int:
    """Full-model SGD over already-scored documents (in queue order), cosine LR over groups of about
    TTT_CHUNK_TOKENS targets. Every rank calls it with the same documents. `before_step(n)` before
    the phase's step n = 1, 2, ... returning False (on every rank alike) ends the phase there."""
    ledger.share(0, ledger.num_targets)
    groups: list[list[tuple[int, int]]] = [[]]
    for d in docs:
        if sum(b - a for a, b in groups[-1]) >= s.ttt_chunk_tokens:
            groups.append([])
        groups[-1].append(d)
    optimizer = torch.optim.SGD(list(model.parameters()), lr=s.global_ttt_lr, momentum=s.ttt_momentum)
    answers = []  # before_step's answers so far: the first refusal ends the phase

    def gate() -> bool:
        answers.append(before_step(len(answers) + 1))
        return answers[-1]

    steps = 0
    for gi, group in enumerate(groups):
        steps += adapt_full_model(model, ledger, group, optimizer, ctx, lr=cosine_lr(s.global_ttt_lr, gi, len(groups)),
                                  epochs=s.global_ttt_epochs, seq_len=s.seq_len, batch_seqs=s.ttt_batch_seqs,
                                  grad_clip=s.ttt_grad_clip, before_step=gate)
        if not all(answers):
            break
    return steps


def measure_steps(model: GPT, lora: DocLoRA, s: TTTSettings, widths: list[int], ctx: EvalContext, *, forward,
                  costs: StepCosts | None) -> None:
    """At each width, on full rows of synthetic tokens: an adapting step (forward, backward, AdamW),
    which compiles the width's graph; with `costs`, then a timed plain step (the forward) and a timed
    adapting one, and (phased TTT with global phases, unless timed already) a timed global SGD step
    (TTT_BATCH_SEQS sequences of EVAL_SEQ_LEN, over all ranks) after an untimed one: the budget's step
    costs before the first validation step. The adapters are reset by the next round; every weight of
    the model is put back."""
    optimizer = torch.optim.AdamW(lora.params, lr=0.0)
    device = lora.a[0].device
    with frozen(model.parameters()):  # as inside a round
        for width in widths:
            x = synthetic_tokens(lora.num_rows * width, model.cfg.vocab_size, seed=width).view(lora.num_rows, width)
            positions = torch.arange(width - s.chunk, width).expand(lora.num_rows, -1).contiguous()  # a real step's
            x, positions = x.to(device), positions.to(device)
            for kind, timed in [("adapt", False)] + ([("plain", True), ("adapt", True)] if costs is not None else []):
                t0 = costs.now() if timed else 0.0
                with torch.enable_grad(), ctx.autocast():  # as in `lora_round`
                    logits = forward(lora, model, x, positions, ctx.looping)
                if kind == "adapt":
                    logits.float().logsumexp(-1).mean().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if timed:
                    costs.add((kind, width), costs.now() - t0)
    if (costs is None or "global" in costs.sums or s.ttt_mode != "phased" or s.global_ttt_epochs == 0
            or s.phased_ttt_prefix_docs == 0):
        return
    source = TrainingTokens(synthetic_tokens(s.ttt_batch_seqs * s.seq_len + 1, model.cfg.vocab_size, seed=2), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=s.ttt_momentum)
    with weights_restored(model):
        for timed in (False, True):
            t0 = costs.now()
            adapt_full_model(model, source, [(0, source.num_targets)], optimizer, ctx, lr=0.0, epochs=1,
                             seq_len=s.seq_len, batch_seqs=s.ttt_batch_seqs, grad_clip=s.ttt_grad_clip)
            if timed:
                costs.add("global", costs.now() - t0)
    optimizer.zero_grad(set_to_none=True)


def nothing_to_adapt(s: TTTSettings, num_targets: int, queue: list[tuple[int, int]] | None = None,
                     round_docs: int = 1) -> str | None:
    """Why a TTT pass with these settings would adapt on nothing that a later score sees, or None."""
    if s.ttt_mode == "chunked":
        if s.ttt_epochs == 0:
            return "TTT_EPOCHS=0 (set it > 0)"
        if num_targets <= s.ttt_chunk_tokens:
            return (f"the {num_targets} validation targets fit in one TTT_CHUNK_TOKENS={s.ttt_chunk_tokens} chunk, which "
                    f"is scored last and never trains (lower TTT_CHUNK_TOKENS)")
        return None
    if any(b - a > s.chunk for a, b in queue):
        return None
    phased = s.ttt_mode == "phased"
    if phased and s.global_ttt_epochs > 0:
        first = min(s.phased_ttt_prefix_docs, len(queue)) // s.phased_ttt_num_phases  # documents the first global phase trains on
        if first > 0 and -(-first // round_docs) < -(-len(queue) // round_docs):  # it ends before the last round
            return None
    return (f"every one of the {len(queue)} documents fits in one TTT_CHUNK_SIZE={s.chunk} chunk, which never trains"
            + (", and no global phase ends before the last round (lower TTT_CHUNK_SIZE, TTT_BATCH_SIZE or "
               "PHASED_TTT_PREFIX_DOCS)" if phased else " (lower TTT_CHUNK_SIZE)"))


def document_rounds(queue: list[tuple[int, int]], per_rank: int, rt: Runtime) -> tuple[list[list], list[list]]:
    """Document TTT's rounds (per_rank x world size documents of the queue each) and this rank's
    documents of each (rank r holds the round's positions r*per_rank onwards)."""
    size = per_rank * rt.world_size
    rounds = [queue[j : j + size] for j in range(0, len(queue), size)]
    return rounds, [r[rt.rank * per_rank : (rt.rank + 1) * per_rank] for r in rounds]


def document_step_widths(tokens: torch.Tensor, s: TTTSettings, rt: Runtime) -> collections.Counter:
    """This rank's chunk steps of a document TTT pass over `tokens`, by padded width: what scoring it
    plainly takes."""
    _, mine = document_rounds(document_queue(tokens), s.ttt_batch_size, rt)
    return collections.Counter(w for docs in mine for w, _ in round_steps(docs, s.chunk, s.seq_len))


def ttt_documents(model: GPT, ledger: ScoreLedger, s: TTTSettings, ctx: EvalContext, lora_forward=None) -> TTTResult:
    """Per-document LoRA TTT (mode lora) or phased TTT (mode phased) over the whole stream.
    `lora_forward` is `lora_logits` or a compiled form of it."""
    forward, queue = lora_forward or lora_logits, document_queue(ledger.tokens)
    rounds, mine = document_rounds(queue, s.ttt_batch_size, ctx.rt)
    round_docs = s.ttt_batch_size * ctx.rt.world_size
    num_steps = [len(sequence_pieces(r[:1], s.chunk)) for r in rounds]  # every rank's most (the longest is first)
    phased, prefix = s.ttt_mode == "phased", min(s.phased_ttt_prefix_docs, len(queue))
    boundaries = phase_boundaries(prefix, s.phased_ttt_num_phases) if phased else []
    lora = DocLoRA(model, s.ttt_batch_size, s, ledger.device, ctx.looping)
    tracker = TTTTracker(ctx, f"mode:{s.ttt_mode} docs:{len(queue)} rounds:{len(rounds)} "
                         f"docs_per_rank:{s.ttt_batch_size} window_widths:{window_widths(s.chunk, s.seq_len)} "
                         f"lora_rank:{s.ttt_lora_rank} lora_alpha:{s.ttt_lora_alpha or s.ttt_lora_rank:g} "
                         f"lora_lr:{s.ttt_lora_lr} warm_start_a:{int(s.ttt_warm_start_a)} adapters:{len(lora.a)}"
                         + (f" prefix_docs:{prefix} boundaries:{boundaries}" if phased else ""),
                         nothing_to_adapt(s, ledger.num_targets, queue, round_docs))
    costs = tracker.costs or StepCosts(tracker.now)
    remaining = document_step_widths(ledger.tokens, s, ctx.rt)  # plain steps left on this rank, by width
    if tracker.costs is not None:  # what the evaluation warm-up has not timed yet
        measure_steps(model, lora, s, [w for w in sorted(remaining) if ("plain", w) not in costs.sums], ctx,
                      forward=forward, costs=costs)

    def gate(kind, where: str) -> bool:
        """Whether the next step, of `kind` ("global", a chunk step's (plain or adapt, width), or None: a
        chunk step where this rank holds no document, not timed), may adapt (always, without a budget).
        Under a budget the step is then timed as `kind` if it may, else a chunk step as plain."""
        if tracker.costs is None:
            return True
        width = kind[1] if isinstance(kind, tuple) else None
        if width:
            remaining[width] -= 1
        ok = tracker.allows(costs.ms(kind), costs.plain_ms(remaining), where)
        costs.lap(kind if ok else ("plain", width) if width else None)
        return ok

    steps = global_steps = phases_done = trained_rounds = 0
    for j, docs in enumerate(mine):
        t0 = tracker.now()
        with frozen(model.parameters()):  # only the adapters learn inside a round
            done, adapted = lora_round(model, ledger, docs, lora, s, ctx, num_steps=num_steps[j], forward=forward,
                                       before_step=lambda i, kind: gate(kind, f"round {j + 1}/{len(rounds)} step "
                                                                              f"{i + 1}/{num_steps[j]}"))
        costs.lap(None)
        steps += done
        trained_rounds += bool(adapted)
        tracker.add("adapt" if adapted else "score", t0)
        done_docs = min((j + 1) * round_docs, len(queue))
        while phases_done < len(boundaries) and boundaries[phases_done] <= done_docs:
            phase = f"{phases_done + 1}/{len(boundaries)}"
            if done_docs == len(queue):  # every document is scored: what the phase would learn reaches no score
                ctx.log(f"ttt:global_phase {phase} skipped: no document is left to score")
            elif tracker.stopped_at is None:
                t0 = tracker.now()
                phase_steps = global_sgd_phase(model, ledger, queue[: boundaries[phases_done]], s, ctx,
                                               before_step=lambda n: gate("global", f"global phase {phase} step {n}"))
                costs.lap(None)
                global_steps += phase_steps
                phase_ms = tracker.add("adapt", t0)
                ctx.log(f"ttt:global_phase {phase} docs_scored:{done_docs} docs_trained:{boundaries[phases_done]} "
                        f"steps:{phase_steps} time:{phase_ms / 1000:.1f}s")
            phases_done += 1
    model.eval()
    return tracker.result(len(rounds), trained_rounds, steps + global_steps, global_steps)


# PRE-QUANTIZATION TTT, the seeds' technique in its legal form: after training and before export, the
# full-precision weights take PREQUANT_TTT_EPOCHS AdamW passes over PREQUANT_TTT_TOKENS tokens of
# *training* data (the tail of the last training shard). That reads training data, so it happens
# inside the training budget: its cost is measured before training (a warm-up and a timed step on the
# same slice, weights restored) and reserved from the training time (PhaseClock.reserve_ms). The seeds adapted on
# the validation tokens before scoring them, which breaks C3: PREQUANT_TTT_SOURCE=val is refused
# unless ALLOW_VAL_ADAPTATION=1, and that opt-in stamps every score line, the compliance block and the
# returned results as non-record.


class TrainingTokens:
    """A token source for adaptation without a ledger: training data only (no score to protect)."""

    def __init__(self, tokens: torch.Tensor, device: torch.device):
        self.tokens, self.device, self.num_targets = tokens, device, tokens.numel() - 1

    def adaptation_tokens(self, lo: int, hi: int) -> torch.Tensor:
        return self.tokens[lo : hi + 1]


def prequant_ttt_tokens(hp: Hyperparameters, train_files: list[str],
                        val_tokens: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The pre-quantization TTT stream and its source name. Validation tokens only with the opt-in."""
    if hp.prequant_ttt_source == "val":
        if not hp.allow_val_adaptation:
            raise RunError("PREQUANT_TTT_SOURCE=val adapts on validation tokens before scoring them (C3); set "
                           "ALLOW_VAL_ADAPTATION=1 for a non-record experiment")
        return val_tokens[: hp.prequant_ttt_tokens + 1], "validation"
    tail = load_data_shard(train_files[-1])
    return tail[-min(hp.prequant_ttt_tokens + 1, tail.numel()) :], "train"


def prequant_ttt(model: GPT, tokens: torch.Tensor, ctx: EvalContext, *, seq_len: int, epochs: int, lr: float,
                 batch_seqs: int, grad_clip: float) -> int:
    """AdamW passes over `tokens` (cut into seq_len pieces, split across ranks, gradients averaged)."""
    source = TrainingTokens(tokens, ctx.rt.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    steps = adapt_full_model(model, source, [(0, source.num_targets)], optimizer, ctx, lr=lr, epochs=epochs,
                             seq_len=seq_len, batch_seqs=batch_seqs, grad_clip=grad_clip)
    optimizer.zero_grad(set_to_none=True)
    return steps


PREQUANT_TTT_RESERVE_MARGIN = 1.5  # reserve = measured pre-quantization TTT time x this


def prepare_prequant_ttt(hp: Hyperparameters, rt: Runtime, model: GPT, train_files: list[str],
                         val_tokens: torch.Tensor, clock: PhaseClock, autocast, log) -> dict | None:
    """Before training: pick the pre-quantization TTT data and reserve its time from the training budget
    (training data only): one step on its own data to warm up, then one timed step (weights put back
    after), scaled to the full number of steps, times PREQUANT_TTT_RESERVE_MARGIN. None when
    PREQUANT_TTT_ENABLED=0."""
    if not hp.prequant_ttt_enabled:
        return None
    tokens, source = prequant_ttt_tokens(hp, train_files, val_tokens)
    settings = dict(seq_len=hp.train_seq_len, epochs=hp.prequant_ttt_epochs, lr=hp.prequant_ttt_lr,
                    batch_seqs=hp.ttt_batch_seqs, grad_clip=hp.ttt_grad_clip)
    ctx = EvalContext(rt, autocast)
    steps = hp.prequant_ttt_epochs * math.ceil(math.ceil((tokens.numel() - 1) / hp.train_seq_len) / hp.ttt_batch_seqs)
    reserve_ms = 0.0
    clock.start("warmup")  # measuring is not training: the weights are put back
    if steps:
        looped, one_epoch = dataclasses.replace(ctx, looping=hp.num_loops > 0), dict(settings, epochs=1)
        sample = tokens[: hp.ttt_batch_seqs * hp.train_seq_len + 1]
        with weights_restored(model):
            for _ in range(2):  # the second step is timed: the first's costs (allocation, kernel loading) recur not
                t0 = time.perf_counter()
                prequant_ttt(model, sample, looped, **one_epoch)  # one step: `sample` is one batch
            step_ms = agree_max([1000.0 * (time.perf_counter() - t0)], rt)[0]  # every rank shortens its budget alike
        reserve_ms = PREQUANT_TTT_RESERVE_MARGIN * step_ms * steps
    clock.stop()
    if source == "train":  # reads training data: must end inside the training cap
        clock.reserve_ms += reserve_ms
    log(f"prequant_ttt:reserving {reserve_ms:.0f}ms for {steps} steps source:{source} tokens:{tokens.numel()} "
        f"(measured before training){NON_RECORD_STAMP if source == 'validation' else ''}")
    return dict(tokens=tokens, source=source, settings=settings, ctx=ctx, reserve_ms=reserve_ms, steps=steps)


def run_prequant_ttt(prequant: dict, model: GPT, clock: PhaseClock, *, looping: bool, log) -> None:
    """After training, before export: adapt the full-precision weights; logs when data access ended."""
    clock.start("prequant_ttt")
    steps = prequant_ttt(model, prequant["tokens"], dataclasses.replace(prequant["ctx"], looping=looping),
                         **prequant["settings"])
    clock.stop()
    used = clock.elapsed_ms("prequant_ttt")
    end = clock.elapsed_ms("train") + used
    within = prequant["source"] != "train" or clock.cap_ms is None or end <= clock.cap_ms
    prequant.update(steps_done=steps, time_ms=used, data_access_end_ms=end, within_cap=within)
    log(f"prequant_ttt: steps:{steps} source:{prequant['source']} time:{used:.0f}ms reserved:"
        f"{prequant['reserve_ms']:.0f}ms train_data_access_end:{end:.0f}ms cap:{ms_or_none(clock.cap_ms)} "
        f"within_cap:{int(within)}")


def run_ttt(model: GPT, ledger: ScoreLedger, settings: TTTSettings, ctx: EvalContext, *, logits_fn=None,
            lora_forward=None) -> TTTResult:
    """The TTT pass of TTT_MODE over the ledger's whole stream. `logits_fn` (chunked scoring) and
    `lora_forward` (the per-document step, `lora_logits`) may be compiled forms."""
    if settings.ttt_mode == "chunked":
        return ttt_chunked(model, ledger, settings, ctx, logits_fn)
    return ttt_documents(model, ledger, settings, ctx, lora_forward)


# ==================================================================================================
# SCORING AN ARTIFACT
# ==================================================================================================
# Scoring an artifact file: a fresh model built from the file alone, warmed up, then every
# evaluation stage the run asks for (roundtrip, sliding window, TTT) within the evaluation budget,
# and the compliance block. The end of a training run and EVAL_ONLY=1 both go through score_artifact.


def compliance_lines(passes: ArtifactScore, hp: Hyperparameters, *, eval_ms: float, eval_cap_ms: float | None,
                     causal_diff: float, prequant: dict | None) -> list[str]:
    """The compliance block (conditions C1-C4 of the public field guide), every data source
    (calibration: where quantization calibration data came from, e.g. train or synthetic) and what
    each evaluation pass came to."""
    results, ttt_info = passes.results, passes.ttt_info
    targets = {r.num_targets for r in results.values()}
    adapted = ttt_info is not None and ttt_info.adapted_targets > 0
    val_prequant = prequant is not None and prequant["source"] == "validation"
    c3 = (f"VIOLATED: pre-quantization TTT adapted the weights on {prequant['tokens'].numel()} validation tokens "
          "before they were scored" if val_prequant else
          f"ok: {ttt_info.adapted_targets} adaptation targets, each handed out by the ledger after its score was "
          "committed" if adapted else "ok: no adaptation on validation tokens")
    prequant_ok = prequant is None or prequant.get("within_cap", True)
    prequant_source = "none" if prequant is None else "validation (before scoring: NON-RECORD)" if val_prequant else (
        f"train ({prequant['tokens'].numel()} tokens, inside the training budget: {int(prequant_ok)})")
    over = eval_cap_ms is not None and eval_ms > eval_cap_ms
    eligible = not over and len(targets) == 1 and not hp.allow_val_adaptation and prequant_ok
    track = "non-record (ALLOW_VAL_ADAPTATION=1)" if hp.allow_val_adaptation else \
        "B (adaptive, score-first)" if adapted else "A (fixed predictor)"
    return [
        "compliance:",
        f"  track: {track}",
        f"  C1 causal: ok: windows end at their last scored target; a later token moved earlier logits by "
        f"{causal_diff:.3g}",
        f"  C2 full normalized softmax: ok: cross-entropy over all {hp.vocab_size} logits, softmax sum checked",
        f"  C3 score before update: {c3}",
        f"  C4 each target scored once: {'ok' if len(targets) == 1 else 'FAILED'}: "
        f"{', '.join(f'{k}:{r.num_targets}' for k, r in results.items())}",
        f"  sources: train_warmup:train eval_warmup:synthetic "
        f"adaptation:{'validation (already scored)' if adapted else 'none'} pre_quant_ttt:{prequant_source} "
        f"calibration:{hp.gptq_calibration_source if hp.quant_method == 'gptq' else 'none'}",
        f"  eval_time: {eval_ms:.0f}ms budget:{ms_or_none(eval_cap_ms)} within_budget:{int(not over)}",
        f"  eval_passes: {passes.line()}",
        f"  record_eligible: {int(eligible)}" + (NON_RECORD_STAMP if hp.allow_val_adaptation else ""),
    ]


NON_RECORD_STAMP = " non_record:C3_violated"


def eval_flops_plan(hp: Hyperparameters, cfg: ModelConfig, val_tokens: torch.Tensor, looping: bool,
                    world_size: int, ttt: TTTSettings | None) -> list[str]:
    """Forward/backward FLOPs of every evaluation pass about to run, and the time they need at peak
    and at 40% MFU on this run's devices and on 8xH100, against the evaluation budget."""
    seq_len, num_targets = hp.effective_eval_seq_len, val_tokens.numel() - 1
    fwd = estimate_flops_per_token(cfg, seq_len, looping)

    def window_tokens(stride: int) -> int:
        return sum(min(b, seq_len) for _, b in plan_windows(num_targets, seq_len, stride))

    def flat(name: str, fwd_tokens: int, train_tokens: int = 0) -> tuple:  # a training token: fwd + bwd (~2 fwd)
        return name, fwd_tokens, train_tokens, fwd * fwd_tokens + 3 * fwd * train_tokens

    passes = [flat("roundtrip", window_tokens(seq_len))]
    if 0 < hp.eval_stride < seq_len:
        passes.append(flat("sliding", window_tokens(hp.eval_stride)))
    if ttt is not None and ttt.ttt_mode == "chunked":
        trained = min(num_targets, (-(-num_targets // hp.ttt_chunk_tokens) - 1) * hp.ttt_chunk_tokens)
        passes.append(flat("ttt_chunked", window_tokens(hp.eval_stride or seq_len), trained * hp.ttt_epochs))
    elif ttt is not None:  # each chunk step reads a rank's padded rows; a step where a row trains backpropagates
        queue, rows = document_queue(val_tokens), ttt.ttt_batch_size
        # one rank's share of each round (the head counted at every position)
        steps = [step for j in range(0, len(queue), rows)
                 for step in round_steps(queue[j : j + rows], ttt.chunk, seq_len)]
        fwd_tokens = sum(rows * width for width, _ in steps)
        backprop_tokens = sum(rows * width for width, trains in steps if trains)
        lora = lora_flops_per_token(cfg, hp.ttt_lora_rank, looping, k=hp.ttt_k_lora, o=hp.ttt_o_lora,
                                    mlp=hp.ttt_mlp_lora)
        boundaries = phase_boundaries(min(hp.phased_ttt_prefix_docs, len(queue)), hp.phased_ttt_num_phases)
        global_tokens = hp.global_ttt_epochs * sum(sum(b - a for a, b in queue[:n]) for n in boundaries) \
            if hp.ttt_mode == "phased" else 0
        # the frozen base's backward only carries activation gradients (~1 forward); the adapters get both
        passes.append((f"ttt_{hp.ttt_mode}", fwd_tokens, backprop_tokens + global_tokens,
                       (fwd + lora) * fwd_tokens + (fwd + 2 * lora) * backprop_tokens + 3 * fwd * global_tokens))
    total = sum(flops for *_, flops in passes)

    def seconds(devices: int) -> str:
        peak, mfu_40 = (total / (devices * hp.peak_tflops * 1e12 * mfu) for mfu in (1, 0.4))
        return f"at_peak:{peak:.3g}s at_40%_mfu:{mfu_40:.3g}s"

    budget = f"{hp.max_eval_seconds:.0f}s" if hp.max_eval_seconds > 0 else "none"
    lines = [f"eval_plan: {name} forward_tokens:{f} train_tokens:{t} flops:{flops:.3e}" for name, f, t, flops in passes]
    return lines + [f"eval_plan_total: flops:{total:.3e} this_run({world_size} devices) {seconds(world_size)} | "
                    f"8xH100 {seconds(8)} | budget:{budget}"]


def synthetic_tokens(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """A seeded random stream (BOS every 97 tokens): data for warm-ups that is neither validation nor training."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab_size, (n,), generator=g)
    tokens[::97] = BOS_ID
    return tokens


def ms_or_none(ms: float | None) -> str:
    return "none" if ms is None else f"{ms:.0f}ms"


def warm_up_evaluation(model: GPT, logits_fn, luts: ByteLuts, ctx: EvalContext, *, seq_len: int, batch_seqs: int,
                       ttt: TTTSettings | None = None, lora_forward=None) -> dict:
    """Compile (and warm) the evaluation graphs on synthetic tokens, run the causality self-test, and
    run the TTT path once on a synthetic stream (for lora/phased after a plain and an adapting step at
    every window width, so every graph of the pass is compiled here); every weight is put back. Under
    a budget, time a window batch (forward and scoring, 3 times) and each TTT step shape: the costs
    the first pass is planned with."""
    documents, costs = ttt is not None and ttt.ttt_mode != "chunked", ctx.costs
    quiet = EvalContext(ctx.rt, ctx.autocast, ctx.looping)  # no budget, no log
    if documents:
        adapter_hooks(model)  # registered before the first compile: the plain graphs never change after
    rows = batch_seqs * ctx.rt.world_size  # a full batch for every rank
    stream = synthetic_tokens(rows * seq_len + 1, model.cfg.vocab_size)
    with weights_restored(model):
        x = stream[: batch_seqs * seq_len].view(batch_seqs, seq_len).to(ctx.rt.device)
        flipped = x.clone()
        flipped[:, -1] = torch.where(flipped[:, -1] == 2, 3, 2)
        with torch.no_grad(), ctx.autocast():
            a, b = logits_fn(x, ctx.looping).float(), logits_fn(flipped, ctx.looping).float()
        causal_diff = float((a[:, :-1] - b[:, :-1]).abs().max()) if seq_len > 1 else 0.0
        if causal_diff > 1e-3:
            raise RunError(f"causality self-test failed: the last token changed earlier logits by {causal_diff:.3g} "
                           "(C1); no score is reported")
        no_sidecar = dataclasses.replace(luts, val_bytes=None)  # synthetic tokens are not the validation stream
        for _ in range(3 if costs is not None else 0):
            synthetic = ScoreLedger(stream, no_sidecar, ctx.rt.device)
            t0 = costs.now()
            score_windows(lambda t: logits_fn(t, ctx.looping), synthetic,
                          plan_windows(rows * seq_len, seq_len, seq_len), quiet, seq_len=seq_len, batch_seqs=batch_seqs)
            costs.add("window", costs.now() - t0)
        if ttt is not None:
            if documents:
                lora = DocLoRA(model, ttt.ttt_batch_size, ttt, ctx.rt.device, ctx.looping)
                measure_steps(model, lora, ttt, window_widths(ttt.chunk, seq_len), quiet,
                              forward=lora_forward or lora_logits, costs=costs)
            synthetic = ScoreLedger(synthetic_tokens(2 * seq_len + 1, model.cfg.vocab_size, seed=1), no_sidecar,
                                    ctx.rt.device)
            small = dataclasses.replace(ttt, ttt_chunk_tokens=seq_len, ttt_epochs=1, phased_ttt_prefix_docs=1,
                                        phased_ttt_num_phases=1, global_ttt_epochs=1)
            run_ttt(model, synthetic, small, quiet, logits_fn=logits_fn, lora_forward=lora_forward)
    model.eval()
    return dict(causal_diff=causal_diff, tokens=int(stream.numel()) + (2 * seq_len + 1 if ttt is not None else 0))


def final_score_log_key(stage: str, tag: str) -> str:
    """The log line that reports a stage's exact score (the last stage run is the submitted score);
    `tag` names the artifact's format, e.g. int6_brotli."""
    return {"roundtrip": f"final_{tag}_roundtrip_exact", "sliding": "final_sliding_window_exact",
            "ttt": "legal_ttt_exact"}[stage]


def evaluate_artifact(hp: Hyperparameters, model: GPT, val_tokens: torch.Tensor, luts: ByteLuts, clock: PhaseClock,
                      ctx: EvalContext, *, use_compile: bool, batch_seqs: int, tag: str,
                      prequant: dict | None = None) -> ArtifactScore:
    """Every score of the reloaded artifact (`tag`: its format, e.g. int6_brotli), in order: the flat
    roundtrip, the sliding window if EVAL_STRIDE is set, test-time training if TTT_ENABLED. The clock's
    `eval` phase runs from the artifact read (started by the caller) to the final score and is logged
    per phase. Under MAX_EVAL_SECONDS a pass whose measured plain cost does not fit in what is left is
    skipped, and one that stops fitting while it runs is cut (TTT first stops adapting); the final score
    is then the last pass that completed (see ArtifactScore), which also keeps the compliance block."""
    rt, log, seq_len = ctx.rt, ctx.log, hp.effective_eval_seq_len
    stamp = NON_RECORD_STAMP if hp.allow_val_adaptation else ""
    model.eval()
    logits_fn = maybe_compile(model.forward_logits, use_compile, "eval_forward_logits")
    lora_forward = maybe_compile(lora_logits, use_compile, "ttt_lora_step")
    phases = {"load": clock.elapsed_ms("eval")}

    def phase_done(name: str) -> float:
        phases[name] = clock.elapsed_ms("eval") - sum(phases.values())
        return phases[name]

    settings = None
    if hp.ttt_enabled:  # a rank holds TTT_BATCH_SIZE documents, or fewer when they all fit in one round (the same
        # single round either way, with fewer padded rows)
        rows = min(hp.ttt_batch_size, -(-len(document_spans(val_tokens)) // rt.world_size))
        settings = TTTSettings.from_hparams(hp, seq_len=seq_len, score_batch_seqs=batch_seqs,
                                            ttt_batch_size=rows or hp.ttt_batch_size)
    for line in eval_flops_plan(hp, model.cfg, val_tokens, ctx.looping, rt.world_size, settings):
        log(line)
    budget = EvalBudget(lambda: clock.elapsed_ms("eval"), clock.eval_cap_ms, rt)
    ctx = dataclasses.replace(ctx, budget=budget)
    warm = warm_up_evaluation(model, logits_fn, luts, ctx, seq_len=seq_len, batch_seqs=batch_seqs, ttt=settings,
                              lora_forward=lora_forward)
    log(f"eval_warmup: source:synthetic tokens:{warm['tokens']} causal_self_test:ok max_earlier_logit_change:"
        f"{warm['causal_diff']:.3g} ttt_path:{int(settings is not None)} weights_restored:1 "
        f"time:{phase_done('warmup'):.0f}ms")
    stride = hp.eval_stride if 0 < hp.eval_stride < seq_len else 0

    def plain_ms(stage: str) -> float:
        """What the pass costs scored plainly, from the step costs measured so far."""
        windows = plan_windows(val_tokens.numel() - 1, seq_len, (stride if stage != "roundtrip" else 0) or seq_len)
        if stage != "ttt":
            rounds = max(map(len, window_rounds(windows, seq_len, batch_seqs, rt.world_size)))
        elif settings.ttt_mode == "chunked":
            rounds = sum(chunk_rounds(chunk_windows(windows, settings.ttt_chunk_tokens), settings, rt.world_size))
        else:
            return budget.costs.plain_ms(document_step_widths(val_tokens, settings, rt))
        return rounds * budget.costs.ms("window")

    def run_pass(stage: str) -> EvalResult:
        if stage != "ttt":
            return evaluate(lambda x: logits_fn(x, ctx.looping), val_tokens, luts, ctx, seq_len=seq_len,
                            batch_seqs=batch_seqs, stride=stride if stage == "sliding" else 0)
        ledger = ScoreLedger(val_tokens, luts, rt.device, group=rt.control_group)
        info = run_ttt(model, ledger, settings, ctx, logits_fn=logits_fn, lora_forward=lora_forward)
        check_scored_once(ledger)
        adapted = torch.tensor([ledger.adapted_targets], dtype=torch.float64, device=rt.device)
        passes.ttt_info = dataclasses.replace(info, adapted_targets=int(all_reduce_sum(adapted).item()))
        log(f"ttt:done mode:{hp.ttt_mode} chunks_or_rounds:{info.chunks} adapted:{info.trained_chunks} "
            f"steps:{info.steps} score:{info.score_ms:.0f}ms adapt:{info.adapt_ms:.0f}ms "
            f"adaptation_stopped:{info.stopped_at or 'never'}")
        return ledger.result()

    names = {"roundtrip": "quantized", "sliding": "quantized_sliding_window",
             "ttt": "quantized_ttt" if hp.ttt_mode == "chunked" else f"quantized_ttt_{hp.ttt_mode}"}
    passes = ArtifactScore(tag)
    for stage in ["roundtrip"] + ["sliding"] * bool(stride) + ["ttt"] * hp.ttt_enabled:
        try:
            if budget.cap_ms is not None:
                budget.require(plain_ms(stage), stage)
        except EvalPassCut as e:
            passes.status[stage] = "skipped"
            log(f"eval:skipped {e}")
            continue
        try:
            r = passes.results[stage] = run_pass(stage)
        except EvalPassCut as e:
            budget.costs.running = None  # the step in flight never ran
            passes.status[stage] = "cut"
            log(f"eval:cut {stage} {e}; it is not scored (time:{phase_done(stage):.0f}ms)")
            continue
        ms, within = phase_done(stage), budget.cap_ms is None or clock.elapsed_ms("eval") <= budget.cap_ms
        passes.status[stage] = "complete" if within else "over_budget"
        if stage == "roundtrip":
            log(f"final_{tag}_roundtrip val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} eval_time:{ms:.0f}ms{stamp}")
        log(f"{names[stage]} val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} eval_time:{ms:.0f}ms"
            f"{f' stride:{hp.eval_stride} seq_len:{seq_len}' if stage == 'sliding' else ''}{stamp}")
        if within:
            log(f"{final_score_log_key(stage, tag)} val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}{stamp}")
        else:
            log(f"eval:over_budget {stage} ended at {clock.elapsed_ms('eval') / 1000:.1f}s, past the "
                f"{budget.cap_ms / 1000:.1f}s budget")
    eval_ms = clock.elapsed_ms("eval")
    if not passes.results:
        raise RunError(f"evaluation budget (MAX_EVAL_SECONDS={hp.max_eval_seconds:g}) ran out before any pass "
                       f"completed ({passes.line()}), so no score is reported; raise "
                       "MAX_EVAL_SECONDS or lower VAL_BATCH_SIZE")
    final = passes.final_stage
    r = passes.results[final]
    if passes.status[final] != "complete":  # over budget, but the only score there is: reported, not eligible
        log(f"{final_score_log_key(final, tag)} val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}{stamp}")
    log("eval_phases: " + " ".join(f"{k}:{v:.0f}ms" for k, v in phases.items()) + f" total:{eval_ms:.0f}ms "
        f"budget:{ms_or_none(clock.eval_cap_ms)}")
    passes.compliance = compliance_lines(passes, hp, eval_ms=eval_ms, eval_cap_ms=clock.eval_cap_ms,
                                         causal_diff=warm["causal_diff"], prequant=prequant)
    for line in passes.compliance:
        log(line)
    log(f"final_score stage:{final} val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} "
        f"total_eval_time:{eval_ms / 1000:.1f}s" + (f" fallback_from:{passes.asked_stage}" if passes.fallback else "")
        + stamp)
    return passes


def load_artifact_model(path: Path, device: torch.device, expect: ModelConfig | None = None,
                        attn_backend: str = "sdpa") -> tuple[GPT, dict]:
    """A fresh model built from the artifact file alone (which exists: just exported, or checked by
    EVAL_ONLY), and the artifact's header."""
    entries, header = unpack_artifact(path.read_bytes(),
                                      expect_model=None if expect is None else dataclasses.asdict(expect))
    if {f.name for f in fields(ModelConfig)} - {"attn_backend"} - set(header["model"]):
        raise RunError(f"model artifact {path} does not record the model configuration; re-export it with this "
                       "train_gpt.py")
    cfg = ModelConfig(**dict(header["model"], attn_backend=attn_backend))
    model = GPT(cfg).to(device)
    model.load_state_dict(dequantize_state_dict(entries), strict=True)
    return model, header


@dataclass
class ArtifactScore:
    """What the evaluation of an artifact came to: each pass the run asked for (`status`: complete,
    over_budget, skipped or cut), its score if it completed, and which score is final: the last pass
    that completed within the budget (else the last that completed at all). A partial pass is never
    scored. `tag` names the artifact's format (the log keys are named after it); `compliance` is the
    compliance block (the run manifest keeps it); `score_artifact` adds the byte counts."""

    tag: str = "quantized"
    results: dict[str, EvalResult] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    ttt_info: TTTResult | None = None
    compliance: list[str] = field(default_factory=list)
    code_bytes: int = 0
    model_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.model_bytes

    @property
    def asked_stage(self) -> str:
        return next(reversed(self.status))

    @property
    def final_stage(self) -> str:
        within = [k for k in self.results if self.status[k] == "complete"]
        return (within or list(self.results))[-1]

    @property
    def fallback(self) -> bool:
        return self.final_stage != self.asked_stage

    def line(self) -> str:
        passes = " ".join(f"{k}:{v}" for k, v in self.status.items())
        return passes if not self.results else passes + f" final:{self.final_stage}" + (
            f" (fallback: {self.asked_stage} did not complete within the budget)" if self.fallback else "")

    def final_score_record(self) -> dict:
        """The manifest's final_score: the submitted score and the log line that reports it
        (records/records.py checks they agree), and the stage the run asked for if it fell back."""
        stage = self.final_stage
        return {"stage": stage, "log_key": final_score_log_key(stage, self.tag),
                **dataclasses.asdict(self.results[stage]), "asked_stage": self.asked_stage, "fallback": self.fallback,
                "passes": dict(self.status)}


def eval_batch_seqs(hp: Hyperparameters, world_size: int) -> int:
    """Windows per scoring forward on a rank: VAL_BATCH_SIZE tokens over ranks and accumulation steps."""
    return max(1, hp.val_batch_size // (world_size * hp.grad_accum_for(world_size) * hp.effective_eval_seq_len))


def score_artifact(hp: Hyperparameters, rt: Runtime, path: Path, val_tokens: torch.Tensor, luts: ByteLuts,
                   clock: PhaseClock, log, *, use_compile: bool, expect: ModelConfig | None = None,
                   prequant: dict | None = None) -> ArtifactScore:
    """Load the artifact file alone into a fresh model and run every evaluation stage on it under the
    evaluation budget, which runs from reading the file to the final score. The end of a training run
    and EVAL_ONLY=1 both come here, so they report the same numbers."""
    clock.start("eval")
    fresh, header = load_artifact_model(path, rt.device, expect=expect, attn_backend=hp.attn_backend)
    ctx = EvalContext(rt, lambda: autocast_context(hp, rt.device), bool(header["meta"].get("looping", False)), log=log)
    score = evaluate_artifact(hp, fresh, val_tokens, luts, clock, ctx, use_compile=use_compile,
                              batch_seqs=eval_batch_seqs(hp, rt.world_size), tag=header["meta"].get("tag", "quantized"),
                              prequant=prequant)
    clock.stop()
    score.code_bytes, score.model_bytes = code_bytes(), path.stat().st_size
    log(f"artifact code_bytes:{score.code_bytes} model_bytes:{score.model_bytes} total_bytes:{score.total_bytes} "
        f"limit:{ARTIFACT_LIMIT_BYTES} fits:{int(score.total_bytes <= ARTIFACT_LIMIT_BYTES)}")
    return score


# ==================================================================================================
# RUN FOLDER & MANIFEST
# ==================================================================================================
# Every run owns <ARTIFACT_DIR or ./runs>/<RUN_ID>/: its log, raw weights, artifact, the code that was
# counted, and manifest.json. A folder that exists is never written into (REPLACE_RUN=1 deletes it
# first), so a seed sweep keeps every seed's files. The manifest is written at start (status
# "started"), and atomically rewritten at the end ("complete") or on a crash ("failed"). Runs whose
# config_hash is equal differ only in seed and run identity: they are comparable, and the records
# tool (records/records.py) refuses to mix others. The code written beside the artifact is the shipped
# form of this file (below), whose bytes are the code bytes counted against the limit.

RUNS_DIR_DEFAULT = "runs"
RUN_LOG_NAME, RUN_MANIFEST_NAME, RUN_CODE_NAME = "train.log", "manifest.json", "train_gpt.py"
# The quantized, packed model: one name whatever bits the export (auto-fit included) chose.
ARTIFACT_NAME = "final_model.quantized.ptz"
# Knobs that name or place a run, or pick its seed: not part of the config hash.
RUN_IDENTITY_FIELDS = ("run_id", "artifact_dir", "replace_run", "seed", "data_path", "tokenizer_path")


def agree_run_id(run_id: str, rt: Runtime) -> str:
    """The run's name, the same on every rank (an empty RUN_ID becomes rank 0's fresh uuid4)."""
    run_id = run_id or str(uuid.uuid4())
    if rt.distributed and dist.is_initialized():
        box = [run_id]
        dist.broadcast_object_list(box, src=0, group=rt.control_group)
        run_id = box[0]
    if run_id in (".", "..") or "/" in run_id or "\\" in run_id:
        raise ConfigError(f"RUN_ID={run_id!r} must be a plain folder name (no path separators)")
    size = len(run_id.encode())
    if size > 200:  # file systems take 255 bytes per name; leave room for suffixes
        raise ConfigError(f"RUN_ID is {size} bytes long ({run_id[:24]}...); use at most 200")
    return run_id


# The claim is atomic: the folder is made under a temporary name, with its (empty) train.log inside, and
# renamed into place. rename(2) refuses a non-empty target, so of N runs started at once with one RUN_ID
# exactly one wins (an empty folder someone made by hand is taken by the first) and the others remove
# only their own temporary folder. The winner holds an flock on its folder for as long as it runs;
# REPLACE_RUN=1 deletes an old folder only after taking that lock, so it never replaces a live run.
RUN_DIR_LOCKS = {}  # run folder (str) -> the open, locked descriptor of it


def claim_run_dir(hp: Hyperparameters, rt: Runtime) -> Path:
    """Create this run's folder, or stop (on every rank) if it exists and REPLACE_RUN is not set."""
    run_dir = Path(hp.artifact_dir or RUNS_DIR_DEFAULT) / hp.run_id
    error = None
    if rt.is_main:
        try:
            claim_folder(run_dir, hp.replace_run)
        except RunError as e:
            error = str(e)
    if agree_max([float(error is not None)], rt)[0]:
        raise RunError(error or f"rank 0 could not claim the run folder {run_dir}{os.sep}")
    return run_dir


def claim_folder(run_dir: Path, replace: bool) -> None:
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".claim-", dir=run_dir.parent))
    except OSError as e:
        raise filesystem_error(e, run_dir.parent) from None
    fd = None
    try:
        (stage / RUN_LOG_NAME).touch()  # non-empty, so a second rename onto the claimed folder fails
        os.chmod(stage, 0o755)  # mkdtemp makes 0700
        fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows this folder yet
        if replace:
            remove_old_run_dir(run_dir)
        try:
            os.rename(stage, run_dir)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise RunError(f"run folder {run_dir}{os.sep} already exists; pick a new RUN_ID or set "
                               "REPLACE_RUN=1") from None
            raise filesystem_error(e, run_dir) from None
    except BaseException as e:
        if fd is not None:
            os.close(fd)
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError):
            raise filesystem_error(e, stage) from None
        raise
    RUN_DIR_LOCKS[str(run_dir)] = fd


def remove_old_run_dir(run_dir: Path) -> None:
    """REPLACE_RUN=1: delete the old folder, unless a run still holds it or it is not a folder."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run folder; remove it or pick another RUN_ID")
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return  # another claimer moved it first
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            moved = os.fstat(fd).st_ino != os.stat(run_dir).st_ino  # moved or replaced between our open and our lock
        except (BlockingIOError, FileNotFoundError):  # locked by its run, or moved away
            moved = True
        if moved:
            raise RunError(f"run folder {run_dir}{os.sep} belongs to a run that is still going; let it end, stop it "
                           "or pick a new RUN_ID") from None
        trash = run_dir.parent / f".replaced-{uuid.uuid4().hex[:12]}"
        os.rename(run_dir, trash)  # atomic: from here on nobody sees the old folder under the run's name
        shutil.rmtree(trash)
    finally:
        os.close(fd)


def release_run_dir(run_dir: Path) -> None:
    """The run is over: drop the lock on its folder (process exit drops it too)."""
    fd = RUN_DIR_LOCKS.pop(str(run_dir), None)
    if fd is not None:
        os.close(fd)


def config_hash(hp: Hyperparameters) -> str:
    """sha256 over every knob that can change the result, so equal hashes mean comparable runs."""
    config = {f.name: getattr(hp, f.name) for f in fields(hp) if f.name not in RUN_IDENTITY_FIELDS}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(data_path: str, tokenizer_path: str, splits=("train", "val")) -> dict:
    """Which data a run used: shard counts and checksums (from the data manifest when one sits beside
    the shards, else computed here), the manifest's own hash and the tokenizer's. The records tool
    refuses to pool runs whose tokenizer or validation shards differ."""
    files = {split: shard_files(data_path, split) if split in splits else [] for split in ("train", "val")}
    files["val_bytes"] = sorted(glob.glob(os.path.join(data_path, "fineweb_val_bytes_*.bin")))  # the byte sidecar
    manifest_path = Path(data_path) / DATA_MANIFEST_NAME
    recorded, source = {}, "computed"
    if manifest_path.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data_manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            recorded = {s["file"]: s["sha256"] for split in data_manifest["splits"].values() for s in split["shards"]}
            recorded.update({s["file"]: s["sha256"] for s in data_manifest.get("byte_sidecar", {}).get("shards", [])})
            source = "data manifest"
    return {"variant": Path(data_path).name, "train_shards": len(files["train"]), "val_shards": len(files["val"]),
            "val_byte_sidecars": len(files["val_bytes"]), "checksum_source": source,
            "shard_sha256": {p.name: recorded.get(p.name) or file_sha256(p)
                             for split in files.values() for p in map(Path, split)},
            "data_manifest_sha256": file_sha256(manifest_path) if manifest_path.is_file() else None,
            "tokenizer_sha256": file_sha256(Path(tokenizer_path)) if tokenizer_path else None}


def step_time_stats(step_ms: list[float]) -> dict:
    if not step_ms:
        return {"count": 0}
    t = np.array(step_ms)
    return {"count": len(t), "mean": float(t.mean()), "median": float(np.median(t)),
            "p90": float(np.percentile(t, 90)), "max": float(t.max()), "first": float(t[0])}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunManifest:
    """manifest.json of a run folder, written by rank 0 (atomically, every time it changes)."""

    def __init__(self, path: Path, hp: Hyperparameters, rt: Runtime, mode: str):
        self.path, self.is_main = path, rt.is_main
        readable = readable_source()
        self.data = {
            "manifest_version": 1, "status": "started", "mode": mode, "run_id": hp.run_id, "started_utc": utc_now(),
            "seed": hp.seed, "world_size": rt.world_size, "config_hash": config_hash(hp),
            "config": {f.name: getattr(hp, f.name) for f in fields(hp)},
            "code": {"train_gpt_sha256": hashlib.sha256(readable).hexdigest(), "readable_bytes": len(readable),
                     "shipped_sha256": hashlib.sha256(_shipped_code_of_this_file()).hexdigest()},
            "environment": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                            "sentencepiece": spm.__version__, "platform": platform.platform(), "device": str(rt.device),
                            "world_size": rt.world_size, **({"cuda": torch.version.cuda,
                                                             "gpu": torch.cuda.get_device_name(rt.device)}
                                                            if rt.device.type == "cuda" else {})},
        }
        self.write()

    def update(self, **sections) -> None:
        self.data.update(sections)
        self.write()

    def finish(self, status: str, **sections) -> None:
        self.update(**sections, status=status, finished_utc=utc_now())

    def finish_scored(self, scored: ArtifactScore, path: Path, clock: PhaseClock, log, use_compile: bool, *,
                      artifact: dict, returns: dict, scores: dict | None = None, compliance: dict | None = None,
                      **sections) -> dict:
        """Finish a run that scored an artifact (a training run or EVAL_ONLY): log the phase times and
        what compile did; write every score, the submitted one, the bytes, the phase times, the compile
        section and the compliance block, plus the caller's sections; return what run() returns (the
        caller's `returns` added)."""
        log(clock.summary())
        compile_summary = {"enabled": False}
        if use_compile:
            log(_active_compile.line())
            compile_summary = _active_compile.summary()
        fits = scored.total_bytes <= ARTIFACT_LIMIT_BYTES
        self.finish(
            "complete", scores={**(scores or {}), **{k: dataclasses.asdict(r) for k, r in scored.results.items()}},
            final_score=scored.final_score_record(), phases_ms=dict(clock.totals), compile=compile_summary,
            artifact={"code_bytes": scored.code_bytes, "model_bytes": scored.model_bytes,
                      "total_bytes": scored.total_bytes, "limit": ARTIFACT_LIMIT_BYTES, "fits": fits,
                      "sha256": file_sha256(path), **artifact},
            compliance={"eval_time_ms": clock.elapsed_ms("eval"), "eval_cap_ms": clock.eval_cap_ms,
                        "artifact_under_limit": fits, **(compliance or {}), "block": scored.compliance},
            **sections)
        return dict(run_id=self.data["run_id"], run_dir=str(self.path.parent),
                    roundtrip=scored.results.get("roundtrip"), code_bytes=scored.code_bytes, model_bytes=scored.model_bytes, total_bytes=scored.total_bytes,
                    tag=scored.tag, phases=dict(clock.totals), log_path=str(log.path), compile=compile_summary,
                    **returns)

    def write(self) -> None:
        if self.is_main:
            write_atomic(self.path, (json.dumps(self.data, indent=2, sort_keys=True, default=str) + "\n").encode())


def record_failure(manifest: "RunManifest | None", e: BaseException, artifact: Path | None, is_main: bool) -> None:
    """A failed run's manifest says why (the signal, when one stopped it), and its artifact leaves its
    final name (kept as <name>.failed), so nothing takes it for the artifact of a finished run. A
    compile failure is recorded as its one line, with the run's compile section."""
    sections = {}
    if _active_compile is not None:
        e = compile_failure(e) or e
        sections["compile"] = _active_compile.summary()

    def record() -> None:
        if artifact is not None:
            failed = artifact.with_name(artifact.name + ".failed")
            if is_main and artifact.is_file():
                with contextlib.suppress(OSError):
                    os.replace(artifact, failed)
            if failed.is_file():
                sections["artifact_kept_as"] = failed.name
        if manifest is not None:
            stopped = STOP_SIGNAL_RECEIVED[0] if STOP_SIGNAL_RECEIVED else None
            # e.g. the disk is still full: the first error is the one to report
            with contextlib.suppress(RunError, OSError):
                manifest.finish("failed", error=f"stopped by {stopped}" if stopped else f"{e.__class__.__name__}: {e}",
                                **({"signal": stopped} if stopped else {}), **sections)

    try:
        record()
    except RunStopped:  # the signal came while recording another failure (a peer it stopped): record it
        record()  # a stop signal raises only once


# ---- the shipped code form ---------------------------------------------------------------------------
# Only the bytes of the code that is shipped count, so the shipped form is a self-extracting copy:
# a latin-1 Python file holding the brotli-compressed source in a triple-quoted string literal, where
# only \ CR NUL and a " before another " (or at the end) are escaped (~1.5% overhead, against 25% for
# base85). The source it holds is the readable file without what no run reads (comments, docstrings,
# the knobs' help texts, annotations, the long names of local variables, parameters and module
# functions, indents wider than one space, the code that builds the shipped form): the same syntax tree
# otherwise (ast.unparse). It runs that source in its own namespace, where SHIPPED_SOURCE keeps the text;
# shipping it again gives the same bytes.
# Tracebacks from a shipped run name the short names: rerun the readable file to read them.

SHIPPED_PREFIX = b'# -*- coding: latin-1 -*-\nimport brotli;SHIPPED_SOURCE=brotli.decompress("""'
SHIPPED_SUFFIX = b'""".encode("latin-1"));exec(compile(SHIPPED_SOURCE,"train_gpt.py","exec"))\n'


def string_literal_body(data: bytes) -> bytes:
    """`data` as the body of a triple-quoted latin-1 string literal (an LF stays as it is): a backslash
    doubled, CR as \\r (Python reads a raw CR in source as a line end), NUL as \\0 (\\x00 before an octal
    digit), and a quote escaped before another quote or at the end (never three quotes in a row, nor
    one before the closing three)."""
    escapes = {b"\\": b"\\\\", b"\r": b"\\r", b"\0": b"\\0", b'"': b'\\"'}
    return re.sub(rb'(\0(?=[0-7]))|[\\\r\0]|"(?="|\Z)', lambda m: b"\\x00" if m[1] else escapes[m[0]], data)


def readable_only(definition):
    """Marks a definition only the readable file uses (to build the shipped form): the shipped form,
    which knows its source already, leaves it out (RuntimeTree)."""
    return definition


def readable_source() -> bytes:
    """The source this process runs: the readable train_gpt.py, or the stripped one when run from the
    shipped form."""
    shipped = globals().get("SHIPPED_SOURCE")
    return shipped if isinstance(shipped, bytes) else Path(__file__).read_bytes()


@readable_only
class RuntimeTree(ast.NodeTransformer):
    """The syntax tree without what no run reads: docstrings, the knobs' help texts (only the README's
    env table reads them; `knob(default, help)` becomes `knob(default)`) and the annotations of
    functions and of their local variables (a class's field annotations stay: they make dataclass fields)."""

    in_function = False

    def visit_body(self, node, in_function: bool = False):
        if ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
        outer, self.in_function = self.in_function, in_function
        self.generic_visit(node)
        self.in_function = outer
        return node

    visit_ClassDef = visit_body

    def visit_Module(self, node):
        node.body = [part for part in node.body if not isinstance(part, (ast.FunctionDef, ast.ClassDef)) or (
            part.name != "readable_only" and "readable_only" not in (getattr(d, "id", None) for d in part.decorator_list))]
        return self.visit_body(node)

    def visit_FunctionDef(self, node):
        node.returns = None
        for arg in ast.walk(node.args):
            if isinstance(arg, ast.arg):
                arg.annotation = None
        return self.visit_body(node, True)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):  # in a function, `x: T = v` is `x = v` and a bare `x: T` nothing
        self.generic_visit(node)
        if not self.in_function:
            return node
        return ast.Assign([node.target], node.value, lineno=0) if node.value else None

    def visit_Call(self, node):
        if getattr(node.func, "id", None) == "knob":
            node.args = node.args[:1]
        return self.generic_visit(node)


@readable_only
def bound_name(node: ast.AST) -> str | None:
    """The name this node binds (assigns, deletes, takes as a parameter, defines, imports, catches), if any."""
    if isinstance(node, ast.Name):
        return None if isinstance(node.ctx, ast.Load) else node.id
    if isinstance(node, ast.alias):
        return node.asname or node.name.split(".")[0]
    return getattr(node, "arg", None) or getattr(node, "name", None) if isinstance(
        node, (ast.arg, ast.FunctionDef, ast.ClassDef, ast.ExceptHandler)) else None


@readable_only
def fresh_names(taken: set[str]):
    """a, b, ..., Z, aa, ab, ...: the short names not in `taken` and not keywords."""
    import itertools
    import keyword
    import string

    for size in itertools.count(1):
        for name in map("".join, itertools.product(string.ascii_letters, repeat=size)):
            if name not in taken and not keyword.iskeyword(name):
                yield name


@readable_only
def rename(nodes: list[ast.AST], old: list[str], skip: set[int] = frozenset()):
    """Gives the names in `old` short names free among `nodes`, where they are read and bound (never
    attributes, keyword arguments or imports; not in the nodes whose ids are in `skip`)."""
    names = dict(zip(old, fresh_names({bound_name(n) for n in nodes} | {n.id for n in nodes if isinstance(n, ast.Name)})))
    for n in nodes:
        if isinstance(n, ast.alias) and bound_name(n) in names:  # import x as <short>
            n.asname = names[bound_name(n)]
        key = {ast.Name: "id", ast.arg: "arg", ast.FunctionDef: "name", ast.ExceptHandler: "name"}.get(type(n))
        if key and getattr(n, key) in names and id(n) not in skip:
            setattr(n, key, names[getattr(n, key)])


@readable_only
def shorten_names(tree: ast.Module) -> ast.Module:
    """Short names where no run can tell: in each function its own variables and the parameters no call
    names, then module-level functions bound nowhere else. A name stays when a string holds it (log
    lines, getattr, keys that may become keyword arguments), when a nested scope binds it too, in a
    function with global/nonlocal, and for the parameters of a function the code hands to others (a hook)."""
    nodes = list(ast.walk(tree))
    kept = {n.arg for n in nodes if isinstance(n, ast.keyword)} | {word for n in nodes if isinstance(
        n, ast.Constant) and isinstance(n.value, str) for word in re.findall(r"\w+", n.value)}
    callees = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
    handed = {getattr(n, "id", None) or n.attr for n in nodes if isinstance(n, (ast.Name, ast.Attribute)) and id(n) not in callees}
    for fn in reversed([n for n in nodes if isinstance(n, ast.FunctionDef)]):  # nested functions first
        inside = list(ast.walk(fn))
        if any(isinstance(n, (ast.Global, ast.Nonlocal)) for n in inside):
            continue
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs + [a for a in (fn.args.vararg, fn.args.kwarg) if a]
        own, todo = [a.arg for a in args], list(fn.body)
        nested = {a.arg for a in args if a.arg in kept or fn.name in handed or fn.name.startswith("__")}
        while todo:  # fn's own scope: what a nested scope binds belongs to it
            node = todo.pop()
            name = bound_name(node)
            if isinstance(node, (ast.FunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp,
                                 ast.GeneratorExp)):
                nested |= {bound_name(n) for n in ast.walk(node)} - {name}
            else:
                todo += ast.iter_child_nodes(node)
            if isinstance(node, (ast.alias, ast.ClassDef)):
                nested.add(name)
            elif name:
                own.append(name)
        outer = fn.decorator_list + fn.args.defaults + fn.args.kw_defaults  # evaluated in the enclosing scope
        rename(inside, [name for name in dict.fromkeys(own) if len(name) > 2 and name not in nested],
               {id(n) for part in outer if part for n in ast.walk(part)} | {id(fn)})
    bindings = collections.Counter(map(bound_name, nodes))
    module_names = []  # what the module binds: functions, imports (not from __future__), assigned names
    for part in tree.body:
        if isinstance(part, ast.FunctionDef):
            module_names.append(part.name)
        elif isinstance(part, ast.Import) or isinstance(part, ast.ImportFrom) and part.module != "__future__":
            module_names += [bound_name(a) for a in part.names if a.asname or "." not in a.name]
        elif isinstance(part, ast.Assign):
            module_names += map(bound_name, part.targets)
    rename(nodes, [name for name in module_names if name and len(name) > 2 and name not in kept and bindings[name] == 1])
    return tree


@readable_only
@functools.lru_cache(maxsize=4)
def stripped_source(source: bytes) -> bytes:
    """The source as runs read it (RuntimeTree: no comments, docstrings, help texts, annotations or
    readable-only definitions; then shorten_names until nothing changes), as ast.unparse writes it with
    one space per indent level (idempotent)."""
    tree, code = RuntimeTree().visit(ast.parse(source)), None
    while code != (code := ast.unparse(shorten_names(tree))):  # until no name can be shortened
        pass
    return re.sub(r"(?m)^(    )+", lambda indent: " " * (len(indent[0]) // 4), code).encode("utf-8") + b"\n"


@readable_only
def shipped_code(source: bytes) -> bytes:
    return self_extracting(stripped_source(source))


def self_extracting(stripped: bytes) -> bytes:
    import brotli

    return SHIPPED_PREFIX + string_literal_body(brotli.compress(stripped, quality=11)) + SHIPPED_SUFFIX


@functools.lru_cache(maxsize=1)
def _shipped_code_of_this_file() -> bytes:
    shipped = globals().get("SHIPPED_SOURCE")  # run from the shipped form: its source is stripped already
    return self_extracting(shipped) if isinstance(shipped, bytes) else shipped_code(readable_source())


def code_bytes() -> int:
    """Bytes of this script as shipped (its self-extracting form): the code part of the artifact."""
    return len(_shipped_code_of_this_file())


# ==================================================================================================
# MAIN
# ==================================================================================================
# A run from its first line to its last: the log header, the validation data and the shapes checked
# before anything is allocated, then run(): EVAL_ONLY=1, or a training run as the named steps that
# train_and_score lists (its table of contents). main() turns a bad setting, a failed run or a
# stop signal into one line on stderr and exit code 2.


def log_run_header(hp: Hyperparameters, rt: Runtime, log) -> None:
    log(readable_source().decode("utf-8"), console=False)
    log("=" * 100, console=False)
    log(f"python:{platform.python_version()} torch:{torch.__version__} device:{rt.device}", console=False)
    if rt.device.type == "cuda":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False, timeout=30)
            log(out.stdout, console=False)
    log("Hyperparameters:")
    for line in hp.describe():
        log(line)
    for warning in env_name_warnings(os.environ, Hyperparameters.knob_names()):
        log(warning)
    if hp.allow_val_adaptation:
        log(f"non_record: ALLOW_VAL_ADAPTATION=1 permits adapting on validation tokens before scoring them (C3); "
            f"score lines carry '{NON_RECORD_STAMP.strip()}'")


def prepare_validation(hp: Hyperparameters, rt: Runtime, log) -> tuple[torch.Tensor, ByteLuts]:
    """Validation tokens and byte tables, plus the byte sidecar when the data has one, with the byte count
    checked against the decoded text (CaseOps: the original text, the transform inverted)."""
    sp = load_tokenizer(hp)
    log(f"tokenizer_check:{check_tokenizer_belongs_to_shards(hp.tokenizer_path, hp.data_path)}")
    val_tokens = load_validation_tokens(hp.data_path)
    if int(val_tokens.max()) >= hp.vocab_size:
        raise RunError(f"validation tokens reach id {int(val_tokens.max())} >= VOCAB_SIZE={hp.vocab_size}: the shards "
                       "are from another tokenizer; point DATA_PATH at the shards of TOKENIZER_PATH")
    luts = build_byte_luts(sp, hp.vocab_size)
    operators = caseops_operator_ids(sp)
    sidecar = load_validation_byte_sidecar(hp.data_path)
    if sidecar is None and (operators is not None or hp.caseops_enabled):
        what = "CASEOPS_ENABLED=1" if operators is None else f"{hp.tokenizer_path} is a CaseOps tokenizer"
        raise RunError(f"{what} but DATA_PATH={hp.data_path} has no byte sidecar fineweb_val_bytes_*.bin, so val_bpb "
                       "would count the pieces' bytes; fetch the variant with its sidecar or re-export with "
                       "data/export_shards.py --caseops")
    if hp.caseops_enabled and operators is None:
        raise RunError(f"CASEOPS_ENABLED=1 but {hp.tokenizer_path} has no CaseOps operator pieces; point "
                       "TOKENIZER_PATH at DATA_PATH's CaseOps tokenizer or unset CASEOPS_ENABLED")
    byte_check = "ok"
    if sidecar is None:
        val_bytes = check_validation_bytes(sp, val_tokens, luts, rt.rank, rt.world_size, rt.device)
    else:
        check_sidecar_structure(val_tokens, sidecar, operators or {})
        luts = dataclasses.replace(luts, val_bytes=sidecar)
        decoded, val_bytes = validation_byte_totals(sp, val_tokens, luts, rt.rank, rt.world_size, rt.device,
                                                    caseops=operators is not None)
        if decoded != val_bytes:
            # Our exporter records its sidecar in the data manifest and counts the decoded text exactly; a
            # sidecar from elsewhere may count the raw input the tokenizer normalised (see RAW_SIDECAR_SLACK).
            raw_ok = not manifest_records_sidecar(hp.data_path) and normalizes_whitespace(sp)
            if not (raw_ok and 0 < val_bytes - decoded <= RAW_SIDECAR_SLACK * decoded):
                raise byte_mismatch(val_bytes, decoded, luts)
            byte_check = f"raw_sidecar(+{(val_bytes - decoded) / decoded:.3%}_over_the_decoded_text)"
            log(f"byte_sidecar: counts {val_bytes} bytes, the decoded text {decoded}: the raw text before the "
                "tokenizer's normalisation (the public CaseOps convention); val_bpb uses the sidecar's")
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    log(f"val_loader:shards pattern={hp.data_path}/fineweb_val_*.bin tokens:{val_tokens.numel()} "
        f"targets:{val_tokens.numel() - 1} bytes:{val_bytes} byte_source:{'tables' if sidecar is None else 'sidecar'}"
        f"{' caseops:1' if operators is not None else ''} byte_check:{byte_check}")
    return val_tokens, luts


def training_memory_floor(hp: Hyperparameters, cfg: ModelConfig, world_size: int) -> tuple[int, int]:
    """(parameters, bytes) with bytes a lower bound on what training holds per device: fp32 weights,
    gradients and one optimizer moment (12 bytes a parameter), plus one micro-batch's fp32 logits and
    the residual stream and MLP hidden of every virtual layer (2 bytes a value, as under bf16). Counted
    from one block built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        per_block = sum(p.numel() for p in Block(cfg, 0).parameters())
    tables = cfg.vocab_size * cfg.model_dim * (1 if cfg.tie_embeddings else 2) + cfg.bigram_vocab_size * cfg.bigram_dim
    params = cfg.num_layers * per_block + tables
    tokens = hp.train_batch_tokens // (world_size * hp.grad_accum_for(world_size))
    activations = tokens * (4 * cfg.vocab_size + 2 * cfg.max_virtual_layers * (cfg.model_dim + cfg.mlp_hidden))
    return params, 12 * params + activations


def check_shapes_fit(hp: Hyperparameters, rt: Runtime, train_files: list[str], val_tokens: torch.Tensor) -> None:
    """Before anything is allocated: the sequences fit the data and the model fits the device."""
    largest = max(shard_token_count(f) for f in train_files)
    if hp.train_seq_len + 1 > largest:
        raise RunError(f"TRAIN_SEQ_LEN={hp.train_seq_len} is longer than every training shard (the largest holds "
                       f"{largest} tokens); lower TRAIN_SEQ_LEN or use larger shards")
    if hp.effective_eval_seq_len > val_tokens.numel() - 1:
        name = "EVAL_SEQ_LEN" if hp.eval_seq_len else "TRAIN_SEQ_LEN (EVAL_SEQ_LEN unset)"
        raise RunError(f"{name}={hp.effective_eval_seq_len} is longer than the validation set ({val_tokens.numel() - 1} "
                       "targets); lower it or use the full validation shards")
    params, need = training_memory_floor(hp, ModelConfig.from_hparams(hp), rt.world_size)
    have = (torch.cuda.get_device_properties(rt.device).total_memory if rt.device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if need > have:
        raise RunError(f"the model cannot train here: {params / 1e6:,.0f}M parameters (NUM_LAYERS={hp.num_layers} "
                       f"MODEL_DIM={hp.model_dim} MLP_MULT={hp.mlp_mult}) need >= {need / 2**30:,.1f} GiB per device, "
                       f"this {rt.device.type} has {have / 2**30:,.1f} GiB; lower NUM_LAYERS, MODEL_DIM, MLP_MULT or "
                       "TRAIN_BATCH_TOKENS, or raise GRAD_ACCUM_STEPS")


def train_data_access_ms(clock: PhaseClock, *, prequant_on_train: bool, calibrate_on_train: bool) -> float:
    """When training-data access ends, as the rules count it: training, then pre-quantization TTT on
    training tokens and GPTQ calibration on training batches, taken as one span against the cap."""
    return (clock.elapsed_ms("train") + (clock.elapsed_ms("prequant_ttt") if prequant_on_train else 0.0)
            + (clock.elapsed_ms("calibration") if calibrate_on_train else 0.0))


@contextlib.contextmanager
def run_folder(hp: Hyperparameters, rt: Runtime, mode: str, use_compile: bool):
    """Claim this run's folder and yield (folder, manifest, log) with the log header written. A failure
    inside is recorded in the manifest (a training run's artifact kept as .failed; an EVAL_ONLY error
    says where its log is), and the folder's lock is released at the end."""
    out_dir = claim_run_dir(hp, rt)
    manifest = None
    try:
        manifest = RunManifest(out_dir / RUN_MANIFEST_NAME, hp, rt, mode)  # first: a full disk still leaves a manifest
        log = RunLog(out_dir / RUN_LOG_NAME, rt.is_main)
        log(f"run_dir:{out_dir}")
        log_run_header(hp, rt, log)
        if use_compile:
            _active_compile.log = log
        yield out_dir, manifest, log
    except BaseException as e:  # a crashed run is recognisable from its manifest
        record_failure(manifest, e, out_dir / ARTIFACT_NAME if mode == "train" else None, rt.is_main)
        if mode == "eval_only" and isinstance(e, (ConfigError, RunError)):
            raise RunError(f"{e} (the folder {out_dir}{os.sep} keeps this failed run's log: re-run with REPLACE_RUN=1 "
                           "or a new RUN_ID)") from None
        raise
    finally:
        release_run_dir(out_dir)


def max_eval_ms(hp: Hyperparameters) -> float | None:
    return 1000.0 * hp.max_eval_seconds if hp.max_eval_seconds > 0 else None


def run_eval_only(hp: Hyperparameters, rt: Runtime, use_compile: bool = False) -> dict:
    """EVAL_ONLY=1: score the artifact at ARTIFACT_PATH with nothing but it, the tokenizer and the
    validation shards (no training data, no network). The model's settings are read from the artifact.
    What can be checked without a run folder (the artifact's header, the tokenizer, the validation
    data) is checked first, so such a failure leaves no folder and the RUN_ID stays free. The scores go
    to a run folder of its own with a manifest (mode "eval_only"), like any run."""
    path = Path(hp.artifact_path)
    if not (hp.artifact_path and path.is_file()):
        raise ConfigError(f"EVAL_ONLY=1 needs ARTIFACT_PATH (now {hp.artifact_path!r}) to name an existing "
                          "final_model.*.ptz of a run folder")
    header, _ = read_artifact_header(path.read_bytes())
    # The tokenizer must match the model's vocabulary, which the artifact records
    hp = dataclasses.replace(hp, run_id=agree_run_id(hp.run_id, rt), vocab_size=header["model"]["vocab_size"])
    early: list[str] = []  # lines logged before the run folder exists
    val_tokens, luts = prepare_validation(hp, rt, early.append)
    with run_folder(hp, rt, "eval_only", use_compile) as (out_dir, manifest, log):
        log(f"eval_only: artifact {path} model {header['model']['num_layers']}x{header['model']['model_dim']} "
            f"vocab {hp.vocab_size} quant_method:{header['meta'].get('quant_method')}")
        for line in early:
            log(line)
        hp = choose_attention_backend(hp, rt, bool(header["model"].get("doc_masked_attention")), log)
        manifest.update(data=data_fingerprint(hp.data_path, hp.tokenizer_path, splits=("val",)) if rt.is_main else {})
        clock = PhaseClock(None, max_eval_ms(hp))
        scored = score_artifact(hp, rt, path, val_tokens, luts, clock, log, use_compile=use_compile)
        return manifest.finish_scored(scored, path, clock, log, use_compile, artifact={"path": str(path.resolve())},
                                      returns=dict(results=scored.results, cap_ms=None, train_data_access_end_ms=0.0))


def compile_record_for(hp: Hyperparameters, rt: Runtime) -> CompileRecord | None:
    """The run's CompileRecord, or None when it does not compile."""
    if not (hp.compile == "1" or (hp.compile == "auto" and rt.device.type == "cuda")):
        return None
    fallback = hp.compile_fallback if hp.compile_fallback != "auto" else (
        "error" if rt.device.type == "cuda" else "eager")
    return CompileRecord(hp.compile_backend, fallback)


def run(hp: Hyperparameters, rt: Runtime) -> dict:
    """Train, export the artifact, reload it from disk and score it. Returns the numbers.
    Compiler settings are changed only for the duration of the run."""
    record = compile_record_for(hp, rt)
    with compile_settings(hp.qat_enabled, record) if record else contextlib.nullcontext():
        try:
            return (run_eval_only if hp.eval_only else train_and_score)(hp, rt, record is not None)
        except Exception as e:
            failure = compile_failure(e) if record else None
            if failure is None:
                raise
            raise failure from None


def train_and_score(hp: Hyperparameters, rt: Runtime, use_compile: bool) -> dict:
    """One training run, step by step, in a run folder of its own."""
    hp.check_world(rt.world_size)
    hp = dataclasses.replace(hp, run_id=agree_run_id(hp.run_id, rt))
    with run_folder(hp, rt, "train", use_compile) as (out_dir, manifest, log):
        run = start_training_run(hp, rt, use_compile, out_dir, log, manifest)
        warm_up(run)
        reserve_data_access(run)
        averager = WeightAverager(run.base_model, ema_decay=hp.ema_decay, swa_start_frac=hp.swa_start_frac,
                                  swa_every=hp.swa_every, ema_warmup=hp.ema_warmup)
        state = train(run, averager)
        choice = choose_weights(run, averager, state.looping)
        hessians = calibrate(run, state.looping)
        access = check_data_access(run)
        pre_quant = score_before_quantization(run, state, choice)
        run.clock.start("serialize")
        artifact_path = export_artifact(run.hp, rt, run.base_model, out_dir, log, looping=state.looping,
                                        hessians=hessians)
        run.clock.stop()
        scored = score_artifact(run.hp, rt, artifact_path, run.val_tokens, run.luts, run.clock, log,
                                expect=run.base_model.cfg, use_compile=use_compile, prequant=run.prequant)
        return finish_run(run, state, choice, pre_quant, access, artifact_path, scored)


@dataclass
class TrainingRun:
    """What the steps of one training run share: its settings and runtime, its log and manifest, the
    data, the model being trained (and its compiled or DDP-wrapped forms), the optimizers, the
    export plan and the phase clock, and (set by `reserve_data_access`) what is taken off the training
    budget for training-data reads after training. Built by `start_training_run`; each step below
    takes it."""
    hp: Hyperparameters
    rt: Runtime
    use_compile: bool
    out_dir: Path
    log: object
    manifest: "RunManifest"
    val_tokens: torch.Tensor
    luts: ByteLuts
    train_files: list[str]
    holdout: int  # training tokens kept back at the end of the last shard (the pre-quant TTT slice)
    base_model: GPT
    model: object  # base_model compiled and/or DDP-wrapped: what train_step calls
    logits_fn: object  # base_model.forward_logits, compiled when COMPILE is on
    optimizers: list
    qat_layers: list
    plan: QuantPlan
    clock: PhaseClock
    calibration_probe_ms: float = 0.0  # one measured pass over the calibration batches (0 when not on train data)
    prequant: dict | None = None  # pre-quantization TTT, prepared (None when off)

    @property
    def prequant_on_train(self) -> bool:
        return self.prequant is not None and self.prequant["source"] == "train"

    @property
    def grad_accum(self) -> int:
        return self.hp.grad_accum_for(self.rt.world_size)

    def autocast(self):
        return autocast_context(self.hp, self.rt.device)

    @property
    def val_batch_seqs(self) -> int:
        return eval_batch_seqs(self.hp, self.rt.world_size)

    @property
    def calibrate_on_train(self) -> bool:
        return self.plan.method == "gptq" and self.hp.gptq_calibration_source == "train"

    def evaluate_model(self, looping: bool) -> EvalResult:
        """Flat score of the model being trained (periodic validation and the pre-quantization score)."""
        self.base_model.eval()
        result = evaluate(lambda x: self.logits_fn(x, looping), self.val_tokens, self.luts,
                          EvalContext(self.rt, self.autocast), seq_len=self.hp.effective_eval_seq_len,
                          batch_seqs=self.val_batch_seqs)
        self.base_model.train()
        return result

    def make_loader(self):
        hp, rt = self.hp, self.rt
        return make_train_loader(hp.train_loader, self.train_files, rt.rank, rt.world_size, rt.device, hp.seed,
                                 hp.train_seq_len, self.holdout, hp.vocab_size)


def choose_attention_backend(hp: Hyperparameters, rt: Runtime, doc_masked: bool, log) -> Hyperparameters:
    """ATTN_BACKEND resolved on this device (see select_attention_backend), logged with the reason."""
    backend, why = select_attention_backend(hp.attn_backend, rt.device, doc_masked)
    log(f"attention_backend:{backend}{'_varlen' if backend == 'fa3' and doc_masked else ''} reason:{why}")
    return dataclasses.replace(hp, attn_backend=backend)


def start_training_run(hp: Hyperparameters, rt: Runtime, use_compile: bool, out_dir: Path, log,
                       manifest: "RunManifest") -> TrainingRun:
    """Load and check the data, then build the model and its optimizers, logging what was built."""
    val_tokens, luts = prepare_validation(hp, rt, log)
    train_files = shard_files(hp.data_path, "train")
    log(f"train_loader:dataset:{hp.data_path} train_shards:{len(train_files)} sampler:{hp.train_loader}")
    manifest.update(data=data_fingerprint(hp.data_path, hp.tokenizer_path) if rt.is_main else {})
    check_shapes_fit(hp, rt, train_files, val_tokens)

    hp = choose_attention_backend(hp, rt, hp.doc_masked_attention, log)
    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    base_model = GPT(ModelConfig.from_hparams(hp)).to(rt.device)
    compiled = maybe_compile(base_model, use_compile, "train_step")
    model = DDP(compiled, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                broadcast_buffers=False) if rt.distributed else compiled
    optimizers = build_optimizers(hp, base_model, rt.device)
    for line in model_report(base_model, hp, code_bytes()):
        log(line)
    log(f"world_size:{rt.world_size} grad_accum_steps:{hp.grad_accum_for(rt.world_size)} compile:{int(use_compile)} "
        f"compute_dtype:{resolved_compute_dtype(hp, rt.device)}")
    doc_mask = "off" if not hp.doc_masked_attention else "varlen" if hp.attn_backend == "fa3" else (
        "flex" if use_compile and rt.device.type == "cuda" else "sdpa")
    log(f"attention_mode:gqa num_heads:{hp.num_heads} num_kv_heads:{hp.num_kv_heads} document_mask:{doc_mask}")
    log(f"tie_embeddings:{hp.tie_embeddings} embed_lr:{hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr} "
        f"head_lr:{hp.head_lr if not hp.tie_embeddings else 0.0} matrix_lr:{hp.matrix_lr} scalar_lr:{hp.scalar_lr}")
    log(f"train_batch_tokens:{hp.train_batch_tokens} train_seq_len:{hp.train_seq_len} iterations:{hp.iterations} "
        f"warmup_steps:{hp.warmup_steps} max_wallclock_seconds:{hp.max_wallclock_seconds:.3f}")
    log(f"seed:{hp.seed}")
    holdout = train_holdout_tokens(hp, train_files)
    if holdout:
        log(f"train_loader:holdout {holdout} tokens at the end of {Path(train_files[-1]).name} (pre-quant TTT slice)")
    plan = QuantPlan.from_hparams(hp)
    # QAT layers are set up before the warm-up, so the compiled graph already has the (off) QAT path
    # and switching it on later recompiles nothing; without QAT_ENABLED the forward has no QAT work.
    qat_layers = prepare_qat(base_model, plan) if hp.qat_enabled else []
    clock = PhaseClock(hp.max_wallclock_ms, max_eval_ms(hp))
    return TrainingRun(hp, rt, use_compile, out_dir, log, manifest, val_tokens, luts, train_files, holdout,
                       base_model, model, maybe_compile(base_model.forward_logits, use_compile, "forward_logits"),
                       optimizers, qat_layers, plan, clock)


def warm_up(run: TrainingRun) -> None:
    """Compile the training step (weights and optimizer state reset after) and, under COMPILE, the
    evaluation graph, so a compile failure stops the run before any training."""
    hp, rt = run.hp, run.rt
    run.clock.start("warmup")
    warmup_and_reset(run)
    if run.use_compile:
        seqs, seq_len = run.val_batch_seqs, hp.effective_eval_seq_len
        probe = synthetic_tokens(seqs * seq_len, hp.vocab_size).view(seqs, seq_len)
        run.base_model.eval()
        with torch.no_grad(), run.autocast():
            run.logits_fn(probe.to(rt.device),
                          looping_active(1.0, num_loops=hp.num_loops, enable_at=hp.enable_looping_at))
        run.base_model.train()
        run.log(f"compile:warmed {_active_compile.line().removeprefix('compile:')}")
    run.clock.stop()


def reserve_data_access(run: TrainingRun) -> None:
    """GPTQ calibration on training batches and pre-quantization TTT read training data after
    training, so their time is measured now and reserved out of the training budget."""
    hp, rt, clock = run.hp, run.rt, run.clock
    if run.calibrate_on_train:  # measured on the same number of batches, with a margin for run-to-run jitter
        clock.start("calibration_probe")
        collect_hessians(run.base_model, calibration_inputs(hp, rt, run.base_model, run.train_files, False,
                                                            run.autocast), run.plan, False, run.autocast)
        clock.stop()
        probe_ms = run.calibration_probe_ms = agree_max([clock.elapsed_ms("calibration_probe")], rt)[0]
        calibration_reserve_ms = CALIBRATION_RESERVE_MARGIN * probe_ms
        clock.reserve_ms += calibration_reserve_ms
        run.log(f"gptq:reserving {calibration_reserve_ms / 1000:.3f}s (measured {probe_ms:.0f}ms "
                f"x {CALIBRATION_RESERVE_MARGIN})"
                + (f", effective={clock.train_budget_ms}ms" if clock.train_budget_ms is not None else ""))
    run.prequant = prepare_prequant_ttt(hp, rt, run.base_model, run.train_files, run.val_tokens, clock, run.autocast,
                                        run.log)
    run.log(f"clock: train_budget:{clock.train_budget_ms}ms reserve:{clock.reserve_ms:.0f}ms "
            f"eval_budget:{clock.eval_cap_ms}ms")


def choose_weights(run: TrainingRun, averager: WeightAverager, looping: bool) -> str:
    """Put the exported weights in the model (an average if enabled, QAT off), run pre-quantization
    TTT on them, and refuse diverged ones before anything is scored or written. Returns the choice."""
    choice = averager.choose(run.hp.export_weights)
    averager.apply(choice)
    set_qat(run.qat_layers, False)
    run.log(f"weights:exporting {choice}")
    if run.prequant is not None:  # before calibration: GPTQ must see the weights it will quantize
        run_prequant_ttt(run.prequant, run.base_model, run.clock, looping=looping, log=run.log)
    check_exportable(run.base_model.state_dict())
    return choice


def calibrate(run: TrainingRun, looping: bool) -> dict[str, torch.Tensor] | None:
    """GPTQ's Hessians (None without GPTQ). Training-data calibration never reads a batch that would
    end past the cap: the reserve normally covers every batch, and a run slower than the measurement
    reads fewer."""
    hp, rt, clock = run.hp, run.rt, run.clock
    if run.plan.method != "gptq":
        return None
    run.log("GPTQ:collecting Hessians from calibration data...")
    capped = run.calibrate_on_train and clock.cap_ms is not None
    first_batch_ms = run.calibration_probe_ms / max(math.ceil(hp.gptq_calibration_batches / rt.world_size), 1)
    batches_read = 0

    def past_the_cap() -> bool:
        nonlocal batches_read
        if not capped:
            return False
        per_batch = clock.elapsed_ms("calibration") / batches_read if batches_read else first_batch_ms
        batches_read += 1
        end_ms = train_data_access_ms(clock, prequant_on_train=run.prequant_on_train, calibrate_on_train=True)
        return agree_max([end_ms + per_batch], rt)[0] > clock.cap_ms

    clock.start("calibration")
    hessians = collect_hessians(run.base_model, calibration_inputs(hp, rt, run.base_model, run.train_files, looping,
                                                                   run.autocast), run.plan, looping, run.autocast,
                                stop=past_the_cap)
    clock.stop()
    planned = calibration_batch_count(hp.gptq_calibration_batches, rt.world_size)
    run.log(f"GPTQ:collected {len(hessians)} Hessians in {clock.elapsed_ms('calibration') / 1000:.1f}s "
            f"source:{hp.gptq_calibration_source} batches:{planned}"
            + (f" (GPTQ_CALIBRATION_BATCHES={hp.gptq_calibration_batches} rounded up to a multiple of the "
               f"{rt.world_size} ranks)" if planned != hp.gptq_calibration_batches else "")
            + (f" read_per_rank:{batches_read - 1}" if capped else ""))
    return hessians


def check_data_access(run: TrainingRun) -> dict:
    """Where training-data access ended, checked as one span against the cap (past it: non-record)
    before anything is scored or recorded. Returns the manifest's compliance facts of the training."""
    clock = run.clock
    end_ms = train_data_access_ms(clock, prequant_on_train=run.prequant_on_train,
                                  calibrate_on_train=run.calibrate_on_train)
    inside_cap = clock.cap_ms is None or end_ms <= clock.cap_ms
    span = " + ".join(["training"] + ["pre-quant TTT"] * run.prequant_on_train
                      + ["calibration"] * run.calibrate_on_train)
    run.log(f"train_data_access_end:{end_ms:.0f}ms ({span}; "
            f"cap {clock.cap_ms if clock.cap_ms is not None else 'none'}) inside_cap:{int(inside_cap)}")
    reasons = (["ALLOW_VAL_ADAPTATION=1: validation tokens adapted before scoring (C3)"] * run.hp.allow_val_adaptation
               + [f"training-data access ({span}) ended at {end_ms:.0f}ms, past the "
                  f"{clock.cap_ms or 0:.0f}ms cap"] * (not inside_cap))
    if run.rt.device.type == "cuda":
        run.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    return {"train_time_ms": clock.elapsed_ms("train"), "train_cap_ms": clock.cap_ms,
            "train_data_access_end_ms": end_ms, "train_data_inside_cap": inside_cap, "non_record": bool(reasons),
            **({"non_record_reason": "; ".join(reasons)} if reasons else {})}


def score_before_quantization(run: TrainingRun, state: TrainState, choice: str) -> EvalResult:
    """The flat score of the exported weights, before quantization."""
    hp, clock = run.hp, run.clock
    clock.start("pre_quant_eval")
    pre_quant = run.evaluate_model(state.looping)
    clock.stop()
    train_ms = clock.elapsed_ms("train")
    run.log(f"step:{state.step}/{hp.iterations} val_loss:{pre_quant.val_loss:.4f} val_bpb:{pre_quant.val_bpb:.4f} "
            f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(state.step, 1):.2f}ms")
    run.log(f"pre-quantization post-{choice} val_loss:{pre_quant.val_loss:.8f} val_bpb:{pre_quant.val_bpb:.8f}"
            f"{NON_RECORD_STAMP if hp.allow_val_adaptation else ''}")
    return pre_quant


def finish_run(run: TrainingRun, state: TrainState, choice: str, pre_quant: EvalResult, access: dict,
               artifact_path: Path, scored: ArtifactScore) -> dict:
    """Write the shipped code beside the artifact, finish the manifest, and return the run's numbers."""
    clock = run.clock
    shipped = _shipped_code_of_this_file()
    if run.rt.is_main:  # the code exactly as counted in the artifact (its shipped form), beside it
        write_atomic(run.out_dir / RUN_CODE_NAME, shipped)
    return run.manifest.finish_scored(
        scored, artifact_path, clock, run.log, run.use_compile, scores={"pre_quant": dataclasses.asdict(pre_quant)},
        artifact={"file": artifact_path.name, "code_file": RUN_CODE_NAME,
                  "code_sha256": hashlib.sha256(shipped).hexdigest()},
        compliance=access,
        training={"steps": state.step, "stopped_early": state.stopped_early, "train_time_ms": clock.elapsed_ms("train"),
                  "reserve_ms": clock.reserve_ms, "epochs_consumed": state.epochs_consumed,
                  "train_losses": state.train_losses, "export_weights": choice},
        step_times_ms=step_time_stats(state.step_ms),
        returns=dict(steps=state.step, stopped_early=state.stopped_early, epochs_consumed=state.epochs_consumed,
                     train_losses=state.train_losses, pre_quant=pre_quant, evals=scored.results,
                     final=scored.results[scored.final_stage], final_stage=scored.final_stage,
                     fallback=scored.fallback, export_choice=choice, training_time_ms=clock.elapsed_ms("train"),
                     reserve_ms=clock.reserve_ms, non_record=access["non_record"], prequant_ttt=run.prequant,
                     train_data_access_end_ms=access["train_data_access_end_ms"], cap_ms=clock.cap_ms))


def main(restore_signals: bool = True) -> int:
    with stop_signals_raise(restore_signals):
        return main_with_signals()


def main_with_signals() -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    rt = None
    try:
        hp = Hyperparameters.from_env()
        rt = init_runtime(hp)
        result = run(hp, rt)
        if result["cap_ms"] is not None and result["train_data_access_end_ms"] > result["cap_ms"]:
            raise RunError(f"training-data access ended at {result['train_data_access_end_ms']:.0f}ms, past the "
                           f"{result['cap_ms']:.0f}ms cap (non-record); lower GPTQ_CALIBRATION_BATCHES or "
                           "PREQUANT_TTT_TOKENS, or set GPTQ_CALIBRATION_SOURCE=selfgen")
        if result["total_bytes"] > ARTIFACT_LIMIT_BYTES:
            raise RunError(f"artifact is {result['total_bytes']} bytes, over the {ARTIFACT_LIMIT_BYTES}-byte limit; "
                           "shrink the model (NUM_LAYERS, MODEL_DIM, MLP_MULT, VOCAB_SIZE)")
        return 0
    except (ConfigError, RunError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except BaseException:
        if not STOP_SIGNAL_RECEIVED:  # a signal may also surface as the error it caused (a peer gone)
            raise
        if rank0:
            print(f"error: stopped by {STOP_SIGNAL_RECEIVED[0]}; the run folder keeps what was done; re-run with "
                  "REPLACE_RUN=1 or a new RUN_ID", file=sys.stderr, flush=True)
        return 2
    finally:
        if rt is not None:
            shutdown_runtime(rt, clean=not STOP_SIGNAL_RECEIVED)


if __name__ == "__main__":
    sys.exit(main(restore_signals=False))
