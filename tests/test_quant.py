"""Export quantization and the packer: bounded error on the row grid, SDClip, exact file roundtrip for
every compressor, deterministic bytes, damaged / foreign artifacts refused with one line, and the
start-of-run size and FLOPs estimates."""

import dataclasses
import re

import numpy as np
import pytest
import torch

import train_gpt as tg


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_rows_have_bounded_error_and_valid_scales(bits):
    torch.manual_seed(0)
    w = torch.randn(300, 256)
    w[3] = 0.0  # an all-zero row must not give a zero scale or NaN
    w[4] *= 1e-6  # a tiny row keeps a fine step instead of an absolute floor
    q, s = tg.quantize_rows(w, bits)
    limit = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.abs().max() == limit
    assert (s > 0).all() and torch.isfinite(s).all()
    deq = tg.dequantize_rows(q, s)
    assert torch.isfinite(deq).all() and deq[3].abs().max() == 0
    err = (deq - w).abs()
    assert (err <= s.float()[:, None] / 2 * 1.001 + 1e-12).all()  # round to nearest on the row grid
    assert s[4].float() < 1e-6 and err[4].max() < 1e-6  # its own fine grid, not an absolute floor
    assert torch.equal(tg.fake_quantize(w, bits), deq)  # QAT sees exactly what the export stores


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_sdclip_scale_is_k_row_stds_and_qat_fakes_the_same_grid(bits):
    torch.manual_seed(1)
    w = torch.randn(64, 512) * torch.linspace(0.01, 2.0, 64)[:, None]
    w[0, 0] = 50.0  # an outlier: absmax would waste the grid on it, SDClip clips it
    w[5] = 0.0
    k = 3.0
    q, s = tg.quantize_rows(w, bits, clip_sigmas=k)
    limit = 2 ** (bits - 1) - 1
    expected = (k * w.std(dim=1, correction=0) / limit).to(torch.float16).clamp_min(tg.FP16_MIN_SCALE)
    assert torch.equal(s, expected) and (s > 0).all()
    assert q.abs().max() <= limit and q[0, 0] == limit  # the outlier is clipped to the top code
    assert torch.equal(tg.fake_quantize(w, bits, k), tg.dequantize_rows(q, s))
    assert q[5].abs().max() == 0



SMALL = {"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "192", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
         "VOCAB_SIZE": "400", "MLP_MULT": "4", "TIE_EMBEDDINGS": "0"}


def small_model(**env):
    hp = tg.Hyperparameters.from_env({**SMALL, **env})
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return hp, model


@pytest.mark.parametrize("compressor", ["zlib", "lzma", "brotli"])
def test_artifact_roundtrip_is_bit_identical_and_deterministic(tmp_path, compressor):
    hp, model = small_model()
    sd = model.state_dict()
    plan = tg.QuantPlan(method="sdclip", bits=dict(embed=8, head=7, attn=6, mlp=5, other=6),
                        clip_sigmas=dict(embed=20.0, head=15.0, attn=13.0, mlp=11.5, other=12.85))
    entries = tg.quantize_state_dict(sd, plan)
    blob = tg.pack_artifact(entries, compressor=compressor, model=dataclasses.asdict(model.cfg), meta={"looping": False})
    assert blob == tg.pack_artifact(tg.quantize_state_dict(sd, plan), compressor=compressor,
                                    model=dataclasses.asdict(model.cfg), meta={"looping": False})  # same bytes
    path = tmp_path / "final_model.int6.ptz"
    tg.write_atomic(path, blob)
    loaded, header = tg.unpack_artifact(path.read_bytes(), expect_model=dataclasses.asdict(model.cfg))
    by_name = {e.name: e for e in entries}
    for e in loaded:  # codes, scales and kept tensors come back exactly
        ref = by_name[e.name]
        assert (e.bits, e.shape, e.dtype) == (ref.bits, ref.shape, ref.dtype)
        if e.bits:
            assert torch.equal(e.codes, ref.codes) and torch.equal(e.scales, ref.scales)
        else:
            assert e.value.dtype == ref.value.dtype and torch.equal(e.value, ref.value)
    bits = {t["name"]: t["bits"] for t in header["tensors"]}
    assert bits["tok_emb.weight"] == 8 and bits["lm_head.weight"] == 7
    assert bits["blocks.0.mlp.fc.weight"] == 5 and bits["blocks.0.attn.c_q.weight"] == 0  # 192x192 stays float
    assert all(t["coder"] == compressor for t in header["tensors"])
    assert by_name["blocks.0.mlp.fc.weight"].codes.abs().max() <= 15
    restored = tg.dequantize_state_dict(loaded)
    assert torch.equal(restored["blocks.0.resid_mix"], sd["blocks.0.resid_mix"])  # control tensors: fp32 exact
    fresh, _ = tg.load_artifact_model(path, torch.device("cpu"), expect=model.cfg)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, restored[k])


def test_brotli_shuffles_bytes_and_beats_zlib_on_the_same_weights():
    data = np.random.default_rng(0).standard_normal(10_000).astype(np.float16).tobytes()
    shuffled = tg.byte_shuffle(data, 2)
    assert shuffled != data and tg.byte_unshuffle(shuffled, 2) == data
    hp, model = small_model()
    entries = tg.quantize_state_dict(model.state_dict(), tg.QuantPlan.uniform(6, 8, "sdclip"))
    sizes = {c: len(tg.pack_artifact(entries, compressor=c)) for c in ("zlib", "brotli")}
    assert sizes["brotli"] < sizes["zlib"]


def damaged_versions(blob: bytes) -> dict[str, bytes]:
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    wrong_version = bytearray(blob)
    wrong_version[4] += 1
    return {"truncated": blob[: len(blob) // 2], "bit flip": bytes(flipped), "empty": b"",
            "not an artifact": b"not an artifact at all, just text", "wrong version": bytes(wrong_version),
            "torch.save file": b"PK\x03\x04" + blob[4:]}


def test_damaged_or_foreign_artifacts_fail_with_one_clear_line(tmp_path):
    hp, model = small_model()
    entries = tg.quantize_state_dict(model.state_dict(), tg.QuantPlan.uniform(6, 8))
    blob = tg.pack_artifact(entries, compressor="brotli", model=dataclasses.asdict(model.cfg), meta={"looping": False})
    for what, bad in damaged_versions(blob).items():
        with pytest.raises(tg.RunError) as info:
            tg.unpack_artifact(bad)
        message = str(info.value)
        assert "\n" not in message and ("corrupt" in message or "version" in message), (what, message)
        if what == "wrong version":
            assert "format version 2, this script reads version 1" in message
    other = dataclasses.asdict(tg.ModelConfig.from_hparams(tg.Hyperparameters.from_env({**SMALL, "VOCAB_SIZE": "512"})))
    with pytest.raises(tg.RunError, match=r"made for another model: vocab_size=400 \(expected 512\)"):
        tg.unpack_artifact(blob, expect_model=other)
    path = tmp_path / "a.ptz"
    tg.write_atomic(path, damaged_versions(blob)["truncated"])
    with pytest.raises(tg.RunError, match="corrupt or truncated"):
        tg.load_artifact_model(path, torch.device("cpu"))
    assert path.read_bytes() == damaged_versions(blob)["truncated"]  # a failed load touches nothing


def test_artifact_size_in_the_log_equals_the_bytes_on_disk(tiny_env, tmp_path):
    out = tg.run(tg.Hyperparameters.from_env({**tiny_env, "ITERATIONS": "2", "QUANT_METHOD": "sdclip",
                                              "COMPRESSOR": "brotli", "MATRIX_BITS": "6"}),
                 tg.Runtime(0, 1, 0, torch.device("cpu"), False))
    size = (tmp_path / "final_model.int6.ptz").stat().st_size
    assert out["model_bytes"] == size and out["total_bytes"] == size + out["code_bytes"]
    log = (tmp_path / "logs" / "test.txt").read_text()
    assert re.search(rf"^Serialized model int6\+brotli: {size} bytes", log, re.M)
    assert re.search(r"^final_int6_brotli_roundtrip_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$", log, re.M)


@pytest.mark.parametrize("matrix_bits", [8, 6])
def test_start_of_run_payload_estimate_matches_the_stored_values(matrix_bits):
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "192", "NUM_HEADS": "4",
                                      "NUM_KV_HEADS": "2", "VOCAB_SIZE": "1024", "MLP_MULT": "4"})
    sd = tg.GPT(tg.ModelConfig.from_hparams(hp)).state_dict()
    plan = tg.QuantPlan.uniform(matrix_bits, 8)
    entries = tg.quantize_state_dict(sd, plan)
    packed = sum(-(-e.codes.numel() * e.bits // 8) + 2 * e.scales.numel() for e in entries if e.bits)
    other = sum(e.value.numel() * e.value.element_size() for e in entries if not e.bits)
    assert tg.estimate_payload_bytes(sd, plan) == packed + other


def test_flops_estimate_counts_every_virtual_layer():
    hp = tg.Hyperparameters.from_env({"NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2", "NUM_LOOPS": "2",
                                      "PARALLEL_START_LAYER": "3", "XSA_LAST_N": "4"})
    cfg = tg.ModelConfig.from_hparams(hp)
    plain = tg.estimate_flops_per_token(cfg, 2048, looping=False)
    looped = tg.estimate_flops_per_token(cfg, 2048, looping=True)
    d, hidden, kv = cfg.model_dim, cfg.mlp_hidden, cfg.num_kv_heads * 64
    per_layer = 2 * (2 * d * d + 2 * d * kv + 2 * d * hidden) + 2 * d * 2049
    assert looped - plain == 4 * per_layer  # two segment layers, two extra passes
    assert plain == 4 * per_layer + 2 * d * cfg.vocab_size
