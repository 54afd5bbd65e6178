"""The shard format (data/shards.py) against the spec, checked with raw bytes, not with the module."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data import shards  # noqa: E402
from data.shards import read_shard, read_shard_header, write_atomic, write_shard  # noqa: E402

MAGIC, VERSION = 20240520, 1


def raw_shard(count: int, body: bytes, magic: int = MAGIC, version: int = VERSION) -> bytes:
    """A shard built by hand from the spec: 256 little-endian int32, then the body."""
    return struct.pack("<256i", magic, version, count, *([0] * 253)) + body


@pytest.mark.parametrize(
    "tokens",
    [
        [],
        [0],
        [65535],
        [1, 0, 65535, 2, 3, 40000, 1],
        np.random.default_rng(0).integers(0, 2**16, size=10_001),
    ],
    ids=["empty", "one-zero", "one-max", "mixed", "random-10001"],
)
def test_roundtrip_is_bit_identical(tmp_path, tokens):
    path = tmp_path / "s.bin"
    expected = np.asarray(tokens, dtype=np.int64)
    write_shard(path, tokens)
    got = read_shard(path)
    assert got.dtype == np.dtype("<u2")
    assert np.array_equal(got.astype(np.int64), expected)
    assert read_shard_header(path) == expected.size
    # Writing what was read reproduces the file byte for byte.
    again = tmp_path / "again.bin"
    write_shard(again, got)
    assert again.read_bytes() == path.read_bytes()


def test_header_and_body_bytes_match_spec(tmp_path):
    tokens = [1, 0, 65535, 258, 7]
    path = tmp_path / "s.bin"
    write_shard(path, np.array(tokens, dtype=np.int32))
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = struct.unpack("<256i", raw[:1024])
    assert header[:3] == (MAGIC, VERSION, len(tokens))
    assert all(v == 0 for v in header[3:])
    assert list(struct.unpack(f"<{len(tokens)}H", raw[1024:])) == tokens
    # Little-endian on disk regardless of the platform: 258 is bytes 02 01.
    assert raw[1024 + 2 * 3 : 1024 + 2 * 4] == b"\x02\x01"


def test_reads_a_hand_built_shard(tmp_path):
    path = tmp_path / "hand.bin"
    path.write_bytes(raw_shard(3, struct.pack("<3H", 1, 2, 65535)))
    assert read_shard(path).tolist() == [1, 2, 65535]


@pytest.mark.parametrize(
    "payload, message",
    [
        (raw_shard(2, b"\x01\x00\x02\x00", magic=20240521), "magic"),
        (raw_shard(2, b"\x01\x00\x02\x00", version=2), "version"),
        (raw_shard(3, b"\x01\x00\x02\x00"), "truncated"),  # header says 3 tokens, body has 2
        (raw_shard(2, b"\x01\x00\x02\x00\x03\x00"), "truncated"),  # one extra token
        (raw_shard(2, b"\x01\x00\x02\x00\x00"), "truncated"),  # one stray trailing byte
        (raw_shard(-1, b""), "truncated"),  # negative count
        (raw_shard(0, b"")[:1000], "shorter than"),
        (b"", "shorter than"),
    ],
    ids=["magic", "version", "short-body", "extra-token", "extra-byte", "negative-count", "short-header", "empty-file"],
)
def test_rejects_malformed_files(tmp_path, payload, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value)  # the message names the file


@pytest.mark.parametrize(
    "tokens",
    [[-1], [65536], [1, 2, 70000], np.zeros((2, 2), dtype=np.int64)],
    ids=["negative", "65536", "70000", "2-d"],
)
def test_write_refuses_bad_tokens_and_writes_nothing(tmp_path, tokens):
    path = tmp_path / "s.bin"
    with pytest.raises(ValueError):
        write_shard(path, tokens)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "s.bin"
    write_shard(path, [1, 2, 3])
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_shard(path, [4, 5, 6, 7])
    assert path.read_bytes() == before
    assert read_shard(path).tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]  # no temp file left behind


def test_atomic_write_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.bin"]
