"""The Muon family and AdamW groups: orthogonalization, MuonEq-R, decoupled weight decay, and
sharded Muon over 2 gloo ranks giving the single-process update."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32)])
def test_newton_schulz_output_is_close_to_orthogonal(coefficients, shape):
    torch.manual_seed(0)
    G = torch.randn(shape) @ torch.diag(torch.linspace(0.1, 3, shape[1]))  # uneven spectrum
    s = torch.linalg.svdvals(tg.newton_schulz(G, 5, coefficients=coefficients))
    assert s.max() < 1.3 and (s > 0.6).float().mean() > 0.9
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    X = tg.newton_schulz(G, 5, coefficients=coefficients)
    assert (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm()) > 0.95


def test_polar_express_is_closer_to_orthogonal_than_the_quintic():
    torch.manual_seed(0)
    G = torch.randn(128, 64)
    err = {c: (torch.linalg.svdvals(tg.newton_schulz(G, 5, coefficients=c)) - 1).abs().max()
           for c in ("quintic", "polar_express")}
    assert err["polar_express"] < err["quintic"]


def muon_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32, 64), (48, 48), (16, 80), (80, 16)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def grads(step: int, params) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def run_muon(steps: int = 3, **kw) -> list[torch.Tensor]:
    params = muon_params()
    opt = tg.Muon([dict(params=params, lr=0.05)], lr=0.05, momentum=0.9, backend_steps=5,
                  ns_dtype=torch.float32, **kw)
    for step in range(steps):
        for p, g in zip(params, grads(step, params)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


SHARDED_KWS = [dict(), dict(coefficients="polar_express", row_normalize=True, weight_decay=0.1)]


def _muon_rank(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = [run_muon(**kw) for kw in SHARDED_KWS]
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()  # no rank tears down its gloo connections while the other still uses them (SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_muon_over_two_gloo_ranks_equals_single_process(tmp_path):
    """Both settings in one pair of spawned ranks (a spawn costs more than the steps)."""
    torch.set_num_threads(1)
    mp.spawn(_muon_rank, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    for kw, sharded in zip(SHARDED_KWS, torch.load(tmp_path / "out.pt"), strict=True):
        single = run_muon(**kw)
        for a, b in zip(single, sharded):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), kw


def test_shards_are_balanced_and_cover_every_matrix():
    sizes = [100, 90, 80, 10, 10, 5, 64, 64, 64]
    for world in (1, 2, 3, 8):
        owners = tg.assign_shards(sizes, world)
        assert all(0 <= o < world for o in owners)
        loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world)]
        assert max(loads) <= sum(sizes) / world + max(sizes)  # greedy largest-first bound


def test_row_normalize_and_weight_decay_do_what_they_say():
    p = torch.nn.Parameter(torch.randn(8, 16))
    start = p.detach().clone()
    g = torch.randn(8, 16) * torch.arange(1, 9)[:, None]  # rows of very different norms
    opt = tg.Muon([dict(params=[p], lr=0.1)], lr=0.1, momentum=0.0, backend_steps=5, ns_dtype=torch.float32,
                  row_normalize=True, weight_decay=0.5)
    p.grad = g.clone()
    opt.step()
    rows = g / g.norm(dim=1, keepdim=True)
    expected = start * (1 - 0.1 * 0.5) - 0.1 * tg.newton_schulz(rows, 5)
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_adamw_groups_get_their_own_lr_and_weight_decay():
    hp = tg.Hyperparameters.from_env({"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                      "XSA_LAST_N": "2", "NUM_LOOPS": "0", "PARALLEL_START_LAYER": "-1",
                                      "TIE_EMBEDDINGS": "0", "BIGRAM_VOCAB_SIZE": "64"})
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    opts = tg.build_optimizers(hp, model, torch.device("cpu"))
    by_param = {id(p): (type(o).__name__, g) for o in opts for g in o.param_groups for p in g["params"]}
    kind, group = by_param[id(model.tok_emb.weight)]
    assert kind == "AdamW" and group["lr"] == hp.tied_embed_lr * 0 + hp.embed_lr and group["weight_decay"] == 0.085
    assert by_param[id(model.bigram.embed.weight)][1] is group
    kind, group = by_param[id(model.lm_head.weight)]
    assert kind == "AdamW" and group["lr"] == hp.head_lr and group["weight_decay"] == hp.adam_wd
    kind, group = by_param[id(model.blocks[0].attn.q_gain)]
    assert kind == "AdamW" and group["lr"] == hp.scalar_lr and group["weight_decay"] == 0.02
    kind, group = by_param[id(model.blocks[0].mlp.fc.weight)]
    assert kind == "Muon" and group["weight_decay"] == 0.095
    assert by_param[id(model.bigram.proj.weight)][0] == "Muon"
    muon = next(o for o in opts if isinstance(o, tg.Muon))
    assert muon.coefficients == "polar_express" and muon.row_normalize
