"""Build the sample dataset from the embedded Wikipedia corpus (data/sample/wiki_summaries_en.txt.xz).

Documents are the corpus's blank-line-separated blocks. About 5% of them go to validation, chosen
by a hash of the document text (see `split_sample`), so the choice depends on nothing but the text.
The train/val disjointness is checked, not assumed, and the check is recorded in the manifest.
The export itself is `data/export_shards.py::export_dataset`:

    data/tokenizers/sample_<V>_bpe.model, .vocab
    data/datasets/sample_sp<V>/fineweb_{val,train}_000000.bin, manifest.json

    python data/prepare_sample.py                    # vocab 1024
    python data/prepare_sample.py --vocab-size 8192
    python data/prepare_sample.py --caseops          # sample_sp1024_lossless_caps_caseops_v1_reserved

Re-running with the same settings checks the outputs and rewrites nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python data/prepare_sample.py`: make the `data` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.cli import OneLineArgumentParser, int_at_least
from data.export_shards import (
    CASEOPS_SUFFIX,
    DEFAULT_DATASETS_ROOT,
    DEFAULT_TOKENIZERS_ROOT,
    VAL_HASH_RULE,
    ExportError,
    check_disjoint,
    clean_docs,
    export_dataset,
    print_summary,
    read_text_documents,
    run_cli,
    split_by_hash,
)
from data.shards import file_sha256

SAMPLE_PATH = Path(__file__).resolve().parent / "sample" / "wiki_summaries_en.txt.xz"
VAL_FRACTION = 0.05  # hash bucket < 500 of 10000


def load_sample_docs(max_docs: int | None = None, source: str | Path = SAMPLE_PATH) -> list[str]:
    """The corpus's cleaned, non-empty documents in file order; the first `max_docs` if given."""
    docs = clean_docs(read_text_documents(source))
    return docs if max_docs is None else docs[:max_docs]


def split_sample(docs: Sequence[str]) -> tuple[list[str], list[str], dict]:
    """Return (train, val, check): the hash split of `docs` and the verified disjointness record."""
    train, val = split_by_hash(docs, VAL_FRACTION)
    check = check_disjoint(train, val)
    return train, val, check


def prepare_sample(
    *,
    vocab_size: int = 1024,
    datasets_root: str | Path = DEFAULT_DATASETS_ROOT,
    tokenizers_root: str | Path = DEFAULT_TOKENIZERS_ROOT,
    max_docs: int | None = None,
    shard_tokens: int = 100_000_000,
    source: str | Path = SAMPLE_PATH,
    caseops: bool = False,
) -> dict:
    """Export the sample corpus as dataset `sample_sp<V>` with tokenizer `sample_<V>_bpe` (with `caseops`:
    case-transformed, both names ending in `_lossless_caps_caseops_v1_reserved`, plus the byte sidecar).

    Returns `export_dataset`'s result (manifest plus "dataset_dir" and "tokenizer_path").
    """
    if max_docs is not None and max_docs < 1:
        raise ExportError(f"max docs must be at least 1, got {max_docs}")
    source = Path(source)
    if not source.is_file():
        raise ExportError(f"sample corpus {source} not found; restore data/sample/ from git")
    docs = load_sample_docs(max_docs, source)
    train, val, check = split_sample(docs)
    extra = {
        "sources": [{"file": source.name, "sha256": file_sha256(source), "format": "text", "license": "CC BY-SA 4.0, see data/sample/NOTICE.md"}],
        "max_docs": max_docs,
        "val_selection": {"method": "text_hash", "val_fraction": VAL_FRACTION, "rule": VAL_HASH_RULE},
        "split_check": check,
    }
    suffix = f"_{CASEOPS_SUFFIX}" if caseops else ""
    return export_dataset(
        train,
        val,
        datasets_root=datasets_root,
        tokenizers_root=tokenizers_root,
        dataset_name=f"sample_sp{vocab_size}" + suffix,
        tokenizer_name=f"sample_{vocab_size}_bpe" + suffix,
        vocab_size=vocab_size,
        shard_tokens=shard_tokens,
        extra_manifest=extra,
        case_ops=caseops,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="prepare_sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int_at_least(1), default=1024)
    p.add_argument("--max-docs", type=int_at_least(1), help="use only the first N documents of the corpus (for quick tests)")
    p.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS_ROOT)
    p.add_argument("--tokenizers-root", type=Path, default=DEFAULT_TOKENIZERS_ROOT)
    p.add_argument("--shard-tokens", type=int_at_least(1), default=100_000_000)
    p.add_argument("--caseops", action="store_true", help="case-transform the text (see data/export_shards.py)")
    args = p.parse_args(argv)

    def body() -> int:
        manifest = prepare_sample(
            vocab_size=args.vocab_size,
            datasets_root=args.datasets_root,
            tokenizers_root=args.tokenizers_root,
            max_docs=args.max_docs,
            shard_tokens=args.shard_tokens,
            caseops=args.caseops,
        )
        print_summary(manifest)
        return 0

    return run_cli("prepare_sample.py", body)


if __name__ == "__main__":
    sys.exit(main())
