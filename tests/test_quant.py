"""Export quantization: bounded error, exact file roundtrip, corrupt artifacts refused, and the
start-of-run size and FLOPs estimates."""

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


def test_state_dict_roundtrip_through_the_compressed_file_is_exact(tmp_path):
    torch.manual_seed(0)
    # MODEL_DIM 192 x MLP 4: the MLP matrices (147,456 values) are quantized, the 300x192 embedding
    # (57,600) stays float as the baseline's 65,536-value passthrough rule says.
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "192", "NUM_HEADS": "4",
                                      "NUM_KV_HEADS": "2", "VOCAB_SIZE": "300", "MLP_MULT": "4"})
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    sd = model.state_dict()
    blob, _ = tg.serialize_artifact(sd, matrix_bits=6, embed_bits=8)
    path = tmp_path / "final_model.int8.ptz"
    tg.write_atomic(path, blob)
    from_file = tg.deserialize_artifact(path.read_bytes())
    obj = tg.quantize_state_dict(sd, matrix_bits=6, embed_bits=8)
    in_memory = tg.dequantize_state_dict(obj)
    assert from_file.keys() == sd.keys()
    for k in sd:
        assert from_file[k].dtype == sd[k].dtype and torch.equal(from_file[k], in_memory[k])
    assert "blocks.0.mlp.fc.weight" in obj["quantized"] and "tok_emb.weight" not in obj["quantized"]
    assert obj["bits"]["blocks.0.mlp.fc.weight"] == 6 and obj["quantized"]["blocks.0.mlp.fc.weight"].abs().max() <= 31
    assert torch.equal(from_file["blocks.0.resid_mix"], sd["blocks.0.resid_mix"])  # control tensors: fp32 exact
    fresh = tg.GPT(tg.ModelConfig.from_hparams(hp))
    fresh.load_state_dict(from_file, strict=True)


def test_corrupt_artifact_is_refused_with_a_clear_error():
    with pytest.raises(tg.RunError, match="corrupt"):
        tg.deserialize_artifact(b"not an artifact")
    blob, _ = tg.serialize_artifact({"w": torch.randn(300, 300)}, matrix_bits=8, embed_bits=8)
    with pytest.raises(tg.RunError, match="corrupt"):
        tg.deserialize_artifact(blob[: len(blob) // 2])


@pytest.mark.parametrize("matrix_bits", [8, 6])
def test_start_of_run_payload_estimate_matches_the_stored_values(matrix_bits):
    hp = tg.Hyperparameters.from_env({"RECIPE": "baseline", "NUM_LAYERS": "2", "MODEL_DIM": "192", "NUM_HEADS": "4",
                                      "NUM_KV_HEADS": "2", "VOCAB_SIZE": "1024", "MLP_MULT": "4"})
    sd = tg.GPT(tg.ModelConfig.from_hparams(hp)).state_dict()
    obj = tg.quantize_state_dict(sd, matrix_bits=matrix_bits, embed_bits=8)
    packed = sum(-(-t.numel() * obj["bits"][n] // 8) for n, t in obj["quantized"].items())
    other = sum(t.numel() * t.element_size() for group in ("scales", "passthrough") for t in obj[group].values())
    assert tg.estimate_payload_bytes(sd, matrix_bits=matrix_bits, embed_bits=8) == packed + other


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
