"""README.md stays true: its test command is CI's, and its env-var table is the code's."""

from dataclasses import fields

import train_gpt as tg
from conftest import ROOT


def env_table() -> str:
    rows = ["| Env var | Default | Meaning |", "|---|---|---|"]
    for f in fields(tg.Hyperparameters):
        default = int(f.default) if isinstance(f.default, bool) else f.default
        rows.append(f"| `{f.name.upper()}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


def test_readme_env_table_matches_hyperparameters():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- env-table:start -->\n")[1].split("\n<!-- env-table:end -->")[0]
    assert block == env_table(), "regenerate the README env table:\n" + env_table()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [block.split("```")[0].strip() for block in readme.split("```bash\n")[1:3]]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == commands[1]
    assert "prepare_sample.py" in commands[0] and "train_gpt.py" in commands[0]
