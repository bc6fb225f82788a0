"""``python -m ecmt``: the command line (see :mod:`ecmt.cli`)."""
import sys

from .cli import main

sys.exit(main())
