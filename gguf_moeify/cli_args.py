"""What every command's argument parser shares: the program name as the user typed it, and one-line usage errors.

A bottom-level module: ``cli`` and ``bench`` import it; it imports neither."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def prog_name() -> str:
    """How the user called us: the console script ``gguf-moeify`` or ``python -m gguf_moeify``."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("gguf-moeify") else "python -m gguf_moeify"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")
