"""Reading a user's text file (calibration, evaluation): UTF-8 text or one clear error, never silent garbage."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError


def read_utf8(path: str | Path, what: str = "text file") -> str:
    """The file's text; a missing file, a binary file (NUL bytes) or one that is not UTF-8 is a UserError naming
    the byte where it goes wrong (replacement characters would silently calibrate on noise)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot read ({exc.strerror or exc})")
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(f"{what} {path} is not text (a NUL byte at offset {nul}); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8")
