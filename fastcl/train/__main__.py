"""``python -m fastcl.train``: see :mod:`fastcl.train.cli`."""

import sys

from .cli import main

sys.exit(main())
