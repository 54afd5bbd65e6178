"""The model is causal and starts sane; Muon orthogonalizes; schedules are what they claim."""

import dataclasses
import math
from dataclasses import fields

import pytest
import torch

import train_gpt as tg


def tiny_config(**overrides) -> tg.ModelConfig:
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "NUM_LAYERS": "3", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                      "VOCAB_SIZE": "97", **overrides})
    return tg.ModelConfig.from_hparams(hp)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised projections would hide bugs: give every weight random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("tie", ["1", "0"])
def test_changing_token_t_never_changes_earlier_logits(tie):
    torch.manual_seed(0)
    model = tg.GPT(tiny_config(TIE_EMBEDDINGS=tie))
    randomize(model)
    x = torch.randint(0, 97, (2, 33))
    base = model.forward_logits(x)
    for t in (0, 1, 16, 32):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 97
        out = model.forward_logits(x2)
        assert torch.equal(out[:, :t], base[:, :t]), f"position {t} leaked into earlier logits"
        assert not torch.equal(out[:, t:], base[:, t:]), "the changed token must matter"


def test_initial_loss_is_near_uniform_and_blocks_start_as_identity():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = tg.GPT(cfg)
    x = torch.randint(0, 97, (4, 32))
    loss = model(x, torch.randint(0, 97, (4, 32)))
    assert abs(loss.item() - math.log(97)) < 0.05
    h = tg.rms_norm(model.tok_emb(x))
    assert torch.allclose(model.blocks[0](h, h, None)[0], h)  # zero-initialised output projections


def test_state_dict_names_are_the_baseline_names():
    names = set(tg.GPT(tiny_config(NUM_LAYERS="2")).state_dict())
    expected = {"tok_emb.weight", "skip_weights"}
    for i in range(2):
        expected |= {f"blocks.{i}.{n}" for n in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight",
                                                  "attn.proj.weight", "attn.q_gain", "mlp.fc.weight",
                                                  "mlp.proj.weight", "attn_scale", "mlp_scale", "resid_mix")}
    assert names == expected


def test_model_config_reads_each_knob_under_its_own_name_and_each_switch_reaches_only_its_field():
    knobs = {f.name: f for f in fields(tg.Hyperparameters)}
    computed = {"seq_len", "score_batch_seqs"}  # TTTSettings' own: the window length and the scoring batch
    for view in (tg.ModelConfig, tg.TTTSettings):  # declared once, in Hyperparameters: same name, type, default
        for f in fields(view):
            assert f.name in computed or (f.name in knobs and (f.type, f.default) == (knobs[f.name].type,
                                                                                     knobs[f.name].default)), f.name
    hp = tg.Hyperparameters()
    base = tg.ModelConfig.from_hparams(hp)
    for f in fields(base):  # flipping one boolean knob changes its own field, no other
        if isinstance(getattr(hp, f.name), bool):
            cfg = tg.ModelConfig.from_hparams(dataclasses.replace(hp, **{f.name: not getattr(hp, f.name)}))
            assert [g.name for g in fields(cfg) if getattr(cfg, g.name) != getattr(base, g.name)] == [f.name]
    assert base.mlp_hidden == 1024 and base.attn_gate == "none"  # derived, not declared
    assert tg.ModelConfig.from_hparams(dataclasses.replace(hp, sparse_attn_gate_enabled=True)).attn_gate == "sparse"


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32)])
def test_newton_schulz_is_close_to_the_polar_factor(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = tg.newton_schulz(G, steps=5)
    s = torch.linalg.svdvals(X)
    # The quintic pushes singular values into roughly [0.7, 1.2]; only the tiniest input singular
    # values of a square Gaussian matrix (a few) stay below that after 5 steps.
    assert s.max() < 1.3 and (s > 0.6).float().mean() > 0.9
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    cos = (X * polar).sum() / (X.norm() * polar.norm())
    assert cos > 0.95


def test_muon_single_process_update_is_nesterov_then_orthogonalize():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 32))
    start = p.detach().clone()
    opt = tg.Muon([dict(params=[p], lr=0.1, base_lr=0.1)], lr=0.1, momentum=0.9, backend_steps=5,
                  ns_dtype=torch.float32)
    g = torch.randn(16, 32)
    p.grad = g.clone()
    opt.step()
    buf = g  # first step: buf = g, update = g + 0.9 * buf
    expected = start - 0.1 * tg.newton_schulz(g + 0.9 * buf, 5) * max(1, 16 / 32) ** 0.5
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_every_parameter_has_exactly_one_optimizer():
    for tie in ("1", "0"):
        hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4",
                                          "NUM_KV_HEADS": "2", "TIE_EMBEDDINGS": tie})
        model = tg.GPT(tg.ModelConfig.from_hparams(hp))
        opts = tg.build_optimizers(hp, model, torch.device("cpu"))
        ids = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())
        if tie == "0":
            head_groups = [g for o in opts for g in o.param_groups if any(p is model.lm_head.weight for p in g["params"])]
            assert head_groups[0]["lr"] == hp.head_lr


def lr_at(step, elapsed_ms=0.0, budget_ms=None, **env):
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", **{k.upper(): str(v) for k, v in env.items()}})
    fraction = tg.training_fraction(step, elapsed_ms, iterations=hp.iterations, budget_ms=budget_ms)
    return tg.lr_scale_at(hp, step, elapsed_ms, fraction, budget_ms)


def test_the_baseline_warmdown_is_the_last_warmdown_iters_steps():
    kw = dict(iterations=100, warmdown_iters=20)
    assert lr_at(0, **kw) == lr_at(79, **kw) == lr_at(80, **kw) == 1.0
    assert lr_at(90, **kw) == pytest.approx(0.5)
    assert lr_at(100, **kw) == 0.0
    assert lr_at(50, iterations=100, warmdown_iters=0) == 1.0


def test_under_a_budget_the_warmdown_iters_are_time_and_reach_zero_at_the_cap():
    kw = dict(iterations=10**6, warmdown_iters=100, budget_ms=10_000.0)
    # 10 ms per step: warmdown lasts 1000 ms, so it starts at 9000 ms and ends at the cap.
    assert lr_at(0, 0.0, **kw) == lr_at(800, 8000.0, **kw) == 1.0
    assert lr_at(950, 9500.0, **kw) == pytest.approx(0.5)
    assert lr_at(1000, 10_000.0, **kw) == 0.0


def test_muon_momentum_warmup():
    kw = dict(start=0.85, end=0.95, warmup_steps=500)
    assert tg.muon_momentum_at(0, **kw) == 0.85
    assert tg.muon_momentum_at(250, **kw) == pytest.approx(0.90)
    assert tg.muon_momentum_at(5000, **kw) == 0.95
