"""``python -m curvlab.bench.reproduce NAME …``: the ``reproduce`` command alone."""

from __future__ import annotations

import sys

from curvlab.bench.reproduce.cli import main

sys.exit(main())
