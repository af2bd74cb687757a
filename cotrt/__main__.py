"""``python3 -m cotrt ...``: the same as the ``cotrt`` command."""
import sys

from .cli import main

sys.exit(main())
