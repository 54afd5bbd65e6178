"""The challenge's token shard format: read, write and check `.bin` shards (and the atomic write and
file sha256 every data/ tool shares).

A shard is a header of 256 little-endian int32 values (magic 20240520, version 1, token count, then
zeros) followed by exactly that many little-endian uint16 token ids. Every document in a shard stream
is BOS (id 1) followed by its tokens. This is byte-for-byte the format of the public FineWeb shards,
so shards written here load in the public scripts and theirs load here.

`train_gpt.py` carries its own copy of the reader on purpose (only that file counts as code in a
submission); `tests/test_train.py` checks the two agree.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKENS_PER_SHARD = 2**31 - 1  # the header stores the count as int32
BOS_ID = 1


def write_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` via a temporary file in the same folder and an atomic rename.

    A crash mid-write leaves the previous file (or none) in place, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 16 MiB blocks so a large shard never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def encode_shard(tokens) -> bytes:
    """Serialise token ids (any int array-like, each in [0, 65536)) to shard bytes."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"shard tokens must be 1-D, got shape {arr.shape}")
    if arr.size > MAX_TOKENS_PER_SHARD:
        raise ValueError(f"shard holds at most {MAX_TOKENS_PER_SHARD} tokens, got {arr.size}; split it")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**16):
        raise ValueError(
            f"token ids must be in [0, 65536) to fit uint16, got range [{arr.min()}, {arr.max()}]; "
            "the vocabulary must have at most 65536 entries"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    return header.tobytes() + arr.astype(TOKEN_DTYPE).tobytes()


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write a shard atomically."""
    write_atomic(path, encode_shard(tokens))


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count. Raises ValueError naming the file."""
    path = Path(path)
    file_bytes = path.stat().st_size
    if file_bytes < HEADER_BYTES:
        raise ValueError(f"{path}: {file_bytes} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {int(header[0])}, expected {SHARD_MAGIC}; not a token shard")
    if int(header[1]) != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {int(header[1])}, expected {SHARD_VERSION}")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or file_bytes != expected:
        raise ValueError(
            f"{path}: size {file_bytes} bytes does not match header token count {num_tokens} "
            f"(expected {expected} bytes); the file is truncated or corrupt, re-create or re-download it"
        )
    return num_tokens


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Read a whole shard as a uint16 array after validating its header and size."""
    num_tokens = read_shard_header(path)
    return np.fromfile(path, dtype=TOKEN_DTYPE, count=num_tokens, offset=HEADER_BYTES)
