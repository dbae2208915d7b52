"""Paths of the text shipped inside the package (public-domain excerpts; see data/README.md)."""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
CALIB_EXCERPT = DATA_DIR / "sense_and_sensibility_excerpt.txt"   # calibration
EVAL_EXCERPT = DATA_DIR / "pride_and_prejudice_excerpt.txt"      # held-out evaluation, never calibrated on
NONFICTION_EXCERPT = DATA_DIR / "python_tutorial_excerpt.txt"    # held-out evaluation of another kind: prose + code
DOCS_EXCERPT = DATA_DIR / "sqlite_docs_excerpt.txt"               # calibration: technical prose, SQL, C, shell sessions
# the default --calib of the data-driven methods: a third of the windows text the model samples itself, a third the
# novel, a third the SQLite documentation (of the sources compared, the one whose worse held-out text loses least:
# docs/generalisation.md)
DEFAULT_CALIB = "generated,bundled,bundled-docs"
