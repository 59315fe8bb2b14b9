"""``python -m resilient``: the command line (see ``resilient._cli``)."""

import os
import sys

from . import _cli

try:
    status = _cli.main()
    sys.stdout.flush()
except BrokenPipeError:
    # The reader went away (``... | head``): not an error of ours. Point stdout at /dev/null so
    # that the interpreter's final flush does not raise again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    status = 0
raise SystemExit(status)
