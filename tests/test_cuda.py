"""What only a CUDA GPU can show (marked `cuda`, skipped without one; tests/bench/bench_gpu.py runs them):
bf16 autocast agrees with fp32, compiled equals eager, fused AdamW steps, NCCL with the gloo control
group, GPTQ gives the CPU's codes, CUDA-trained weights pack and unpack exactly, the FA3 check."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

import train_gpt as tg

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def tiny_hp(**env) -> tg.Hyperparameters:
    base = dict(RECIPE="record", NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", VOCAB_SIZE="1024",
                TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="4096", GRAD_ACCUM_STEPS="1", ATTN_BACKEND="sdpa")
    return tg.Hyperparameters.from_env({**base, **env})


def model_and_batch(hp, seed=0):
    torch.manual_seed(seed)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp)).to(CUDA)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, hp.vocab_size, (4, hp.train_seq_len), generator=g).to(CUDA)
    y = torch.randint(0, hp.vocab_size, (4, hp.train_seq_len), generator=g).to(CUDA)
    return model, x, y


def test_bf16_training_step_agrees_with_fp32():
    hp = tiny_hp()
    losses, grads = {}, {}
    for dtype in ("float32", "bfloat16"):
        model, x, y = model_and_batch(hp)
        with tg.autocast_context(tg.Hyperparameters.from_env({"COMPUTE_DTYPE": dtype}), CUDA):
            loss = model(x, y, True)
        loss.backward()
        losses[dtype] = float(loss)
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.02 * losses["float32"]
    cos = torch.nn.functional.cosine_similarity(grads["bfloat16"], grads["float32"], dim=0)
    assert cos > 0.99


def test_compiled_forward_equals_eager():
    model, x, _ = model_and_batch(tiny_hp())
    model.eval()
    compiled = torch.compile(model.forward_logits, dynamic=False)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for looping in (False, True):
            a, b = compiled(x, looping).float(), model.forward_logits(x, looping).float()
            assert torch.allclose(a, b, atol=3e-2, rtol=3e-2), float((a - b).abs().max())


def test_fused_adamw_and_muon_step_on_cuda():
    hp = tiny_hp()
    model, x, y = model_and_batch(hp)
    optimizers = tg.build_optimizers(hp, model, CUDA)
    adams = [o for o in optimizers if isinstance(o, torch.optim.AdamW)]
    assert adams and all(g.get("fused") for o in adams for g in o.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, y, False).backward()
    for opt in optimizers:
        opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(moved)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nccl_init_and_all_reduce_beside_the_gloo_control_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rt = tg.init_runtime(tiny_hp(DEVICE="cuda"), env)
        assert rt.distributed and dist.get_backend() == "nccl" and rt.control_group is not None
        t = torch.full((4,), 3.0, device=CUDA)
        assert torch.equal(tg.all_reduce_sum(t), torch.full((4,), 3.0, device=CUDA))
        assert tg.agree_max([1.0, 2.5], rt) == [1.0, 2.5]  # host values through gloo, no device sync
        tg.shutdown_runtime(rt)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_gptq_gives_the_same_codes_on_cuda_as_on_cpu():
    torch.backends.cuda.matmul.allow_tf32 = True  # as a CUDA run sets it: GPTQ must not use it
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    x = torch.randn(4096, 512, generator=g)
    h = x.T @ x
    hp = tiny_hp(QUANT_METHOD="gptq")
    plan = tg.QuantPlan.from_hparams(hp)
    assert plan.spec("blocks.0.mlp.fc.weight", w) is not None
    cpu = tg.quantize_tensor("blocks.0.mlp.fc.weight", w, plan, h, tg.gptq_options(hp))
    cuda = tg.quantize_tensor("blocks.0.mlp.fc.weight", w.to(CUDA), plan, h.to(CUDA), tg.gptq_options(hp))
    assert cpu.method == cuda.method == "gptq"
    same = (cpu.codes == cuda.codes.cpu()).float().mean()
    assert same > 0.999 and int((cpu.codes.int() - cuda.codes.cpu().int()).abs().max()) <= 1


def test_cuda_trained_weights_pack_and_unpack_exactly():
    hp = tiny_hp()
    model, x, y = model_and_batch(hp)
    optimizers = tg.build_optimizers(hp, model, CUDA)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, y, False).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    entries = tg.quantize_state_dict(state, tg.QuantPlan.from_hparams(hp), None, None)
    for compressor in ("brotli", "ans"):
        blob = tg.pack_artifact(entries, compressor=compressor, model={}, meta={})
        back, _ = tg.unpack_artifact(blob)
        for a, b in zip(tg.dequantize_state_dict(entries).values(), tg.dequantize_state_dict(back).values()):
            assert torch.equal(a, b), compressor


def test_attention_backend_choice_and_the_fa3_check():
    backend, why = tg.select_attention_backend("auto", CUDA)
    if tg.load_flash_attention() is None:
        assert backend == "sdpa" and why
    else:  # installed: used only after the start-up check against SDPA passed
        assert backend in ("fa3", "sdpa") and why
