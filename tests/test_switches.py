"""Every architecture switch: causal, BOS-isolated, alive (changes the forward), starts as
documented, compiles, and trains. State-dict names are pinned because quantization keys on them."""

import re

import pytest
import torch

import train_gpt as tg

BASE = {"RECIPE": "baseline", "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
        "VOCAB_SIZE": "97", "TRAIN_SEQ_LEN": "32"}

# switch -> (env, identity at init with zero-initialised extras?)
SWITCHES = {
    "leaky_relu2": ({"MLP_ACTIVATION": "leaky_relu2"}, False),
    "rope_dims": ({"ROPE_DIMS": "8"}, False),
    "xsa": ({"XSA_LAST_N": "2"}, False),
    "value_residual": ({"VALUE_RESIDUAL": "1"}, False),
    "attn_out_gate": ({"ATTN_OUT_GATE_ENABLED": "1"}, True),
    "gated_attn": ({"GATED_ATTN_ENABLED": "1"}, False),
    "sparse_attn_gate": ({"SPARSE_ATTN_GATE_ENABLED": "1"}, False),
    "bigram": ({"BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "16"}, True),
    "smear_gate": ({"SMEAR_GATE_ENABLED": "1"}, True),
    "untied_head": ({"TIE_EMBEDDINGS": "0"}, False),
    "skip_gates": ({"SKIP_GATES_ENABLED": "1"}, False),
    "ln_scale": ({"LN_SCALE": "1"}, False),
    "parallel_gptj": ({"PARALLEL_START_LAYER": "2", "PARALLEL_MODE": "gptj"}, False),
    "parallel_two_lane": ({"PARALLEL_START_LAYER": "2", "PARALLEL_MODE": "two_lane"}, False),
    "parallel_two_lane_attn_lane": ({"PARALLEL_START_LAYER": "2", "PARALLEL_FINAL_LANE": "attn"}, False),
    "parallel_two_lane_x0_lane": ({"PARALLEL_START_LAYER": "2", "PARALLEL_X0_MIX": "lane"}, False),
    "backout": ({"BACKOUT_LAYER": "1"}, True),
    "loops": ({"NUM_LOOPS": "2", "LOOP_START": "1", "LOOP_END": "2"}, False),
}
ALL_ON = {k: v for env, _ in SWITCHES.values() for k, v in env.items()
          if k not in ("GATED_ATTN_ENABLED", "ATTN_OUT_GATE_ENABLED", "PARALLEL_MODE", "PARALLEL_FINAL_LANE",
                       "PARALLEL_X0_MIX")}
# Document masking (tests/test_docmask.py) and orthogonal init change nothing on a BOS-free row or
# after `randomize`: not in SWITCHES, but on in every ALL_ON case.
ALL_ON.update(DOC_MASKED_ATTENTION="1", ORTHO_INIT="1")


def build(env: dict, seed: int = 0) -> tg.GPT:
    torch.manual_seed(seed)
    return tg.GPT(tg.ModelConfig.from_hparams(tg.Hyperparameters.from_env({**BASE, **env})))


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def copy_shared(src: torch.nn.Module, dst: torch.nn.Module) -> set[str]:
    """Copy every tensor both models have (the overlapping rows where shapes differ, e.g. the
    loop-sized skip weights); return the names only `dst` has."""
    src_sd, own = src.state_dict(), set()
    with torch.no_grad():
        for name, t in dst.state_dict().items():
            if name not in src_sd:
                own.add(name)
            else:
                rows = min(t.shape[0], src_sd[name].shape[0]) if t.ndim else None
                t.copy_(src_sd[name]) if rows is None else t[:rows].copy_(src_sd[name][:rows])
    return own


def logits(model, x, looping=True):
    return model.forward_logits(x, looping)


CASES = {**{name: env for name, (env, _) in SWITCHES.items()}, "all": ALL_ON,
         "all_gated": {**ALL_ON, "SPARSE_ATTN_GATE_ENABLED": "0", "GATED_ATTN_ENABLED": "1"}}


@pytest.mark.parametrize("name", list(CASES))
def test_changing_token_t_never_changes_earlier_logits(name):
    model = build(CASES[name])
    randomize(model)
    x = torch.randint(2, 97, (2, 24))
    x[0, 5] = tg.BOS_ID  # documents in the packed stream
    for looping in (False, True):
        base = logits(model, x, looping)
        for t in (0, 6, 13, 23):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 7) % 97
            out = logits(model, x2, looping)
            assert torch.equal(out[:, :t], base[:, :t]), f"{name}: token {t} leaked backwards"
            assert not torch.equal(out[:, t:], base[:, t:])


def test_bos_position_never_sees_the_previous_document():
    model = build({**ALL_ON, "SMEAR_GATE_ENABLED": "1", "BIGRAM_VOCAB_SIZE": "64"})
    randomize(model)
    x = torch.randint(2, 97, (1, 12))
    x[0, 6] = tg.BOS_ID
    h = model.embed(x)
    for prev in range(2, 97, 7):
        x2 = x.clone()
        x2[0, 5] = prev  # the last token of the previous document
        assert torch.equal(model.embed(x2)[0, 6], h[0, 6])
    # ...while a non-BOS position does depend on its predecessor through both operators.
    x3 = x.clone()
    x3[0, 2] = (x3[0, 2] + 1) % 97
    assert not torch.equal(model.embed(x3)[0, 3], h[0, 3])


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_changes_the_forward_and_starts_as_documented(name):
    env, identity_at_init = SWITCHES[name]
    plain, switched = build({}), build(env)
    randomize(plain)
    copy_shared(plain, switched)
    x = torch.randint(2, 97, (2, 16))
    same_start = torch.allclose(logits(plain, x), logits(switched, x), atol=1e-6)
    assert same_start == identity_at_init, f"{name}: identity at init should be {identity_at_init}"
    randomize(switched, seed=2)
    copy_shared(switched, plain)
    assert not torch.allclose(logits(plain, x), logits(switched, x), atol=1e-4), f"{name} is a dead flag"


def test_documented_initial_values():
    m = build(ALL_ON).requires_grad_(False)
    assert torch.all(m.blocks[0].attn.attn_gate_w == 0)  # sparse gate: sigmoid(0) = 0.5 per head
    assert torch.all(m.skip_gates == 0) and float(m.smear_lambda) == 0 and torch.all(m.smear_gate_w == 0)
    assert float(m.backout_lambda) == 0 and torch.all(m.bigram.proj.weight == 0) and float(m.bigram.scale) == pytest.approx(0.05)
    assert torch.equal(m.blocks[1].attn.value_lambdas, torch.tensor([0.5, 0.5]))
    assert m.blocks[0].attn.value_lambdas is None  # layer 0 provides the values
    assert torch.all(m.blocks[3].parallel_resid_lambdas == 1.1) and torch.all(m.blocks[3].parallel_post_lambdas == 1)
    assert [b.input_scale for b in m.blocks] == pytest.approx([1, 2**-0.5, 3**-0.5, 0.5])
    assert [b.attn.xsa for b in m.blocks] == [False, False, True, True]


def test_orthogonal_init_of_the_input_matrices_leaves_the_output_projections_zero():
    plain, ortho = build({}), build({"ORTHO_INIT": "1"})
    for block in ortho.blocks:
        for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.fc.weight):
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # rows or columns orthonormal (gain 1)
            assert torch.allclose(gram, torch.eye(min(w.shape)), atol=1e-5)
        assert torch.all(block.attn.proj.weight == 0) and torch.all(block.mlp.proj.weight == 0)
    w = plain.blocks[0].attn.c_q.weight  # PyTorch's default init is not orthogonal
    assert not torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=0.1)
    assert torch.equal(plain.tok_emb.weight, ortho.tok_emb.weight)  # drawn before: the rest of init is unchanged


@pytest.mark.parametrize("mix", ["read", "lane"])
def test_two_lane_blends_x0_into_the_attention_read_or_into_the_lane(mix):
    """The record (read) blends x0 only into what attention reads: the lanes carry the incoming residual.
    The `lane` form carries the blend itself (and the MLP lane starts from it)."""
    cfg = tg.ModelConfig.from_hparams(tg.Hyperparameters.from_env(
        {**BASE, "PARALLEL_START_LAYER": "0", "PARALLEL_X0_MIX": mix}))
    torch.manual_seed(0)
    block = tg.Block(cfg, 0)
    with torch.no_grad():
        block.resid_mix.copy_(torch.randn(2, 64))
    x, x0 = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    lane0, lane1, _ = block(x, x0, None)  # output projections start at zero: no attention or MLP term
    r, blend = block.parallel_resid_lambdas, block.resid_mix[0] * x + block.resid_mix[1] * x0
    carried = x if mix == "read" else blend
    assert torch.allclose(lane0, r[0] * carried) and torch.allclose(lane1, r[1] * carried)
    with torch.no_grad():
        block.attn.proj.weight.normal_()
    x0b = x0 + 1
    assert not torch.allclose(block(x, x0b, None)[0], block(x, x0, None)[0])  # attention reads the blend


def test_the_record_uses_document_masking_orthogonal_init_and_the_records_two_lane_form():
    record, baseline = tg.Hyperparameters.from_env({}), tg.Hyperparameters.from_env({"RECIPE": "baseline"})
    assert record.doc_masked_attention and record.ortho_init and record.parallel_x0_mix == "read"
    assert not baseline.doc_masked_attention and not baseline.ortho_init


def test_partial_rope_rotates_only_its_dims_and_rescales_past_the_training_length():
    rot = tg.Rotary(rope_dims=8, base=10000.0, train_seq_len=32)
    cos, sin = rot(32, torch.float32)
    assert cos.shape[-1] == 4
    x = torch.randn(1, 1, 32, 16)
    y = tg.apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:]) and not torch.equal(y[..., :8], x[..., :8])
    cos64, _ = rot(64, torch.float32)
    assert not torch.allclose(cos64[..., :32, :], cos)  # NTK: base grows when evaluating longer
    assert torch.allclose(rot(16, torch.float32)[0], cos[..., :16, :])


def test_layer_order_of_the_record_loop():
    cfg = tg.ModelConfig.from_hparams(tg.Hyperparameters.from_env({}))
    assert cfg.layer_order(False) == list(range(11))
    assert cfg.layer_order(True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("bad, needle", [
    ({"ATTN_OUT_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_ENABLED": "1"}, "mutually exclusive"),
    ({"ROPE_DIMS": "7"}, "ROPE_DIMS=7 must be even"),
    ({"XSA_LAST_N": "5"}, "XSA_LAST_N=5 must be <= NUM_LAYERS=4"),
    ({"NUM_LOOPS": "1", "LOOP_START": "3", "LOOP_END": "1"}, "LOOP_START=3 <= LOOP_END=1"),
    ({"PARALLEL_START_LAYER": "4"}, "PARALLEL_START_LAYER=4 must be < NUM_LAYERS=4"),
    ({"MLP_ACTIVATION": "gelu"}, "MLP_ACTIVATION='gelu' is not one of relu2, leaky_relu2"),
    ({"ENABLE_LOOPING_AT": "1.5"}, "ENABLE_LOOPING_AT=1.5"),
    ({"BACKOUT_LAYER": "9"}, "BACKOUT_LAYER=9"),
])
def test_bad_switch_values_are_rejected(bad, needle):
    with pytest.raises(tg.ConfigError, match=re.escape(needle)):
        tg.Hyperparameters.from_env({**BASE, **bad})


COMPILE_COMBOS = {  # together they compile every switch and every choice of the exclusive ones
    "sparse_two_lane": ALL_ON,
    "gated_gptj": {**ALL_ON, "SPARSE_ATTN_GATE_ENABLED": "0", "GATED_ATTN_ENABLED": "1", "PARALLEL_MODE": "gptj"},
    "out_gate_mlp_lane": {**ALL_ON, "SPARSE_ATTN_GATE_ENABLED": "0", "ATTN_OUT_GATE_ENABLED": "1",
                          "PARALLEL_FINAL_LANE": "mlp", "MLP_ACTIVATION": "relu2", "TIE_EMBEDDINGS": "1"},
}


@pytest.mark.slow
@pytest.mark.parametrize("combo", list(COMPILE_COMBOS))
def test_all_switches_compile_fullgraph_and_match_eager(combo):
    """Every switch traced as one graph by dynamo and AOT autograd, without inductor's code generation
    (~50 s a combination on a CPU; the compiled runs in tests/test_cuda_path.py and the QAT test go
    through inductor)."""
    torch._dynamo.reset()
    model = build(COMPILE_COMBOS[combo])
    randomize(model)
    x = torch.randint(2, 97, (2, 16))
    compiled = torch.compile(model.forward_logits, fullgraph=True, dynamic=False, backend="aot_eager")
    for looping in (False, True):
        with torch.no_grad():  # as the evaluation calls it: no backward graph to trace
            assert torch.allclose(compiled(x, looping), model.forward_logits(x, looping), atol=1e-4, rtol=1e-4)


RECORD_STATE_NAMES = """
tok_emb.weight bigram.embed.weight bigram.proj.weight bigram.scale smear_gate_w smear_lambda skip_weights skip_gates
backout_lambda lm_head.weight
blocks.{i}.attn.c_q.weight blocks.{i}.attn.c_k.weight blocks.{i}.attn.c_v.weight blocks.{i}.attn.proj.weight
blocks.{i}.attn.q_gain blocks.{i}.attn.attn_gate_w blocks.{i}.mlp.fc.weight blocks.{i}.mlp.proj.weight
blocks.{i}.attn_scale blocks.{i}.mlp_scale blocks.{i}.resid_mix
"""


def test_state_dict_names_are_stable():
    model = build({**ALL_ON, "TIE_EMBEDDINGS": "0"})
    expected = set()
    for name in RECORD_STATE_NAMES.split():
        expected |= {name.format(i=i) for i in range(4)} if "{i}" in name else {name}
    expected |= {f"blocks.{i}.attn.value_lambdas" for i in (1, 2, 3)}
    expected |= {f"blocks.{i}.parallel_{k}_lambdas" for i in (2, 3) for k in ("resid", "post")}
    assert set(model.state_dict()) == expected
    # Every non-matrix tensor is routed to Adam and kept in float by the export.
    for name, t in model.state_dict().items():
        if t.ndim < 2 or name.endswith(("_w", "_gates", "skip_weights", "resid_mix", "lambdas")):
            assert tg.is_control_tensor(name) or name.endswith(("q_gain", "_scale")), name


def fake_flash_module(correct: bool):
    """A stand-in for FlashAttention 3's module: (B, T, H, D) layout, GQA, returns (out, lse)."""
    import types

    def flash_attn_func(q, k, v, causal):
        y = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True)
        return (y.transpose(1, 2) if correct else y.transpose(1, 2) * 1.5), None

    return types.SimpleNamespace(flash_attn_func=flash_attn_func)


def test_flash_attention_is_used_only_after_it_matches_sdpa(monkeypatch):
    import sys

    cpu = torch.device("cpu")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake_flash_module(correct=True))
    assert tg.select_attention_backend("fa3", cpu) == ("fa3", "matches SDPA")
    assert tg.select_attention_backend("auto", cpu)[0] == "sdpa"  # auto tries it only on CUDA
    sdpa_model, fa3_model = build({}), build({"ATTN_BACKEND": "fa3"})
    randomize(sdpa_model)
    fa3_model.load_state_dict(sdpa_model.state_dict())
    assert fa3_model.blocks[0].attn.flash is not None and sdpa_model.blocks[0].attn.flash is None
    x = torch.randint(2, 97, (2, 16))
    assert torch.allclose(fa3_model.forward_logits(x), sdpa_model.forward_logits(x), atol=1e-5)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake_flash_module(correct=False))
    with pytest.raises(tg.RunError, match="failed its start-up check"):
        tg.select_attention_backend("fa3", cpu)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # not installed
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND=fa3 but flash_attn_interface is not installed"):
        tg.select_attention_backend("fa3", cpu)
    assert tg.select_attention_backend("auto", cpu) == ("sdpa", "flash_attn_interface not installed")
