"""int8 + zlib export: bounded error, exact file roundtrip, corrupt artifacts refused."""

import pytest
import torch

import train_gpt as tg


def test_int8_rows_have_bounded_error_and_valid_scales():
    torch.manual_seed(0)
    w = torch.randn(300, 256)
    w[3] = 0.0  # an all-zero row must not give a zero scale or NaN
    w[4] *= 1e-6  # a tiny row keeps a fine step instead of an absolute floor
    q, s = tg.quantize_tensor_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.abs().max() <= 127
    assert (s > 0).all() and torch.isfinite(s).all()
    deq = q.float() * s.float()[:, None]
    assert torch.isfinite(deq).all() and deq[3].abs().max() == 0
    clip = torch.quantile(w.abs(), tg.INT8_CLIP_QUANTILE, dim=1)
    inside = w.abs() <= clip[:, None]
    err = (deq - w).abs()
    assert (err[inside] <= (s.float()[:, None] / 2 + 1e-7).expand_as(w)[inside] * 1.01).all()
    assert err[4].max() < 1e-7


def test_state_dict_roundtrip_through_the_compressed_file_is_exact(tmp_path):
    torch.manual_seed(0)
    # MODEL_DIM 192 x MLP 4: the MLP matrices (147,456 values) are quantized, the 300x192 embedding
    # (57,600) stays float as the baseline's 65,536-value passthrough rule says.
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "192", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                      "VOCAB_SIZE": "300", "MLP_MULT": "4"})
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    sd = model.state_dict()
    blob, _ = tg.serialize_int8_artifact(sd)
    path = tmp_path / "final_model.int8.ptz"
    tg.write_atomic(path, blob)
    from_file = tg.deserialize_int8_artifact(path.read_bytes())
    in_memory = tg.dequantize_state_dict_int8(tg.quantize_state_dict_int8(sd))
    assert from_file.keys() == sd.keys()
    for k in sd:
        assert from_file[k].dtype == sd[k].dtype and torch.equal(from_file[k], in_memory[k])
    # Big matrices are int8, control tensors stay fp32 exactly.
    obj = tg.quantize_state_dict_int8(sd)
    assert "blocks.0.mlp.fc.weight" in obj["quantized"] and "tok_emb.weight" not in obj["quantized"]
    assert torch.equal(from_file["blocks.0.resid_mix"], sd["blocks.0.resid_mix"])
    fresh = tg.GPT(tg.ModelConfig.from_hparams(hp))
    fresh.load_state_dict(from_file, strict=True)


def test_corrupt_artifact_is_refused_with_a_clear_error():
    with pytest.raises(tg.RunError, match="corrupt"):
        tg.deserialize_int8_artifact(b"not an artifact")
    blob, _ = tg.serialize_int8_artifact({"w": torch.randn(300, 300)})
    with pytest.raises(tg.RunError, match="corrupt"):
        tg.deserialize_int8_artifact(blob[: len(blob) // 2])


def test_start_of_run_payload_estimate_is_exact_for_int8():
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "192", "NUM_HEADS": "4",
                                      "NUM_KV_HEADS": "2", "VOCAB_SIZE": "1024", "MLP_MULT": "4"})
    sd = tg.GPT(tg.ModelConfig.from_hparams(hp)).state_dict()
    obj = tg.quantize_state_dict_int8(sd)
    stored = sum(t.numel() * t.element_size() for group in ("quantized", "scales", "passthrough")
                 for t in obj[group].values())
    assert tg.estimate_payload_bytes(sd, bits=8) == stored


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
