"""Export text documents as a SentencePiece tokenizer plus token shards and a manifest.

This is the one export path of the repo: `data/prepare_sample.py` calls `export_dataset` for the
embedded sample corpus, and the command line below does the same for any text or JSONL corpus.

What it produces, for a dataset `<name>` and tokenizer `<tok>`:

    <tokenizers_root>/<tok>.model, <tok>.vocab        SentencePiece BPE, trained on train docs only
    <datasets_root>/<name>/fineweb_val_000000.bin ...  validation shards (see data/shards.py)
    <datasets_root>/<name>/fineweb_train_000000.bin .. training shards
    <datasets_root>/<name>/manifest.json               counts, sha256 of every file, settings
    <datasets_root>/<name>/fineweb_val_bytes_000000.bin  with --caseops: the validation byte sidecar

It follows the public exporter's conventions: documents are cleaned (NUL -> space, strip, drop
empty ones); each becomes [BOS=1] + sp.encode(doc) with no EOS; the token stream of each split is
cut into shards of at most `shard_tokens` tokens (a document may straddle two shards); validation
and training never share a shard. The tokenizer uses the public trainer settings plus three that
make it deterministic and safe for bits-per-byte accounting (see `TRAINER_SETTINGS`).

With `--caseops` the documents are first case-transformed (data/caseops.py: capitals become lowercase
letters plus operator characters), the tokenizer is trained on the transformed text with the operator
characters as user-defined symbols (each always its own piece), and beside each validation shard a
byte sidecar `fineweb_val_bytes_NNNNNN.bin` (the same format, one uint16 per token) holds the UTF-8
bytes of the original text each token stands for: BOS and the operators the transform added 0, an
escaped literal operator 3, any other piece its decoded bytes (a lowercased letter is 1, like the
capital it replaced). Per document they sum to the original text's length as the tokenizer's
normaliser leaves it, the bytes the plain tables count for plain tokens, so CaseOps and plain scores
compare. The manifest records the transform and the sidecar.

Outputs are deterministic (two exports of the same inputs are byte-identical, the manifest holds no
paths or times) and the export is idempotent: when the manifest's input hash matches and every
listed file still has its recorded sha256, nothing is rewritten.

Command line (run from the repo root):

    python data/export_shards.py --input docs.jsonl.xz --val-docs 50000 --vocab-size 4096
    python data/export_shards.py --input corpus.txt --val-fraction 0.05 --dataset-name mine_sp1024
    python data/export_shards.py --input docs.jsonl.xz --val-docs 50000 --vocab-size 8192 --caseops
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import lzma
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

if __package__ in (None, ""):  # run as `python data/export_shards.py`: make the `data` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import sentencepiece as spm

from data import caseops
from data.cli import OneLineArgumentParser, int_at_least
from data.shards import BOS_ID, MAX_TOKENS_PER_SHARD, encode_shard, file_sha256, write_atomic

log = logging.getLogger("export_shards")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASETS_ROOT = REPO_ROOT / "data" / "datasets"
DEFAULT_TOKENIZERS_ROOT = REPO_ROOT / "data" / "tokenizers"
MANIFEST_NAME = "manifest.json"
SPLITS = ("val", "train")  # val first, as in the public export
EXPORTER_VERSION = 2  # bump when a code change alters the output for the same inputs (2: long docs reach the trainer)

SPACE_PIECE = "\u2581"  # "▁", SentencePiece's whitespace marker
MIN_VOCAB_SIZE = 4 + 256 + 1  # pad/bos/eos/unk, 256 byte-fallback pieces, "▁"
MAX_VOCAB_SIZE = 2**16  # ids are stored as uint16

# The public exporter's SentencePiece settings, then ours. The additions do not change the learned
# pieces on real text (checked on the sample corpus at 1024/4096/8192) but pin down the result:
# - input_sentence_size=0 and shuffle_input_sentence=False: use every train doc, in order (no sampling);
# - num_threads=8: a fixed value, because the thread count is stored inside the .model file;
# - required_chars="▁": a standalone "▁" piece even if the corpus rarely has spaces. Without it "▁"
#   falls back to 3 byte pieces and bits-per-byte is miscounted (openai/parameter-golf issue #897).
TRAINER_SETTINGS: dict = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "hard_vocab_limit": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "num_threads": 8,
    "required_chars": SPACE_PIECE,
}
assert TRAINER_SETTINGS["bos_id"] == BOS_ID

# Below SentencePiece's default max_sentence_length (4192 bytes), so the trainer drops nothing.
TOKENIZER_PIECE_MAX_BYTES = 4096
SHARD_NAME = "fineweb_{split}_{index:06d}.bin"
SIDECAR_NAME = "fineweb_val_bytes_{index:06d}.bin"  # the public CaseOps sidecar's name
CASEOPS_SUFFIX = "lossless_caps_caseops_v1_reserved"  # default name suffix, as the public variant's
SHARD_PATTERN = re.compile(r"^fineweb_(val|train|val_bytes)_\d{6}\.bin$")  # shards and sidecars
SIDECAR_RULE = ("uint16 per validation token, aligned with fineweb_val_*.bin: UTF-8 bytes of the original text it "
                "stands for; BOS and added operators 0, an escaped operator 3, else the piece's decoded bytes")
DOCS_SHA256_RULE = "sha256 over the split's cleaned docs in order, each as UTF-8 bytes followed by one NUL byte"
VAL_HASH_RULE = "int.from_bytes(sha256(utf8(doc)).digest()[:8], 'big') % 10000 < round(fraction * 10000)"
ENCODE_BATCH_DOCS = 4096


class ExportError(ValueError):
    """Bad input or settings; the message names the cause and the fix on one line."""


# ------------------------------------------------------------------------------------------------
# Documents: cleaning, hashing, splitting, reading files


def clean_doc(text: str) -> str:
    """The public exporter's cleaning: NUL -> space, then strip."""
    return text.replace("\x00", " ").strip()


def clean_docs(docs: Iterable[str]) -> list[str]:
    """Clean every document and drop the ones left empty; order is kept."""
    return [doc for doc in map(clean_doc, docs) if doc]


def doc_sha256(doc: str) -> str:
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


def docs_sha256(docs: Iterable[str]) -> str:
    """Content hash of a split (see DOCS_SHA256_RULE); cleaned docs cannot contain NUL."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def hash_bucket(doc: str) -> int:
    """A document's bucket in [0, 10000), from its text only (see VAL_HASH_RULE)."""
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") % 10_000


def split_by_hash(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Return (train, val): a doc is val iff its text hash bucket is below val_fraction * 10000.

    Membership depends only on the text, so identical texts always land in the same split and a
    prefix of the corpus splits the same way as the whole corpus.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ExportError(f"val fraction must be in (0, 1), got {val_fraction}; pass e.g. --val-fraction 0.05")
    threshold = round(val_fraction * 10_000)
    train, val = [], []
    for doc in docs:
        (val if hash_bucket(doc) < threshold else train).append(doc)
    return train, val


def split_first_n(docs: Sequence[str], num_val_docs: int) -> tuple[list[str], list[str]]:
    """Return (train, val) with the first `num_val_docs` docs as val (the public FineWeb convention)."""
    if num_val_docs < 1:
        raise ExportError(f"--val-docs must be at least 1, got {num_val_docs}")
    if num_val_docs >= len(docs):
        raise ExportError(
            f"--val-docs {num_val_docs} leaves no training docs out of {len(docs)}; pass a smaller --val-docs"
        )
    return list(docs[num_val_docs:]), list(docs[:num_val_docs])


def count_shared_docs(train_docs: Iterable[str], val_docs: Iterable[str]) -> int:
    """How many distinct document texts (by sha256) occur in both splits."""
    train_hashes = {doc_sha256(d) for d in train_docs}
    return len({doc_sha256(d) for d in val_docs} & train_hashes)


def check_disjoint(train_docs: Sequence[str], val_docs: Sequence[str]) -> dict:
    """Check that no document text occurs in both splits; return a record for the manifest.

    Raises ExportError naming the number of shared texts otherwise.
    """
    train_hashes = {doc_sha256(d) for d in train_docs}
    val_hashes = {doc_sha256(d) for d in val_docs}
    shared = len(train_hashes & val_hashes)
    if shared:
        raise ExportError(
            f"{shared} document text(s) occur in both train and val; the split leaks validation data, "
            "split by document text hash instead"
        )
    return {
        "method": "sha256 of each cleaned doc text, train set intersected with val set",
        "shared_docs": 0,
        "train_unique_docs": len(train_hashes),
        "val_unique_docs": len(val_hashes),
        "passed": True,
    }


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_text_documents(path: str | Path) -> list[str]:
    """Documents of a text file (optionally .xz): blocks separated by one or more blank lines."""
    with _open_text(Path(path)) as f:
        text = f.read()
    return re.split(r"\n\s*\n", text)


def read_jsonl_documents(path: str | Path) -> list[str]:
    """Documents of a JSONL file (optionally .xz): the "text" field of one JSON object per line."""
    path = Path(path)
    docs = []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ExportError(f"{path.name} line {line_no} is not valid JSON ({e.msg}); fix or drop that line")
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ExportError(
                    f'{path.name} line {line_no} has no string "text" field; each line must be {{"text": "..."}}'
                )
            docs.append(obj["text"])
    return docs


def guess_input_format(path: str | Path) -> str:
    name = Path(path).name.lower().removesuffix(".xz")
    return "jsonl" if name.endswith((".jsonl", ".ndjson")) else "text"


def read_documents(path: str | Path, input_format: str = "auto") -> list[str]:
    """Raw (uncleaned) documents of one input file; input_format is "text", "jsonl" or "auto"."""
    if input_format == "auto":
        input_format = guess_input_format(path)
    if input_format == "text":
        return read_text_documents(path)
    if input_format == "jsonl":
        return read_jsonl_documents(path)
    raise ExportError(f"unknown input format {input_format!r}; use text or jsonl")


# ------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_training_pieces(doc: str, max_bytes: int | None = None) -> list[str]:
    """`doc` cut into pieces of at most `max_bytes` UTF-8 bytes, for tokenizer training only.

    SentencePiece's trainer silently drops every "sentence" longer than its max_sentence_length (4192
    bytes by default), so long documents (speeches, long web pages) would never reach it. Pieces end
    at line breaks where possible, else before a space, else at a character boundary; nothing is lost
    (the pieces concatenate back to `doc`). The shards always keep whole documents.
    """
    max_bytes = max_bytes or TOKENIZER_PIECE_MAX_BYTES
    if len(doc.encode("utf-8")) <= max_bytes:
        return [doc]
    pieces: list[str] = []
    rest = doc
    while len(rest.encode("utf-8")) > max_bytes:
        head = rest.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")  # whole characters only
        newline = head.rfind("\n")
        cut = newline + 1 if newline >= 0 else head.rfind(" ")  # a space starts the next piece
        cut = cut if cut > 0 else len(head)
        pieces.append(rest[:cut])
        rest = rest[cut:]
    return pieces + ([rest] if rest else [])


def train_tokenizer(train_docs: Sequence[str], vocab_size: int, user_symbols: Sequence[str] = ()) -> tuple[bytes, dict]:
    """Train a SentencePiece BPE model on every `train_docs` byte, in memory; `user_symbols` are always
    pieces of their own (the CaseOps operators).

    Returns the serialized .model bytes and what the trainer saw (documents, pieces, bytes)."""
    pieces = [piece for doc in train_docs for piece in tokenizer_training_pieces(doc)]
    seen = {"docs": len(train_docs), "pieces": len(pieces),
            "bytes": sum(len(piece.encode("utf-8")) for piece in pieces),
            "max_piece_bytes": TOKENIZER_PIECE_MAX_BYTES}
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(pieces),
            model_writer=model,
            vocab_size=vocab_size,
            minloglevel=2,
            **TRAINER_SETTINGS,
            **({"user_defined_symbols": list(user_symbols)} if user_symbols else {}),
        )
    except RuntimeError as e:
        message = " ".join(str(e).split())
        too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        if too_small:
            raise ExportError(
                f"vocab size {vocab_size} is too small for this corpus: it needs at least {too_small.group(2)} "
                f"pieces (special, byte and character pieces); pass a larger vocab size"
            ) from None
        if "sentences_.empty()" in message:
            raise ExportError(
                f"the tokenizer trainer kept no sentence out of {seen['pieces']} pieces of {seen['docs']} train docs "
                f"(each piece is at most {TOKENIZER_PIECE_MAX_BYTES} bytes); check the input text ({message})"
            ) from None
        raise ExportError(f"SentencePiece training failed: {message}") from None
    return model.getvalue(), seen


def vocab_file_text(sp: spm.SentencePieceProcessor) -> str:
    """The .vocab file SentencePiece itself writes: "piece<TAB>score" per id."""
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


def check_tokenizer(sp: spm.SentencePieceProcessor, vocab_size: int, what: str, case_ops: bool = False) -> None:
    """Fail with a clear message unless the model fits the shard conventions and BPB accounting (and, for
    CaseOps, has every operator as a piece of its own)."""
    if case_ops:
        missing = [f"U+{ord(c):04X}" for c in caseops.TOKENIZER_SYMBOLS if sp.id_to_piece(sp.piece_to_id(c)) != c]
        if missing:
            raise ExportError(f"{what} lacks the CaseOps operator pieces {', '.join(missing)}; train it with --caseops "
                              "(they are user-defined symbols) instead of reusing a plain tokenizer")
    if sp.bos_id() != BOS_ID:
        raise ExportError(f"{what} has bos_id {sp.bos_id()}, shards need BOS={BOS_ID}; retrain it with bos_id=1")
    if sp.get_piece_size() > vocab_size:
        raise ExportError(
            f"{what} has {sp.get_piece_size()} pieces, more than vocab size {vocab_size}; "
            f"pass vocab size {sp.get_piece_size()}"
        )
    space_id = sp.piece_to_id(SPACE_PIECE)
    if space_id == sp.unk_id() or sp.id_to_piece(space_id) != SPACE_PIECE:
        raise ExportError(
            f"{what} has no standalone '{SPACE_PIECE}' piece, so a space would cost 3 byte-fallback tokens and "
            f"bits-per-byte would be miscounted; retrain it with required_chars={SPACE_PIECE}"
        )


# ------------------------------------------------------------------------------------------------
# Shards


def original_byte_counts(sp: spm.SentencePieceProcessor, stream: np.ndarray) -> np.ndarray:
    """The sidecar values of a CaseOps stream of whole [BOS]+tokens documents (see SIDECAR_RULE): what
    train_gpt.py's byte tables count for each target, except that the operators the transform added count 0."""
    n = sp.get_piece_size()
    base, space, boundary = np.zeros(n, np.int64), np.zeros(n, bool), np.ones(n, bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        piece = sp.id_to_piece(i)
        boundary[i], space[i] = False, piece.startswith(SPACE_PIECE) and not sp.is_byte(i)
        base[i] = 1 if sp.is_byte(i) else len(piece.removeprefix(SPACE_PIECE).encode("utf-8"))
    prev = np.concatenate([[BOS_ID], stream[:-1]])
    counts = base[stream] + (space[stream] & ~boundary[prev])
    operator_ids = {sp.piece_to_id(c): c for c in caseops.OPERATORS}
    escaping = -2  # position of the last ESC that escapes the token after it
    for pos in np.flatnonzero(np.isin(stream, list(operator_ids))).tolist():
        if pos == escaping + 1:
            continue  # a literal operator of the original text: its 3 bytes stay
        counts[pos] = 0
        if operator_ids[int(stream[pos])] == caseops.ESC:
            escaping = pos
    return counts


def _write_split_shards(
    sp: spm.SentencePieceProcessor,
    docs: Sequence[str],
    split: str,
    dataset_dir: Path,
    shard_tokens: int,
    vocab_size: int,
    sidecar: list[dict] | None = None,
) -> tuple[list[dict], int]:
    """Encode `docs` as one [BOS]+tokens stream, write it as shards; return (shard records, token count).
    With `sidecar` (a list to fill), each shard also gets its byte sidecar (`original_byte_counts`)."""
    shards: list[dict] = []
    pending: list[np.ndarray] = []
    pending_counts: list[np.ndarray] = []  # the sidecar values of the pending tokens, in step with them
    pending_tokens = 0
    total = 0

    def flush(tokens: np.ndarray, counts: np.ndarray) -> None:
        name = SHARD_NAME.format(split=split, index=len(shards))
        if sidecar is not None:
            side_name, side_payload = SIDECAR_NAME.format(index=len(shards)), encode_shard(counts)
            write_atomic(dataset_dir / side_name, side_payload)
            sidecar.append({"file": side_name, "tokens": int(tokens.size), "bytes": int(counts.sum()),
                            "sha256": hashlib.sha256(side_payload).hexdigest()})
        payload = encode_shard(tokens)
        write_atomic(dataset_dir / name, payload)
        shards.append({"file": name, "tokens": int(tokens.size), "sha256": hashlib.sha256(payload).hexdigest()})
        log.info("wrote %s (%d tokens)", name, tokens.size)

    for start in range(0, len(docs), ENCODE_BATCH_DOCS):
        encoded = sp.encode(list(docs[start : start + ENCODE_BATCH_DOCS]), out_type=int, num_threads=-1)
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
        stream = np.empty(int(lengths.sum()), dtype=np.int32)
        pos = 0
        for ids, n in zip(encoded, lengths.tolist()):
            stream[pos] = BOS_ID
            stream[pos + 1 : pos + n] = ids
            pos += n
        if stream.size and (stream.min() < 0 or stream.max() >= vocab_size):
            raise ExportError(f"token id {int(stream.max())} is outside vocab size {vocab_size}; pass a larger vocab size")
        pending.append(stream)
        # A batch starts at a BOS, so its counts need nothing before it; without a sidecar, zeros stand in.
        pending_counts.append(original_byte_counts(sp, stream) if sidecar is not None else np.zeros(0, np.int64))
        pending_tokens += stream.size
        total += stream.size
        if pending_tokens >= shard_tokens:
            joined, joined_counts = np.concatenate(pending), np.concatenate(pending_counts)
            cut = 0
            while joined.size - cut >= shard_tokens:
                flush(joined[cut : cut + shard_tokens], joined_counts[cut : cut + shard_tokens])
                cut += shard_tokens
            pending, pending_counts = [joined[cut:]], [joined_counts[cut:]]
            pending_tokens = joined.size - cut
    if pending_tokens:
        flush(np.concatenate(pending), np.concatenate(pending_counts))
    return shards, total


def _existing_shards(dataset_dir: Path) -> set[str]:
    if not dataset_dir.is_dir():
        return set()
    return {p.name for p in dataset_dir.iterdir() if SHARD_PATTERN.match(p.name)}


# ------------------------------------------------------------------------------------------------
# Export


def _check_name(kind: str, name: str) -> None:
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ExportError(f"{kind} {name!r} must be a plain file name (letters, digits, . _ -); pick another")


def _up_to_date(manifest_path: Path, dataset_dir: Path, tokenizer_paths: tuple[Path, Path], inputs_sha: str) -> dict | None:
    """The stored manifest if it was built from the same inputs and every file still matches, else None."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("inputs_sha256") != inputs_sha:
            return None
        tok = manifest["tokenizer"]
        model_path, vocab_path = tokenizer_paths
        if file_sha256(model_path) != tok["model_sha256"] or file_sha256(vocab_path) != tok["vocab_sha256"]:
            return None
        listed = set()
        sidecar = manifest.get("byte_sidecar", {}).get("shards", [])
        for shard in [s for split in SPLITS for s in manifest["splits"][split]["shards"]] + sidecar:
            listed.add(shard["file"])
            if file_sha256(dataset_dir / shard["file"]) != shard["sha256"]:
                return None
        if listed != _existing_shards(dataset_dir):
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_dataset(
    train_docs: Sequence[str],
    val_docs: Sequence[str],
    *,
    datasets_root: str | Path,
    tokenizers_root: str | Path,
    dataset_name: str,
    tokenizer_name: str,
    vocab_size: int = 1024,
    shard_tokens: int = 100_000_000,
    reuse_tokenizer: str | Path | None = None,
    tokenizer_train_docs: int | None = None,
    extra_manifest: dict | None = None,
    case_ops: bool = False,
) -> dict:
    """Build (or confirm up to date) a tokenizer, the shards of both splits and the manifest.

    `train_docs` / `val_docs` are raw texts; they are cleaned here. The tokenizer is trained on the
    (first `tokenizer_train_docs`) cleaned train docs only, unless `reuse_tokenizer` names an existing
    .model, which is then copied to `<tokenizers_root>/<tokenizer_name>.model`. `extra_manifest` must
    be JSON-serialisable; it is stored under "extra" and is part of the input hash. With `case_ops`, the
    cleaned docs are case-transformed (data/caseops.py) before tokenizer training and encoding, and the
    validation split gets the byte sidecar (see the module docstring).

    Returns the manifest dict plus "dataset_dir" and "tokenizer_path" (absolute paths as str; these
    two are not stored in manifest.json). Raises ExportError on bad input or settings.
    """
    datasets_root, tokenizers_root = Path(datasets_root), Path(tokenizers_root)
    _check_name("dataset name", dataset_name)
    _check_name("tokenizer name", tokenizer_name)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ExportError(
            f"vocab size {vocab_size!r} is out of range; use an int in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] "
            f"({MIN_VOCAB_SIZE} = 4 special + 256 byte pieces + '{SPACE_PIECE}'; ids are uint16)"
        )
    if not isinstance(shard_tokens, int) or not 1 <= shard_tokens <= MAX_TOKENS_PER_SHARD:
        raise ExportError(f"shard tokens {shard_tokens!r} is out of range; use an int in [1, {MAX_TOKENS_PER_SHARD}]")
    if tokenizer_train_docs is not None and tokenizer_train_docs < 1:
        raise ExportError(f"tokenizer train docs must be at least 1, got {tokenizer_train_docs}")

    splits = {"val": clean_docs(val_docs), "train": clean_docs(train_docs)}
    for split, docs in splits.items():
        if not docs:
            raise ExportError(f"the {split} split has no non-empty documents; give it some documents")

    reuse_path = Path(reuse_tokenizer) if reuse_tokenizer is not None else None
    reused_model = None
    if reuse_path is not None:
        try:
            reused_model = reuse_path.read_bytes()
        except OSError as e:
            raise ExportError(f"cannot read tokenizer {reuse_path} ({e.strerror}); check the reuse path") from None
    if reused_model is not None:
        tokenizer_source = {"source": "reused", "reused_model_sha256": hashlib.sha256(reused_model).hexdigest()}
    else:
        tokenizer_source = {
            "source": "trained",
            "trainer_settings": TRAINER_SETTINGS,
            "tokenizer_train_docs": min(tokenizer_train_docs or len(splits["train"]), len(splits["train"])),
            **({"user_defined_symbols": [f"U+{ord(c):04X}" for c in caseops.TOKENIZER_SYMBOLS]} if case_ops else {}),
        }
    docs_hashes = {split: docs_sha256(docs) for split, docs in splits.items()}  # of the original text
    inputs = {
        "exporter_version": EXPORTER_VERSION,
        "sentencepiece_version": spm.__version__,
        "dataset_name": dataset_name,
        "tokenizer_name": tokenizer_name,
        "vocab_size": vocab_size,
        "shard_tokens": shard_tokens,
        "tokenizer": tokenizer_source,
        "docs_sha256": docs_hashes,
        "extra": extra_manifest or {},
        **({"text_transform": caseops.TRANSFORM_NAME} if case_ops else {}),  # plain exports keep their hash
    }
    try:
        inputs_sha = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()
    except TypeError as e:
        raise ExportError(f"extra manifest is not JSON-serialisable ({e}); pass plain dicts, lists, str and numbers") from None

    dataset_dir = datasets_root / dataset_name
    manifest_path = dataset_dir / MANIFEST_NAME
    model_path = tokenizers_root / f"{tokenizer_name}.model"
    vocab_path = tokenizers_root / f"{tokenizer_name}.vocab"
    paths = {"dataset_dir": str(dataset_dir.resolve()), "tokenizer_path": str(model_path.resolve())}

    manifest = _up_to_date(manifest_path, dataset_dir, (model_path, vocab_path), inputs_sha)
    if manifest is not None:
        log.info("%s is up to date (%s)", dataset_name, dataset_dir)
        return {**manifest, **paths}

    log.info("building %s in %s", dataset_name, dataset_dir)
    if case_ops:
        splits = {split: [caseops.encode(doc) for doc in docs] for split, docs in splits.items()}
    if reused_model is None:
        train_for_tokenizer = splits["train"][: tokenizer_source["tokenizer_train_docs"]]
        log.info("training %d-piece BPE tokenizer on %d train docs", vocab_size, len(train_for_tokenizer))
        symbols = caseops.TOKENIZER_SYMBOLS if case_ops else ()
        model_bytes, trainer_saw = train_tokenizer(train_for_tokenizer, vocab_size, symbols)
        what = f"trained tokenizer {tokenizer_name}"
    else:
        model_bytes, what, trainer_saw = reused_model, f"tokenizer {reuse_path}", None
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except RuntimeError:
        raise ExportError(f"{what} is not a SentencePiece model; pass a .model file") from None
    check_tokenizer(sp, vocab_size, what, case_ops)
    if sp.get_piece_size() < vocab_size:
        log.warning("tokenizer has %d pieces, fewer than vocab size %d (corpus too small)", sp.get_piece_size(), vocab_size)
    vocab_bytes = vocab_file_text(sp).encode("utf-8")

    # From here on files change: drop the old manifest first so none describes a half-rebuilt folder.
    manifest_path.unlink(missing_ok=True)
    write_atomic(model_path, model_bytes)
    write_atomic(vocab_path, vocab_bytes)

    dataset_dir.mkdir(parents=True, exist_ok=True)
    split_records = {}
    written: set[str] = set()
    sidecar: list[dict] | None = [] if case_ops else None
    for split in SPLITS:
        shards, tokens = _write_split_shards(sp, splits[split], split, dataset_dir, shard_tokens, vocab_size,
                                             sidecar if split == "val" else None)
        written.update(s["file"] for s in shards + (sidecar or []))
        split_records[split] = {
            "docs": len(splits[split]),
            "tokens": tokens,
            "docs_sha256": docs_hashes[split],
            "shards": shards,
        }
    for stale in sorted(_existing_shards(dataset_dir) - written):
        log.info("removing stale shard %s", stale)
        (dataset_dir / stale).unlink()

    manifest = {
        "manifest_version": 1,
        "exporter": "data/export_shards.py",
        "exporter_version": EXPORTER_VERSION,
        "dataset_name": dataset_name,
        "vocab_size": vocab_size,
        "tokenizer": {
            "name": tokenizer_name,
            "model_file": model_path.name,
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "vocab_file": vocab_path.name,
            "vocab_sha256": hashlib.sha256(vocab_bytes).hexdigest(),
            "pieces": sp.get_piece_size(),
            "sentencepiece_version": spm.__version__,
            **tokenizer_source,
            **({"trainer_saw": trainer_saw} if trainer_saw is not None else {}),
        },
        "shard_format": {
            "header": "256 little-endian int32: magic 20240520, version 1, token count, zeros",
            "token_dtype": "<u2",
            "bos_id": BOS_ID,
            "doc_layout": "[BOS] + sp.encode(doc) per document, no EOS; a document may straddle shards",
            "max_shard_tokens": shard_tokens,
        },
        "doc_cleaning": "NUL -> space, strip, drop empty documents",
        "docs_sha256_rule": DOCS_SHA256_RULE,
        "splits": split_records,
        "train_val_shared_docs": count_shared_docs(splits["train"], splits["val"]),
        "inputs_sha256": inputs_sha,
        "extra": extra_manifest or {},
    }
    if case_ops:
        manifest["text_transform"] = {"name": caseops.TRANSFORM_NAME, "implementation": "data/caseops.py",
                                      "operators": {"TITLE": "U+E001", "ALLCAPS": "U+E002", "CAPNEXT": "U+E003",
                                                    "ESC": "U+E004"},
                                      "tokenizer_user_defined_symbols": [f"U+{ord(c):04X}"
                                                                         for c in caseops.TOKENIZER_SYMBOLS]}
        manifest["byte_sidecar"] = {"rule": SIDECAR_RULE, "shards": sidecar,
                                    "original_bytes": sum(s["bytes"] for s in sidecar)}
    write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    log.info(
        "%s: val %d docs / %d tokens, train %d docs / %d tokens",
        dataset_name,
        split_records["val"]["docs"],
        split_records["val"]["tokens"],
        split_records["train"]["docs"],
        split_records["train"]["tokens"],
    )
    return {**manifest, **paths}


# ------------------------------------------------------------------------------------------------
# Command line


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a command-line body; turn expected failures into one stderr line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # stderr: errors only
    try:
        return body()
    except ExportError as e:
        message = str(e)
    except FileNotFoundError as e:
        message = f"{e.filename} not found ({e.strerror}); check the path"
    except OSError as e:
        message = f"cannot access {e.filename or 'a file'} ({e.strerror or e}); check the path and permissions"
    except lzma.LZMAError as e:
        message = f"input is not a valid .xz file ({e}); decompress it or fix the file"
    except UnicodeDecodeError as e:
        message = f"input is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8"
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="export_shards.py",
        description="Train a SentencePiece BPE tokenizer on train docs and write token shards + manifest.",
    )
    p.add_argument("--input", action="append", required=True, metavar="FILE",
                   help="corpus file (.xz read transparently); repeat to concatenate several files")
    p.add_argument("--input-format", choices=("auto", "text", "jsonl"), default="auto",
                   help="text: documents separated by blank lines; jsonl: one {\"text\": ...} per line; "
                        "auto (default): jsonl for *.jsonl[.xz], else text")
    p.add_argument("--val-docs", type=int_at_least(1), metavar="N",
                   help="the first N documents are validation (public convention)")
    p.add_argument("--val-fraction", type=float, metavar="F",
                   help="validation = docs whose text hash bucket is below F (e.g. 0.05)")
    p.add_argument("--vocab-size", type=int_at_least(1), default=1024)
    p.add_argument("--dataset-name", help="default: <input stem>_sp<V>")
    p.add_argument("--tokenizer-name", help="default: <input stem>_<V>_bpe")
    p.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS_ROOT)
    p.add_argument("--tokenizers-root", type=Path, default=DEFAULT_TOKENIZERS_ROOT)
    p.add_argument("--shard-tokens", type=int_at_least(1), default=100_000_000)
    p.add_argument("--reuse-tokenizer", type=Path, metavar="MODEL",
                   help="use this existing SentencePiece .model instead of training one")
    p.add_argument("--tokenizer-train-docs", type=int_at_least(1), metavar="N",
                   help="train the tokenizer on the first N train docs only (default: all)")
    p.add_argument("--caseops", action="store_true",
                   help="case-transform the text first (lossless_caps_caseops_v1, data/caseops.py): the tokenizer gets "
                        "the operator symbols, the validation split its byte sidecar fineweb_val_bytes_*.bin")
    return p


def _input_stem(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".jsonl", ".ndjson", ".json", ".txt"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "corpus"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if (args.val_docs is None) == (args.val_fraction is None):
            raise ExportError("choose the validation split with exactly one of --val-docs N or --val-fraction F")
        inputs = [Path(p) for p in args.input]
        for path in inputs:
            if not path.is_file():
                raise ExportError(f"input file {path} not found; check the --input path")
        docs, sources = [], []
        for path in inputs:
            raw = read_documents(path, args.input_format)
            docs.extend(clean_docs(raw))
            sources.append({"file": path.name, "sha256": file_sha256(path),
                            "format": args.input_format if args.input_format != "auto" else guess_input_format(path)})
        if not docs:
            raise ExportError("the input has no non-empty documents; check --input and --input-format")
        if args.val_docs is not None:
            train, val = split_first_n(docs, args.val_docs)
            selection = {"method": "first_n", "val_docs": args.val_docs}
        else:
            train, val = split_by_hash(docs, args.val_fraction)
            selection = {"method": "text_hash", "val_fraction": args.val_fraction, "rule": VAL_HASH_RULE}
        stem = _input_stem(inputs[0])
        suffix = f"_{CASEOPS_SUFFIX}" if args.caseops else ""
        manifest = export_dataset(
            train,
            val,
            datasets_root=args.datasets_root,
            tokenizers_root=args.tokenizers_root,
            dataset_name=args.dataset_name or f"{stem}_sp{args.vocab_size}{suffix}",
            tokenizer_name=args.tokenizer_name or f"{stem}_{args.vocab_size}_bpe{suffix}",
            vocab_size=args.vocab_size,
            shard_tokens=args.shard_tokens,
            reuse_tokenizer=args.reuse_tokenizer,
            tokenizer_train_docs=args.tokenizer_train_docs,
            extra_manifest={"sources": sources, "val_selection": selection},
            case_ops=args.caseops,
        )
        print_summary(manifest)
        return 0

    return run_cli("export_shards.py", body)


def print_summary(manifest: dict) -> None:
    print(f"dataset:   {manifest['dataset_dir']}")
    print(f"tokenizer: {manifest['tokenizer_path']}")
    for split in SPLITS:
        rec = manifest["splits"][split]
        print(f"{split:5s}: {rec['docs']:,} docs, {rec['tokens']:,} tokens in {len(rec['shards'])} shard(s)")
    if "byte_sidecar" in manifest:
        side = manifest["byte_sidecar"]
        print(f"caseops: validation byte sidecar, {side['original_bytes']:,} original bytes in {len(side['shards'])} "
              "file(s); train with CASEOPS_ENABLED=1")


if __name__ == "__main__":
    sys.exit(main())
