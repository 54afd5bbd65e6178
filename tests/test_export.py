"""The exporter (data/export_shards.py) and the sample dataset (data/prepare_sample.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data import export_shards  # noqa: E402
from data.export_shards import ExportError, check_disjoint, export_dataset  # noqa: E402
from data.prepare_sample import load_sample_docs, prepare_sample, split_sample  # noqa: E402
from data.shards import read_shard, read_shard_header  # noqa: E402

SMALL_DOCS = 2000
SMALL_SHARD_TOKENS = 10_000  # small enough for several shards per split and docs straddling them


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_files(manifest: dict) -> dict[str, Path]:
    """Every file an export wrote, keyed by a name that is the same across output folders."""
    dataset_dir, model = Path(manifest["dataset_dir"]), Path(manifest["tokenizer_path"])
    files = {"manifest.json": dataset_dir / "manifest.json", "model": model, "vocab": model.with_suffix(".vocab")}
    files.update({p.name: p for p in dataset_dir.glob("fineweb_*.bin")})
    return files


def split_stream(manifest: dict, split: str) -> np.ndarray:
    dataset_dir = Path(manifest["dataset_dir"])
    return np.concatenate([read_shard(dataset_dir / s["file"]) for s in manifest["splits"][split]["shards"]])


def normalized(sp: spm.SentencePieceProcessor, doc: str) -> str:
    """What decoding a document's tokens must give back: its text after SentencePiece normalisation."""
    return sp.normalize(doc).replace("\u2581", " ")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("small")
    return prepare_sample(
        max_docs=SMALL_DOCS,
        shard_tokens=SMALL_SHARD_TOKENS,
        datasets_root=root / "datasets",
        tokenizers_root=root / "tokenizers",
    )


@pytest.fixture(scope="module")
def small_sp(small) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=small["tokenizer_path"])


@pytest.fixture(scope="module")
def small_split() -> tuple[list[str], list[str]]:
    train, val, _ = split_sample(load_sample_docs(SMALL_DOCS))
    return train, val


def test_manifest_matches_files(small, small_split):
    train, val = small_split
    dataset_dir = Path(small["dataset_dir"])
    manifest_text = (dataset_dir / "manifest.json").read_text()
    stored = json.loads(manifest_text)
    assert {**stored, "dataset_dir": small["dataset_dir"], "tokenizer_path": small["tokenizer_path"]} == small
    assert "dataset_dir" not in stored and "tokenizer_path" not in stored
    assert str(dataset_dir.parent) not in manifest_text  # no absolute paths in the file

    tok = stored["tokenizer"]
    model = Path(small["tokenizer_path"])
    assert model.name == tok["model_file"] == "sample_1024_bpe.model"
    assert sha256(model) == tok["model_sha256"]
    assert sha256(model.with_suffix(".vocab")) == tok["vocab_sha256"]
    assert stored["vocab_size"] == 1024 and tok["pieces"] == 1024

    assert stored["splits"]["val"]["docs"] == len(val)
    assert stored["splits"]["train"]["docs"] == len(train)
    assert stored["splits"]["val"]["docs_sha256"] == export_shards.docs_sha256(val)
    assert stored["splits"]["train"]["docs_sha256"] == export_shards.docs_sha256(train)
    listed = set()
    for split in ("val", "train"):
        rec = stored["splits"][split]
        assert rec["shards"], split
        for i, shard in enumerate(rec["shards"]):
            assert shard["file"] == f"fineweb_{split}_{i:06d}.bin"
            path = dataset_dir / shard["file"]
            assert sha256(path) == shard["sha256"]
            assert read_shard_header(path) == shard["tokens"]
            listed.add(shard["file"])
        assert sum(s["tokens"] for s in rec["shards"]) == rec["tokens"]
    assert {p.name for p in dataset_dir.glob("*.bin")} == listed
    assert stored["train_val_shared_docs"] == 0
    assert stored["extra"]["split_check"]["passed"] is True
    assert stored["extra"]["split_check"]["shared_docs"] == 0


def test_shard_streams_are_bos_docs_that_decode_to_the_texts(small, small_sp, small_split):
    train, val = small_split
    for split, docs in (("val", val), ("train", train)):
        shards = small["splits"][split]["shards"]
        sizes = [s["tokens"] for s in shards]
        assert all(n == SMALL_SHARD_TOKENS for n in sizes[:-1]) and 0 < sizes[-1] <= SMALL_SHARD_TOKENS
        stream = split_stream(small, split)
        assert stream.max() < small["vocab_size"]
        starts = np.flatnonzero(stream == 1)
        assert starts[0] == 0 and len(starts) == len(docs)  # BOS opens every doc and appears nowhere else
        pieces = np.split(stream, starts[1:])
        for doc, tokens in zip(docs, pieces):
            assert small_sp.decode(tokens[1:].tolist()) == normalized(small_sp, doc)
    # With 10k-token shards some document must straddle a shard boundary in the train split.
    first_tokens = [read_shard(Path(small["dataset_dir"]) / s["file"])[0] for s in small["splits"]["train"]["shards"]]
    assert any(t != 1 for t in first_tokens[1:])


def test_sample_split_is_disjoint_by_text_and_about_5_percent():
    docs = load_sample_docs()
    assert len(docs) > 10_000
    train, val, check = split_sample(docs)
    assert len(train) + len(val) == len(docs)
    assert 0.04 < len(val) / len(docs) < 0.06
    assert not {export_shards.doc_sha256(d) for d in train} & {export_shards.doc_sha256(d) for d in val}
    assert check["passed"] and check["shared_docs"] == 0
    # Membership depends on the text only: a corpus prefix splits like the whole corpus does.
    prefix_val = split_sample(docs[:SMALL_DOCS])[1]
    val_set = set(val)
    assert prefix_val == [d for d in docs[:SMALL_DOCS] if d in val_set]


def test_check_disjoint_catches_shared_text():
    with pytest.raises(ExportError, match="1 document text"):
        check_disjoint(["a", "b", "c"], ["x", "b"])
    assert export_shards.count_shared_docs(["a", "b"], ["b", "b", "c"]) == 1


def test_two_exports_are_byte_identical(small, tmp_path):
    again = prepare_sample(
        max_docs=SMALL_DOCS,
        shard_tokens=SMALL_SHARD_TOKENS,
        datasets_root=tmp_path / "datasets",
        tokenizers_root=tmp_path / "tokenizers",
    )
    first, second = output_files(small), output_files(again)
    assert first.keys() == second.keys()
    for name, path in first.items():
        assert path.read_bytes() == second[name].read_bytes(), name


def test_rerun_is_a_noop(small, caplog):
    files = output_files(small)
    stamps = {name: os.stat(path).st_mtime_ns for name, path in files.items()}
    with caplog.at_level(logging.INFO, logger="export_shards"):
        again = prepare_sample(
            max_docs=SMALL_DOCS,
            shard_tokens=SMALL_SHARD_TOKENS,
            datasets_root=Path(small["dataset_dir"]).parent,
            tokenizers_root=Path(small["tokenizer_path"]).parent,
        )
    assert again == small
    assert "up to date" in caplog.text
    assert {name: os.stat(path).st_mtime_ns for name, path in output_files(again).items()} == stamps


def test_changed_input_or_damaged_shard_triggers_rebuild(small_split, tmp_path):
    train, val = small_split
    kwargs = dict(
        datasets_root=tmp_path / "d", tokenizers_root=tmp_path / "t", dataset_name="x", tokenizer_name="x_bpe",
        vocab_size=1024, shard_tokens=5_000,
    )
    big = export_dataset(train[:400], val[:20], **kwargs)
    small_export = export_dataset(train[:100], val[:20], **kwargs)
    assert small_export["inputs_sha256"] != big["inputs_sha256"]
    assert small_export["splits"]["train"]["docs"] == 100
    assert len(small_export["splits"]["train"]["shards"]) < len(big["splits"]["train"]["shards"])
    dataset_dir = Path(small_export["dataset_dir"])
    listed = {s["file"] for split in ("val", "train") for s in small_export["splits"][split]["shards"]}
    assert {p.name for p in dataset_dir.glob("*.bin")} == listed  # stale shards of the bigger export are gone

    shard = dataset_dir / small_export["splits"]["train"]["shards"][0]["file"]
    good = shard.read_bytes()
    shard.write_bytes(good[:-2] + bytes([good[-2] ^ 1, good[-1]]))  # flip one bit of the last token
    repaired = export_dataset(train[:100], val[:20], **kwargs)
    assert shard.read_bytes() == good
    assert repaired == small_export


def test_space_piece_is_standalone(small_sp):
    space = small_sp.piece_to_id("\u2581")
    assert space != small_sp.unk_id()
    assert small_sp.id_to_piece(space) == "\u2581"
    # Where "▁" is not merged into a neighbour it is one token, not 3 byte-fallback tokens.
    assert "<0xE2>" not in small_sp.encode("1 2", out_type=str)


def test_space_piece_added_even_for_a_corpus_without_spaces(tmp_path):
    rng = random.Random(0)
    docs = ["".join(rng.choice("abcdefghij") for _ in range(200)) for _ in range(200)]
    out = export_dataset(
        docs[20:], docs[:20], datasets_root=tmp_path / "d", tokenizers_root=tmp_path / "t",
        dataset_name="nospace", tokenizer_name="nospace_bpe", vocab_size=400,
    )
    sp = spm.SentencePieceProcessor(model_file=out["tokenizer_path"])
    assert sp.encode("ab cd", out_type=str) == ["ab", "\u2581", "cd"]


def test_reused_tokenizer_gives_the_same_shards(small, small_split, tmp_path):
    train, val = small_split
    out = export_dataset(
        train, val, datasets_root=tmp_path / "d", tokenizers_root=tmp_path / "t", dataset_name="reuse",
        tokenizer_name="reuse_bpe", vocab_size=1024, shard_tokens=SMALL_SHARD_TOKENS,
        reuse_tokenizer=small["tokenizer_path"],
    )
    assert out["tokenizer"]["source"] == "reused"
    assert Path(out["tokenizer_path"]).read_bytes() == Path(small["tokenizer_path"]).read_bytes()
    assert out["splits"] == small["splits"]
    with pytest.raises(ExportError, match="more than vocab size 512"):
        export_dataset(
            train, val, datasets_root=tmp_path / "d", tokenizers_root=tmp_path / "t", dataset_name="reuse2",
            tokenizer_name="reuse2_bpe", vocab_size=512, reuse_tokenizer=small["tokenizer_path"],
        )


def test_vocab_4096(small, tmp_path):
    out = prepare_sample(vocab_size=4096, max_docs=SMALL_DOCS, datasets_root=tmp_path / "d", tokenizers_root=tmp_path / "t")
    assert out["dataset_name"] == "sample_sp4096"
    assert Path(out["tokenizer_path"]).name == "sample_4096_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=out["tokenizer_path"])
    assert sp.get_piece_size() == out["tokenizer"]["pieces"] == 4096
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    stream = np.concatenate([split_stream(out, "val"), split_stream(out, "train")])
    assert stream.max() < 4096 and stream.max() >= 1024  # the larger vocabulary is actually used
    # Same documents, bigger vocabulary: fewer tokens.
    for split in ("val", "train"):
        assert out["splits"][split]["docs"] == small["splits"][split]["docs"]
        assert out["splits"][split]["tokens"] < small["splits"][split]["tokens"]


def run_script(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    docs = load_sample_docs(300)
    files = {
        "text": root / "docs.txt",
        "empty": root / "empty.txt",
        "badjson": root / "bad.jsonl",
        "badxz": root / "bad.txt.xz",
    }
    files["text"].write_text("\n\n".join(docs) + "\n")
    files["empty"].write_text("\n\n   \n\x00\n\n")
    files["badjson"].write_text('{"text": "fine"}\n{"text": oops}\n')
    files["badxz"].write_bytes(b"not xz at all")
    return files


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "{missing}", "--val-docs", "5"], "not found"),
        (["--input", "{empty}", "--val-docs", "5"], "no non-empty documents"),
        (["--input", "{text}", "--val-docs", "5", "--vocab-size", "100"], "vocab size 100 is out of range"),
        (["--input", "{text}", "--val-docs", "5", "--vocab-size", "262"], "too small for this corpus: it needs at least"),
        (["--input", "{text}", "--val-docs", "5", "--val-fraction", "0.05"], "exactly one of"),
        (["--input", "{text}"], "exactly one of"),
        (["--input", "{text}", "--val-docs", "300"], "leaves no training docs"),
        (["--input", "{text}", "--val-fraction", "1.5"], "val fraction must be in"),
        (["--input", "{badjson}", "--val-docs", "1"], "line 2 is not valid JSON"),
        (["--input", "{badxz}", "--val-docs", "1"], "not a valid .xz file"),
        (["--input", "{text}", "--val-docs", "5", "--reuse-tokenizer", "{text}"], "not a SentencePiece model"),
        (["--input", "{text}", "--val-docs", "five"], "expected an integer >= 1, got 'five'"),
    ],
    ids=["missing", "empty", "vocab-100", "vocab-262", "both-val", "no-val", "all-val", "fraction", "jsonl", "xz",
         "reuse-bad", "not-int"],
)
def test_cli_errors_are_one_line_exit_2(cli_inputs, tmp_path, args, message):
    paths = {**{k: str(v) for k, v in cli_inputs.items()}, "missing": str(tmp_path / "nope.txt")}
    args = [a.format(**paths) for a in args]
    out = run_script("data/export_shards.py", *args, "--datasets-root", str(tmp_path / "d"),
                     "--tokenizers-root", str(tmp_path / "t"))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("manifest.json"))


def test_jsonl_and_xz_text_inputs_give_the_same_dataset(tmp_path):
    docs = load_sample_docs(300)
    text_xz = tmp_path / "docs.txt.xz"
    with lzma.open(text_xz, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(docs))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    common = ["--val-docs", "20", "--datasets-root", str(tmp_path / "d"), "--tokenizers-root", str(tmp_path / "t")]
    assert export_shards.main(["--input", str(text_xz), "--dataset-name", "a", "--tokenizer-name", "a_bpe", *common]) == 0
    assert export_shards.main(["--input", str(jsonl), "--dataset-name", "b", "--tokenizer-name", "b_bpe", *common]) == 0
    a = json.loads((tmp_path / "d" / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "d" / "b" / "manifest.json").read_text())
    assert b["extra"]["sources"][0]["format"] == "jsonl" and a["extra"]["sources"][0]["format"] == "text"
    assert a["splits"] == b["splits"]
    assert a["tokenizer"]["model_sha256"] == b["tokenizer"]["model_sha256"]
    assert (b["splits"]["val"]["docs"], b["splits"]["train"]["docs"]) == (20, 280)
    # The public convention: the first N documents are validation, in order.
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t" / "b_bpe.model"))
    val = read_shard(tmp_path / "d" / "b" / "fineweb_val_000000.bin")
    first_doc = val[1 : np.flatnonzero(val == 1)[1]]
    assert sp.decode(first_doc.tolist()) == normalized(sp, docs[0])


def test_prepare_sample_runs_as_a_script(tmp_path):
    out = run_script("data/prepare_sample.py", "--max-docs", "300", "--datasets-root", str(tmp_path / "d"),
                     "--tokenizers-root", str(tmp_path / "t"))
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "d" / "sample_sp1024") in out.stdout
    manifest = json.loads((tmp_path / "d" / "sample_sp1024" / "manifest.json").read_text())
    assert manifest["extra"]["max_docs"] == 300
    assert manifest["splits"]["val"]["docs"] + manifest["splits"]["train"]["docs"] == 300


# ---- long documents ------------------------------------------------------------------------------


def long_documents(num_docs: int = 24) -> list[str]:
    """Documents like whole speeches: 5-60 KB each, built from consecutive sample articles (one per
    line), and one 20 KB document with no line break at all."""
    articles = load_sample_docs(3000)
    docs, start = [], 0
    for i in range(num_docs):
        count = 16 + (i * 37) % 140
        docs.append("\n".join(articles[start : start + count]))
        start += count
    docs.append(" ".join(articles[start : start + 40])[:20_000])
    return docs


def test_tokenizer_training_pieces_cover_the_document_and_respect_the_limit():
    doc = "première ligne\n" + "mot " * 3000 + "é" * 5000  # lines, spaces, then 2-byte chars with no break
    pieces = export_shards.tokenizer_training_pieces(doc, max_bytes=1000)
    assert "".join(pieces) == doc  # nothing lost, nothing added
    assert all(len(p.encode("utf-8")) <= 1000 for p in pieces)
    assert pieces[0] == "première ligne\n"  # a line break is the preferred cut
    assert pieces[1].endswith("mot") and pieces[2].startswith(" mot")  # else before a space
    assert set(pieces[-2]) == {"é"}  # else at a character boundary, never inside a character
    assert export_shards.tokenizer_training_pieces("short") == ["short"]


def test_long_documents_export_and_the_tokenizer_sees_every_byte(tmp_path):
    docs = long_documents()
    assert min(len(d.encode()) for d in docs) > 5000 and max(len(d.encode()) for d in docs) > 50_000
    train, val = docs[3:], docs[:3]
    out = export_dataset(train, val, datasets_root=tmp_path / "d", tokenizers_root=tmp_path / "t",
                         dataset_name="speeches", tokenizer_name="speeches_bpe", vocab_size=512)
    saw = out["tokenizer"]["trainer_saw"]
    assert saw["docs"] == len(train) and saw["bytes"] == sum(len(d.encode("utf-8")) for d in train)
    assert saw["pieces"] > 4 * len(train)  # long documents were cut into pieces for the trainer
    stored = json.loads((Path(out["dataset_dir"]) / "manifest.json").read_text())
    assert stored["tokenizer"]["trainer_saw"] == saw
    # The shards keep whole documents: each BOS-delimited run decodes to one full document.
    sp = spm.SentencePieceProcessor(model_file=out["tokenizer_path"])
    stream = split_stream(out, "train")
    bos = np.flatnonzero(stream == 1).tolist() + [len(stream)]
    decoded = [sp.decode(stream[a + 1 : b].tolist()) for a, b in zip(bos, bos[1:])]
    assert decoded == [normalized(sp, d) for d in train]


def test_tokenizer_trainer_failure_is_one_line_naming_the_cause(tmp_path, monkeypatch):
    monkeypatch.setattr(export_shards, "TOKENIZER_PIECE_MAX_BYTES", 10**7)  # no cutting: the trainer drops all
    docs = long_documents(6)
    with pytest.raises(ExportError) as err:
        export_dataset(docs[1:], docs[:1], datasets_root=tmp_path / "d", tokenizers_root=tmp_path / "t",
                       dataset_name="speeches", tokenizer_name="speeches_bpe", vocab_size=512)
    message = str(err.value)
    assert "\n" not in message and "kept no sentence out of 6 pieces of 6 train docs" in message
