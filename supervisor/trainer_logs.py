"""Progress from what a trainer already writes, for commands without progress.jsonl.

Two readers turn a trainer's own output into progress records (the
`progress.jsonl` schema: `event`, `step`, `max_steps`, `loss`, `lr`, `epoch`, `ts`):

* `LlamaFactoryLog`: LLaMA-Factory's `trainer_log.jsonl` in the output folder.
  Its `LogCallback.on_log` (0.9.5, src/llamafactory/train/callbacks.py) appends
  one JSON object per logging step: `current_steps`, `total_steps`, `loss`, `lr`,
  `epoch`, `percentage`, `elapsed_time` "H:MM:SS" since this process began
  training, `remaining_time`, `throughput` when tokens are counted. A resumed run
  appends again from its checkpoint's step, and `overwrite_output_dir` deletes
  the file: the file is a series of *segments*, one per trainer process, split
  where the step or the elapsed time goes back. A line already seen (same bytes)
  is never counted twice, even when the file is rewritten; on the first read only
  the newest segment counts (older ones are history no time can be given to).
* `TqdmReader`: HF Trainer's tqdm training bar and the log dicts it prints
  (`ProgressCallback`: `tqdm(total=max_steps)` moved to the global step at each
  step end; on a log step the bar is cleared, the dict printed, the bar redrawn).
  Bars are redrawn after a carriage return with no newline until something else
  is printed, so the caller feeds the unfinished line too.

Neither source has wall-clock times, only the elapsed time since the process
began training (1 s resolution). A batch of lines is placed by the moment the
newest of them was known to exist (a file's mtime, the time it was read), the
others set back by their elapsed distance to it (`Stamper`); stamps never go
backwards and never into the future.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.follow import LineFollower

LLAMAFACTORY_LOG = "trainer_log.jsonl"  # LLaMA-Factory's extras.constants.TRAINER_LOG
_REMEMBERED_LINES = 200_000


# elapsed times ------------------------------------------------------------
_CLOCK = re.compile(r"^(?:(?P<days>\d+) days?, )?(?:(?P<h>\d+):)?(?P<m>\d+):(?P<s>\d+)$")


def parse_elapsed(text: Any) -> float | None:
    """Seconds in "H:MM:SS", "MM:SS" (tqdm) or "1 day, 2:03:04" (str(timedelta))."""
    if not isinstance(text, str):
        return None
    match = _CLOCK.match(text.strip())
    if match is None:
        return None
    days, hours = int(match["days"] or 0), int(match["h"] or 0)
    return float(((days * 24 + hours) * 60 + int(match["m"])) * 60 + int(match["s"]))


class Stamper:
    """Wall times for lines that only know their elapsed time since their process began."""

    def __init__(self) -> None:
        self.last_ts: float | None = None

    def stamp(self, elapsed: list[float | None], anchor: float, now: float) -> list[float]:
        """`anchor`: when the newest of these lines was known to exist."""
        return self.clamp(back_from(elapsed, min(anchor, now)))

    def clamp(self, stamps: list[float]) -> list[float]:
        """Never back in time (a line is never older than one already stamped)."""
        out = []
        for ts in stamps:
            if self.last_ts is not None:
                ts = max(ts, self.last_ts)
            self.last_ts = ts
            out.append(ts)
        return out


def back_from(elapsed: list[float | None], anchor: float) -> list[float]:
    """Each line's time: `anchor` (the newest line's) less its elapsed distance to it."""
    newest = next((e for e in reversed(elapsed) if e is not None), None)
    return [
        anchor if value is None or newest is None else anchor - max(0.0, newest - value)
        for value in elapsed
    ]


def process_start(elapsed: list[float | None], anchor: float) -> float:
    """When the process that wrote these lines began (its newest elapsed before `anchor`)."""
    newest = next((e for e in reversed(elapsed) if e is not None), None)
    return anchor - newest if newest is not None else anchor


# LLaMA-Factory --------------------------------------------------------------
def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if 0 <= value < 2**53 else None


def _real(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def llamafactory_record(entry: Any) -> dict[str, Any] | None:
    """One `trainer_log.jsonl` object as a progress record (no `ts`), or None.

    Lines with only the progress keys (`current_steps`, `total_steps`,
    `percentage`, times) come from a prediction/evaluation-only run: their steps
    are batches, not training steps, and are skipped. A training log line always
    carries its `log_history` entry's `epoch` (and `loss` on logging steps).
    """
    if not isinstance(entry, dict):
        return None
    step = _count(entry.get("current_steps"))
    if step is None or not any(key in entry for key in ("loss", "eval_loss", "epoch")):
        return None
    if "eval_loss" in entry and "loss" not in entry:
        return {"event": "eval", "step": step, "eval_loss": _real(entry.get("eval_loss"))}
    record: dict[str, Any] = {"event": "step", "step": step}
    total = _count(entry.get("total_steps"))
    if total:
        record["max_steps"] = total
    for key, ours in (("loss", "loss"), ("lr", "lr"), ("epoch", "epoch")):
        value = _real(entry.get(key))
        if value is not None:
            record[ours] = value
    throughput = _real(entry.get("throughput"))  # tokens/s averaged since the start
    if throughput is not None and math.isfinite(throughput) and throughput >= 0:
        record["tokens_per_s"] = throughput
    return record


@dataclass
class _Parsed:
    record: dict[str, Any]
    elapsed: float | None


class LlamaFactoryLog:
    """Progress records from LLaMA-Factory's `trainer_log.jsonl` (see the module doc).

    `read()` blocks on the file: call it from a worker thread, one call at a time.
    """

    def __init__(self, output_dir: Path) -> None:
        # The user's output folder: never through a symlink, never a FIFO.
        self._tail = LineFollower(output_dir / LLAMAFACTORY_LOG, follow=False)
        self._stamper = Stamper()
        self._seen: set[bytes] = set()
        self._seen_order: collections.deque[bytes] = collections.deque()
        self._first_read = True
        self._backlog: list[_Parsed] = []
        self._last_step: int | None = None  # of the newest segment
        self._last_elapsed: float | None = None

    def read(self, now: float) -> list[dict[str, Any]]:
        found = self._tail.read()
        mtime, caught_up = found.mtime, found.at_end
        segments: list[list[_Parsed]] = [[]]  # the first continues the last read's
        for line in found.lines:
            parsed = self._parse(line)
            if parsed is None:
                continue
            if self._starts_segment(parsed):
                segments.append([])
            segments[-1].append(parsed)
            self._last_step = parsed.record["step"]
            if parsed.elapsed is not None:
                self._last_elapsed = parsed.elapsed
        if self._first_read:
            # The file as found: only its newest segment counts (older processes'
            # lines are history nothing can date), stamped once all is read.
            if mtime is None:
                return []
            self._backlog = self._backlog + segments[0] if len(segments) == 1 else segments[-1]
            if not caught_up:
                return []
            self._first_read = False
            segments, self._backlog = [self._backlog], []
        segments = [s for s in segments if s]
        # The newest segment ends at the file's mtime; each older one (a process that
        # ended between two reads) ends before the next one began.
        anchor = min(now, mtime if mtime is not None else now)
        raw: list[list[float]] = []
        for segment in reversed(segments):
            elapsed = [p.elapsed for p in segment]
            raw.insert(0, back_from(elapsed, anchor))
            anchor = process_start(elapsed, anchor)
        records: list[dict[str, Any]] = []
        for segment, times in zip(segments, raw, strict=True):
            stamps = self._stamper.clamp(times)
            records.extend({**p.record, "ts": ts} for p, ts in zip(segment, stamps, strict=True))
        return records

    def _parse(self, line: bytes) -> _Parsed | None:
        line = line.strip()
        if not line:
            return None
        digest = hashlib.blake2b(line, digest_size=16).digest()
        if digest in self._seen:
            return None  # the same line again: a rewritten or re-read file
        self._remember(digest)
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            return None
        record = llamafactory_record(entry)
        if record is None:
            return None
        return _Parsed(record, parse_elapsed(entry.get("elapsed_time")))

    def _remember(self, digest: bytes) -> None:
        self._seen.add(digest)
        self._seen_order.append(digest)
        if len(self._seen_order) > _REMEMBERED_LINES:
            self._seen.discard(self._seen_order.popleft())

    def _starts_segment(self, parsed: _Parsed) -> bool:
        """A new trainer process: its step or its elapsed time went back."""
        step, elapsed = parsed.record["step"], parsed.elapsed
        if self._last_step is None:
            return False
        if step < self._last_step:
            return True
        return (
            elapsed is not None and self._last_elapsed is not None and elapsed < self._last_elapsed
        )


# tqdm and HF Trainer log dicts ----------------------------------------------
_MAX_DICT_LINE = 8192
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BAR = re.compile(
    r"^(?P<desc>.*?)(?P<pct>\d{1,3})%\|(?P<fill>[^|]*)\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>[\d:]+)<(?P<remaining>[^,\]]*)(?:,\s*(?P<rate>[^\]]*))?\]\s*$"
)
_RATE = re.compile(r"^(?:\?|[\d.]+)(?:it/s|s/it)$")
_PAIR = re.compile(
    r"'(?P<key>[A-Za-z_][\w/.-]*)':\s*'?(?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))'?"
)
_DICT_KEYS = {"loss": "loss", "grad_norm": "grad_norm", "learning_rate": "lr", "epoch": "epoch"}


@dataclass(frozen=True)
class Bar:
    n: int
    total: int
    elapsed: float | None
    nested: bool


def parse_bar(segment: str) -> Bar | None:
    """A tqdm bar that could be HF Trainer's training bar, or None.

    The training bar (`ProgressCallback`: `tqdm(total=max_steps)`) has no
    description and the default unit: "Map: 100%|...| 500/500 [..., 9.1 examples/s]",
    "model.safetensors: 40%|...", "Loading checkpoint shards: ..." are refused.
    A bar drawn below another (tqdm ends it with cursor-up, ESC [A) is
    reported `nested`: during training that is the evaluation bar.
    """
    nested = "\x1b[A" in segment
    text = _ANSI.sub("", segment).rstrip("\n")
    match = _BAR.match(text)
    if match is None or match["desc"].strip():
        return None
    rate = (match["rate"] or "").strip()
    if rate and not _RATE.match(rate):
        return None
    n, total = int(match["n"]), int(match["total"])
    if total <= 0 or n > total:
        return None
    return Bar(n, total, parse_elapsed(match["elapsed"]), nested)


def parse_log_dict(segment: str) -> dict[str, float] | None:
    """The numbers of a dict HF Trainer prints on a log step, or None.

    transformers 5 prints `{'loss': '2.895', 'grad_norm': '4.932', 'learning_rate':
    '0.008333', 'epoch': '0.09375'}` (values formatted as strings), 4.x prints the
    numbers themselves; `nan`/`inf` appear bare in 4.x. Only dicts with a `loss`
    or `eval_loss` count (not the final `train_loss` summary).
    """
    text = _ANSI.sub("", segment).strip()
    if not (text.startswith("{") and text.endswith("}")) or len(text) > _MAX_DICT_LINE:
        return None
    values: dict[str, float] = {}
    for match in _PAIR.finditer(text):
        try:
            values[match["key"]] = float(match["value"])
        except ValueError:
            continue
    return values if ("loss" in values or "eval_loss" in values) else None


class TqdmReader:
    """Step records from one attempt's log lines (HF Trainer's tqdm training bar).

    The training bar is the first bar `parse_bar` accepts that is not nested
    (with `expected_total`, e.g. max_steps from an earlier attempt, only a bar of
    that total); after that only bars of the same total count. A step is reported
    when the bar's count advances (n = the trainer's global_step; 0 is skipped, a
    count going back is ignored). A log dict is printed just before tqdm redraws
    the bar at the step it belongs to, so its loss waits for that redraw.
    Pure: the caller passes the lines and the time they were known to exist.
    """

    def __init__(self, expected_total: int | None = None) -> None:
        self.total = expected_total
        self._last_n = 0
        self._pending: list[dict[str, float]] = []
        self._stamper = Stamper()

    def feed(
        self, lines: list[str], now: float, anchor: float | None = None
    ) -> list[dict[str, Any]]:
        found: list[tuple[dict[str, Any], float | None]] = []
        for line in lines:
            for segment in line.split("\r"):
                if not segment.strip():
                    continue
                values = parse_log_dict(segment)
                if values is not None:
                    # Seen again when its line, read unfinished, is read whole.
                    if not self._pending or self._pending[-1] != values:
                        self._pending.append(values)
                    continue
                bar = parse_bar(segment)
                if bar is not None:
                    found.extend(self._on_bar(bar))
        stamps = self._stamper.stamp([e for _, e in found], now if anchor is None else anchor, now)
        return [{**record, "ts": ts} for (record, _), ts in zip(found, stamps, strict=True)]

    def _on_bar(self, bar: Bar) -> list[tuple[dict[str, Any], float | None]]:
        if bar.nested:
            return []
        if self.total is None:
            self.total = bar.total
        if bar.total != self.total or bar.n < self._last_n or bar.n == 0:
            return []
        out: list[tuple[dict[str, Any], float | None]] = []
        pending, self._pending = self._pending, []
        base = {"step": bar.n, "max_steps": bar.total}
        train = [v for v in pending if "loss" in v]
        for values in pending:
            if "eval_loss" in values and "loss" not in values:
                out.append(
                    ({"event": "eval", **base, "eval_loss": values["eval_loss"]}, bar.elapsed)
                )
        if train or bar.n > self._last_n:
            record: dict[str, Any] = {"event": "step", **base}
            for key, ours in _DICT_KEYS.items():
                if train and key in train[-1]:
                    record[ours] = train[-1][key]
            out.insert(0, (record, bar.elapsed))
        self._last_n = bar.n
        return out
