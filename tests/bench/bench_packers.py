"""Benchmark: the packers on one artifact's integer codes, as a competitor comparing packers would.

Not collected by pytest. Run from the repo root:

    python tests/bench/bench_packers.py RUN_DIR [--artifact final_model.quantized.ptz] [--no-lrzip]

Reads the artifact a run wrote (its quantized entries: codes, scales, LQER factors, kept tensors) and
packs exactly those entries four ways: byte-shuffle + brotli-11, lzma (9e), our `ans`, and a per-group
lrzip packer written here from the public description of the 2026-04-27 record's (R0427's `pergroup`):
the codes bucketed into 7 groups (the embedding; across layers c_q, c_k, c_v, the attention output,
the MLP input and the MLP output, in layer order), the rows of the embedding, of each c_q and of each
MLP input matrix put in greedy nearest-neighbour order (L1, starting at row 0; the uint16 row order
stored, brotli-11), every tensor transposed (column-major bytes), each group compressed by
`lrzip -z -L 9` (ZPAQ), everything else (scales, LQER factors, kept tensors, a JSON shape list)
brotli-11 with a 2^24 window. Every packer's roundtrip is checked exact.

With `--fullsize-decode`, instead: the full-size record model's Gaussian stand-in with this artifact's
trained embedding codes (8,192 rows) tiled to its width, packed and unpacked by ans (seconds, one core).
With `--order0-sweep`, instead: the ans codes stream against the codes' order-0 entropy on the run's
weights rounded on every grid AUTO_FIT can choose. With `--fill-cap BYTES` it measures instead what AUTO_FIT_FILL buys with bytes a packer saves: the run's
weights (final_model.pt) exported again its way (GPTQ on Hessians recomputed from the same calibration
batches, checked to give the artifact's codes), filled with ans up to BYTES, scored (flat val_bpb) before
and after.

Rows: the whole model; each tensor family's codes packed alone by each packer (the embedding, the
attention and MLP codes, ...); everything but the codes (the whole minus the codes as packed
together); pack and unpack seconds (CPU seconds of this process and its children: lrzip is a child).
lrzip comes from Debian's `lrzip` package (`apt-get install -y lrzip`); without it the column is
skipped, and the benchmark says so in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

# R0427's code groups: the embedding, then per kind across layers (in layer order); rows sorted in three.
LRZIP_GROUPS = ("tok_emb.weight", "attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                "mlp.fc.weight", "mlp.proj.weight")
SORTED_KINDS = ("tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight")
FAMILY_NAMES = {"embed": "embedding", "head": "head", "attn": "attention", "mlp": "MLP", "other": "other"}


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (lrzip runs as one)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def lrzip_bytes(data: bytes, decompress: bool = False) -> bytes:
    """`lrzip -z -L 9` (ZPAQ) of the bytes, or their decompression, through temporary files."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.write_bytes(data)
        flags = ["-d"] if decompress else ["-z", "-L", "9"]
        subprocess.run(["lrzip", *flags, "-q", "-f", "-o", str(dst), str(src)], check=True, capture_output=True)
        return dst.read_bytes()


def nearest_neighbour_order(codes: np.ndarray) -> np.ndarray:
    """Greedy chain from row 0: each next row is the unvisited one nearest (L1) to the last; O(rows^2)."""
    rows = codes.astype(np.int16)
    left = np.ones(len(rows), bool)
    order = [0]
    left[0] = False
    for _ in range(len(rows) - 1):
        candidates = np.flatnonzero(left)
        distance = np.abs(rows[candidates] - rows[order[-1]]).sum(axis=1)
        order.append(int(candidates[np.argmin(distance)]))
        left[order[-1]] = False
    return np.asarray(order, np.uint16)


def lrzip_group(name: str) -> str | None:
    return next((g for g in LRZIP_GROUPS if name == g or name.endswith("." + g)), None)


def pack_pergroup(entries: list[tg.ExportedTensor], stats: dict) -> bytes:
    """The per-group lrzip container: b'PGRP' | u32 count | u32 length each | remainder | orders | groups."""
    grouped: dict[str, list[bytes]] = {g: [] for g in LRZIP_GROUPS}
    orders, rest, manifest = [], [], []
    for e in entries:
        group = lrzip_group(e.name) if e.bits else None
        item = dict(name=e.name, shape=list(e.shape), dtype=e.dtype, bits=e.bits, method=e.method, group=group)
        arrays = [a for _, a in tg._tensor_parts(e)]
        if group is not None:
            codes = arrays.pop(0)
            if group in SORTED_KINDS:
                order = nearest_neighbour_order(codes)
                orders.append(order.tobytes())
                codes = codes[order]
            grouped[group].append(np.ascontiguousarray(codes.T).tobytes())  # column-major
        if e.lqer is not None:
            f = e.lqer
            item["lqer"] = dict(rank=f.b_codes.shape[0], group=f.group, bits=f.bits, a_bits=f.a_bits)
        item["parts"] = [(a.dtype.str, list(a.shape)) for a in arrays]
        rest += [np.ascontiguousarray(a).tobytes() for a in arrays]
        manifest.append(item)
    import brotli

    head = json.dumps(manifest, separators=(",", ":")).encode()
    payloads = [brotli.compress(struct.pack("<I", len(head)) + head + b"".join(rest), quality=11, lgwin=24),
                brotli.compress(b"".join(orders), quality=11)]
    stats.update(remainder=len(payloads[0]), orders=len(payloads[1]))
    for g in LRZIP_GROUPS:
        if grouped[g]:
            payloads.append(lrzip_bytes(b"".join(grouped[g])))
            stats[g] = len(payloads[-1])
    return b"PGRP" + struct.pack(f"<I{len(payloads)}I", len(payloads), *map(len, payloads)) + b"".join(payloads)


def unpack_pergroup(blob: bytes) -> list[tg.ExportedTensor]:
    import brotli

    (count,) = struct.unpack("<I", blob[4:8])
    lengths = struct.unpack(f"<{count}I", blob[8 : 8 + 4 * count])
    at, payloads = 8 + 4 * count, []
    for n in lengths:
        payloads.append(blob[at : at + n])
        at += n
    rest = brotli.decompress(payloads[0])
    (head_len,) = struct.unpack("<I", rest[:4])
    manifest, rest_at = json.loads(rest[4 : 4 + head_len]), 4 + head_len
    orders, order_at = brotli.decompress(payloads[1]), 0
    present = [g for g in LRZIP_GROUPS if any(t["group"] == g for t in manifest)]
    groups = {g: lrzip_bytes(p, decompress=True) for g, p in zip(present, payloads[2:])}
    group_at = dict.fromkeys(groups, 0)
    entries = []
    for t in manifest:
        arrays = []
        for dtype, shape in t["parts"]:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            arrays.append(torch.from_numpy(np.frombuffer(rest[rest_at : rest_at + n], dtype).reshape(shape).copy()))
            rest_at += n
        if not t["bits"]:
            entries.append(tg.ExportedTensor(t["name"], tuple(t["shape"]), t["dtype"], value=arrays[0]))
            continue
        rows, cols = tg._rows_cols(t["shape"])
        g = t["group"]
        if g is None:
            codes = arrays.pop(0)
        else:
            data = groups[g][group_at[g] : group_at[g] + rows * cols]
            group_at[g] += rows * cols
            codes = np.frombuffer(data, np.int8).reshape(cols, rows).T
            if g in SORTED_KINDS:
                order = np.frombuffer(orders[order_at : order_at + 2 * rows], np.uint16)
                order_at += 2 * rows
                codes = codes[np.argsort(order)]
            codes = torch.from_numpy(np.ascontiguousarray(codes))
        scales, lqer = arrays[0], None
        if "lqer" in t:
            q = t["lqer"]
            lqer = tg.LowRankFactors(arrays[1], arrays[3], arrays[2], arrays[4], q["group"], q["bits"], q["a_bits"])
        entries.append(tg.ExportedTensor(t["name"], tuple(t["shape"]), t["dtype"], t["bits"], codes, scales,
                                         method=t["method"], lqer=lqer))
    return entries


def check_same(a: list[tg.ExportedTensor], b: list[tg.ExportedTensor], packer: str) -> None:
    """Exact roundtrip: every code, scale, LQER factor and kept value."""
    def arrays(e):
        return [e.codes, e.scales, e.value] + ([e.lqer.a_codes, e.lqer.a_scales, e.lqer.b_codes, e.lqer.b_scales]
                                              if e.lqer is not None else [])
    assert [e.name for e in a] == [e.name for e in b], packer
    for x, y in zip(a, b):
        for u, v in zip(arrays(x), arrays(y)):
            assert (u is None) == (v is None) and (u is None or (u.dtype == v.dtype and torch.equal(u, v))), \
                f"{packer}: {x.name} does not roundtrip"


def measure(pack, unpack, entries) -> tuple[bytes, float, float]:
    t0 = cpu_seconds()
    blob = pack()
    t1 = cpu_seconds()
    back = unpack(blob)
    t2 = cpu_seconds()
    check_same(entries, back, "packer")
    return blob, t1 - t0, t2 - t1


def fill_to_cap(run_dir: Path, cap: int, artifact: list[tg.ExportedTensor]) -> None:
    """The run's weights exported its way again (Hessians recomputed from the same calibration batches;
    checked to give the artifact's codes), then filled by AUTO_FIT_FILL with ans up to `cap` model bytes:
    what the filler spends the bytes on, and the flat val_bpb before and after."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    hp = tg.Hyperparameters(**manifest["config"])
    cpu = tg.Runtime(0, 1, 0, torch.device("cpu"), False)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    model.load_state_dict(torch.load(run_dir / "final_model.pt", map_location="cpu"))
    model.eval()
    sd, plan, looping = model.state_dict(), tg.QuantPlan.from_hparams(hp), model.cfg.num_loops > 0
    hessians = tg.collect_hessians(model, tg.calibration_inputs(hp, cpu, model, tg.shard_files(hp.data_path, "train"),
                                                                looping), plan, looping)
    lqer = dict(rank=hp.lqer_rank, top_k=hp.lqer_top_k, factor_bits=hp.lqer_factor_bits, a_bits=hp.lqer_a_bits,
                group=hp.lqer_asym_group if hp.lqer_asym_enabled else 0) if hp.lqer_enabled else None
    natural = tg.quantize_state_dict(sd, plan, hessians, tg.gptq_options(hp))
    natural = tg.apply_lqer(sd, natural, hessians=hessians, **lqer) if lqer else natural
    check_same(artifact, natural, "the re-export")
    val_tokens = tg.load_validation_tokens(hp.data_path)
    luts = tg.build_byte_luts(tg.load_tokenizer(hp), hp.vocab_size)

    def score(entries) -> float:
        m = tg.GPT(model.cfg)
        m.load_state_dict(tg.dequantize_state_dict(entries))
        m.eval()
        with torch.no_grad():
            return tg.evaluate(lambda x: m.forward_logits(x, looping), val_tokens, luts, tg.EvalContext(cpu),
                               seq_len=hp.effective_eval_seq_len, batch_seqs=16).val_bpb

    def pack(entries) -> bytes:
        return tg.pack_artifact(entries, compressor="ans", model=dataclasses.asdict(model.cfg), meta={"looping": looping})

    natural_bytes = len(pack(natural))
    lines: list[str] = []
    blob, filled = tg.fit_artifact(sd, plan, target_bytes=cap, pack=pack, hessians=hessians,
                                   gptq=tg.gptq_options(hp), lqer=lqer, log=lines.append)
    print("\n".join("    " + line for line in lines))
    print(f"\n| model bytes (ans) | cap | filled bytes | val_bpb natural | val_bpb filled |\n|---|---|---|---|---|\n"
          f"| {natural_bytes:,} | {cap:,} | {len(blob):,} | {score(natural):.5f} | {score(filled):.5f} |")


def order0_sweep(run_dir: Path) -> None:
    """The run's weights (final_model.pt) rounded to nearest on every grid AUTO_FIT can choose (bits 2-8;
    SDClip k from 6 up, and absmax), all groups at once: the ans codes stream (side information, tables,
    row and column predictions and header included) against the order-0 entropy of the codes, summed over the ans
    coding groups (family x bits; below the entropy of all codes pooled)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    hp = tg.Hyperparameters(**manifest["config"])
    sd = torch.load(run_dir / "final_model.pt", map_location="cpu")
    print("| bits | k | order-0 entropy, bytes | ans codes stream, bytes | ans - order-0, bytes | ans / order-0 |\n"
          "|---|---|---|---|---|---|")
    for bits in range(2, 9):
        for k in (6.0, 9.0, 12.85, 20.0, 0.0):
            plan = tg.QuantPlan("sdclip" if k else "absmax", {g: bits for g in tg.QUANT_GROUPS},
                                {g: k for g in tg.QUANT_GROUPS}, min_numel=hp.quant_min_numel)
            quantized = [e for e in tg.quantize_state_dict(sd, plan) if e.bits]
            families = [tg.tensor_group(e.name) for e in quantized]
            order0 = 0.0
            for f in set(families):
                counts = sum(np.bincount(e.codes.numpy().reshape(-1).astype(np.int64) + 128, minlength=256)
                             for e, g in zip(quantized, families) if g == f)
                p = counts[counts > 0] / counts.sum()
                order0 += float(-(counts[counts > 0] * np.log2(p)).sum()) / 8
            data = tg.ans_encode([e.codes.numpy() for e in quantized], [e.bits for e in quantized], None, families)
            print(f"| {bits} | {k or 'absmax'} | {order0:,.0f} | {len(data):,} | {len(data) - order0:+,.0f} | "
                  f"{len(data) / max(order0, 1):.4f} |", flush=True)


def fullsize_decode(artifact: list[tg.ExportedTensor]) -> None:
    """The full-size RECIPE=record model (Gaussian stand-in, rounded on the record's grids) with this
    artifact's trained embedding codes in place of its own (tiled across the columns to the full
    width; they need the full-size row count, 8,192): ans pack and unpack seconds on one core, and how
    many embedding rows are predicted."""
    hp = tg.Hyperparameters.from_env({})
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(hp))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1 / p.shape[1] ** 0.5)
    entries = tg.quantize_state_dict(model.state_dict(), dataclasses.replace(tg.QuantPlan.from_hparams(hp),
                                                                             method="sdclip"))
    trained = next(e for e in artifact if e.name == "tok_emb.weight").codes
    i = next(k for k, e in enumerate(entries) if e.name == "tok_emb.weight")
    rows, cols = entries[i].codes.shape
    if trained.shape[0] != rows:
        raise SystemExit(f"the artifact's embedding has {trained.shape[0]} rows; the full-size one {rows}")
    entries[i] = dataclasses.replace(entries[i], codes=trained.repeat(1, -(-cols // trained.shape[1]))[:, :cols]
                                     .contiguous(), bits=next(e for e in artifact if e.name == "tok_emb.weight").bits)
    stats: dict = {}
    t0 = time.process_time()
    blob = tg.pack_artifact(entries, compressor="ans", stats=stats)
    t1 = time.process_time()
    back, _ = tg.unpack_artifact(blob)
    t2 = time.process_time()
    check_same(entries, back, "ans")
    row_stats: dict = {}
    tg.ans_encode([entries[i].codes.numpy()], [entries[i].bits], row_stats, ["embed"])
    print(f"full size ({sum(e.codes.numel() for e in entries if e.bits):,} codes), trained embedding codes "
          f"{tuple(trained.shape)} tiled to {(rows, cols)}: {len(blob):,} bytes (codes {stats['codes']:,}, "
          f"of which embedding row and column predictions {row_stats['rows']:,}), pack {t1 - t0:.1f} s, unpack {t2 - t1:.1f} s "
          f"(CPU, one thread), roundtrip exact")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (or an artifact file)")
    parser.add_argument("--artifact", default=tg.ARTIFACT_NAME)
    parser.add_argument("--no-lrzip", action="store_true", help="skip the per-group lrzip column")
    parser.add_argument("--order0-sweep", action="store_true", help="instead: ans against the order-0 entropy "
                        "of the run's weights rounded on every grid AUTO_FIT can choose (needs final_model.pt)")
    parser.add_argument("--fullsize-decode", action="store_true", help="instead: the full-size stand-in with "
                        "this artifact's embedding codes (8,192 rows): ans pack and unpack seconds")
    parser.add_argument("--fill-cap", type=int, default=0, help="also fill the run's weights with AUTO_FIT_FILL "
                        "and ans up to this many model bytes, and score both (needs the run folder and its data)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.run_dir if args.run_dir.is_file() else args.run_dir / args.artifact
    entries, header = tg.unpack_artifact(path.read_bytes())
    model, meta = header["model"], header["meta"]
    if args.fill_cap:
        return fill_to_cap(path.parent, args.fill_cap, entries)
    if args.order0_sweep:
        return order0_sweep(path.parent)
    if args.fullsize_decode:
        return fullsize_decode(entries)
    quantized = [e for e in entries if e.bits]
    families = [g for g in tg.QUANT_GROUPS if any(tg.tensor_group(e.name) == g for e in quantized)]
    packers = ["brotli", "ans", "lrzip", "lzma"]
    if args.no_lrzip or shutil.which("lrzip") is None:
        print("lrzip not found on PATH (Debian: apt-get install -y lrzip): the per-group lrzip column is skipped"
              if not args.no_lrzip else "per-group lrzip column skipped (--no-lrzip)")
        packers.remove("lrzip")
    cells: dict[str, dict[str, str]] = {p: {} for p in packers}
    for p in packers:
        stats: dict = {}
        if p == "lrzip":
            blob, pack_s, unpack_s = measure(lambda: pack_pergroup(entries, stats), unpack_pergroup, entries)
            codes_together = sum(stats[g] for g in LRZIP_GROUPS if g in stats)
            for f in families:
                members = [e for e in quantized if tg.tensor_group(e.name) == f]
                outside = [e.codes.numpy().T.tobytes() for e in members if lrzip_group(e.name) is None]
                cells[p][f] = sum(stats.get(g, 0) for g in {lrzip_group(e.name) for e in members} if g) + (
                    len(lrzip_bytes(b"".join(outside))) if outside else 0)  # an untied head: in the remainder
        else:
            blob, pack_s, unpack_s = measure(
                lambda: tg.pack_artifact(entries, compressor=p, model=model, meta=meta, stats=stats),
                lambda b: tg.unpack_artifact(b)[0], entries)
            codes_together = stats["codes"]
            for f in families:
                family_stats: dict = {}
                tg.pack_artifact([e for e in quantized if tg.tensor_group(e.name) == f], compressor=p,
                                 stats=family_stats)
                cells[p][f] = family_stats["codes"]
        cells[p].update(whole=len(blob), rest=len(blob) - codes_together, pack=pack_s, unpack=unpack_s)
        print(f"{p}: {len(blob):,} bytes, roundtrip exact, pack {pack_s:.2f} s, unpack {unpack_s:.2f} s "
              f"(CPU)", flush=True)
    n_values = sum(e.codes.numel() for e in quantized)
    print(f"\n{path}: {n_values:,} quantized values; bytes (each family's codes packed alone by each packer):\n")
    print("| bytes | " + " | ".join("record's per-group lrzip" if p == "lrzip" else p for p in packers) + " |")
    print("|---|" + "---|" * len(packers))
    rows = [("whole model", "whole")]
    for f in families:
        members = [e for e in quantized if tg.tensor_group(e.name) == f]
        bits = "/".join(f"int{b}" for b in sorted({e.bits for e in members}))
        rows.append((f"{FAMILY_NAMES[f]} codes ({sum(e.codes.numel() for e in members):,} {bits})", f))
    rows.append(("everything but the codes (scales, LQER, kept tensors, header, row orders)", "rest"))
    for label, key in rows:
        best = min(cells[p][key] for p in packers)
        print(f"| {label} | " + " | ".join((f"**{cells[p][key]:,}**" if cells[p][key] == best else
                                             f"{cells[p][key]:,}") for p in packers) + " |")
    for label, key in (("pack, CPU seconds", "pack"), ("unpack, CPU seconds", "unpack")):
        print(f"| {label} | " + " | ".join(f"{cells[p][key]:.2f}" for p in packers) + " |")
    if "lrzip" in packers:
        whole = cells["lrzip"]["whole"]
        print(f"\nans against the per-group lrzip packer: whole {100 * (cells['ans']['whole'] / whole - 1):+.2f}%"
              + "".join(f", {FAMILY_NAMES[f]} codes {100 * (cells['ans'][f] / cells['lrzip'][f] - 1):+.2f}%"
                        for f in families))


if __name__ == "__main__":
    main()
