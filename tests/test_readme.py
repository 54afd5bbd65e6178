"""README.md stays true: its test command is CI's, and its env-var table is the code's.

`python tests/test_readme.py` rewrites the README env-var table from `Hyperparameters`.
"""

import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

START, END = "<!-- env-table:start -->\n", "\n<!-- env-table:end -->"


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
    path.write_text(head + START + env_table() + END + rest.split(END)[1])
