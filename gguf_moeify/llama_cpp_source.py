"""Find or fetch llama.cpp's source at the pinned commit.

Order: a checkout named by ``LLAMA_CPP_DIR``; the cached extract under ``~/.cache/gguf_moeify``; ``git clone``
(online); the llama-cpp-python sdist from PyPI, which vendors the same commit. The tokenizer export
(``--vocab-only`` of llama.cpp's own converter) and the build script both come through here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import UserError

LLAMA_CPP_COMMIT = "0c1e57098"
SDIST_PACKAGE = "llama-cpp-python==0.3.36"
GIT_URL = "https://github.com/ggml-org/llama.cpp"


def cache_root() -> Path:
    return Path(os.environ.get("GGUF_MOEIFY_CACHE", Path.home() / ".cache" / "gguf_moeify"))


def _looks_like_llama_cpp(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "src" / "llama-graph.cpp").is_file()


def _log(msg: str) -> None:
    print(f"[llama.cpp source] {msg}", file=sys.stderr, flush=True)


def _try_git_clone(dest: Path) -> bool:
    if shutil.which("git") is None:
        return False
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".clone-"))
    try:
        subprocess.run(["git", "clone", "--quiet", "--filter=blob:none", GIT_URL, str(tmp / "src")],
                       check=True, timeout=600, capture_output=True)
        subprocess.run(["git", "-C", str(tmp / "src"), "checkout", "--quiet", LLAMA_CPP_COMMIT],
                       check=True, timeout=300, capture_output=True)
        os.replace(tmp / "src", dest)
        return True
    except (subprocess.SubprocessError, OSError):
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _try_sdist(dest: Path) -> bool:
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".sdist-"))
    try:
        sdists = sorted(cache_root().glob("src/llama_cpp_python-0.3.36.tar.gz"))
        if not sdists:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            SDIST_PACKAGE, "-d", str(tmp)], check=True, timeout=900, capture_output=True)
            sdists = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            return False
        with tarfile.open(sdists[0]) as tar:
            top = tar.getmembers()[0].name.split("/")[0]
            prefix = f"{top}/vendor/llama.cpp"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix + "/")]
            if not members:
                return False
            tar.extractall(tmp, members=members, filter="data")
        src = tmp / prefix
        # The vendored tree carries a dangling .git file that makes CMake/ninja regenerate forever.
        (src / ".git").unlink(missing_ok=True)
        os.replace(src, dest)
        return True
    except (subprocess.SubprocessError, OSError, tarfile.TarError):
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def llama_cpp_source(fetch: bool = True) -> Path:
    """Path to a llama.cpp source tree at the pinned commit (unpatched), fetching it once if needed."""
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        path = Path(env).expanduser().resolve()
        if not _looks_like_llama_cpp(path):
            raise UserError(f"LLAMA_CPP_DIR={env} is not a llama.cpp checkout (no convert_hf_to_gguf.py / src/)")
        return path
    dest = cache_root() / f"llama.cpp-{LLAMA_CPP_COMMIT}"
    if _looks_like_llama_cpp(dest):
        return dest
    if not fetch:
        raise UserError(f"llama.cpp source not found in {dest}; set LLAMA_CPP_DIR or allow fetching")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _log(f"fetching llama.cpp {LLAMA_CPP_COMMIT} into {dest} (once)")
    # the last check: another process (a parallel test or build) may have fetched it meanwhile
    if _try_git_clone(dest) or _try_sdist(dest) or _looks_like_llama_cpp(dest):
        return dest
    raise UserError(f"could not obtain llama.cpp {LLAMA_CPP_COMMIT}: set LLAMA_CPP_DIR to a checkout, or go online "
                    f"(git clone {GIT_URL}, or pip download {SDIST_PACKAGE})")
