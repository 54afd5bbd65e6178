"""README.md stays true: its test command is CI's, its env-var table is the code's, and so are the
figures the code can compute (the shipped code's bytes, the record recipe's parameter count).

`python tests/test_readme.py` rewrites the README env-var table and those figures.
"""

import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

START, END = "<!-- env-table:start -->\n", "\n<!-- env-table:end -->"
FIGURE = r"<!-- {0} -->([\d,]+)<!-- /{0} -->"


def show(value) -> str:
    return f"`{int(value) if isinstance(value, bool) else value}`"


def env_table() -> str:
    record = tg.RECIPES["record"]
    rows = ["| Env var | `RECIPE=baseline` | `RECIPE=record` (default) | Meaning |", "|---|---|---|---|"]
    for f in fields(tg.Hyperparameters):
        if f.name == "recipe":
            continue
        value = record.get(f.name)
        rec = (f"`{value.formula}` ({value(record['num_layers'])})" if isinstance(value, tg.PerDepth)
               else show(value) if f.name in record else "same")
        rows.append(f"| `{f.name.upper()}` | {show(f.default)} | {rec} | {f.metadata['help']} |")
    return "\n".join(rows)


def figures() -> dict[str, str]:
    """What the README states that the code computes: shipped code bytes, the record's parameters."""
    import torch

    with torch.device("meta"):
        model = tg.GPT(tg.ModelConfig.from_hparams(tg.Hyperparameters.from_env({"RECIPE": "record"})))
    return {"shipped-bytes": f"{tg.code_bytes():,}", "record-params": f"{sum(p.numel() for p in model.parameters()):,}"}


def with_figures(text: str) -> str:
    import re

    for name, value in figures().items():
        text = re.sub(FIGURE.format(name), f"<!-- {name} -->{value}<!-- /{name} -->", text)
    return text


def test_readme_figures_are_the_codes():
    import re

    readme = (ROOT / "README.md").read_text()
    for name, value in figures().items():
        assert re.findall(FIGURE.format(name), readme) == [value], f"{name}: run `python tests/test_readme.py`"


def test_readme_is_a_manual_not_a_log():
    assert len((ROOT / "README.md").read_bytes()) <= 35_000  # measurements live in docs/RESULTS.md


def test_readme_env_table_matches_hyperparameters():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(START)[1].split(END)[0]
    assert block == env_table(), "run `python tests/test_readme.py` to regenerate the README env table"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [block.split("```")[0].strip() for block in readme.split("```bash\n")[1:3]]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == commands[1]
    assert "prepare_sample.py" in commands[0] and "train_gpt.py" in commands[0]


if __name__ == "__main__":
    path = ROOT / "README.md"
    text = path.read_text()
    head, rest = text.split(START)
    path.write_text(with_figures(head + START + env_table() + END + rest.split(END)[1]))
