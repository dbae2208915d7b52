import os
import sys

from .cli import main

code = main()
if isinstance(code, int) and code > 128:
    # Interrupted (128 + signal), temporary files already removed. Leave without the interpreter's finalisation:
    # CPython ends the process by SIGINT instead when the KeyboardInterrupt had passed through an exec() of a
    # string (e.g. a dataclass being defined by a lazy import as the signal landed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
