"""Tests for data/cached_challenge_fineweb.py against a fake Hugging Face Hub built in tmp_path.

The fake hub is a folder laid out like the public dataset repo (`datasets/manifest.json`,
`datasets/datasets/fineweb10B_<variant>/...`, `datasets/tokenizers/...`). The module's single network
function, `_hub_download`, is replaced by `FakeHub`. FakeHub records every call and returns an
HF-cache-style symlink, so the code under test must resolve symlinks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running this file from any folder
    sys.path.insert(0, str(ROOT))

from huggingface_hub import errors as hf_errors  # noqa: E402

import data.cached_challenge_fineweb as dl  # noqa: E402
from data.shards import HEADER_BYTES, read_shard, write_shard  # noqa: E402

SCRIPT = ROOT / "data" / "cached_challenge_fineweb.py"
DEFAULT_ROOT = "datasets"
# variant -> (val shard count, train shard count, tokenizer entry)
VARIANTS = {
    "sp1024": (
        1,
        3,
        {
            "name": "sp_bpe_1024",
            "kind": "sentencepiece_bpe",
            "vocab_size": 1024,
            "bos_id": 1,
            "eos_id": 2,
            "model_path": "tokenizers/fineweb_1024_bpe.model",
            "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
        },
    ),
    "byte260": (
        2,
        2,
        {
            "name": "pure_byte_260",
            "kind": "byte",
            "vocab_size": 260,
            "bos_id": 1,
            "eos_id": 2,
            "path": "tokenizers/fineweb_pure_byte_260.json",
        },
    ),
}


def shard_rel(variant: str, split: str, i: int) -> str:
    return f"datasets/fineweb10B_{variant}/fineweb_{split}_{i:06d}.bin"


def build_hub(hub: Path, remote_root: str = DEFAULT_ROOT, variants=("sp1024", "byte260")) -> Path:
    """Write a small export in the public layout under hub/<remote_root>; return the export folder."""
    export = hub / remote_root if remote_root else hub
    rng = np.random.default_rng(0)
    manifest = {"version": "10B", "shard_size": 64, "append_eos": False, "tokenizers": [], "datasets": []}
    for variant in variants:
        n_val, n_train, tok = VARIANTS[variant]
        vocab = tok["vocab_size"]
        tokens = {"val": 0, "train": 0}
        for split, count in (("val", n_val), ("train", n_train)):
            for i in range(count):
                body = rng.integers(2, vocab, size=40 + 7 * i)
                body[0] = 1  # each shard starts a document with BOS
                write_shard(export / shard_rel(variant, split, i), body)
                tokens[split] += body.size
        for key in ("model_path", "vocab_path", "path"):
            if key in tok:
                target = export / tok[key]
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.suffix == ".json":
                    target.write_text(json.dumps({"tokenizer_type": "pure_byte", "vocab_size": vocab}))
                else:
                    target.write_bytes(f"fake {key} for {variant}".encode())
        manifest["tokenizers"].append(dict(tok))
        name = f"fineweb10B_{variant}"
        manifest["datasets"].append(
            {
                "name": name,
                "tokenizer_name": tok["name"],
                "tokenizer_kind": tok["kind"],
                "path": f"datasets/{name}",
                "train_glob": f"datasets/{name}/fineweb_train_*.bin",
                "val_glob": f"datasets/{name}/fineweb_val_*.bin",
                "vocab_size": vocab,
                "bos_id": 1,
                "eos_id": 2,
                "stats": {
                    "files_total": n_val + n_train,
                    "files_val": n_val,
                    "files_train": n_train,
                    "tokens_val": tokens["val"],
                    "tokens_train": tokens["train"],
                    "tokens_total": tokens["val"] + tokens["train"],
                },
            }
        )
    write_manifest(export, manifest)
    return export


def write_manifest(export: Path, manifest: dict) -> None:
    export.mkdir(parents=True, exist_ok=True)
    (export / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(export: Path) -> dict:
    return json.loads((export / "manifest.json").read_text())


class FakeHub:
    """Stands in for `_hub_download`: serves files from a folder and hands out HF-cache-like symlinks."""

    def __init__(self, hub: Path, cache: Path):
        self.hub, self.cache = hub, cache
        self.calls: list[tuple[str, str, bool]] = []
        self.fail_with: BaseException | None = None

    def __call__(self, repo_id: str, remote_path: str, *, force: bool = False) -> str:
        self.calls.append((repo_id, remote_path, force))
        if self.fail_with is not None:
            raise self.fail_with
        src = self.hub / remote_path
        if not src.is_file():
            raise hf_errors.EntryNotFoundError(f"404: {remote_path} not found in {repo_id}")
        blob = self.cache / "blobs" / f"{len(self.calls)}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(src.read_bytes())
        link = self.cache / "snapshots" / remote_path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        return str(link)

    def paths(self) -> list[str]:
        return [remote for _, remote, _ in self.calls]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    fake = FakeHub(tmp_path / "hub", tmp_path / "hf_cache")
    fake.export = build_hub(fake.hub)
    monkeypatch.setattr(dl, "_hub_download", fake)
    return fake


@pytest.fixture
def local(tmp_path) -> Path:
    return tmp_path / "local"


def run(local: Path, *args: str) -> int:
    return dl.main([*args, "--local-dir", str(local)])


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def temp_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")] if folder.exists() else []


def expected_sp1024_calls(n_train: int, root: str = DEFAULT_ROOT) -> list[str]:
    rels = ["manifest.json", shard_rel("sp1024", "val", 0)]
    rels += [shard_rel("sp1024", "train", i) for i in range(n_train)]
    rels += ["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]
    return [f"{root}/{r}" if root else r for r in rels]


# --------------------------------------------------------------------------------------------------
# Happy path and idempotence


def test_downloads_val_train_prefix_and_tokenizer_to_local_layout(hub, local):
    assert run(local, "--variant", "sp1024", "--train-shards", "2") == 0

    assert hub.paths() == expected_sp1024_calls(2)  # manifest, all val, a train prefix, then the tokenizer
    assert all(repo == dl.DEFAULT_REPO_ID and not force for repo, _, force in hub.calls)
    wanted = [shard_rel("sp1024", "val", 0), shard_rel("sp1024", "train", 0), shard_rel("sp1024", "train", 1)]
    wanted += ["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab", "manifest.json"]
    for rel in wanted:
        got = local / rel
        assert got.is_file() and not got.is_symlink(), rel  # a real file, not a link into the HF cache
        assert got.read_bytes() == (hub.export / rel).read_bytes(), rel
    assert not (local / shard_rel("sp1024", "train", 2)).exists()  # only the requested prefix
    assert not (local / "datasets" / "fineweb10B_byte260").exists()
    assert temp_leftovers(local) == []


def test_byte260_uses_the_tokenizer_path_key(hub, local):
    assert run(local, "--variant", "byte260", "--train-shards", "1") == 0
    assert hub.paths()[-1] == "datasets/tokenizers/fineweb_pure_byte_260.json"
    assert (local / shard_rel("byte260", "val", 1)).is_file()  # every val shard, not just the first
    assert json.loads((local / "tokenizers/fineweb_pure_byte_260.json").read_text())["vocab_size"] == 260


def test_positional_train_shard_count_matches_the_option(hub, local, capsys):
    assert run(local, "1") == 0
    assert hub.paths() == expected_sp1024_calls(1)
    assert run(local, "2", "--train-shards", "1") == 2  # two different counts: refuse rather than guess
    assert "given twice" in stderr_lines(capsys)[-1]


def test_second_run_downloads_nothing_and_a_longer_prefix_fetches_only_new_shards(hub, local):
    assert run(local, "--train-shards", "2") == 0
    hub.calls.clear()
    assert run(local, "--train-shards", "2") == 0
    assert hub.calls == []  # the cached manifest is reused and every present file passes its check
    assert run(local, "--train-shards", "3") == 0
    assert hub.paths() == [f"datasets/{shard_rel('sp1024', 'train', 2)}"]


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b[:-2], id="truncated"),
        pytest.param(lambda b: b"\0\0\0\0" + b[4:], id="bad-magic"),
        pytest.param(lambda b: b + b"\1\0", id="trailing-bytes"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_corrupt_local_shard_is_downloaded_again(hub, local, corrupt):
    assert run(local, "--train-shards", "2") == 0
    victim = local / shard_rel("sp1024", "train", 1)
    victim.write_bytes(corrupt(victim.read_bytes()))
    hub.calls.clear()

    assert run(local, "--train-shards", "2") == 0
    assert hub.paths() == [f"datasets/{shard_rel('sp1024', 'train', 1)}"]  # only the bad file
    assert victim.read_bytes() == (hub.export / shard_rel("sp1024", "train", 1)).read_bytes()


def test_empty_local_tokenizer_is_downloaded_again(hub, local):
    assert run(local, "--train-shards", "1") == 0
    (local / "tokenizers/fineweb_1024_bpe.model").write_bytes(b"")
    hub.calls.clear()
    assert run(local, "--train-shards", "1") == 0
    assert hub.paths() == ["datasets/tokenizers/fineweb_1024_bpe.model"]
    assert (local / "tokenizers/fineweb_1024_bpe.model").stat().st_size > 0


# --------------------------------------------------------------------------------------------------
# Bad data on the hub


def test_corrupt_shard_on_hub_fails_clearly_and_leaves_no_bad_file(hub, local, capsys):
    bad = hub.export / shard_rel("sp1024", "train", 1)
    bad.write_bytes(bad.read_bytes()[:-3])  # truncated upload

    assert run(local, "--train-shards", "3") == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith("error: ") and "Traceback" not in line
    assert "fineweb_train_000001.bin" in line and "MATCHED_FINEWEB_REPO_ID" in line
    # fetched twice, the second time bypassing the HF cache; then the run stopped
    assert [(p, f) for _, p, f in hub.calls][-2:] == [
        (f"datasets/{shard_rel('sp1024', 'train', 1)}", False),
        (f"datasets/{shard_rel('sp1024', 'train', 1)}", True),
    ]
    assert not (local / shard_rel("sp1024", "train", 1)).exists()
    assert not (local / shard_rel("sp1024", "train", 2)).exists()  # stopped at the first bad file
    assert temp_leftovers(local) == []
    read_shard(local / shard_rel("sp1024", "train", 0))  # earlier good files are kept and valid


def test_recorded_sha256_and_bytes_are_enforced(hub, local, capsys):
    rel = shard_rel("sp1024", "train", 0)
    good = (hub.export / rel).read_bytes()
    manifest = read_manifest(hub.export)
    manifest["files"] = {rel: {"bytes": len(good), "sha256": hashlib.sha256(good).hexdigest()}}
    write_manifest(hub.export, manifest)
    assert run(local, "--train-shards", "1") == 0

    # A local file with a valid header but other tokens passes the header check; only the sha256 catches it.
    other = np.frombuffer(good[HEADER_BYTES:], dtype="<u2")[::-1].copy()
    write_shard(local / rel, other)
    hub.calls.clear()
    assert run(local, "--train-shards", "1") == 0
    assert hub.paths() == [f"datasets/{rel}"] and (local / rel).read_bytes() == good

    # The same swap on the hub is refused and nothing stays behind.
    write_shard(hub.export / rel, other)
    (local / rel).unlink()
    assert run(local, "--train-shards", "1") == 2
    assert "sha256 does not match" in stderr_lines(capsys)[-1]
    assert not (local / rel).exists() and temp_leftovers(local) == []


def test_file_listed_in_manifest_but_missing_on_hub(hub, local, capsys):
    (hub.export / shard_rel("sp1024", "val", 0)).unlink()
    assert run(local, "--train-shards", "1") == 2
    (line,) = stderr_lines(capsys)
    assert "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin is not in dataset repo" in line
    assert "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX" in line


def test_stale_manifest_token_counts_warn(hub, local, capsys):
    manifest = read_manifest(hub.export)
    manifest["datasets"][0]["stats"]["tokens_val"] += 1
    write_manifest(hub.export, manifest)
    assert run(local, "--train-shards", "1") == 0  # a warning, not a failure
    err = capsys.readouterr().err
    assert "warning: val shards of fineweb10B_sp1024 hold" in err and "manifest.json" in err


# --------------------------------------------------------------------------------------------------
# Requests the manifest cannot satisfy


def test_too_many_train_shards_fails_before_downloading_shards(hub, local, capsys):
    assert run(local, "--train-shards", "4") == 2
    (line,) = stderr_lines(capsys)
    assert "sp1024 has only 3 train shards" in line and "--train-shards 3" in line
    assert hub.paths() == ["datasets/manifest.json"]
    assert not (local / "datasets").exists()


def test_unknown_variant_lists_the_known_ones(hub, local, capsys):
    assert run(local, "--variant", "sp4096", "--train-shards", "1") == 2
    (line,) = stderr_lines(capsys)
    assert "sp4096" in line and "known variants there: byte260, sp1024" in line
    assert "MATCHED_FINEWEB_REPO_ID" in line


def test_malformed_variant_is_a_usage_error(hub, local, capsys):
    assert run(local, "--variant", "gpt2") == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith("error: ") and "byte260" in line
    assert hub.calls == []


def test_cached_manifest_without_the_variant_is_fetched_again(hub, local):
    # first a repo with only sp1024 ...
    sp_only = read_manifest(hub.export)
    sp_only["datasets"] = [d for d in sp_only["datasets"] if d["name"] == "fineweb10B_sp1024"]
    write_manifest(hub.export, sp_only)
    assert run(local, "--train-shards", "1") == 0
    # ... then a repo that also publishes byte260: its manifest must replace the stale cached one
    build_hub(hub.hub)
    hub.calls.clear()
    assert run(local, "--variant", "byte260", "--train-shards", "1") == 0
    assert hub.paths()[0] == "datasets/manifest.json"
    assert "fineweb10B_byte260" in (local / "manifest.json").read_text()


def test_skip_manifest_requires_a_local_manifest(hub, local, capsys):
    assert run(local, "--skip-manifest", "--train-shards", "1") == 2
    (line,) = stderr_lines(capsys)
    assert "--skip-manifest" in line and str(local / "manifest.json") in line
    assert hub.calls == []

    # with a local manifest it never asks the hub for one
    local.mkdir(parents=True)
    (local / "manifest.json").write_bytes((hub.export / "manifest.json").read_bytes())
    assert run(local, "--skip-manifest", "--train-shards", "1") == 0
    assert "datasets/manifest.json" not in hub.paths()


def test_corrupt_cached_manifest_is_fetched_again(hub, local):
    local.mkdir(parents=True)
    (local / "manifest.json").write_text("{ truncated")
    assert run(local, "--train-shards", "1") == 0
    assert hub.paths()[0] == "datasets/manifest.json"
    assert json.loads((local / "manifest.json").read_text()) == read_manifest(hub.export)


# --------------------------------------------------------------------------------------------------
# Environment and docs


def test_repo_id_and_remote_root_come_from_the_environment(tmp_path, monkeypatch, local):
    fake = FakeHub(tmp_path / "mirror", tmp_path / "hf_cache")
    build_hub(fake.hub, remote_root="export_root")
    monkeypatch.setattr(dl, "_hub_download", fake)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/mirror")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "export_root")

    assert run(local, "--train-shards", "1") == 0
    assert {repo for repo, _, _ in fake.calls} == {"someone/mirror"}
    assert fake.paths() == expected_sp1024_calls(1, root="export_root")
    assert (local / shard_rel("sp1024", "train", 0)).is_file()  # the remote root is not part of the local path


CASEOPS = "sp8192_lossless_caps_caseops_v1_reserved"


def add_caseops_variant(export: Path, n_val: int = 2, n_train: int = 1) -> None:
    """A CaseOps dataset entry as the public one: val shards, one byte sidecar each (`val_bytes_glob`)."""
    manifest = read_manifest(export)
    name, rng = f"fineweb10B_{CASEOPS}", np.random.default_rng(1)
    for split, count in (("val", n_val), ("train", n_train)):
        for i in range(count):
            body = rng.integers(2, 8192, size=30 + i)
            body[0] = 1
            write_shard(export / shard_rel(CASEOPS, split, i), body)
            if split == "val":
                write_shard(export / f"datasets/{name}/fineweb_val_bytes_{i:06d}.bin", rng.integers(0, 5, body.size))
    tok = {"name": "sp_bpe_8192_caseops", "kind": "sentencepiece_bpe", "vocab_size": 8192,
           "model_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"}
    (export / tok["model_path"]).write_bytes(b"fake caseops model")
    manifest["tokenizers"].append(tok)
    manifest["datasets"].append({"name": name, "tokenizer_name": tok["name"], "path": f"datasets/{name}",
                                 "val_bytes_glob": f"datasets/{name}/fineweb_val_bytes_*.bin",
                                 "stats": {"files_val": n_val, "files_train": n_train}})
    write_manifest(export, manifest)


@pytest.mark.slow
@pytest.mark.parametrize("remote_root", ["datasets", "caseops_export"])
def test_caseops_variant_fetches_the_byte_sidecar_of_every_val_shard(tmp_path, monkeypatch, local, remote_root):
    """As the public instructions run it: MATCHED_FINEWEB_REPO_ID plus MATCHED_FINEWEB_REMOTE_ROOT_PREFIX."""
    fake = FakeHub(tmp_path / "mirror", tmp_path / "hf_cache")
    add_caseops_variant(build_hub(fake.hub, remote_root=remote_root))
    monkeypatch.setattr(dl, "_hub_download", fake)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "romeerp/parameter-golf-caseops-v1")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", remote_root)
    assert run(local, "--variant", CASEOPS, "--train-shards", "1") == 0
    folder = f"datasets/fineweb10B_{CASEOPS}"
    rels = ["manifest.json", f"{folder}/fineweb_val_000000.bin", f"{folder}/fineweb_val_000001.bin",
            f"{folder}/fineweb_val_bytes_000000.bin", f"{folder}/fineweb_val_bytes_000001.bin",
            f"{folder}/fineweb_train_000000.bin", "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"]
    assert fake.paths() == [f"{remote_root}/{r}" for r in rels]
    assert {repo for repo, _, _ in fake.calls} == {"romeerp/parameter-golf-caseops-v1"}
    import train_gpt as tg  # the folder is what train_gpt.py reads: every val shard paired with its sidecar

    sidecar = tg.load_validation_byte_sidecar(str(local / folder))
    assert sidecar.size == sum(read_shard(local / f"{folder}/fineweb_val_{i:06d}.bin").size for i in range(2))
    fake.calls.clear()
    assert run(local, "--variant", CASEOPS, "--train-shards", "1") == 0 and fake.calls == []  # all present


def test_a_sidecar_that_does_not_match_its_val_shard_is_refused(hub, local, capsys):
    add_caseops_variant(hub.export)
    side = hub.export / f"datasets/fineweb10B_{CASEOPS}/fineweb_val_bytes_000001.bin"
    write_shard(side, np.zeros(5, dtype=np.int64))  # a valid shard file, but not this val shard's length
    assert run(local, "--variant", CASEOPS, "--train-shards", "1") == 2
    (line,) = stderr_lines(capsys)
    assert "fineweb_val_bytes_000001.bin holds 5 counts" in line and "31 tokens" in line


def test_a_malformed_val_bytes_glob_is_refused(hub, local, capsys):
    add_caseops_variant(hub.export)
    manifest = read_manifest(hub.export)
    manifest["datasets"][-1]["val_bytes_glob"] = "datasets/x/fineweb_val_bytes.bin"
    write_manifest(hub.export, manifest)
    assert run(local, "--variant", CASEOPS, "--train-shards", "1") == 2
    assert "val_bytes_glob" in stderr_lines(capsys)[-1]


def test_with_docs_fetches_docs_and_checks_their_size(hub, local, capsys):
    docs = b'{"text": "hello"}\n{"text": "world"}\n'
    (hub.export / "docs_selected.jsonl").write_bytes(docs)
    sidecar = {"num_docs": 2, "docs_val": 1, "docs_bytes": len(docs)}
    (hub.export / "docs_selected.source_manifest.json").write_text(json.dumps(sidecar))
    assert run(local, "--with-docs", "--train-shards", "1") == 0
    assert hub.paths()[1:3] == ["datasets/docs_selected.source_manifest.json", "datasets/docs_selected.jsonl"]
    assert (local / "docs_selected.jsonl").read_bytes() == docs

    (hub.export / "docs_selected.jsonl").write_bytes(docs[:-1])  # docs no longer match the sidecar
    (local / "docs_selected.jsonl").unlink()
    assert run(local, "--with-docs", "--train-shards", "1") == 2
    assert "docs_selected.jsonl" in stderr_lines(capsys)[-1]
    assert not (local / "docs_selected.jsonl").exists()


def test_unreachable_hub_is_one_line_naming_network_and_repo(hub, local, capsys):
    hub.fail_with = hf_errors.LocalEntryNotFoundError("Please check your connection")
    assert run(local) == 2
    (line,) = stderr_lines(capsys)
    assert "cannot reach the Hugging Face Hub" in line and "MATCHED_FINEWEB_REPO_ID" in line


def test_unexpected_exceptions_are_not_hidden(hub, local):
    hub.fail_with = ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        run(local)


# --------------------------------------------------------------------------------------------------
# The real script, as users run it


def run_script(*args: str, env_extra: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATCHED_FINEWEB_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_script_errors_are_one_line_with_exit_code_2(tmp_path):
    local = tmp_path / "local"
    cases = [
        (["--skip-manifest", "--local-dir", str(local)], {}, "--skip-manifest"),
        (["--variant", "gpt2", "--local-dir", str(local)], {}, "invalid variant"),
        # the real huggingface_hub code path, kept offline: HF_HUB_OFFLINE makes it fail at once
        (
            ["--local-dir", str(local)],
            {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MATCHED_FINEWEB_REPO_ID": "someone/mirror"},
            "MATCHED_FINEWEB_REPO_ID=someone/mirror",
        ),
    ]
    for args, env, needle in cases:
        proc = run_script(*args, env_extra=env, cwd=tmp_path)  # runs from any folder
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not local.exists()  # failed runs create nothing


def test_import_has_no_side_effects():
    code = (
        "import sys, os; before = list(sys.path); listing = sorted(os.listdir('data')); "
        "import data.cached_challenge_fineweb as m; "
        "assert sys.path == before, 'sys.path changed'; "
        "assert sorted(os.listdir('data')) == listing, 'files created'; "
        "assert 'huggingface_hub' not in sys.modules, 'network stack imported eagerly'"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
