"""`python -m ftsup.trainer`: see `ftsup.trainer.run`."""

from __future__ import annotations

import sys

from ftsup.trainer.run import main

if __name__ == "__main__":
    sys.exit(main())
