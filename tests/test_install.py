"""Installs are reproducible: every third-party import is pinned in constraints.txt, both README commands
use the pins, and torch stays a range that the CPU wheel (torch==2.13.0) satisfies."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imported only when present, never installed by our files: FlashAttention 3 is an optional fast path on
# Hopper GPUs (train_gpt.py falls back to SDPA without it).
OPTIONAL_IMPORTS = {"flash_attn_interface"}
RANGED = {"torch"}  # a range in requirements.txt: users bring their own CUDA build


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[normalize(name)] = version
    return pins


def source_files() -> list[Path]:
    files = [ROOT / "train_gpt.py", *sorted((ROOT / "records").glob("*.py"))]  # not the submissions' code copies
    for folder in ("data", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def local_modules() -> set[str]:
    names = {"train_gpt", "data", "records"}
    for path in source_files():
        names.add(path.stem)  # conftest, test_train, bench scripts, data.shards, ...
    return names


def third_party_imports() -> dict[str, list[str]]:
    """Top-level module -> files importing it, for every import that is neither stdlib nor ours."""
    found: dict[str, list[str]] = {}
    local = local_modules()
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_pinned():
    pins, dists = pinned(), packages_distributions()
    imports = third_party_imports()
    assert {"torch", "numpy", "sentencepiece", "pytest", "huggingface_hub"} <= set(imports)  # the scan works
    missing = []
    for module, where in sorted(imports.items()):
        if module in OPTIONAL_IMPORTS or module in RANGED:
            continue
        assert module in dists, f"{module} (imported by {where[0]}) is not installed: add it to requirements"
        if not any(normalize(d) in pins for d in dists[module]):
            missing.append(f"{module} ({', '.join(dists[module])}) imported by {where[0]}")
    assert not missing, "not pinned in constraints.txt: " + "; ".join(missing)


def test_requirements_are_pinned_except_torch_which_admits_the_cpu_wheel():
    pins = pinned()
    names = []
    for req in ("requirements.txt", "tests/requirements.txt"):
        for line in (ROOT / req).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                names.append(line)
    for spec in names:
        name = normalize(re.split(r"[<>=!~ ]", spec)[0])
        if name == "torch":
            lo, hi = re.search(r">=([\d.]+),<([\d.]+)", spec).groups()
            assert tuple(map(int, lo.split("."))) <= (2, 13) < tuple(map(int, hi.split("."))), spec
        else:
            assert name in pins, f"{spec} from requirements has no exact pin in constraints.txt"
    assert "torch" not in pins  # a pin would fight the user's CUDA build


def test_both_readme_commands_install_with_the_pins():
    readme = (ROOT / "README.md").read_text()
    commands = [block.split("```")[0].strip() for block in readme.split("```bash\n")[1:3]]
    for command in commands:
        assert "pip install torch==2.13.0 &&" in command
        assert re.search(r"pip install -r (tests/)?requirements\.txt -c constraints\.txt", command), command
