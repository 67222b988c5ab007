"""``python -m vlmtta ...``: the ``vlmtta`` command line."""
import sys

from .cli import main

sys.exit(main())
