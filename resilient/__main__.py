"""``python -m resilient``: the command line (see ``resilient._cli``)."""

from . import _cli

raise SystemExit(_cli.main())
