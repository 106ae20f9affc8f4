"""Fixtures for the health tests: the NVML double (the only test double here)."""

from __future__ import annotations

import sys
from pathlib import Path

# The double lives next to the tests; make it importable however pytest is started.
sys.path.insert(0, str(Path(__file__).parent))
