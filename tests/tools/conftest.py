"""Tests of the maintainer tools in ``tools/``: the repository root must be importable (``import tools``)
also when pytest is started as ``pytest`` rather than ``python -m pytest``."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
