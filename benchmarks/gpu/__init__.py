"""The GPU runner: one call that settles correctness, speed and memory on a GPU.

    python -m benchmarks.gpu --out DIR --budget-s 540

See benchmarks/gpu/README.md. The modules of benchmarks/ (harness, suite, impls, ...)
are scripts' siblings, imported by their plain names: their folder goes on sys.path.
"""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent
REPO = BENCHMARKS.parent
for _path in (str(REPO), str(BENCHMARKS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
