"""Demo: train a small CNN on scikit-learn's handwritten digits while rehearsed faults hit it.

The worker meets a GPU out-of-memory error, a segfault, a hang and a preemption on the way;
resilient classifies each one, degrades the plan where the policy says so, resumes from the last
checkpoint, and the training finishes with the accuracy it would have had anyway. The same demo
runs as ``resilient demo``; its code (the model, the data and the one ``resilient.fit`` call) is in
``resilient/_demo.py``.

    python examples/demo.py [--run-dir DIR] [--faults SPEC] [--epochs N]
"""

from __future__ import annotations

import argparse
import sys

from resilient._demo import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
