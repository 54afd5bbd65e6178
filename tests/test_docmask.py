"""DOC_MASKED_ATTENTION: a document never sees another one, in training, in evaluation (flat and
sliding windows) and with every attention kernel that runs on CPU; a packed row equals its documents
run alone; the compiled forward does not recompile for new document layouts."""

import pytest
import torch

import train_gpt as tg
from test_switches import ALL_ON, build, randomize

V = 97
# Every switch that mixes positions or touches attention: GQA, XSA, partial RoPE, SmearGate,
# BigramHash, value residual, gates, two-lane parallel residuals, the loop.
DOC_ENV = ALL_ON  # with DOC_MASKED_ATTENTION=1
KERNELS = ["sdpa", "flex"]  # flex runs here in eager mode (no backward on CPU), as a check of the fused path


def doc_model(kernel: str = "sdpa", **env) -> tg.GPT:
    model = build({**DOC_ENV, **env})
    randomize(model)
    model.doc_attention_kernel = kernel
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


@pytest.mark.parametrize("path", ["train", "eval_sdpa", "eval_flex"])
def test_no_token_of_an_earlier_document_changes_a_logit_of_a_later_one(path):
    kernel = "flex" if path == "eval_flex" else "sdpa"
    model = doc_model(kernel)
    x = torch.cat([packed_row([7, 6, 11], seed=1, lead=3), packed_row([9, 9, 9], seed=2)])  # (2, 27)
    later = 16  # position of the third document's BOS in row 0 (3 + 7 + 6); row 1 is cut at 18
    if path == "train":
        model.train()
    context = torch.enable_grad() if path == "train" else torch.no_grad()
    with context:
        for looping in (False, True) if kernel == "sdpa" else (True,):  # eager flex is slow: fewer cases
            base = model.forward_logits(x, looping)
            positions = (0, 3, 4, 9, 15) if looping else (2, 10)  # tail, a BOS, its successor, middle, last
            for t in positions if kernel == "sdpa" else (3,):
                x2 = x.clone()
                x2[:, t] = 2 + (x2[:, t] + 5) % (V - 2)  # any other non-BOS token, even in place of a BOS
                out = model.forward_logits(x2, looping)
                assert torch.equal(out[0, later:], base[0, later:]), f"token {t} reached a later document"
                assert torch.equal(out[1, 18:], base[1, 18:]), f"token {t} reached a later document"
                assert not torch.equal(out[0, t:later], base[0, t:later])  # ...and it does matter to its own
    if path == "train":  # the loss backpropagates through the masked kernel
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
    lengths = [5, 12, 1, 9, 5] if kernel == "sdpa" else [5, 13, 14]
    x = packed_row(lengths, seed=3)  # at most TRAIN_SEQ_LEN long: past it the NTK RoPE rescale follows the row length
    with torch.no_grad():
        for looping in (False, True) if kernel == "sdpa" else (True,):
            packed = model.forward_logits(x, looping)
            start = 0
            for n in lengths:
                alone = model.forward_logits(x[:, start : start + n], looping)
                torch.testing.assert_close(packed[:, start : start + n], alone, atol=2e-5, rtol=2e-5)
                start += n


def test_flex_and_sdpa_kernels_agree_and_the_fa3_choice_does_not_bypass_the_mask():
    x = torch.cat([packed_row([10, 14], seed=4, lead=8), packed_row([20, 12], seed=5)])
    with torch.no_grad():
        flex, sdpa = doc_model("flex").forward_logits(x, True), doc_model("sdpa").forward_logits(x, True)
    torch.testing.assert_close(flex, sdpa, atol=2e-5, rtol=2e-5)
    def fa3(*args, **kwargs):
        raise AssertionError("FA3 was called, but it has no document mask")

    masked = doc_model(None)  # as ATTN_BACKEND=fa3 would build it
    for block in masked.blocks:
        block.attn.flash = fa3
    with torch.no_grad():
        torch.testing.assert_close(masked.forward_logits(x, True), sdpa)  # eager on CPU: the SDPA mask


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
    ledger = tg.ScoreLedger(stream, unit_luts(), torch.device("cpu"), keep_per_target=True)
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
