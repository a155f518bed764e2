"""``python -m refattn``: the same as the ``refattn`` command."""

import sys

from .cli import main

sys.exit(main())
