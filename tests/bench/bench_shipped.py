"""Shipped code bytes per section of train_gpt.py: what each banner section (`# ====` / name / `# ====`)
costs in the shipped form, measured as the shipped size minus the shipped size without that section.

    python tests/bench/bench_shipped.py [CHECKOUT]   # default: this checkout

CHECKOUT is a folder holding a train_gpt.py (an older commit's worktree, say); its own `shipped_code`
builds the shipped form, so each commit is measured by its own rules.
"""

import importlib.util
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2])
    spec = importlib.util.spec_from_file_location("measured_train_gpt", root / "train_gpt.py")
    tg = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tg  # dataclasses look their module up while the file runs
    spec.loader.exec_module(tg)
    lines = (root / "train_gpt.py").read_text().split("\n")
    heads = [i for i in range(len(lines) - 2) if lines[i].startswith("# ====") and lines[i + 2].startswith("# ====")]
    bounds = heads + [len(lines)]
    total = len(tg.shipped_code("\n".join(lines).encode()))
    print("| section | shipped bytes |\n|---|---|")
    for k, head in enumerate(heads):
        without = "\n".join(lines[: bounds[k]] + lines[bounds[k + 1]:]).encode()
        print(f"| {lines[head + 1][2:].strip()} | {total - len(tg.shipped_code(without)):,} |")
    print(f"| **shipped train_gpt.py** | **{total:,}** |")


if __name__ == "__main__":
    main()
