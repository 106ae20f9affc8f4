"""`python -m ftsup.supervisor` is the `ftsup` command."""

import sys

from ftsup.supervisor.cli.main import main

sys.exit(main())
