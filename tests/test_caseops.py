"""CaseOps: the transform and its two inverses, the exporter's byte sidecar, and train_gpt.py scoring with it."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import TINY_ENV
from data import caseops
from data.export_shards import ExportError, export_dataset, original_byte_counts
from data.prepare_sample import load_sample_docs, split_sample
from data.shards import read_shard, write_shard

CPU = tg.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
OPS = caseops.OPERATORS

# ---- the transform ----------------------------------------------------------------------------------

ALPHABET = "aAbBzZqQ" + "é" + "ÉßΩ日" + " \n\t.,'-0" + "".join(OPS) + caseops.RESERVED_V1_SENTINEL + "\U0001f600"


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(n)]
    texts += ["".join(chr(rng.randint(1, 0x10FFFF)) for _ in range(20)).encode("utf-8", "replace").decode("utf-8",
              "replace") for _ in range(n // 4)]  # any code point (surrogates replaced)
    return texts


@pytest.mark.parametrize("text, encoded", [
    ("the cat", "the cat"),
    ("NASA", "\ue002nasa"),
    ("Paris", "\ue001paris"),
    ("I am", "\ue001i am"),
    ("iPhone", "i\ue003phone"),
    ("McDonald", "\ue001mc\ue003donald"),
    ("ABc", "\ue001a\ue003bc"),
    ("HTTPServer2", "\ue001h\ue003t\ue003t\ue003p\ue003server2"),
    ("Élan ÉCOLE", "Élan É\ue002cole"),  # only ASCII letters are modelled: É passes through and ends the run
    ("x\ue001y \ue004", "x\ue004\ue001y \ue004\ue004"),  # literal operators are escaped
    ("\ue000A", "\ue000\ue001a"),  # the reserved v1 sentinel is an ordinary character
])
def test_encode_follows_the_rules(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text == tg.caseops_decode(encoded)


def test_inverse_of_transform_is_identity_on_random_unicode_with_literal_operators():
    texts = random_texts(3000)
    assert sum(any(op in t for op in OPS) for t in texts) > 1000  # the hard case is well covered
    for text in texts:
        encoded = caseops.encode(text)
        assert not any("A" <= c <= "Z" for c in encoded)  # no ASCII capital survives
        assert caseops.decode(encoded) == text, repr(text)
        assert tg.caseops_decode(encoded) == text, repr(text)  # train_gpt.py's copy agrees
        # the byte rule the sidecar follows: each added operator is 3 bytes of no original text
        added = sum(encoded.count(op) for op in OPS) - sum(text.count(op) for op in OPS)
        assert len(encoded.encode()) - 3 * added == len(text.encode())


@pytest.mark.parametrize("bad", ["\ue004", "\ue004a", "a\ue001", "\ue001 x", "\ue001A", "\ue002a", "\ue002a b",
                                 "x\ue003", "x\ue0031", "\ue003\ue003a"])
def test_malformed_text_is_refused_by_both_inverses(bad):
    with pytest.raises(caseops.CaseOpsError):
        caseops.decode(bad)
    with pytest.raises(tg.RunError, match="not valid CaseOps"):
        tg.caseops_decode(bad)


def test_the_two_inverses_agree_on_random_operator_soup():
    """Strings that are mostly not valid encodings: both decoders accept and refuse the same ones."""
    rng = random.Random(1)
    soup = "ab AZ." + "".join(OPS)
    for _ in range(3000):
        text = "".join(rng.choice(soup) for _ in range(rng.randint(1, 12)))
        try:
            want = caseops.decode(text)
        except caseops.CaseOpsError:
            with pytest.raises(tg.RunError):
                tg.caseops_decode(text)
            continue
        assert tg.caseops_decode(text) == want


# ---- the exporter -----------------------------------------------------------------------------------

LITERAL_DOCS = ["Keys \ue001 and \ue004\ue004 stay as TYPED: \ue002X.", "A \ue003B"]  # escaped operators


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory) -> dict:
    """400 sample documents exported with --caseops (val also gets docs with literal operators); small
    shards so that validation spans several shards and sidecars and documents straddle them."""
    train, val, _ = split_sample(load_sample_docs(400))
    root = tmp_path_factory.mktemp("caseops")
    out = export_dataset(train, val + LITERAL_DOCS, datasets_root=root / "d", tokenizers_root=root / "t",
                         dataset_name="sample_caseops", tokenizer_name="sample_caseops", vocab_size=512,
                         shard_tokens=1500, case_ops=True)
    out["val_docs"], out["root"] = val + LITERAL_DOCS, root
    return out


def val_docs_tokens(dataset_dir: str) -> list[np.ndarray]:
    tokens = tg.load_validation_tokens(dataset_dir).numpy()
    starts = np.flatnonzero(tokens == tg.BOS_ID).tolist() + [len(tokens)]
    return [tokens[a:b] for a, b in zip(starts, starts[1:])]


def test_export_writes_the_sidecar_in_the_public_format_and_the_manifest_says_the_transform(caseops_data):
    d = Path(caseops_data["dataset_dir"])
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["text_transform"]["name"] == "lossless_caps_caseops_v1"
    assert manifest["tokenizer"]["user_defined_symbols"] == ["U+E000", "U+E001", "U+E002", "U+E003", "U+E004"]
    vals = sorted(p.name for p in d.glob("fineweb_val_0*.bin"))
    sides = sorted(p.name for p in d.glob("fineweb_val_bytes_*.bin"))
    assert len(vals) >= 3 and sides == [v.replace("val_", "val_bytes_") for v in vals]
    assert [s["file"] for s in manifest["byte_sidecar"]["shards"]] == sides
    for v, s in zip(vals, sides):
        assert read_shard(d / s).size == read_shard(d / v).size  # same header layout, one count per token
    sp = spm.SentencePieceProcessor(model_file=caseops_data["tokenizer_path"])
    for op in caseops.TOKENIZER_SYMBOLS:
        assert sp.id_to_piece(sp.piece_to_id(op)) == op  # each operator is a piece of its own
    train_text = "".join(sp.decode(read_shard(d / "fineweb_train_000000.bin").tolist()))
    assert not any("A" <= c <= "Z" for c in train_text)  # training data is transformed too


def test_sidecar_counts_each_documents_original_bytes(caseops_data):
    """Ground truth independent of the byte code: the original document, normalised by the same
    tokenizer (encoded and decoded without the transform). Also not the pieces' bytes (the trap)."""
    d = caseops_data["dataset_dir"]
    sp = spm.SentencePieceProcessor(model_file=caseops_data["tokenizer_path"])
    sidecar = tg.load_validation_byte_sidecar(d).astype(np.int64)
    docs = val_docs_tokens(d)
    assert len(docs) == len(caseops_data["val_docs"])
    pos = 0
    for tokens, original in zip(docs, caseops_data["val_docs"]):
        counted = int(sidecar[pos : pos + len(tokens)].sum())
        assert counted == len(sp.decode(sp.encode(original)).encode("utf-8")), original[:40]
        assert counted == len(caseops.decode(sp.decode(tokens[1:].tolist())).encode("utf-8"))
        pos += len(tokens)
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    pieces = tg.validation_byte_totals(sp, tg.load_validation_tokens(d), luts)[1]
    assert pieces > 1.05 * sidecar.sum()  # what a run counted before: the operators' bytes too


def test_reexporting_plain_into_the_folder_removes_the_sidecar(caseops_data):
    train, val, _ = split_sample(load_sample_docs(400))
    root = caseops_data["root"]
    kw = dict(datasets_root=root / "d2", tokenizers_root=root / "t2", dataset_name="x", tokenizer_name="x",
              vocab_size=512)
    export_dataset(train, val, **kw, case_ops=True)
    again = export_dataset(train, val, **kw, case_ops=True)  # up to date: nothing rewritten
    assert "byte_sidecar" in again
    plain = export_dataset(train, val, **kw)
    assert not list(Path(plain["dataset_dir"]).glob("fineweb_val_bytes_*")) and "byte_sidecar" not in plain
    with pytest.raises(ExportError, match="lacks the CaseOps operator pieces"):
        export_dataset(train, val, **{**kw, "dataset_name": "y", "tokenizer_name": "y"}, case_ops=True,
                       reuse_tokenizer=plain["tokenizer_path"])


def test_sidecar_keeps_an_escaped_operators_bytes():
    sp = spm.SentencePieceProcessor()
    train, _, _ = split_sample(load_sample_docs(200))
    from data.export_shards import train_tokenizer

    sp.LoadFromSerializedProto(train_tokenizer([caseops.encode(t) for t in train], 400, caseops.TOKENIZER_SYMBOLS)[0])
    for text in ["\ue004\ue004\ue001Ab", "A\ue004 \ue003", "\ue001\ue001"]:
        ids = np.array([tg.BOS_ID] + sp.encode(caseops.encode(text)))
        assert int(original_byte_counts(sp, ids).sum()) == len(text.encode("utf-8")), repr(text)


def test_command_line_and_sample_names_carry_the_transform(tmp_path, capsys):
    from data import export_shards
    from data.prepare_sample import prepare_sample

    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(load_sample_docs(150)), encoding="utf-8")
    roots = ["--datasets-root", str(tmp_path / "d"), "--tokenizers-root", str(tmp_path / "t")]
    args = ["--input", str(corpus), "--val-docs", "10", "--vocab-size", "400", "--caseops", *roots]
    assert export_shards.main(args) == 0
    d = tmp_path / "d" / "docs_sp400_lossless_caps_caseops_v1_reserved"
    assert (d / "fineweb_val_bytes_000000.bin").is_file()
    assert (tmp_path / "t" / "docs_400_bpe_lossless_caps_caseops_v1_reserved.model").is_file()
    assert "caseops: validation byte sidecar" in capsys.readouterr().out
    sample = prepare_sample(vocab_size=400, max_docs=150, caseops=True, datasets_root=tmp_path / "d",
                            tokenizers_root=tmp_path / "t")
    assert Path(sample["dataset_dir"]).name == "sample_sp400_lossless_caps_caseops_v1_reserved"
    assert sample["text_transform"]["name"] == "lossless_caps_caseops_v1"


# ---- train_gpt.py ------------------------------------------------------------------------------------


def hp_for(data: dict, **env) -> tg.Hyperparameters:
    sp = spm.SentencePieceProcessor(model_file=data["tokenizer_path"])
    return tg.Hyperparameters.from_env({**TINY_ENV, "DATA_PATH": data["dataset_dir"],
                                        "TOKENIZER_PATH": data["tokenizer_path"],
                                        "VOCAB_SIZE": str(sp.vocab_size()), **env})


def prepare(hp: tg.Hyperparameters) -> tuple[torch.Tensor, tg.ByteLuts, list[str]]:
    lines: list[str] = []
    val, luts = tg.prepare_validation(hp, CPU, lambda line, **_: lines.append(line))
    return val, luts, lines


def copy_data(data: dict, tmp_path: Path, *, manifest: bool = True) -> dict:
    target = tmp_path / "data"
    shutil.copytree(data["dataset_dir"], target)
    if not manifest:
        (target / "manifest.json").unlink()
    return {**data, "dataset_dir": str(target)}


def test_prepare_validation_takes_bytes_from_the_sidecar(caseops_data):
    val, luts, lines = prepare(hp_for(caseops_data, CASEOPS_ENABLED="1"))
    sidecar = tg.load_validation_byte_sidecar(caseops_data["dataset_dir"])
    assert luts.val_bytes is not None and np.array_equal(luts.val_bytes, sidecar)
    line = next(x for x in lines if x.startswith("val_loader:"))
    assert f"bytes:{int(sidecar.sum())} byte_source:sidecar caseops:1 byte_check:ok" in line


def test_rank_shares_of_the_byte_check_add_up(caseops_data, monkeypatch):
    """Each rank decodes and counts its share of the documents; the shares sum to the whole."""
    val, luts, _ = prepare(hp_for(caseops_data))
    sp = spm.SentencePieceProcessor(model_file=caseops_data["tokenizer_path"])
    whole = tg.validation_byte_totals(sp, val, luts, caseops=True)
    monkeypatch.setattr(tg, "all_reduce_sum", lambda t: t)  # each rank's own numbers
    shares = [tg.validation_byte_totals(sp, val, luts, r, 3, caseops=True) for r in range(3)]
    assert [sum(x) for x in zip(*shares)] == list(whole) and whole[0] == whole[1]
    assert all(decoded == counted > 0 for decoded, counted in shares)


def uniform_logits(vocab: int):
    return lambda x: torch.zeros(*x.shape, vocab)


@pytest.mark.parametrize("stride", [0, 16])
def test_flat_and_sliding_passes_count_sidecar_bytes(caseops_data, stride):
    val, luts, _ = prepare(hp_for(caseops_data))
    vocab = luts.base_bytes.numel()
    r = tg.evaluate(uniform_logits(vocab), val, luts, tg.EvalContext(tg.Runtime(0, 1, 0, torch.device("cpu"), False)),
                    seq_len=64, batch_seqs=4, stride=stride)
    assert r.num_bytes == int(luts.val_bytes[1:].astype(np.int64).sum())
    assert r.val_bpb == pytest.approx(math.log(vocab) * r.num_targets / (math.log(2) * r.num_bytes))


def test_document_rows_the_ttt_passes_use_count_sidecar_bytes(caseops_data):
    val, luts, _ = prepare(hp_for(caseops_data))
    ledger = tg.ScoreLedger(val, luts, torch.device("cpu"))
    docs = tg.document_spans(val)
    spans = [(a, min(a + 7, b)) for a, b in docs[:3]]
    x, _, x_at, y_at, mask = ledger.document_rows(spans, [a for a, _ in spans], rows=list(range(len(spans))),
                                                  num_rows=len(spans), width=7, chunk=7)
    ledger.commit(spans, torch.zeros(*x_at.shape, luts.base_bytes.numel()), x_at, y_at, mask)
    assert ledger.result().num_bytes == sum(int(luts.val_bytes[a + 1 : b + 1].sum()) for a, b in spans)
    with pytest.raises(tg.RunError, match="belongs to the validation stream"):
        tg.ScoreLedger(val[:-1], luts, torch.device("cpu"))


def test_caseops_tokenizer_without_sidecar_stops_the_run(caseops_data, tmp_path):
    data = copy_data(caseops_data, tmp_path)
    for f in Path(data["dataset_dir"]).glob("fineweb_val_bytes_*"):
        f.unlink()
    for flag in ("0", "1"):
        with pytest.raises(tg.RunError) as err:
            prepare(hp_for(data, CASEOPS_ENABLED=flag))
        assert "is a CaseOps tokenizer" in str(err.value) and "no byte sidecar" in str(err.value)
        assert "\n" not in str(err.value)


def test_caseops_enabled_needs_the_sidecar_and_the_operators(sample_dataset):
    with pytest.raises(tg.RunError, match="CASEOPS_ENABLED=1 but DATA_PATH=.* has no byte sidecar"):
        prepare(hp_for(sample_dataset, CASEOPS_ENABLED="1"))
    assert "CASEOPS_ENABLED" not in tg.PUBLIC_ONLY_KNOBS


def test_a_sidecar_of_piece_bytes_is_refused(caseops_data, tmp_path):
    """The trap of the issue: per-token bytes taken from the pieces (operators 3 bytes each)."""
    data = copy_data(caseops_data, tmp_path)
    d = Path(data["dataset_dir"])
    sp = spm.SentencePieceProcessor(model_file=data["tokenizer_path"])
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    for side in sorted(d.glob("fineweb_val_bytes_*")):
        tokens = torch.from_numpy(read_shard(str(side).replace("val_bytes_", "val_")).astype(np.int64))
        prev = torch.cat([tokens.new_tensor([tg.BOS_ID]), tokens[:-1]])
        write_shard(side, tg.target_bytes(prev, tokens, luts).numpy())
    with pytest.raises(tg.RunError, match="counts bytes for CaseOps operator tokens"):
        prepare(hp_for(data))


@pytest.mark.parametrize("damage, match", [
    ("drop_last", "holds .* byte counts but .* holds .* tokens"),
    ("remove_one", "does not pair with the validation shards"),
    ("plus_one", "the byte sidecar counts .* but the decoded"),
    ("bos", "gives BOS tokens a nonzero byte count"),
])
def test_a_damaged_sidecar_stops_the_run_with_one_line(caseops_data, tmp_path, damage, match):
    data = copy_data(caseops_data, tmp_path)
    sides = sorted(Path(data["dataset_dir"]).glob("fineweb_val_bytes_*"))
    counts = read_shard(sides[1]).astype(np.int64)
    if damage == "drop_last":
        write_shard(sides[1], counts[:-1])
    elif damage == "remove_one":
        sides[1].unlink()
    elif damage == "plus_one":
        counts[np.flatnonzero(counts)[-1]] += 1  # a text piece, not an operator
        write_shard(sides[1], counts)
    else:
        first = read_shard(sides[0]).astype(np.int64)
        first[0] = 1
        write_shard(sides[0], first)
    with pytest.raises(tg.RunError, match=match) as err:
        prepare(hp_for(data))
    assert "\n" not in str(err.value)


def test_a_foreign_raw_sidecar_within_the_whitespace_slack_is_scored_on_its_bytes(caseops_data, tmp_path):
    """The public sidecar counts the raw input (newlines and repeated spaces the normaliser collapsed):
    without our manifest a small excess is accepted and said; a deficit, or our own data, is refused."""
    for manifest, delta, ok in [(False, +3, True), (False, -3, False), (True, +3, False)]:
        data = copy_data(caseops_data, tmp_path / f"{manifest}{delta}", manifest=manifest)
        side = sorted(Path(data["dataset_dir"]).glob("fineweb_val_bytes_*"))[0]
        counts = read_shard(side).astype(np.int64)
        spaces = np.flatnonzero(counts >= 4)[:3]  # pieces long enough to lose a byte
        counts[spaces] += int(math.copysign(1, delta))
        write_shard(side, counts)
        if ok:
            _, luts, lines = prepare(hp_for(data))
            assert any("byte_check:raw_sidecar(+" in line for line in lines)
            assert any(line.startswith("byte_sidecar: counts") for line in lines)
            assert int(luts.val_bytes.astype(np.int64).sum()) == int(
                tg.load_validation_byte_sidecar(caseops_data["dataset_dir"]).astype(np.int64).sum()) + 3
        else:
            with pytest.raises(tg.RunError, match="the byte sidecar counts"):
                prepare(hp_for(data))


@pytest.mark.slow
def test_a_caseops_run_scores_every_pass_on_sidecar_bytes(caseops_data, tmp_path):
    """End to end: the pre-quantization, flat, sliding and LoRA TTT passes all count the sidecar's bytes.
    (EVAL_ONLY=1 builds its byte source with the same `prepare_validation`.)"""
    sidecar_bytes = int(tg.load_validation_byte_sidecar(caseops_data["dataset_dir"])[1:].astype(np.int64).sum())
    env = dict(ITERATIONS="2", TRAIN_BATCH_TOKENS="2048", VAL_BATCH_SIZE="4096", TRAIN_SEQ_LEN="64",
               EVAL_STRIDE="48", TTT_ENABLED="1", TTT_MODE="lora", TTT_CHUNK_SIZE="64", TTT_BATCH_SIZE="32",
               CASEOPS_ENABLED="1", ARTIFACT_DIR=str(tmp_path), RUN_ID="caseops")
    out = tg.run(hp_for(caseops_data, **env), CPU)
    assert set(out["evals"]) >= {"roundtrip", "sliding", "ttt"}
    for name, result in [("pre_quant", out["pre_quant"])] + list(out["evals"].items()):
        assert result.num_bytes == sidecar_bytes, name
    log = Path(out["log_path"]).read_text()
    assert f"bytes:{sidecar_bytes} byte_source:sidecar caseops:1 byte_check:ok" in log
    data = json.loads((Path(out["run_dir"]) / "manifest.json").read_text())["data"]  # the run records its byte source
    sides = sorted(Path(caseops_data["dataset_dir"]).glob("fineweb_val_bytes_*.bin"))
    assert data["val_byte_sidecars"] == len(sides) > 1
    assert all(data["shard_sha256"][p.name] == hashlib.sha256(p.read_bytes()).hexdigest() for p in sides)
