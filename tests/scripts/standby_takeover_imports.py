"""Warm up as a standby does (`WarmUp`, whole), then take over: resume the checkpoint
given and print, as JSON on the last line, the modules imported between the end
of the warm-up and `train_start` (each one is time on the takeover's path).

    python standby_takeover_imports.py TRAIN_JSON CHECKPOINT
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ftsup.trainer import callback, run, standby


def main() -> int:
    config, checkpoint = sys.argv[1], sys.argv[2]
    warm_up = standby.WarmUp(config, lower=False)
    warm_up.start()
    warm_up.join()
    before = set(sys.modules)
    seen: list[str] = []
    on_train_begin = callback.FtsupCallback.on_train_begin

    def record(self: Any, *args: Any, **kwargs: Any) -> None:
        seen.extend(sorted(set(sys.modules) - before))
        on_train_begin(self, *args, **kwargs)

    callback.FtsupCallback.on_train_begin = record  # type: ignore[method-assign]
    code = run.main(["--config", config, "--resume-from", checkpoint], prepared=warm_up.prepared)
    print(json.dumps({"code": code, "prepared": warm_up.prepared is not None, "new": seen}))
    return code


if __name__ == "__main__":
    sys.exit(main())
