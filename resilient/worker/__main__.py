"""``python -m resilient.worker``: one training attempt in a fresh process."""

import os
import sys

from .attempt import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: TensorFlow's can hang or crash after a failed step.
    os._exit(code)
