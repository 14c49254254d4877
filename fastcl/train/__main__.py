"""``python -m fastcl.train``: see :mod:`fastcl.train.cli`."""

from ..interrupts import run_command
from .cli import main

run_command(main)
