"""DOC_MASKED_ATTENTION: a document never sees another one, in training, in evaluation (flat and
sliding windows) and with every attention kernel that runs on CPU; a packed row equals its documents
run alone; the compiled forward does not recompile for new document layouts."""

import concurrent.futures
import functools

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from test_switches import ALL_ON, build, randomize
from ledger_probe import RecordingLedger

V = 97


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
    """flash_attn_varlen_func's contract from per-document SDPA: (total, heads, D) streams, document i
    at positions cu_seqlens[i]..cu_seqlens[i+1]-1, causal attention within it, GQA by head groups."""
    cu = cu_seqlens_q.tolist()
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    assert max_seqlen_q == max_seqlen_k >= max(b - a for a, b in zip(cu, cu[1:]))
    return per_document_attention(q, k, v, cu)


def per_document_attention(q, k, v, cu: list[int]) -> torch.Tensor:
    assert cu[0] == 0 and cu[-1] == q.size(0) and all(a < b for a, b in zip(cu, cu[1:]))  # no empty document
    pieces = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True,
                                             enable_gqa=True)[0].transpose(0, 1) for a, b in zip(cu, cu[1:])]
    return torch.cat(pieces)


# Every switch that mixes positions or touches attention: GQA, XSA, partial RoPE, SmearGate,
# BigramHash, value residual, gates, two-lane parallel residuals, the loop.
DOC_ENV = ALL_ON  # with DOC_MASKED_ATTENTION=1
# flex runs here in eager mode (no backward on CPU), as a check of the fused path; varlen through reference_varlen
KERNELS = ["sdpa", "flex", "varlen"]


def doc_model(kernel: str = "sdpa", **env) -> tg.GPT:
    model = build({**DOC_ENV, **env})
    randomize(model)
    model.doc_attention_kernel = kernel
    if kernel == "varlen":
        model.varlen_attention = reference_varlen
    return model.eval()


def packed_row(lengths: list[int], seed: int = 0, lead: int = 0) -> torch.Tensor:
    """One row: `lead` tokens of a previous document's tail, then documents of the given lengths (BOS + text)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(2, V, (lead,), generator=g)]
    for n in lengths:
        parts.append(torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(2, V, (n - 1,), generator=g)]))
    return torch.cat(parts)[None]


def test_layout_numbers_documents_and_restarts_positions_at_each_bos():
    ids = torch.tensor([[5, 6, 1, 7, 8, 9, 1, 1, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    layout = tg.DocumentLayout(ids, "sdpa")
    assert layout.doc.tolist() == [[0, 0, 1, 1, 1, 1, 2, 3, 3], [1] * 9]
    assert layout.positions.tolist() == [[0, 1, 0, 1, 2, 3, 0, 0, 1], list(range(9))]
    mask = layout.mask[0, 0]
    assert mask[5].tolist() == [False, False, True, True, True, True, False, False, False]
    assert torch.equal(layout.mask[1, 0], torch.ones(9, 9, dtype=torch.bool).tril())  # one document: causal


@pytest.mark.parametrize("path", ["train", "train_varlen", "eval_sdpa", "eval_flex", "eval_varlen"])
def test_no_token_of_an_earlier_document_changes_a_logit_of_a_later_one(path):
    kernel = path.split("_")[1] if "_" in path else "sdpa"
    model = doc_model(kernel)
    x = torch.cat([packed_row([7, 6, 11], seed=1, lead=3), packed_row([9, 9, 9], seed=2)])  # (2, 27)
    later = 16  # position of the third document's BOS in row 0 (3 + 7 + 6); row 1 is cut at 18
    train = path.startswith("train")
    if train:
        model.train()
    context = torch.enable_grad() if train else torch.no_grad()
    with context:
        for looping in (False, True) if kernel != "flex" else (True,):  # eager flex is slow: fewer cases
            base = model.forward_logits(x, looping)
            positions = (0, 3, 4, 9, 15) if looping else (2, 10)  # tail, a BOS, its successor, middle, last
            for t in positions if kernel != "flex" else (3,):
                x2 = x.clone()
                x2[:, t] = 2 + (x2[:, t] + 5) % (V - 2)  # any other non-BOS token, even in place of a BOS
                out = model.forward_logits(x2, looping)
                assert torch.equal(out[0, later:], base[0, later:]), f"token {t} reached a later document"
                assert torch.equal(out[1, 18:], base[1, 18:]), f"token {t} reached a later document"
                assert not torch.equal(out[0, t:later], base[0, t:later])  # ...and it does matter to its own
    if train:  # the loss backpropagates through the masked kernel
        model(x, x.roll(-1, 1)).backward()
        assert model.blocks[0].attn.c_q.weight.grad.abs().sum() > 0


def test_without_the_mask_earlier_documents_do_reach_later_ones():
    """The control: the property above is the mask's doing, so the test can fail."""
    model = doc_model(DOC_MASKED_ATTENTION="0")
    x = packed_row([7, 6, 11], seed=1, lead=3)
    x2 = x.clone()
    x2[0, 4] += 1
    with torch.no_grad():
        assert not torch.allclose(model.forward_logits(x2)[0, 16:], model.forward_logits(x)[0, 16:], atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_packed_row_equals_each_document_run_alone(kernel):
    model = doc_model(kernel)
    lengths = [5, 12, 1, 9, 5] if kernel != "flex" else [5, 13, 14]
    x = packed_row(lengths, seed=3)  # at most TRAIN_SEQ_LEN long: past it the NTK RoPE rescale follows the row length
    with torch.no_grad():
        for looping in (False, True) if kernel != "flex" else (True,):
            packed = model.forward_logits(x, looping)
            start = 0
            for n in lengths:
                alone = model.forward_logits(x[:, start : start + n], looping)
                torch.testing.assert_close(packed[:, start : start + n], alone, atol=2e-5, rtol=2e-5)
                start += n


def test_flex_varlen_and_sdpa_kernels_agree_and_fa3s_dense_kernel_never_sees_a_document_mask():
    x = torch.cat([packed_row([10, 14], seed=4, lead=8), packed_row([20, 12], seed=5)])
    with torch.no_grad():
        flex, sdpa = doc_model("flex").forward_logits(x, True), doc_model("sdpa").forward_logits(x, True)
    torch.testing.assert_close(flex, sdpa, atol=2e-5, rtol=2e-5)

    def fa3(*args, **kwargs):
        raise AssertionError("FA3's dense kernel was called, but it has no document mask")

    masked = doc_model(None)  # as ATTN_BACKEND=fa3 builds it: the varlen kernel, never the dense one
    masked.varlen_attention = reference_varlen
    for block in masked.blocks:
        block.attn.flash = fa3
    with torch.no_grad():
        torch.testing.assert_close(masked.forward_logits(x, True), sdpa, atol=2e-5, rtol=2e-5)


def test_cu_seqlens_cut_the_flattened_batch_at_every_row_start_and_bos():
    """A row's tokens before its first BOS are a document of their own (the tail of an earlier one)."""
    ids = torch.tensor([[5, 6, 1, 7, 8, 9, 1, 1, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 3, 3, 3, 3, 3, 3, 3, 1]])
    layout = tg.DocumentLayout(ids, "varlen", reference_varlen)
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens.tolist() == [0, 2, 6, 7, 9, 18, 26, 27]
    assert layout.positions.tolist()[2] == list(range(8)) + [0]  # RoPE restarts at the BOS only


@pytest.mark.parametrize("seed", range(3))
def test_the_varlen_kernel_equals_the_dense_mask_forward_and_backward(seed):
    """Through DocumentLayout.attend: flattening, cu_seqlens, GQA and unflattening against the dense
    mask, on rows with no BOS, all BOS, and random documents crossing row starts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (4, 48), generator=g)
    ids[1] = tg.BOS_ID
    ids[2:][torch.rand(2, 48, generator=g) < 0.1 * (seed + 1)] = tg.BOS_ID
    q, k, v = (torch.randn(4, h, 48, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    outs, grads = {}, {}
    for kernel in ("varlen", "sdpa"):
        outs[kernel] = tg.DocumentLayout(ids, kernel, reference_varlen).attend(q, k, v)
        grads[kernel] = torch.autograd.grad(outs[kernel].square().sum(), (q, k, v))
    torch.testing.assert_close(outs["varlen"], outs["sdpa"], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads["varlen"], grads["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def crossing_documents(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """A broken kernel: one document per row (BOS ignored)."""
    return per_document_attention(q, k, v, list(range(0, q.size(0) + 1, max_q)))


def crossing_rows(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """A broken kernel: documents run on across row starts."""
    return per_document_attention(q, k, v, [c for c in cu_q.tolist() if c % max_q or c in (0, q.size(0))])


def without_gradient(q, k, v, *args, **kwargs):
    """A broken kernel: the right output, no gradient into q, k and v."""
    return reference_varlen(q, k, v, *args, **kwargs).detach() + 0 * (q + k.repeat_interleave(2, 1) + v.repeat_interleave(2, 1))


def test_fa3_varlen_is_used_only_after_it_matches_the_masked_sdpa(monkeypatch):
    import sys
    import types

    from test_switches import fake_flash_module

    def install(varlen):
        module = fake_flash_module(correct=True)
        monkeypatch.setitem(sys.modules, "flash_attn_interface",
                            types.SimpleNamespace(flash_attn_func=module.flash_attn_func, flash_attn_varlen_func=varlen))

    cpu = torch.device("cpu")
    install(reference_varlen)
    assert tg.select_attention_backend("fa3", cpu, doc_masked=True) == (
        "fa3", "flash_attn_varlen_func matches the document-masked SDPA")
    assert tg.select_attention_backend("auto", cpu, doc_masked=True) == ("sdpa", "FlashAttention 3 needs a CUDA device")
    model, sdpa = build({**DOC_ENV, "ATTN_BACKEND": "fa3"}), doc_model("sdpa")
    model.load_state_dict(sdpa.state_dict())
    assert model.varlen_attention is reference_varlen and model.doc_attention_kernel is None
    x = torch.cat([packed_row([10, 14], seed=4, lead=8), packed_row([20, 12], seed=5)])
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_logits(x, True), sdpa.forward_logits(x, True), atol=2e-5,
                                   rtol=2e-5)
    for broken, reason in ((crossing_documents, "output differs"), (crossing_rows, "output differs"),
                           (without_gradient, "gradients differ")):
        install(broken)
        with pytest.raises(tg.RunError, match=rf"failed its start-up check \({reason} from SDPA\)"):
            tg.select_attention_backend("fa3", cpu, doc_masked=True)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake_flash_module(correct=True))  # an FA3 without varlen
    with pytest.raises(tg.RunError, match=r"start-up check raised AttributeError"):
        tg.select_attention_backend("fa3", cpu, doc_masked=True)
    assert tg.select_attention_backend("fa3", cpu) == ("fa3", "matches SDPA")  # without the mask: the dense kernel


def unit_luts() -> tg.ByteLuts:
    ids = torch.arange(V)
    return tg.ByteLuts((ids != tg.BOS_ID).to(torch.int16), torch.zeros(V, dtype=torch.bool), ids == tg.BOS_ID)


@pytest.mark.parametrize("stride", [1, 3])
def test_sliding_windows_score_each_target_once_from_its_own_document_only(stride):
    """A window reads up to L tokens back, across a BOS; every target is still scored once, and its
    NLL is the one its document gets alone: the next document's BOS is the last target of a document."""
    model = doc_model("sdpa")
    lengths = [9, 4, 13, 7, 10, 6]
    stream = packed_row(lengths, seed=6)[0]
    ledger = RecordingLedger(stream, unit_luts(), torch.device("cpu"))
    spans = tg.plan_windows(ledger.num_targets, 16, stride)
    tg.score_windows(lambda x: model.forward_logits(x, True), ledger, spans,
                     tg.EvalContext(tg.Runtime(0, 1, 0, torch.device("cpu"), False)), seq_len=16, batch_seqs=4)
    tg.check_scored_once(ledger)
    start = 0
    with torch.no_grad():
        for n in lengths:
            end = min(start + n, ledger.num_targets)  # inputs start..end-1 predict targets start+1..end
            logits = model.forward_logits(stream[None, start:end], True)[0]
            alone = torch.nn.functional.cross_entropy(logits, stream[start + 1 : end + 1], reduction="none")
            torch.testing.assert_close(torch.from_numpy(ledger.per_target[start + 1 : end + 1]).float(), alone,
                                       atol=2e-5, rtol=2e-5)
            start += n


class GraphCounter:
    """A torch.compile backend that runs the captured graph eagerly and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


LAYOUTS = [[32], [1] * 32, [3, 29], [5, 7, 9, 11]]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["train", "eval_flex"])
def test_the_compiled_forward_compiles_once_for_every_document_layout(path):
    """One graph per looping mode, whatever the documents (tensors, not guards); no graph breaks."""
    torch._dynamo.reset()
    counter, train = GraphCounter(), path == "train"
    env = {} if train else {"NUM_LOOPS": "0"}  # tracing eager flex is slow
    model = doc_model(None if train else "flex", **env)  # None: what a CPU run picks (SDPA with the mask)
    reference = doc_model("sdpa", **env)
    if train:
        model.train()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    modes = (False, True) if train else (True,)
    with torch.enable_grad() if train else torch.no_grad():
        for i, lengths in enumerate(LAYOUTS if train else LAYOUTS[:3]):
            x = torch.cat([packed_row(lengths, seed=i), packed_row(lengths[::-1], seed=i)])
            for looping in modes:
                loss = compiled(x, x.roll(-1, 1), looping)
                torch.testing.assert_close(loss, reference(x, x.roll(-1, 1), looping), atol=1e-5, rtol=1e-5)
                if train:
                    loss.backward()
            assert counter.graphs == len(modes), f"{counter.graphs} graphs after {i + 1} layouts: a layout recompiled"


@functools.lru_cache(maxsize=1)
def varlen_custom_op():
    """reference_varlen as an opaque custom operator with a registered backward, as FA3 registers its
    kernels: what torch.compile traces around without looking inside. Returns a callable of its signature."""
    lib = "pgolf_test"

    @torch.library.custom_op(f"{lib}::varlen", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        return reference_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)

    forward.register_fake(lambda q, k, v, cu, max_seqlen: torch.empty_like(q))

    @torch.library.custom_op(f"{lib}::varlen_backward", mutates_args=())
    def backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                 max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def vjp():  # a fresh thread: an operator's body runs below autograd, a new thread's is not
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = reference_varlen(*leaves, cu, cu, max_seqlen, max_seqlen, causal=True)
                return tuple(g.contiguous() for g in torch.autograd.grad(out, leaves, grad))

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(vjp).result()

    backward.register_fake(lambda grad, q, k, v, cu, m: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))

    def setup(ctx, inputs, output):
        q, k, v, cu, ctx.max_seqlen = inputs
        ctx.save_for_backward(q, k, v, cu)

    forward.register_autograd(lambda ctx, grad: (*backward(grad, *ctx.saved_tensors, ctx.max_seqlen), None, None),
                              setup_context=setup)
    return lambda q, k, v, cu_q, cu_k, max_q, max_k, causal=False: forward(q, k, v, cu_q, max_q)


@pytest.mark.slow
def test_the_compiled_varlen_forward_compiles_once_for_every_document_layout():
    """The varlen kernel as the run compiles it (compile_settings, maybe_compile; AOT autograd traces the
    backward): cu_seqlens of every length are one unbacked size, so one graph per looping mode, no
    recompile, no graph break; loss and gradients as the dense mask's."""
    torch._dynamo.reset()
    model, reference = doc_model("varlen").train(), doc_model("sdpa").train()
    model.varlen_attention = varlen_custom_op()
    with tg.compile_settings(qat=False, record=tg.CompileRecord("aot_eager", "error")) as record:
        compiled = tg.maybe_compile(model, True, "train_step")
        for i, lengths in enumerate(LAYOUTS):
            x = torch.cat([packed_row(lengths, seed=i), packed_row(lengths[::-1], seed=i, lead=i)[:, :32]])
            for looping in (False, True):
                losses = [m(x, x.roll(-1, 1), looping) for m in (compiled, reference)]
                torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
                grads = [torch.autograd.grad(loss, m.blocks[0].attn.c_q.weight)[0]
                         for loss, m in zip(losses, (model, reference))]
                torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
            assert record.graphs == {"train_step": 2} and not record.failures, (i, record.graphs)


@pytest.mark.cuda
def test_compiled_flex_attention_trains_on_cuda_like_the_sdpa_mask():
    """The fused FlexAttention kernel a compiled CUDA run picks, forward and backward, against the
    dense SDPA mask (on CPU, inductor builds the forward too: checked by hand, 5e-6 apart)."""
    torch._dynamo.reset()
    x = torch.cat([packed_row([40, 24, 64], seed=7), packed_row([10, 54, 64], seed=8)]).cuda()
    grads = {}
    for kernel in ("flex", "sdpa"):
        model = doc_model(None if kernel == "flex" else "sdpa").cuda().train()
        forward = torch.compile(model, dynamic=False) if kernel == "flex" else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(x, x.roll(-1, 1), True)
        loss.backward()
        grads[kernel] = (loss.detach().float(), model.blocks[0].attn.c_q.weight.grad.float())
    torch.testing.assert_close(grads["flex"][0], grads["sdpa"][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grads["flex"][1], grads["sdpa"][1], atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
def test_compiled_fa3_varlen_trains_on_cuda_like_the_sdpa_mask():
    """FlashAttention 3's varlen kernel as a CUDA run compiles it, forward and backward, against the dense
    SDPA mask, over two document layouts: one graph, no failure."""
    if tg.load_flash_attention() is None:
        pytest.skip("FlashAttention 3 (flash_attn_interface) is not installed")
    cuda = torch.device("cuda")
    assert tg.select_attention_backend("fa3", cuda, doc_masked=True)[0] == "fa3"
    torch._dynamo.reset()
    varlen, sdpa = doc_model(None).cuda().train(), doc_model("sdpa").cuda().train()
    varlen.varlen_attention = tg.load_flash_attention().flash_attn_varlen_func
    with tg.compile_settings(qat=False, record=tg.CompileRecord("inductor", "error")) as record:
        compiled = tg.maybe_compile(varlen, True, "varlen_step")
        for i, lengths in enumerate(([40, 24, 64], [10, 54, 12, 52])):
            x = torch.cat([packed_row(lengths, seed=i), packed_row(lengths[::-1], seed=i + 9)]).cuda()
            grads = []
            for forward, model in ((compiled, varlen), (sdpa, sdpa)):
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = forward(x, x.roll(-1, 1), True)
                loss.backward()
                grads.append((loss.detach().float(), model.blocks[0].attn.c_q.weight.grad.float()))
            torch.testing.assert_close(grads[0][0], grads[1][0], atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(grads[0][1], grads[1][1], atol=5e-2, rtol=5e-2)
    assert record.graphs == {"varlen_step": 1} and not record.failures
