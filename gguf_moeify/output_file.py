"""The output file's temporary sibling: created next to the output (so the final rename is atomic), named after
the output and the writing process, and cleaned up after runs that were killed."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import UserError


def _temp_pattern(out: Path) -> re.Pattern:
    """Our temporary files for ``out``: ``.NAME.PID.RANDOM.tmp`` (and llama-quantize's ``.tmp.q`` beside it)."""
    return re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp(\.q)?")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete the temporary files an earlier run for ``out`` left behind when it was killed (SIGKILL, power
    loss): ours by name, and only those whose process is gone, so a run writing the same file now keeps its own."""
    folder = out.parent if str(out.parent) else Path(".")
    pattern, removed = _temp_pattern(out), []
    for f in folder.iterdir():
        m = pattern.fullmatch(f.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def output_temp_path(out: Path) -> Path:
    """Create (and so check) the temporary output file next to ``out``; a clear error if the folder is unwritable.
    Stale temporary files of earlier killed runs for the same output are removed first."""
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"cannot write {out}: folder {folder} does not exist")
    try:
        remove_stale_temp_files(out)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}")
    os.close(fd)
    return Path(tmp)
