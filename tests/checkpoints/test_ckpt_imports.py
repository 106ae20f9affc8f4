"""The daemon imports these modules: they must never pull in torch or transformers."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import ftsup.supervisor.checkpoints
import ftsup.supervisor.checkpoints.guards
import ftsup.supervisor.checkpoints.watch
import ftsup.supervisor.cli.ckpt_cmd
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "numpy") if m in sys.modules)
print(",".join(heavy))
"""


def test_no_heavy_imports() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=60
    )
    assert proc.stdout.strip() == ""
