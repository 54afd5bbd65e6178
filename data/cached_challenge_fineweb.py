"""Download the challenge's cached FineWeb shards and tokenizer from the Hugging Face Hub.

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80

Same command line as the public `data/cached_challenge_fineweb.py` of openai/parameter-golf. It also
checks every file it keeps.

Source: the Hub dataset repo `MATCHED_FINEWEB_REPO_ID` (default willdepueoai/parameter-golf), under
the folder `MATCHED_FINEWEB_REMOTE_ROOT_PREFIX` (default `datasets`; an empty value means the repo
root). Files are fetched with `hf_hub_download(repo_type="dataset")` at the repo's main branch. The
public script pins no revision either.

Steps:
1. Read `<root>/manifest.json`. The first run downloads it to `<local-dir>/manifest.json`; later runs
   use that copy and do not fetch it again. The one exception: if the requested variant is missing
   from the cached copy, it is fetched once more, which handles a changed MATCHED_FINEWEB_REPO_ID. To
   force a re-fetch, delete the local manifest. `--skip-manifest` never fetches it and fails if there
   is no local copy.
2. Find the dataset entry named `fineweb10B_<variant>` and its tokenizer entry (`tokenizer_name`).
3. Download `docs_selected.source_manifest.json` and `docs_selected.jsonl` (only with `--with-docs`),
   then all val shards, then their byte sidecars when the dataset entry lists `val_bytes_glob` (the
   CaseOps variants: one `fineweb_val_bytes_NNNNNN.bin` per val shard, the counts train_gpt.py scores
   with), then train shards 0..N-1 (always a prefix, so every user gets the same data order), then
   the tokenizer files (`model_path`, `vocab_path`, `path`).

Manifest layout, as written by the public exporter (`data/download_hf_docs_and_tokenize.py`), with
paths relative to the export root:

    {"datasets":   [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                     "stats": {"files_train": 80, "files_val": 1, "tokens_val": ..., ...}, ...}],
     "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                     "vocab_path": "tokenizers/fineweb_1024_bpe.vocab", ...}], ...}

Shards live at `datasets/<dataset name>/fineweb_{val,train}_NNNNNN.bin`. A root-relative path `p`
is fetched from `<root>/p` and stored at `<local-dir>/p`, for example
`<local-dir>/datasets/fineweb10B_sp1024/` and `<local-dir>/tokenizers/`. The public manifest records
no checksums. This script also reads an optional top-level `"files": {"<root-relative path>":
{"bytes": int, "sha256": hex}}` and checks every file listed there.

Checks, run on every file whether it was already present or just downloaded:
- shards: a valid header and an exact size (`data.shards.read_shard_header`); a byte sidecar also
  holds exactly as many counts as its val shard has tokens;
- tokenizer files: not empty; `.json` files must parse;
- manifest and docs sidecar: must parse as JSON;
- docs: the `docs_bytes` size from the sidecar;
- any file with a recorded `bytes`/`sha256`: both must match. sha256 costs one full read per run.
A valid file that is already present is skipped. A present file that fails a check is deleted and
downloaded again. A download is copied from the HF cache (symlinks resolved) to a temporary file in
the target folder, checked, and moved into place with os.replace, so a bad or partial file never
takes a real name. If a download fails its check, it is fetched once more with force_download (in
case the HF cache copy is bad). If it still fails, the temporary file is removed and the run stops.

Expected failures (hub unreachable, unknown variant, too many shards, corrupt file, ...) print one
line `error: <cause>; <fix>` to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

if __package__ in (None, ""):  # run as `python data/cached_challenge_fineweb.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.cli import OneLineArgumentParser, int_at_least
from data.shards import file_sha256, read_shard_header, write_atomic

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_VARIANT = "sp1024"
DEFAULT_TRAIN_SHARDS = 80
DATASET_PREFIX = "fineweb10B_"
MANIFEST_NAME = "manifest.json"
DOCS_NAME = "docs_selected.jsonl"
DOCS_SIDECAR_NAME = "docs_selected.source_manifest.json"
TOKENIZER_PATH_KEYS = ("model_path", "vocab_path", "path")
# sp<vocab> or byte260; an optional suffix covers mirrors such as sp8192_lossless_caps_caseops_v1_reserved.
_VARIANT_RE = re.compile(r"(byte260|sp[0-9]+(_[a-z0-9_]+)?)")
_COPY_CHUNK_BYTES = 16 * 1024 * 1024

# Kinds of file; each decides which check applies.
SHARD, TOKENIZER, JSON_FILE, DOCS = "shard", "tokenizer", "json", "docs"


class DownloadError(Exception):
    """An expected failure. The message is one line that names the cause and the fix."""


@dataclass(frozen=True)
class Source:
    """Where files come from (Hub repo and folder) and where they go (local folder)."""

    repo_id: str
    remote_root: str
    local_dir: Path

    def remote(self, rel: str) -> str:
        return f"{self.remote_root}/{rel}" if self.remote_root else rel

    def local(self, rel: str) -> Path:
        return self.local_dir / rel


@dataclass
class Summary:
    variant: str
    val_shards: int
    train_shards: int
    tokenizer_files: list[str]
    val_bytes_shards: int = 0
    downloaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    manifest_sha256: str = ""


def default_local_dir() -> Path:
    """The data/ folder holding this script. Files go here unless --local-dir says otherwise."""
    return Path(__file__).resolve().parent


def source_from_env(local_dir: Path | None = None) -> Source:
    """Read MATCHED_FINEWEB_REPO_ID and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX at call time, never at import."""
    repo_id = os.environ.get("MATCHED_FINEWEB_REPO_ID") or DEFAULT_REPO_ID
    remote_root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT).strip("/")
    return Source(repo_id, remote_root, Path(local_dir) if local_dir is not None else default_local_dir())


def dataset_name(variant: str) -> str:
    return f"{DATASET_PREFIX}{variant}"


# --------------------------------------------------------------------------------------------------
# Hub access


def _hub_download(repo_id: str, remote_path: str, *, force: bool = False) -> str:
    """Fetch one file of the dataset repo into the HF cache and return its local path.

    This is the only function that touches the network; tests replace it with a fake hub.
    """
    from huggingface_hub import hf_hub_download

    folder, _, name = remote_path.rpartition("/")
    return hf_hub_download(
        repo_id=repo_id,
        filename=name,
        subfolder=folder or None,
        repo_type="dataset",
        force_download=force,
    )


def _explain_hub_error(exc: BaseException, source: Source, remote: str) -> str | None:
    """A one-line cause + fix for an expected Hub failure, or None if `exc` is not one (a bug)."""
    what = f"{remote} from dataset repo {source.repo_id}"
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub missing entirely is handled by the caller
        hf_errors = None
    if hf_errors is not None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        if isinstance(exc, (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError)):
            why = "HF_HUB_OFFLINE is set" if offline else "no connection, and it is not in the local HF cache"
            return (
                f"cannot reach the Hugging Face Hub to fetch {what} ({why}); check your network or proxy "
                f"(and unset HF_HUB_OFFLINE), and that MATCHED_FINEWEB_REPO_ID={source.repo_id} is right"
            )
        if isinstance(exc, hf_errors.GatedRepoError):
            return f"dataset repo {source.repo_id} is gated; accept its terms on huggingface.co and run `hf auth login`"
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            return (
                f"dataset repo {source.repo_id} does not exist or is private; check MATCHED_FINEWEB_REPO_ID "
                f"(default {DEFAULT_REPO_ID}) or log in with `hf auth login`"
            )
        if isinstance(exc, hf_errors.EntryNotFoundError):
            return (
                f"{remote} is not in dataset repo {source.repo_id}; check MATCHED_FINEWEB_REMOTE_ROOT_PREFIX "
                f"(now {source.remote_root!r}), and if the manifest lists this file the repo is incomplete: "
                "try another MATCHED_FINEWEB_REPO_ID"
            )
        if isinstance(exc, hf_errors.HfHubHTTPError):
            return f"the Hub refused {what} ({_first_line(exc)}); retry later, or check MATCHED_FINEWEB_REPO_ID"
    if isinstance(exc, (ConnectionError, TimeoutError)) or "httpx" in type(exc).__module__:
        return f"network error while fetching {what} ({_first_line(exc)}); check your network and retry"
    if isinstance(exc, OSError):
        return f"could not fetch {what} ({_first_line(exc)}); check free disk space in the HF cache (HF_HOME)"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def fetch_to_cache(source: Source, rel: str, *, force: bool = False) -> Path:
    """Download `rel` (root-relative) via _hub_download; return the real file (HF symlinks resolved)."""
    remote = source.remote(rel)
    try:
        cached = _hub_download(source.repo_id, remote, force=force)
    except ImportError as exc:
        raise DownloadError(f"huggingface_hub is not installed ({exc}); run `pip install huggingface_hub`") from exc
    except Exception as exc:
        message = _explain_hub_error(exc, source, remote)
        if message is None:
            raise
        raise DownloadError(message) from exc
    try:
        return Path(cached).resolve(strict=True)
    except OSError as exc:
        raise DownloadError(
            f"the HF cache entry for {remote} is broken ({_first_line(exc)}); "
            "delete it with `hf cache delete` and rerun"
        ) from exc


# --------------------------------------------------------------------------------------------------
# Checks


def check_file(path: Path, kind: str, expected: dict | None = None) -> str | None:
    """Return None if the file at `path` is good, else a short reason. Never raises for bad content."""
    expected = expected or {}
    try:
        size = path.stat().st_size
        if kind == SHARD:
            try:
                read_shard_header(path)
            except ValueError as exc:
                # read_shard_header names the path first; keep only the reason (the caller names the file).
                return str(exc).split(": ", 1)[-1]
        elif size == 0:
            return "file is empty"
        if kind == JSON_FILE or (kind == TOKENIZER and path.suffix == ".json"):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return f"not valid JSON ({_first_line(exc)})"
        want_bytes = expected.get("bytes")
        if want_bytes is not None and size != int(want_bytes):
            return f"size {size} bytes, the manifest records {int(want_bytes)}"
        want_sha = expected.get("sha256")
        if want_sha and file_sha256(path) != str(want_sha).lower():
            return "sha256 does not match the manifest"
    except OSError as exc:
        return f"unreadable ({_first_line(exc)})"
    return None


def _copy_to_temp(src: Path, dest: Path) -> Path:
    """Copy `src` to a fresh temporary file beside `dest` (same folder, so os.replace is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, _COPY_CHUNK_BYTES)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.unlink(tmp_name)
        raise
    return Path(tmp_name)


def ensure_file(source: Source, rel: str, kind: str, expected: dict | None = None, log=print) -> bool:
    """Make `<local-dir>/<rel>` a checked copy of `<root>/<rel>`. Return True if it was downloaded.

    A present file that passes the check is kept as it is. A present file that fails is deleted and
    fetched again. A fetched file that fails is fetched once more with force_download, and if it
    still fails nothing is left behind and DownloadError is raised.
    """
    dest = source.local(rel)
    if dest.is_symlink() and not dest.exists():
        dest.unlink()  # dangling link, e.g. to an HF cache blob that was deleted
    if dest.exists():
        problem = check_file(dest, kind, expected)
        if problem is None:
            return False
        log(f"{rel}: {problem}; downloading it again")
        dest.unlink()
    for force in (False, True):
        cached = fetch_to_cache(source, rel, force=force)
        try:
            tmp = _copy_to_temp(cached, dest)
        except OSError as exc:
            raise DownloadError(
                f"cannot write {dest} ({_first_line(exc)}); free disk space or choose another --local-dir"
            ) from exc
        try:
            problem = check_file(tmp, kind, expected)
            if problem is None:
                os.replace(tmp, dest)
                return True
        finally:
            tmp.unlink(missing_ok=True)  # after a successful os.replace there is nothing left to remove
    raise DownloadError(
        f"{source.remote(rel)} from {source.repo_id} failed its check twice ({problem}), so nothing was kept "
        f"at {dest}; the copy on the Hub is bad or the manifest is out of date: report it to the repo owner, "
        "or set MATCHED_FINEWEB_REPO_ID to another mirror"
    )


# --------------------------------------------------------------------------------------------------
# Manifest


def _parse_manifest(payload: bytes, where: str) -> dict:
    try:
        manifest = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DownloadError(f"{where} is not valid JSON ({_first_line(exc)})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise DownloadError(f"{where} has no 'datasets' list, so it is not a challenge export manifest")
    return manifest


def fetch_manifest(source: Source) -> dict:
    """Download the manifest, check it, and store it atomically as `<local-dir>/manifest.json`."""
    cached = fetch_to_cache(source, MANIFEST_NAME)
    payload = cached.read_bytes()
    manifest = _parse_manifest(
        payload,
        f"{source.remote(MANIFEST_NAME)} in {source.repo_id} (check MATCHED_FINEWEB_REMOTE_ROOT_PREFIX)",
    )
    write_atomic(source.local(MANIFEST_NAME), payload)
    return manifest


def load_manifest(source: Source, *, skip_download: bool) -> tuple[dict, bool]:
    """Return (manifest, came_from_cache). Use the local copy if it parses, else fetch one (unless skip_download)."""
    path = source.local(MANIFEST_NAME)
    if path.is_file():
        try:
            return _parse_manifest(path.read_bytes(), f"local manifest {path}"), True
        except DownloadError as exc:
            if skip_download:
                raise DownloadError(f"{exc}; delete it and rerun without --skip-manifest") from exc
            print(f"{path}: {exc}; fetching it again")
    elif skip_download:
        raise DownloadError(
            f"--skip-manifest needs a local manifest at {path}, but there is none; rerun without --skip-manifest"
        )
    return fetch_manifest(source), False


def known_variants(manifest: dict) -> list[str]:
    names = [str(d.get("name", "")) for d in manifest.get("datasets", []) if isinstance(d, dict)]
    return sorted(n[len(DATASET_PREFIX) :] for n in names if n.startswith(DATASET_PREFIX))


def find_dataset(manifest: dict, variant: str) -> dict | None:
    name = dataset_name(variant)
    return next((d for d in manifest["datasets"] if isinstance(d, dict) and d.get("name") == name), None)


def _checked_rel(value, what: str) -> str:
    """Turn a manifest path into a safe root-relative POSIX path (no absolute paths or '..')."""
    text = str(value).replace("\\", "/")
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts:
        raise DownloadError(f"manifest {what} {value!r} is not a path relative to the export root; fix the manifest")
    return path.as_posix()


@dataclass
class Plan:
    """What to fetch for one variant, in download order, each as (root-relative path, kind)."""

    dataset: dict
    val: list[str]
    train: list[str]
    tokenizer: list[str]
    docs: list[tuple[str, str]]
    val_bytes: list[str] = field(default_factory=list)  # byte sidecars, one per val shard (CaseOps variants)

    def files(self) -> list[tuple[str, str]]:
        shards = self.val + self.val_bytes + self.train
        return self.docs + [(rel, SHARD) for rel in shards] + [(rel, TOKENIZER) for rel in self.tokenizer]


def plan_variant(manifest: dict, variant: str, train_shards: int, *, with_docs: bool, where: str) -> Plan:
    """Turn the manifest entry for `variant` into the files to fetch. `where` names the source in errors."""
    dataset = find_dataset(manifest, variant)
    if dataset is None:
        known = ", ".join(known_variants(manifest)) or "none"
        raise DownloadError(
            f"variant {variant} ({dataset_name(variant)}) is not in {where}; known variants there: {known}; "
            "pick one of those or set MATCHED_FINEWEB_REPO_ID to a repo that publishes it"
        )
    stats = dataset.get("stats") if isinstance(dataset.get("stats"), dict) else {}
    try:
        files_train, files_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DownloadError(
            f"{dataset_name(variant)} in {where} lacks integer stats.files_train/files_val; the manifest is not in "
            "the challenge layout, so delete the local manifest and rerun"
        ) from exc
    if train_shards > files_train:
        raise DownloadError(
            f"{variant} has only {files_train} train shards in {where}, but {train_shards} were requested; "
            f"pass --train-shards {files_train} or fewer"
        )
    tok_name = dataset.get("tokenizer_name")
    tokenizer = next(
        (t for t in manifest.get("tokenizers", []) if isinstance(t, dict) and t.get("name") == tok_name), None
    )
    if tokenizer is None:
        raise DownloadError(
            f"tokenizer {tok_name!r} of {dataset_name(variant)} is not in {where}; the manifest is incomplete: "
            "delete the local manifest and rerun, or use another MATCHED_FINEWEB_REPO_ID"
        )
    tok_files: list[str] = []
    for key in TOKENIZER_PATH_KEYS:
        if tokenizer.get(key):
            rel = _checked_rel(tokenizer[key], f"tokenizer {key}")
            if rel not in tok_files:
                tok_files.append(rel)
    if not tok_files:
        raise DownloadError(f"tokenizer {tok_name!r} in {where} names no model_path/vocab_path/path; fix the manifest")
    folder = f"datasets/{dataset_name(variant)}"
    docs = [(DOCS_SIDECAR_NAME, JSON_FILE), (DOCS_NAME, DOCS)] if with_docs else []
    return Plan(
        dataset=dataset,
        val=[f"{folder}/fineweb_val_{i:06d}.bin" for i in range(files_val)],
        train=[f"{folder}/fineweb_train_{i:06d}.bin" for i in range(train_shards)],
        tokenizer=tok_files,
        docs=docs,
        val_bytes=_val_bytes_files(dataset, files_val, where),
    )


def _val_bytes_files(dataset: dict, files_val: int, where: str) -> list[str]:
    """The byte sidecar of every val shard when the entry lists `val_bytes_glob` (e.g.
    `datasets/<name>/fineweb_val_bytes_*.bin`), in val shard order; else none."""
    pattern = dataset.get("val_bytes_glob")
    if not pattern:
        return []
    rel = PurePosixPath(_checked_rel(pattern, "val_bytes_glob"))
    if rel.name.count("*") != 1 or "*" in str(rel.parent):
        raise DownloadError(f"val_bytes_glob {pattern!r} of {dataset.get('name')} in {where} is not a folder plus a "
                            "file name with one '*' (e.g. fineweb_val_bytes_*.bin); fix the manifest")
    return [(rel.parent / rel.name.replace("*", f"{i:06d}")).as_posix() for i in range(files_val)]


def file_expectations(manifest: dict) -> dict[str, dict]:
    """The optional top-level `files` map: root-relative path -> {"bytes": int, "sha256": hex}."""
    raw = manifest.get("files") or {}
    if not isinstance(raw, dict):
        raise DownloadError("manifest 'files' must map paths to {bytes, sha256}; fix the manifest")
    out = {}
    for rel, spec in raw.items():
        if not isinstance(spec, dict):
            raise DownloadError(f"manifest files[{rel!r}] must be an object with bytes/sha256; fix the manifest")
        try:
            if spec.get("bytes") is not None:
                int(spec["bytes"])
        except (TypeError, ValueError) as exc:
            raise DownloadError(f"manifest files[{rel!r}].bytes is not an integer; fix the manifest") from exc
        out[_checked_rel(rel, "files key")] = spec
    return out


def _docs_expectation(source: Source, base: dict | None) -> dict:
    """Expected size of docs_selected.jsonl: the manifest's `files` entry, else the sidecar's docs_bytes."""
    expected = dict(base or {})
    if expected.get("bytes") is None:
        sidecar = json.loads(source.local(DOCS_SIDECAR_NAME).read_text(encoding="utf-8"))
        docs_bytes = sidecar.get("docs_bytes") if isinstance(sidecar, dict) else None
        if isinstance(docs_bytes, int) and not isinstance(docs_bytes, bool):
            expected["bytes"] = docs_bytes
    return expected


def _token_count_warnings(source: Source, plan: Plan, files_train: int) -> list[str]:
    """Compare shard token totals with the manifest stats. A mismatch usually means a stale local manifest.

    Only warnings: the published stats are not documented to match the shards in every export.
    """
    stats = plan.dataset.get("stats") or {}
    checks = [("val", plan.val, stats.get("tokens_val"))]
    if len(plan.train) == files_train and not stats.get("stopped_early"):
        checks.append(("train", plan.train, stats.get("tokens_train")))
    warnings = []
    for split, rels, want in checks:
        if not isinstance(want, int) or not rels:
            continue
        have = sum(read_shard_header(source.local(rel)) for rel in rels)
        if have != want:
            warnings.append(
                f"warning: {split} shards of {plan.dataset.get('name')} hold {have} tokens but the manifest says "
                f"{want}; if you changed MATCHED_FINEWEB_REPO_ID, delete {source.local(MANIFEST_NAME)} and "
                f"{source.local(plan.val[0]).parent} and rerun"
            )
    return warnings


# --------------------------------------------------------------------------------------------------
# Driver


def download(
    variant: str,
    train_shards: int,
    *,
    source: Source,
    skip_manifest: bool = False,
    with_docs: bool = False,
    log=print,
) -> Summary:
    """Fetch and check everything for `variant`; files that are already present and valid are not fetched."""
    manifest, from_cache = load_manifest(source, skip_download=skip_manifest)
    if from_cache and not skip_manifest and find_dataset(manifest, variant) is None:
        log(f"{variant} is not in the cached {source.local(MANIFEST_NAME)}; fetching the manifest again")
        manifest, from_cache = fetch_manifest(source), False
    where = (
        f"the cached manifest {source.local(MANIFEST_NAME)}"
        if from_cache
        else f"{source.remote(MANIFEST_NAME)} of {source.repo_id}"
    )
    plan = plan_variant(manifest, variant, train_shards, with_docs=with_docs, where=where)
    expectations = file_expectations(manifest)
    summary = Summary(
        variant=variant,
        val_shards=len(plan.val),
        train_shards=len(plan.train),
        val_bytes_shards=len(plan.val_bytes),
        tokenizer_files=plan.tokenizer,
        manifest_sha256=hashlib.sha256(source.local(MANIFEST_NAME).read_bytes()).hexdigest(),
    )
    for rel, kind in plan.files():
        expected = expectations.get(rel)
        if kind == DOCS:
            expected = _docs_expectation(source, expected)
        if ensure_file(source, rel, kind, expected, log=log):
            summary.downloaded.append(rel)
            log(f"downloaded {rel}")
        else:
            summary.present.append(rel)
    for shard, sidecar in zip(plan.val, plan.val_bytes):
        tokens, counts = read_shard_header(source.local(shard)), read_shard_header(source.local(sidecar))
        if tokens != counts:
            raise DownloadError(
                f"byte sidecar {sidecar} holds {counts} counts but {shard} holds {tokens} tokens, so the validation "
                f"bytes would be wrong; the copy on {source.repo_id} is inconsistent: report it to the repo owner, or "
                f"delete {source.local(sidecar).parent} and rerun"
            )
    for warning in _token_count_warnings(source, plan, int(plan.dataset["stats"]["files_train"])):
        print(warning, file=sys.stderr)
    return summary


def _variant_arg(text: str) -> str:
    if not _VARIANT_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid variant {text!r}: expected sp<vocab size> (e.g. sp1024) or byte260")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        description="Download the challenge's cached FineWeb shards and tokenizer from the Hugging Face Hub "
        "(repo: $MATCHED_FINEWEB_REPO_ID, default willdepueoai/parameter-golf; folder: "
        "$MATCHED_FINEWEB_REMOTE_ROOT_PREFIX, default datasets).",
    )
    parser.add_argument("train_shards_positional", nargs="?", type=int_at_least(0), default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--variant",
        type=_variant_arg,
        default=DEFAULT_VARIANT,
        help="tokenizer family: sp1024, sp4096, sp8192, ... (sp<vocab>) or byte260 (default: %(default)s)",
    )
    parser.add_argument(
        "--train-shards",
        type=int_at_least(0),
        default=None,
        help=f"download train shards 0..N-1 (default: {DEFAULT_TRAIN_SHARDS}, i.e. 8B tokens); "
        "a bare positional number works too",
    )
    parser.add_argument(
        "--skip-manifest", action="store_true", help="never fetch manifest.json; use the local copy (must exist)"
    )
    parser.add_argument(
        "--with-docs",
        action="store_true",
        help=f"also fetch {DOCS_NAME} and {DOCS_SIDECAR_NAME} (for re-tokenising)",
    )
    parser.add_argument(
        "--local-dir",
        type=Path,
        default=None,
        help="where datasets/, tokenizers/ and manifest.json go (default: the data/ folder of this script)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    positional, option = args.train_shards_positional, args.train_shards
    if positional is not None and option is not None and positional != option:
        print(
            f"error: train shard count given twice ({positional} and --train-shards {option}); give one",
            file=sys.stderr,
        )
        return 2
    train_shards = next((n for n in (option, positional) if n is not None), DEFAULT_TRAIN_SHARDS)
    source = source_from_env(args.local_dir)
    try:
        summary = download(
            args.variant,
            train_shards,
            source=source,
            skip_manifest=args.skip_manifest,
            with_docs=args.with_docs,
        )
    except DownloadError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume (finished files are kept)", file=sys.stderr)
        return 130
    sidecar = f" (+ {summary.val_bytes_shards} byte sidecar file(s))" if summary.val_bytes_shards else ""
    print(
        f"{summary.variant}: {summary.val_shards} val{sidecar} + {summary.train_shards} train shards and "
        f"{len(summary.tokenizer_files)} tokenizer files ready in {source.local_dir} from {source.repo_id} "
        f"({len(summary.downloaded)} downloaded, {len(summary.present)} already present; "
        f"manifest sha256 {summary.manifest_sha256[:12]})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
