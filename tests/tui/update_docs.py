"""The TUI captures that the docs show: rendered from the recording, checked or rewritten.

    python -m tests.tui.update_docs            # exit 1 and list the stale files
    python -m tests.tui.update_docs --update   # rewrite them

`docs/tui.md` carries two text captures between `<!-- capture:NAME -->`
markers, and `docs/tui-dashboard.svg` / `docs/tui-job.svg` (shown by
docs/tui.md and the README) are screenshots of the same two screens. All are
rendered from `data/recording.json` with the clock frozen and `TZ=UTC`, so the
same code gives the same files; `tests/tui/test_app.py` fails when the
committed ones differ from what the code renders now. Only this script writes
them, so a test run never changes the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ftsup.tui.app import FtsupApp
from ftsup.tui.capture import screen_text
from ftsup.tui.recorded import RecordedSource

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
RECORDING = Path(__file__).parent / "data" / "recording.json"
UPDATE_COMMAND = "python -m tests.tui.update_docs --update"
SIZE = (100, 30)
TITLE = "ftsup tui"

# Rich names every CSS class and clip path of an export after a number it draws
# at random (`terminal-1234567-r1`, `terminal-1234567-line-3`): the only part
# of an SVG capture that changes between two renders of the same screen.
_RANDOM_ID = re.compile(r"\bterminal-\d+-")


def normalise_svg(svg: str) -> str:
    """The SVG with Rich's per-render id replaced: equal text means an equal picture."""
    return _RANDOM_ID.sub("terminal-ftsup-", svg)


@dataclass(frozen=True)
class Captures:
    dashboard_text: str
    dashboard_svg: str
    job_text: str
    job_svg: str


def _pin_time_zone() -> None:
    """Event times print in local time; the docs show them in UTC."""
    os.environ["TZ"] = "UTC"
    time.tzset()


async def render() -> Captures:
    """The dashboard and the first job's screen, as text and as (normalised) SVG."""
    from tests.tui.conftest import open_first_job, until_synced

    app = FtsupApp(RecordedSource.load(RECORDING))
    async with app.run_test(size=SIZE) as pilot:
        await until_synced(pilot)
        dashboard_text = screen_text(app)
        dashboard_svg = normalise_svg(app.export_screenshot(title=TITLE))
        await open_first_job(pilot)
        job_text = screen_text(app)
        job_svg = normalise_svg(app.export_screenshot(title=TITLE))
    return Captures(dashboard_text, dashboard_svg, job_text, job_svg)


def _replace_capture(doc: str, name: str, text: str) -> str:
    block = f"<!-- capture:{name} -->\n```text\n{text.rstrip()}\n```\n<!-- /capture:{name} -->"
    pattern = re.compile(rf"<!-- capture:{name} -->.*?<!-- /capture:{name} -->", re.S)
    if not pattern.search(doc):
        raise ValueError(f"docs/tui.md lacks the <!-- capture:{name} --> markers")
    return pattern.sub(lambda _: block, doc)


def expected_files(captures: Captures, doc: str) -> dict[Path, str]:
    """Every file the captures go into, with the content it should have.

    `doc` is the current docs/tui.md: only its capture blocks are the renderer's.
    """
    doc = _replace_capture(doc, "dashboard", captures.dashboard_text)
    doc = _replace_capture(doc, "job", captures.job_text)
    return {
        DOCS / "tui.md": doc,
        DOCS / "tui-dashboard.svg": captures.dashboard_svg,
        DOCS / "tui-job.svg": captures.job_svg,
    }


def _committed(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text()
    return normalise_svg(text) if path.suffix == ".svg" else text


def stale_files(expected: dict[Path, str]) -> list[Path]:
    """The files whose committed content is not what the code renders now."""
    return [path for path, text in expected.items() if _committed(path) != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the stale files")
    args = parser.parse_args(argv)
    _pin_time_zone()
    captures = asyncio.run(render())
    expected = expected_files(captures, (DOCS / "tui.md").read_text())
    stale = stale_files(expected)
    for path in stale:
        if args.update:
            path.write_text(expected[path])
        print(f"{'rewrote' if args.update else 'stale'}: {path.relative_to(REPO)}")
    if stale and not args.update:
        print(f"run `{UPDATE_COMMAND}` to regenerate them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
