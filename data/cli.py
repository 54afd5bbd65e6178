"""Command-line helpers shared by the data/ scripts: usage errors as one line, integer arguments."""

from __future__ import annotations

import argparse


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one `error: ...` line (exit code 2), not usage + message."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}; see --help\n")


def int_at_least(minimum: int):
    """An argparse `type` accepting integers >= minimum (underscores allowed: 100_000_000)."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse
