"""Parse and validate `job.toml` into the frozen `JobSpec` of `spec_types.py`.

A spec is fully validated before anything starts, and every problem in a file
is collected before raising, so that a user fixes them all in one go. Each
problem names the file, the line (found by scanning the text, since tomllib
reports none), the key, and a hint such as a likely typo's correction.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ftsup.supervisor import protocol
from ftsup.supervisor.durations import MAX_DURATION, parse_duration, parse_size
from ftsup.supervisor.spec_types import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    CheckpointSection,
    CommandSection,
    DaemonConfig,
    DaemonGpuSection,
    DaemonStandbySection,
    GpuSection,
    HealthSection,
    JobSection,
    JobSpec,
    LaunchSection,
    NotifySection,
    RestartSection,
    SpecIssue,
    TrainSection,
)

__all__ = [
    "RENAMED_KEYS",
    "SpecError",
    "SpecIssue",
    "load_spec",
    "parse_spec",
    "parse_train_table",
    "spec_to_json",
]

# ----------------------------------------------------------------- issues


class SpecError(Exception):
    """A refused job file: `issues` holds every problem found, `str()` one per line."""

    def __init__(self, issues: Iterable[SpecIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def __reduce__(self) -> tuple[type[SpecError], tuple[list[SpecIssue]]]:
        return (SpecError, (self.issues,))


class _Bad(Exception):
    """Raised by a converter: the value is refused, with a message and maybe a hint."""

    def __init__(self, message: str, hint: str | None = None, *, at: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.at = at  # a key inside the value (env.HF_HOME), for a sharper location


# ------------------------------------------------------ finding line numbers

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_PART = rf"(?:{_BARE}|{_QUOTED})"
_DOTTED = rf"{_PART}(?:[ \t]*\.[ \t]*{_PART})*"
_HEADER_RE = re.compile(rf"^\s*\[\[?[ \t]*({_DOTTED})[ \t]*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(rf"^\s*({_DOTTED})[ \t]*=(.*)$")
_INLINE_KEY_RE = re.compile(rf"[{{,][ \t]*({_DOTTED})[ \t]*=")
_PART_RE = re.compile(_PART)


def _split_dotted(dotted: str) -> tuple[str, ...]:
    return tuple(_unquote(part) for part in _PART_RE.findall(dotted))


def _unquote(part: str) -> str:
    if part.startswith("'"):
        return part[1:-1]
    if part.startswith('"'):
        try:
            return str(json.loads(part))
        except ValueError:
            return part[1:-1]
    return part


class _LineIndex:
    """Line numbers of tables and keys, found by scanning the TOML text."""

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str, ...], int] = {}
        self.keys: dict[tuple[str, ...], int] = {}
        self._scan(text)

    def _scan(self, text: str) -> None:
        table: tuple[str, ...] = ()
        closing: str | None = None  # delimiter of an open multi-line string
        # Split on "\n" only, as tomllib counts lines.
        for number, line in enumerate(text.split("\n"), start=1):
            if closing is not None:
                closing = None if closing in line else closing
                continue
            if header := _HEADER_RE.match(line):
                table = _split_dotted(header.group(1))
                self.tables.setdefault(table, number)
            elif key := _KEY_RE.match(line):
                closing = self._add_key(table + _split_dotted(key.group(1)), key.group(2), number)

    def _add_key(self, path: tuple[str, ...], value: str, number: int) -> str | None:
        """Record a `key = value` line; return a multi-line string delimiter left open."""
        self.keys.setdefault(path, number)
        for depth in range(1, len(path)):
            self.tables.setdefault(path[:depth], number)
        if value.lstrip().startswith("{"):
            for inner in _INLINE_KEY_RE.findall(value):
                self.keys.setdefault(path + _split_dotted(inner), number)
        for delimiter in ('"""', "'''"):
            if value.count(delimiter) % 2 == 1:
                return delimiter
        return None

    def keys_in(self, table: str) -> set[str]:
        """The keys written directly in `[table]`."""
        return {path[1] for path in self.keys if len(path) == 2 and path[0] == table}

    def find(self, path: tuple[str, ...]) -> int | None:
        """The key's line, else its table's, else its parent's; None when absent."""
        while path:
            line = self.keys.get(path) or self.tables.get(path)
            if line is not None:
                return line
            path = path[:-1]
        return None


class _Collector:
    """Gathers the issues of one file, locating each by its key path."""

    def __init__(self, source: Path, lines: _LineIndex) -> None:
        self.source = source
        self.lines = lines
        self.items: list[SpecIssue] = []
        self.warnings: list[SpecIssue] = []

    def add(
        self,
        path: tuple[str, ...],
        message: str,
        hint: str | None = None,
        *,
        line: int | None = None,
    ) -> None:
        found = line if line is not None else self.lines.find(path)
        self.items.append(SpecIssue(self.source, found, ".".join(path), message, hint))

    def warn(self, path: tuple[str, ...], message: str, hint: str | None = None) -> None:
        """Accepted, but the user should change it (the job still runs)."""
        found = self.lines.find(path)
        self.warnings.append(SpecIssue(self.source, found, ".".join(path), message, hint))

    def sorted_warnings(self) -> tuple[SpecIssue, ...]:
        return tuple(sorted(self.warnings, key=lambda i: (i.line is None, i.line or 0)))

    def reported(self, path: tuple[str, ...]) -> bool:
        key = ".".join(path)
        return any(issue.key == key for issue in self.items)

    def raise_if_any(self) -> None:
        if self.items:
            ordered = sorted(self.items, key=lambda i: (i.line is None, i.line or 0))
            raise SpecError(ordered)


# ------------------------------------------------------- describing values

_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _type_name(value: object) -> str:
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)), "a date/time")


# TOML integers are 64-bit; tomllib does not enforce it, and Python refuses to
# print integers of more than 4300 digits.
_INT64 = range(-(2**63), 2**63)


def _show(value: object) -> str:
    """A value as it would look in TOML, cut short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int) and value not in _INT64:
        text = "a number beyond 64 bits"
    elif isinstance(value, str | list):
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (ValueError, RecursionError):
            text = "[...]"
    else:
        text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    return f"{_type_name(value)} ({_show(value)})"


def _is_number_text(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _type_hint(value: object, wanted: str) -> str | None:
    """A fix for common type slips: quoted numbers and booleans, 3.0 for 3."""
    if isinstance(value, str) and wanted in ("integer", "number") and _is_number_text(value):
        return f"write it without quotes: {value.strip()}"
    if isinstance(value, str) and wanted == "boolean" and value.lower() in ("true", "false"):
        return f"write it without quotes: {value.lower()}"
    if isinstance(value, float) and wanted == "integer" and value.is_integer():
        return f"write a whole number: {int(value)}"
    if isinstance(value, bool) and wanted in ("integer", "number"):
        return "booleans are not numbers; write a number such as 1"
    return None


def _fmt(number: float) -> str:
    return f"{number:g}"


# -------------------------------------------------------------- converters

# A converter takes a TOML value and the job file's folder (for relative paths)
# and returns the dataclass value, or raises _Bad.
Convert = Callable[[object, Path], Any]


def _integer(
    at_least: int | None = None, hint: str | None = None, *, at_most: int | None = None
) -> Convert:
    """An integer in [at_least, at_most]: every count ftsup or the trainer computes
    with has a sane upper bound, so no value in a job file overflows an expression."""

    def convert(value: object, _base: Path) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"expected an integer, got {_describe(value)}", _type_hint(value, "integer"))
        if value not in _INT64:
            raise _Bad("is out of range (TOML integers are 64-bit)")
        if at_least is not None and value < at_least:
            raise _Bad(f"must be at least {at_least}, got {value}", hint)
        if at_most is not None and value > at_most:
            raise _Bad(f"must be at most {at_most:,}, got {value:,}", hint)
        return value

    return convert


def _number(
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> Convert:
    def convert(value: object, _base: Path) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(f"expected a number, got {_describe(value)}", _type_hint(value, "number"))
        number = _finite(value)
        if at_least is not None and number < at_least:
            raise _Bad(f"must be at least {_fmt(at_least)}, got {_fmt(number)}")
        if above is not None and number <= above:
            raise _Bad(f"must be greater than {_fmt(above)}, got {_fmt(number)}")
        if below is not None and number >= below:
            raise _Bad(f"must be less than {_fmt(below)}, got {_fmt(number)}")
        if at_most is not None and number > at_most:
            raise _Bad(f"must be at most {_fmt(at_most)}, got {_fmt(number)}")
        return number

    return convert


def _finite(value: float) -> float:
    try:
        number = float(value)
    except OverflowError:
        raise _Bad("is too large") from None
    if not math.isfinite(number):
        raise _Bad(f"must be a finite number, got {_show(value)}")
    return number


def _boolean(value: object, _base: Path) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_describe(value)}", _type_hint(value, "boolean"))
    return value


def _text(value: object, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected {what}, got {_describe(value)}")
    if not value.strip():
        raise _Bad("must not be empty")
    if "\0" in value:
        raise _Bad("must not contain a NUL character")
    return value


def _string(value: object, _base: Path) -> str:
    return _text(value)


def _choice(*options: str) -> Convert:
    def convert(value: object, _base: Path) -> str:
        text = _text(value)
        if text not in options:
            raise _Bad(
                f"expected one of {', '.join(map(_show, options))}, got {_show(text)}",
                _did_you_mean(text, options),
            )
        return text

    return convert


def _did_you_mean(word: str, options: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else None


def _string_list(value: object, *, what: str = "an array of strings") -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad(f"expected {what}, got {_describe(value)}")
    items: list[str] = []
    for index, item in enumerate(value, start=1):
        if not isinstance(item, str):
            raise _Bad(f"item {index}: expected a string, got {_describe(item)}", _quote_hint(item))
        if "\0" in item:
            raise _Bad(f"item {index}: must not contain a NUL character")
        items.append(item)
    return tuple(items)


def _quote_hint(item: object) -> str | None:
    if isinstance(item, int | float) and not isinstance(item, bool):
        return f'quote it: "{item}"'
    return None


def _strings(value: object, _base: Path) -> tuple[str, ...]:
    items = _string_list(value)
    if not items:
        raise _Bad("must not be empty")
    return items


def _string_or_strings(value: object, _base: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_text(value),)
    return _string_list(value, what="a string or an array of strings")


def _duration(positive: bool = False) -> Convert:
    def convert(value: object, _base: Path) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise _Bad(f"a duration cannot be negative, got {_show(value)}")
        try:
            seconds = parse_duration(value)
        except (ValueError, OverflowError):
            raise _Bad(
                'expected a duration such as "90s", "10m", "2h" or seconds, '
                f"got {_describe(value)}",
                'units are ms, s, m, h and d, written right after the number: "10m"'
                if isinstance(value, str)
                else None,
            ) from None
        seconds = _finite(seconds)
        if positive and seconds <= 0:
            raise _Bad("must be longer than 0 seconds")
        if seconds > MAX_DURATION:
            raise _Bad(
                f"must be at most {MAX_DURATION / 86400:g} days "
                f"({MAX_DURATION:.0f} seconds), got {_show(value)}",
                'write a duration such as "10m", "2h" or "7d"',
            )
        return seconds

    return convert


def _size(value: object, _base: Path) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise _Bad(f"a size cannot be negative, got {value}")
    try:
        size = parse_size(value)
    except (ValueError, OverflowError):
        raise _Bad(
            f'expected a size such as "20G", "512M" or bytes, got {_describe(value)}',
            'units are K, M, G and T (powers of 1024): "20G"' if isinstance(value, str) else None,
        ) from None
    if size not in _INT64:
        raise _Bad("is too large")
    return size


def _auto(inner: Convert) -> Convert:
    """`"auto"` becomes None (ftsup decides); anything else goes to `inner`."""

    def convert(value: object, base: Path) -> Any:
        return None if value == "auto" else inner(value, base)

    return convert


# ------------------------------------------------------------------- paths


def _exists(path: str) -> bool:
    try:
        return os.path.exists(path)
    except (OSError, ValueError):
        return False


def _resolve(text: str, base: Path) -> Path:
    """`~` expanded, relative to the job file's folder, normalised, absolute."""
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        user = expanded.split("/", 1)[0]
        raise _Bad(f"cannot expand {user}: no such user", "write the full path instead")
    return Path(os.path.normpath(os.path.join(base, expanded)))


def _path(value: object, base: Path) -> Path:
    return _resolve(_text(value, "a path (string)"), base)


def _path_text(value: object, base: Path) -> str:
    return str(_path(value, base))


def _deepspeed_ref(value: object, base: Path) -> str:
    """`[launch] deepspeed`: a built-in name (zero2, zero3, zero3-offload) stays, else a path."""
    from ftsup.trainer.deepspeed_configs import is_builtin

    text = _text(value, "a path (string) or zero2, zero3, zero3-offload")
    return text if is_builtin(text) else _path_text(text, base)


def _looks_like_path(text: str, base: Path) -> bool:
    prefixes = ("/", "./", "../", "~")
    return text.startswith(prefixes) or text in (".", "..") or _exists(os.path.join(base, text))


def _model_ref(value: object, base: Path) -> str:
    """A local folder becomes absolute; a hub id such as `Qwen/Qwen2.5-0.5B` stays."""
    text = _text(value)
    return str(_resolve(text, base)) if _looks_like_path(text, base) else text


def _datasets(value: object, base: Path) -> tuple[str, ...]:
    names = _string_or_strings(value, base)
    if not names:
        raise _Bad("must name at least one dataset file")
    resolved: list[str] = []
    for index, name in enumerate(names, start=1):
        try:
            resolved.append(str(_resolve(_text(name, "a path (string)"), base)))
        except _Bad as bad:
            raise _Bad(f"item {index}: {bad.message}", bad.hint) from None
    return tuple(resolved)


NAME_MAX = 255  # bytes in one path component (Linux file systems)
PATH_MAX = 4096


def _output_dir(value: object, base: Path) -> Path:
    path = _path(value, base)
    home = Path(os.path.normpath(os.path.expanduser("~")))
    if path in (Path("/"), home):
        raise _Bad(
            f"must not be {'/' if path == Path('/') else 'your home folder'} itself",
            'give the run a folder of its own, e.g. "~/runs/qwen-lora"',
        )
    too_long = [part for part in path.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long or len(os.fsencode(str(path))) > PATH_MAX:
        what = f"a name of {len(os.fsencode(too_long[0]))} bytes" if too_long else "too long"
        raise _Bad(
            f"is {what}: file systems allow {NAME_MAX} bytes a name, {PATH_MAX} a path",
            "choose a shorter folder",
        )
    return path


# --------------------------------------------------------- table-specific

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _job_name(value: object, _base: Path) -> str:
    name = _text(value)
    if not _NAME_RE.fullmatch(name):
        raise _Bad(
            f"{_show(name)} is not a valid job name",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it becomes a folder name)",
        )
    return name


def _argv(value: object, _base: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        raise _Bad(f"expected an array of strings, got {_describe(value)}", _argv_hint(value))
    argv = _string_list(value)
    if not argv:
        raise _Bad(
            "must not be empty", 'name the program and its arguments: ["python", "train.py"]'
        )
    if not argv[0].strip():
        raise _Bad("the program name (item 1) must not be empty")
    return argv


def _argv_hint(text: str) -> str:
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    return f"write it as a list: {json.dumps(words or ['python', 'train.py'], ensure_ascii=False)}"


_PLACEHOLDER_RE = re.compile(r"\{(\w*)\}")


def _resume_args(value: object, _base: Path) -> tuple[str, ...]:
    args = _string_list(value)
    for index, arg in enumerate(args, start=1):
        for name in _PLACEHOLDER_RE.findall(arg):
            if name != "checkpoint":
                raise _Bad(
                    f"item {index}: unknown placeholder {{{name}}}",
                    "the only placeholder is {checkpoint}",
                )
    if not any("{checkpoint}" in arg for arg in args):
        raise _Bad(
            "no argument contains {checkpoint}, so a restart could not resume",
            'e.g. resume_args = ["--resume_from_checkpoint", "{checkpoint}"]; '
            "leave resume_args out if the command finds its checkpoint itself",
        )
    return args


def _env(value: object, _base: Path) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Bad(f"expected a table of strings, got {_describe(value)}")
    env: dict[str, str] = {}
    for name, item in value.items():
        if not name or "=" in name or "\0" in name:
            raise _Bad(f"{_show(name)} is not a valid environment variable name")
        if not isinstance(item, str):
            raise _Bad(f"expected a string, got {_describe(item)}", _quote_hint(item), at=name)
        if "\0" in item:
            raise _Bad("must not contain a NUL character", at=name)
        env[name] = item
    return MappingProxyType(env)


def _devices(value: object, _base: Path) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _Bad(
            f"expected a non-empty array of GPU indices, got {_describe(value)}",
            "e.g. devices = [0, 1]; leave devices out to use every visible GPU",
        )
    for index, item in enumerate(value, start=1):
        if isinstance(item, bool) or not isinstance(item, int) or item not in range(2**31):
            raise _Bad(f"item {index}: expected a GPU index (0, 1, ...), got {_describe(item)}")
    if len(set(value)) != len(value):
        raise _Bad("lists a GPU more than once")
    return tuple(value)


MAX_GPUS = 1024  # GPUs one job may ask for (a sane bound, far above any server)


def _job_names(value: object, base: Path) -> tuple[str, ...]:
    if not isinstance(value, list):
        got = _describe(value)
        raise _Bad(f"expected an array of job names, got {got}", 'e.g. after = ["prep"]')
    names = tuple(_job_name(item, base) for item in value)
    if len(set(names)) != len(names):
        raise _Bad("names a job more than once")
    return names


XID_ACTIONS = ("restart", "stop", "warn", "ignore")


def _xid_actions(value: object, _base: Path) -> Mapping[int, str]:
    if not isinstance(value, dict):
        raise _Bad(f'expected a table such as {{ 79 = "stop" }}, got {_describe(value)}')
    actions: dict[int, str] = {}
    for xid, action in value.items():
        if not (xid.isascii() and xid.isdigit() and len(xid) <= 6):
            raise _Bad(f"{_show(xid)} is not an XID number", 'e.g. 79 = "stop"', at=xid)
        if action not in XID_ACTIONS:
            hint = _did_you_mean(action, XID_ACTIONS) if isinstance(action, str) else None
            choices = ", ".join(map(_show, XID_ACTIONS))
            raise _Bad(f"expected one of {choices}, got {_describe(action)}", hint, at=xid)
        actions[int(xid)] = str(action)
    return MappingProxyType(actions)


def _webhook(value: object, _base: Path) -> str:
    url = _text(value, "a URL (string)")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        parts = urllib.parse.urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _Bad(f"{_show(url)} is not an http(s) URL", 'e.g. "https://hooks.example.com/T0/B0"')
    return url


NOTIFY_EVENTS: tuple[str, ...] = tuple(kind.value for kind in protocol.NOTIFY_EVENTS)


def _events(value: object, base: Path) -> tuple[str, ...]:
    """Event names as the daemon emits them; an old alias (`restarted`) is read as the
    event's own name (`restart`), so job files that use it keep working."""
    events = []
    for event in _string_or_strings(value, base):
        event = protocol.NOTIFY_ALIASES.get(event, event)
        if event not in NOTIFY_EVENTS:
            raise _Bad(
                f"unknown event {_show(event)}; events are {', '.join(NOTIFY_EVENTS)}",
                _did_you_mean(event, NOTIFY_EVENTS),
            )
        events.append(str(event))
    return tuple(events)


# The `[train]` vocabularies, defined once: the built-in trainer imports them.
TRAIN_FORMATS = ("auto", "alpaca", "chat")
FINETUNING_TYPES = ("lora", "qlora", "full")
# The transformers scheduler names the trainer passes through to TrainingArguments
# unchanged. Left out: those that need `lr_scheduler_kwargs`, which [train] has
# no key for (cosine_with_min_lr, cosine_warmup_with_min_lr: min_lr;
# warmup_stable_decay: num_decay_steps), so they would crash at the first step.
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
)
# Schedulers that step on an evaluation metric: transformers refuses them without an eval split.
EVAL_SCHEDULERS = ("reduce_lr_on_plateau",)
# The fewest tokens a causal-LM example can train on: labels are shifted by one.
MIN_CUTOFF_LEN = 2
MAX_VAL_ROWS = 10**9


def _val_size(value: object, base: Path) -> float:
    """0 (no split), a fraction in (0, 1), or a whole row count >= 1 (`data.split_eval`)."""
    number: float = _number(at_least=0, at_most=MAX_VAL_ROWS)(value, base)
    if number >= 1 and not number.is_integer():
        raise _Bad(
            f"a row count must be a whole number, got {_fmt(number)}",
            f"write a fraction below 1 (0.1) or a count of rows ({int(number)})",
        )
    return number


def _lora_target(value: object, base: Path) -> tuple[str, ...]:
    targets = _string_or_strings(value, base)
    if not targets:
        raise _Bad("must name at least one module", 'use ["all"] for every linear layer')
    return targets


# ------------------------------------------------------------------ schema

# Keys renamed so that one concept has one name everywhere (TOML, train.json,
# JSON, docs): (table, old key) -> new key. A job file with the old key still
# runs; `ftsup check` and `ftsup start` warn. Writing both is refused.
RENAMED_KEYS: Mapping[tuple[str, str], str] = MappingProxyType(
    {("checkpoint", "async"): "async_save"}
)


@dataclass(frozen=True)
class _Field:
    """One TOML key: its dataclass attribute, converter and, if required, an example."""

    key: str
    convert: Convert
    attr: str = ""
    required: bool = False
    example: str | None = None
    default: Callable[[Path], Any] | None = None  # when the dataclass has none

    @property
    def name(self) -> str:
        return self.attr or self.key


@dataclass(frozen=True)
class _Table:
    make: Callable[..., Any]
    fields: Mapping[str, _Field]


def _table(make: Callable[..., Any], *fields: _Field) -> _Table:
    return _Table(make, MappingProxyType({f.key: f for f in fields}))


# Upper bounds far beyond any real run: what they catch is a typo or a fuzzer.
_MAX_STEPS = 10**12
_MAX_SIZE_FACTOR = 1 << 20  # batch sizes, ranks, token lengths, worker counts
_POSITIVE_INT = _integer(at_least=1)
_COUNT = _integer(at_least=0)
_STEPS = _integer(at_least=1, at_most=_MAX_STEPS)
_STEP_COUNT = _integer(at_least=0, at_most=_MAX_STEPS)
_FACTOR = _integer(at_least=1, at_most=_MAX_SIZE_FACTOR)

_TABLES: Mapping[str, _Table] = MappingProxyType(
    {
        "job": _table(
            JobSection,
            _Field("name", _job_name, required=True, example='name = "qwen-lora"'),
            _Field(
                "output_dir",
                _output_dir,
                required=True,
                example='output_dir = "/data/runs/qwen-lora"',
            ),
            _Field("priority", _integer(MIN_PRIORITY, "higher starts first", at_most=MAX_PRIORITY)),
            _Field("after", _job_names),
            _Field("preemptible", _boolean),
        ),
        "command": _table(
            CommandSection,
            _Field("argv", _argv, required=True, example='argv = ["python", "train.py"]'),
            _Field("cwd", _path, default=lambda base: base),
            _Field("env", _env),
            _Field("resume_args", _resume_args),
            _Field("instrument", _boolean),
        ),
        "train": _table(
            TrainSection,
            _Field("model", _model_ref, required=True, example='model = "Qwen/Qwen2.5-0.5B"'),
            _Field("dataset", _datasets, required=True, example='dataset = "data/sft.jsonl"'),
            _Field("tokenizer", _model_ref),
            _Field("format", _choice(*TRAIN_FORMATS)),
            _Field(
                "cutoff_len",
                _integer(
                    at_least=MIN_CUTOFF_LEN,
                    at_most=_MAX_SIZE_FACTOR,
                    hint="a causal LM learns from the next token, so an example needs 2 or more",
                ),
            ),
            _Field("finetuning_type", _choice(*FINETUNING_TYPES)),
            _Field(
                "lora_rank",
                _integer(at_least=1, at_most=_MAX_SIZE_FACTOR, hint="typical ranks are 8 to 128"),
            ),
            _Field("lora_alpha", _FACTOR),
            _Field("lora_dropout", _number(at_least=0, below=1)),
            _Field("lora_target", _lora_target),
            _Field("per_device_train_batch_size", _FACTOR),
            _Field("gradient_accumulation_steps", _FACTOR),
            _Field("learning_rate", _number(above=0)),
            _Field("lr_scheduler_type", _choice(*LR_SCHEDULERS)),
            _Field("warmup_steps", _STEP_COUNT),
            _Field("warmup_ratio", _number(at_least=0, below=1)),
            _Field("weight_decay", _number(at_least=0)),
            _Field("max_grad_norm", _number(at_least=0)),
            _Field("num_train_epochs", _number(at_least=0, at_most=1e6)),
            _Field("max_steps", _integer(at_most=_MAX_STEPS)),
            _Field(
                "seed",
                _integer(at_least=0, at_most=2**32 - 1, hint="numpy seeds are 32-bit"),
            ),
            _Field("bf16", _boolean),
            _Field("fp16", _boolean),
            _Field("save_steps", _STEPS),
            _Field("save_every", _duration(positive=True)),
            _Field(
                "save_total_limit",
                _integer(
                    at_least=2,
                    at_most=_MAX_SIZE_FACTOR,
                    hint="keep at least 2: the newest checkpoint may still be being written "
                    "when a run dies",
                ),
            ),
            _Field("logging_steps", _STEPS),
            _Field("val_size", _val_size),
            _Field("eval_steps", _STEPS),
            _Field("report_to", _string_or_strings),
            _Field("dataloader_num_workers", _integer(at_least=0, at_most=4096)),
            _Field("save_on_each_node", _boolean),
        ),
        "launch": _table(
            LaunchSection,
            _Field("nproc_per_node", _integer(at_least=1, at_most=4096)),
            _Field("nnodes", _integer(at_least=1, at_most=_MAX_SIZE_FACTOR)),
            _Field("node_rank", _integer(at_least=0, at_most=_MAX_SIZE_FACTOR)),
            _Field("rdzv_backend", _string),
            _Field("rdzv_endpoint", _string),
            _Field("rdzv_id", _string),
            _Field("min_nodes", _integer(at_least=1, at_most=_MAX_SIZE_FACTOR)),
            _Field("rdzv_last_call", _duration(positive=True)),
            _Field("deepspeed", _deepspeed_ref),
            # HF's `fsdp` option names (ftsup.trainer.fsdp.STRATEGIES).
            _Field("fsdp", _choice("full_shard", "shard_grad_op")),
        ),
        "restart": _table(
            RestartSection,
            _Field("max_restarts", _integer(at_least=0, at_most=100_000)),
            _Field("backoff", _duration()),
            _Field("backoff_max", _duration()),
            _Field("crash_loop", _integer(at_least=1, at_most=1000)),
            _Field("stop_grace", _duration()),
            _Field("standby", _boolean),
            _Field("standby_count", _integer(at_least=1, at_most=4)),
        ),
        "health": _table(
            HealthSection,
            _Field("hang_timeout", _auto(_duration(positive=True))),
            _Field("hang_floor", _duration(positive=True)),
            _Field("hang_ceiling", _duration(positive=True)),
            _Field("startup_timeout", _duration(positive=True)),
            _Field("loss_anomaly", _choice("rollback", "stop", "warn")),
            _Field("loss_spike_factor", _number(above=1, at_most=1e6)),
        ),
        "checkpoint": _table(
            CheckpointSection,
            _Field("keep_last", _integer(at_least=1, at_most=_MAX_SIZE_FACTOR)),
            _Field("keep_every", _STEPS),
            _Field("keep_best", _string),
            _Field("async_save", _boolean),
            _Field("min_free", _auto(_size)),
            _Field("allow_scratch", _boolean),
            _Field("watch", _choice("auto", "inotify", "polling")),
            _Field("memory_every", _auto(_STEP_COUNT)),
            _Field("memory_dir", _path_text),
            _Field("memory_overhead", _number(at_least=0, below=1)),
        ),
        "gpu": _table(
            GpuSection,
            _Field("devices", _devices),
            _Field("count", _integer(1, "the number of GPUs the job needs", at_most=MAX_GPUS)),
            _Field("xid_actions", _xid_actions),
            _Field("elastic", _boolean),
        ),
        "notify": _table(
            NotifySection,
            _Field("webhook", _webhook),
            _Field("command", _strings),
            _Field("on", _events),
        ),
    }
)

# --------------------------------------------------- cross-field checks

# (key, message, hint) for a section whose keys each converted cleanly.
_Problem = tuple[str, str, str | None]


def _check_train(train: TrainSection) -> Iterator[_Problem]:
    if train.bf16 and train.fp16:
        yield "fp16", "bf16 and fp16 cannot both be true", "keep bf16 on Ampere or newer GPUs"
    if train.max_steps <= 0 and train.num_train_epochs <= 0:
        yield (
            "num_train_epochs",
            "nothing to train: max_steps and num_train_epochs are both unset or 0",
            "set max_steps = 1000 or num_train_epochs = 3",
        )
    if train.eval_steps is not None and train.val_size == 0:
        yield (
            "eval_steps",
            "eval_steps has no effect: no data is held out for evaluation",
            "set val_size = 0.05, or leave eval_steps out",
        )
    if train.lr_scheduler_type in EVAL_SCHEDULERS and train.val_size == 0:
        yield (
            "lr_scheduler_type",
            f"{train.lr_scheduler_type} steps on the eval loss, and no data is held out",
            "set val_size = 0.05, or pick another scheduler",
        )


def _check_launch(launch: LaunchSection) -> Iterator[_Problem]:
    if launch.node_rank >= launch.nnodes:
        yield (
            "node_rank",
            f"must be less than nnodes ({launch.nnodes}), got {launch.node_rank}",
            None,
        )
    if launch.nnodes > 1 and launch.rdzv_endpoint is None:
        yield (
            "rdzv_endpoint",
            "required when nnodes > 1",
            'add rdzv_endpoint = "host:29500" (the same on every node)',
        )
    if launch.min_nodes is not None and launch.min_nodes > launch.nnodes:
        yield (
            "min_nodes",
            f"must not exceed nnodes ({launch.nnodes}), got {launch.min_nodes}",
            "min_nodes is the fewest nodes the run goes on with",
        )
    if launch.elastic_nodes and launch.rdzv_backend == "static":
        yield (
            "min_nodes",
            "needs a dynamic rendezvous: the static backend fixes every node's rank",
            'use rdzv_backend = "c10d", or leave min_nodes out',
        )


def _check_restart(restart: RestartSection) -> Iterator[_Problem]:
    if restart.backoff_max < restart.backoff:
        yield (
            "backoff_max",
            f"must not be shorter than backoff ({_fmt(restart.backoff)}s), "
            f"got {_fmt(restart.backoff_max)}s",
            "backoff is the first delay, backoff_max its cap",
        )


def _check_health(health: HealthSection) -> Iterator[_Problem]:
    if health.hang_ceiling < health.hang_floor:
        yield (
            "hang_ceiling",
            f"must not be shorter than hang_floor ({_fmt(health.hang_floor)}s)",
            None,
        )


def _check_retention(sections: Mapping[str, Any], issues: _Collector) -> None:
    """Two rotations can act on one folder: a [train] job's trainer keeps the newest
    `save_total_limit` complete checkpoints (by itself, after each manifest), and
    the daemon's `[checkpoint] keep_last` retention (any job, with keep_every and
    keep_best) deletes too. Together the smaller count wins and the trainer deletes
    milestones, so settings that disagree are pointed out."""
    train = sections.get("train")
    checkpoint = sections.get("checkpoint")
    if not isinstance(train, TrainSection) or not isinstance(checkpoint, CheckpointSection):
        return
    limit = train.save_total_limit
    written = "" if "save_total_limit" in issues.lines.keys_in("train") else " (the default)"
    if checkpoint.keep_last is not None and checkpoint.keep_last != limit:
        issues.warn(
            ("checkpoint", "keep_last"),
            f"keep_last = {checkpoint.keep_last} disagrees with [train] save_total_limit = "
            f"{limit}{written}: both rotate this job's checkpoints and the smaller count wins",
            "in a [train] job set save_total_limit only; keep_last is for [command] jobs",
        )
    for key in ("keep_every", "keep_best"):
        if getattr(checkpoint, key) is not None:
            issues.warn(
                ("checkpoint", key),
                f"has no effect in a [train] job: the trainer keeps only the newest "
                f"save_total_limit = {limit}{written} checkpoints",
                "leave it out, or run your trainer as a [command] job",
            )


def _check_queue(sections: Mapping[str, Any], issues: _Collector) -> None:
    """A job asks for GPUs one way, and never waits for itself."""
    job, gpu = sections.get("job"), sections.get("gpu")
    if isinstance(gpu, GpuSection) and gpu.count is not None and gpu.devices is not None:
        issues.add(
            ("gpu", "count"),
            "count and devices cannot both be set",
            "devices = [...] for exactly these GPUs, or count = N for any N free ones",
        )
    if isinstance(job, JobSection) and job.name in job.after:
        issues.add(("job", "after"), f"a job cannot wait for itself ({job.name!r})", None)
    if isinstance(gpu, GpuSection) and gpu.elastic:
        if gpu.count is None:
            issues.add(
                ("gpu", "elastic"),
                "needs count: an elastic job runs on any N free GPUs, fewer when some fail",
                "set count = N (and no devices)",
            )
        if sections.get("train") is None:
            issues.add(
                ("gpu", "elastic"),
                "works only for a [train] job: ftsup keeps the global batch by changing "
                "the gradient accumulation, which it cannot do in a [command]",
                "leave elastic out, or run the job as a [train] job",
            )


def _check_elastic_nodes(sections: Mapping[str, Any], issues: _Collector) -> None:
    """`[launch] min_nodes`: every node count the run may go on with must keep the
    global batch (per-device batch x processes divides it)."""
    launch, train = sections.get("launch"), sections.get("train")
    if not isinstance(launch, LaunchSection) or not launch.elastic_nodes or train is None:
        return
    assert launch.min_nodes is not None
    per_device = train.per_device_train_batch_size
    batch = per_device * train.gradient_accumulation_steps * launch.world_size
    for nodes in range(launch.min_nodes, launch.nnodes):
        if batch % (per_device * launch.nproc_per_node * nodes):
            issues.add(
                ("launch", "min_nodes"),
                f"on {nodes} node(s) the global batch {batch} cannot be kept "
                f"({per_device} per device x {launch.nproc_per_node * nodes} processes "
                "does not divide it)",
                "choose min_nodes, nnodes and gradient_accumulation_steps so that it does",
            )


def _check_node_local(sections: Mapping[str, Any], issues: _Collector) -> None:
    """`[train] save_on_each_node`: plain data-parallel copies only. Sharded states
    (DeepSpeed, FSDP) are split across ranks, so no node holds a whole checkpoint;
    with `min_nodes` a node that joins later has no copy of the steps it missed.
    On one node it changes nothing (one folder, one copy)."""
    launch, train = sections.get("launch"), sections.get("train")
    if not isinstance(train, TrainSection) or not train.save_on_each_node:
        return
    if not isinstance(launch, LaunchSection):
        return
    where = ("train", "save_on_each_node")
    for key, what in (("deepspeed", "DeepSpeed"), ("fsdp", "FSDP")):
        if getattr(launch, key):
            issues.add(
                where,
                f"cannot be combined with [launch] {key}: {what} splits each checkpoint "
                "across ranks, so no node's folder would hold a whole copy",
                "use one shared output folder (leave save_on_each_node out)",
            )
    if launch.elastic_nodes:
        issues.add(
            where,
            "cannot be combined with [launch] min_nodes: a node that joins later has no "
            "copy of the checkpoints saved without it, and every node must resume one step",
            "use one shared output folder, or leave min_nodes out",
        )


def _check_memory_tier(sections: Mapping[str, Any], issues: _Collector) -> None:
    """`[checkpoint] memory_every` and `memory_overhead`: the built-in trainer in one
    process only (a `[command]` trainer's state is out of ftsup's reach; several
    processes would each need their own snapshot, not built)."""
    checkpoint = sections.get("checkpoint")
    if not isinstance(checkpoint, CheckpointSection):
        return
    built_in = isinstance(sections.get("train"), TrainSection)
    if checkpoint.memory_overhead is not None and not built_in:
        issues.add(
            ("checkpoint", "memory_overhead"),
            "needs a [train] job: it paces the built-in trainer's memory snapshots",
            "leave memory_overhead out of a [command] job",
        )
    if not checkpoint.memory_every:
        return
    launch = sections.get("launch") or LaunchSection()
    where = ("checkpoint", "memory_every")
    if not built_in:
        issues.add(
            where,
            "needs a [train] job: the memory tier snapshots the built-in trainer's state",
            "leave memory_every out of a [command] job",
        )
    elif launch.distributed or launch.deepspeed or launch.fsdp:
        issues.add(
            where,
            "works for one process only (not with several processes, DeepSpeed or FSDP)",
            'set memory_every = 0, or "auto" (off for such jobs)',
        )


def _check_elastic_launch(
    sections: Mapping[str, Any], raw: Mapping[str, Any], issues: _Collector
) -> None:
    gpu, raw_launch = sections.get("gpu"), raw.get("launch")
    if not isinstance(gpu, GpuSection) or not gpu.elastic or not isinstance(raw_launch, dict):
        return
    for key in ("nproc_per_node", "nnodes"):
        if key in raw_launch:
            issues.add(
                ("launch", key),
                "is set by ftsup for an elastic job (one process per GPU it is placed on, "
                "one node)",
                "leave it out",
            )


def _launch_from_count(sections: dict[str, Any], raw: Mapping[str, Any]) -> None:
    """A [train] job with `[gpu] count = N` runs N processes (one per GPU) unless
    `[launch] nproc_per_node` says otherwise; an elastic job as many as it is placed on."""
    gpu, launch = sections.get("gpu"), sections.get("launch") or LaunchSection()
    if sections.get("train") is None or not isinstance(gpu, GpuSection) or gpu.count is None:
        return
    raw_launch = raw.get("launch")
    if isinstance(raw_launch, dict) and "nproc_per_node" in raw_launch:
        return
    sections["launch"] = replace(launch, nproc_per_node=gpu.count)


def _check_deepspeed(sections: dict[str, Any], issues: _Collector) -> None:
    """A [train] job's `[launch] deepspeed`: a readable config whose batch keys are
    "auto" or agree with [train] (the same check the trainer makes; exit 2 there).
    Its ZeRO stage is kept in the launch section (`zero_stage`) for the drift guard."""
    from ftsup.trainer.deepspeed_configs import (
        DeepSpeedConfigError,
        batch_key_problems,
        load_deepspeed_config,
        zero_stage,
    )

    launch, train, gpu = sections.get("launch"), sections.get("train"), sections.get("gpu")
    if not isinstance(launch, LaunchSection) or not launch.deepspeed or train is None:
        return
    where = ("launch", "deepspeed")
    try:
        config = load_deepspeed_config(launch.deepspeed)
    except DeepSpeedConfigError as exc:
        issues.add(where, str(exc).removeprefix("[launch] deepspeed = "))
        return
    sections["launch"] = replace(launch, zero_stage=zero_stage(config))
    elastic = (isinstance(gpu, GpuSection) and gpu.elastic) or launch.elastic_nodes
    for problem in batch_key_problems(
        config,
        per_device=train.per_device_train_batch_size,
        accumulation=None if elastic else train.gradient_accumulation_steps,
        world_size=None if elastic else launch.world_size,
        source=launch.deepspeed,
    ):
        issues.add(where, problem)


def _check_fsdp(sections: Mapping[str, Any], issues: _Collector) -> None:
    """`[launch] fsdp` runs the built-in trainer's FSDP: a [train] job, not with DeepSpeed."""
    launch = sections.get("launch")
    if not isinstance(launch, LaunchSection) or not launch.fsdp:
        return
    where = ("launch", "fsdp")
    if sections.get("train") is None:
        issues.add(
            where,
            "works only for a [train] job: ftsup's trainer passes it to HF Trainer; "
            "a [command] configures FSDP itself",
            "leave fsdp out, or run the job as a [train] job",
        )
    if launch.deepspeed:
        issues.add(
            where,
            "cannot be combined with [launch] deepspeed: both shard the model, "
            "HF Trainer takes one",
            "keep one of deepspeed and fsdp",
        )


_CHECKS: Mapping[str, Callable[[Any], Iterator[_Problem]]] = MappingProxyType(
    {
        "train": _check_train,
        "launch": _check_launch,
        "restart": _check_restart,
        "health": _check_health,
    }
)

# ----------------------------------------------------------------- parsing


def load_spec(path: Path) -> JobSpec:
    """Read and validate a job file; a file that cannot be read is a SpecError too."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError(
            [SpecIssue(path, None, "", f"cannot read the job file: {reason}")]
        ) from None
    return parse_spec(text, path)


# Job files are a few KiB; tomllib is slow on some large inputs (the daemon
# parses specs it is sent, so a cap keeps it responsive).
MAX_SPEC_CHARS = 64 * 1024


def parse_spec(text: str, source: Path) -> JobSpec:
    """Validate TOML text; `source` is the job file (relative paths start from its folder)."""
    if len(text) > MAX_SPEC_CHARS:
        message = f"the job file is too large ({len(text)} characters; at most {MAX_SPEC_CHARS})"
        raise SpecError([SpecIssue(source, None, "", message)])
    data = _load_toml(text, source)
    issues = _Collector(source, _LineIndex(text))
    absolute = Path(os.path.abspath(os.path.expanduser(source)))
    sections = _parse_tables(data, absolute.parent, issues)
    _check_kind(data, issues)
    issues.raise_if_any()
    _check_retention(sections, issues)
    _check_queue(sections, issues)
    _check_elastic_launch(sections, data, issues)
    _check_elastic_nodes(sections, issues)
    _check_node_local(sections, issues)
    _check_memory_tier(sections, issues)
    issues.raise_if_any()
    _launch_from_count(sections, data)
    _check_deepspeed(sections, issues)
    _check_fsdp(sections, issues)
    issues.raise_if_any()
    return JobSpec(source=absolute, text=text, warnings=issues.sorted_warnings(), **sections)


def key_line(text: str, path: tuple[str, ...]) -> int | None:
    """The line of `path` (e.g. ("checkpoint", "memory_dir")) in a job file's text, else
    its table's; for warnings found after parsing."""
    return _LineIndex(text).find(path)


_JOB_HEADER_RE = re.compile(r"^[ \t]*\[[ \t]*job[ \t]*\][ \t]*(#.*)?$", re.MULTILINE)


def with_after(spec: JobSpec, names: Sequence[str]) -> JobSpec:
    """`spec` that also runs after `names` (`ftsup start --after`): the key is written
    into the job file's text, so the daemon stores, and a new daemon reads, the same."""
    if spec.job.after:
        issue = SpecIssue(
            spec.source,
            None,
            "job.after",
            f"the job file already sets after = {list(spec.job.after)}",
            "add the names there instead of --after",
        )
        raise SpecError([issue])
    header = _JOB_HEADER_RE.search(spec.text)
    if header is None:  # [job] written as a dotted or inline table: no line to extend
        issue = SpecIssue(
            spec.source, None, "job", "cannot add --after to this job file", "set after there"
        )
        raise SpecError([issue])
    line = f"after = {json.dumps(list(names))}  # ftsup start --after"
    text = f"{spec.text[: header.end()]}\n{line}{spec.text[header.end() :]}"
    return parse_spec(text, spec.source)


_TABLE_HEADER_RE = re.compile(r"^[ \t]*\[", re.MULTILINE)
_PRIORITY_LINE_RE = re.compile(r"^[ \t]*priority[ \t]*=.*$", re.MULTILINE)


def with_priority(spec: JobSpec, priority: int) -> JobSpec:
    """`spec` with `[job] priority` set (`ftsup priority`), written into the job file's
    text like `--after`, so that the database, runs/ and a new daemon all agree."""
    header = _JOB_HEADER_RE.search(spec.text)
    if header is None:
        issue = SpecIssue(
            spec.source, None, "job", "cannot set the priority in this job file", "edit it there"
        )
        raise SpecError([issue])
    following = _TABLE_HEADER_RE.search(spec.text, header.end())
    end = following.start() if following else len(spec.text)
    line = f"priority = {priority}  # ftsup priority"
    existing = _PRIORITY_LINE_RE.search(spec.text, header.end(), end)
    if existing is not None:
        text = f"{spec.text[: existing.start()]}{line}{spec.text[existing.end() :]}"
    else:
        text = f"{spec.text[: header.end()]}\n{line}{spec.text[header.end() :]}"
    changed = parse_spec(text, spec.source)
    if changed.job.priority != priority:  # e.g. a priority inside a multi-line string
        issue = SpecIssue(
            spec.source, None, "job.priority", "cannot set the priority in this job file", None
        )
        raise SpecError([issue])
    return changed


def parse_train_table(table: Mapping[str, Any], source: Path) -> TrainSection:
    """Validate a `[train]` table given as data (the trainer's train.json) by the same
    fields, bounds and cross-field rules as a job file; SpecError lists every problem.
    Relative paths start from `source`'s folder."""
    issues = _Collector(source, _LineIndex(""))
    base = Path(os.path.abspath(os.path.expanduser(source))).parent
    train = _parse_section("train", _TABLES["train"], dict(table), base, issues)
    issues.raise_if_any()
    assert isinstance(train, TrainSection)
    return train


DAEMON_TABLES: Mapping[str, _Table] = MappingProxyType(
    {
        "notify": _TABLES["notify"],
        "gpu": _table(DaemonGpuSection, _Field("foreign_memory_limit", _size)),
        "standby": _table(DaemonStandbySection, _Field("spares", _integer(at_least=0, at_most=4))),
    }
)


def parse_daemon_config(text: str, source: Path) -> DaemonConfig:
    """Validate `daemon.toml` (`[notify]` defaults, `[gpu]` and `[standby]` settings)
    like a job file."""
    data = _load_toml(text, source)
    issues = _Collector(source, _LineIndex(text))
    base = Path(os.path.abspath(os.path.expanduser(source))).parent
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in DAEMON_TABLES:
            issues.add(
                (name,), "not a daemon setting", "daemon.toml holds [notify], [gpu] and [standby]"
            )
        elif not isinstance(value, dict):
            issues.add((name,), f"expected a table, got {_describe(value)}", None)
        else:
            sections[name] = _parse_section(name, DAEMON_TABLES[name], value, base, issues)
    issues.raise_if_any()
    gpu = sections.get("gpu") or DaemonGpuSection()
    standby = sections.get("standby") or DaemonStandbySection()
    return DaemonConfig(source=source, notify=sections.get("notify"), gpu=gpu, standby=standby)


def load_daemon_config(path: Path) -> DaemonConfig:
    """The daemon's configuration; an absent file means the defaults."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return DaemonConfig()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecIssue(path, None, "", f"cannot read it: {exc}")]) from None
    return parse_daemon_config(text, path)


_TOML_POSITION_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _load_toml(text: str, source: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([_syntax_issue(str(exc), text, source)]) from None
    except (ValueError, RecursionError) as exc:  # huge integers, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise SpecError([SpecIssue(source, None, "", f"invalid TOML: {reason}")]) from None


def _syntax_issue(message: str, text: str, source: Path) -> SpecIssue:
    """tomllib puts the position in its message; move it to where SpecIssue keeps it."""
    line: int | None = None
    if position := _TOML_POSITION_RE.search(message):
        line = int(position.group(1))
        message = f"{message[: position.start()]} (column {position.group(2)})"
    elif message.endswith("(at end of document)"):
        line = text.count("\n") + 1
        message = message.removesuffix(" (at end of document)") + " at the end of the file"
    # No key: where tomllib notices a problem is often a line after its cause.
    return SpecIssue(source, line, "", f"invalid TOML: {message}", _syntax_hint(message))


_SYNTAX_HINTS = (
    ("Invalid value", 'strings need quotes: name = "qwen-lora"'),
    ("Cannot overwrite", "a key or a table is defined twice"),
    ("Cannot declare", "a key or a table is defined twice"),
    ("Unclosed array", 'an array opened above ("[") is missing its "]"'),
    ("Unclosed inline table", 'an inline table opened above ("{") is missing its "}"'),
    ("Expected '=' after a key", "write keys as key = value"),
)


def _syntax_hint(message: str) -> str | None:
    return next((hint for start, hint in _SYNTAX_HINTS if message.startswith(start)), None)


def _parse_tables(data: dict[str, Any], base: Path, issues: _Collector) -> dict[str, Any]:
    sections: dict[str, Any] = {}
    for name, value in data.items():
        table = _TABLES.get(name)
        if table is None:
            _unknown_root_key(name, value, issues)
        elif not isinstance(value, dict):
            issues.add(
                (name,),
                f"expected a table, got {_describe(value)}",
                f"write a [{name}] header followed by its keys",
            )
        else:
            sections[name] = _parse_section(name, table, value, base, issues)
    return sections


def _parse_section(
    name: str, table: _Table, raw: dict[str, Any], base: Path, issues: _Collector
) -> Any:
    """Convert one table's keys; None when a key could not be converted."""
    values: dict[str, Any] = {}
    complete = True
    for key, value in raw.items():
        spec = table.fields.get(key)
        if spec is None and (name, key) in RENAMED_KEYS:
            spec = _renamed(name, key, raw, table, issues)
            if spec is None:
                continue
        if spec is None:
            issues.add((name, key), "unknown key", _suggest_key(name, key, table))
            continue
        try:
            values[spec.name] = spec.convert(value, base)
        except _Bad as bad:
            path = (name, key) if bad.at is None else (name, key, bad.at)
            issues.add(path, bad.message, bad.hint)
            complete = False
    complete = _fill_missing(name, table, raw, values, base, issues) and complete
    if not complete:
        return None
    section = table.make(**values)
    for key, message, hint in _CHECKS.get(name, _no_checks)(section):
        issues.add((name, key), message, hint)
    return section


def _renamed(
    name: str, old: str, raw: dict[str, Any], table: _Table, issues: _Collector
) -> _Field | None:
    """The new key's field for a deprecated key, with a warning; None (and an
    error) when the new key is written too, since which one counts is unclear."""
    new = RENAMED_KEYS[(name, old)]
    if new in raw:
        issues.add(
            (name, old),
            f"{old} and {new} are the same setting (old and new name), and both are set",
            f"keep only {new} = {_show(raw[new])}",
        )
        return None
    issues.warn(
        (name, old),
        f"{old} is deprecated, renamed {new}",
        f"write {new} = {_show(raw[old])}",
    )
    return table.fields[new]


def _no_checks(_section: object) -> Iterator[_Problem]:
    return iter(())


def _fill_missing(
    name: str,
    table: _Table,
    raw: dict[str, Any],
    values: dict[str, Any],
    base: Path,
    issues: _Collector,
) -> bool:
    """Report required keys that are missing, and fill computed defaults."""
    complete = True
    for key, spec in table.fields.items():
        if key in raw:
            continue
        if spec.required:
            if not issues.reported((name, key)):  # e.g. written above the headers
                hint = f"add: {spec.example}" if spec.example else None
                issues.add((name, key), "required key is missing", hint)
            complete = False
        elif spec.default is not None:
            values[spec.name] = spec.default(base)
    return complete


def _check_kind(data: dict[str, Any], issues: _Collector) -> None:
    """A job needs [job], and exactly one of [command] and [train]."""
    if "job" not in data:
        issues.add(
            ("job",), "required table is missing", "add a [job] table with name and output_dir"
        )
    if "command" in data and "train" in data:
        issues.add(
            ("train",),
            "a job has either [command] or [train], not both",
            "keep [command] to run your own trainer, or [train] for the built-in one",
        )
    elif "command" not in data and "train" not in data:
        issues.add(
            ("command",),
            "a job needs a [command] or a [train] table",
            'e.g. [command] argv = ["python", "train.py"]',
        )


# ------------------------------------------------------------- suggestions


def _unknown_root_key(name: str, value: object, issues: _Collector) -> None:
    if isinstance(value, dict):
        close = difflib.get_close_matches(name, list(_TABLES), n=1, cutoff=0.6)
        hint = f"did you mean [{close[0]}]?" if close else f"tables are {_table_list()}"
        issues.add((name,), "unknown table", hint)
        return
    owners = _owners(name)
    if owners:
        line = issues.lines.keys.get((name,))
        issues.add(
            (owners[0], name),
            "is written above every table header",
            f"move it below the [{owners[0]}] header",
            line=line,
        )
        return
    issues.add(
        (),
        f"unknown key {_show(name)} outside any table",
        f"every key belongs in a table: {_table_list()}",
        line=issues.lines.keys.get((name,)),
    )


def _table_list() -> str:
    return ", ".join(f"[{name}]" for name in _TABLES)


def _owners(key: str, *, besides: str = "") -> list[str]:
    return [name for name, table in _TABLES.items() if name != besides and key in table.fields]


def _suggest_key(table: str, key: str, fields: _Table | None = None) -> str:
    """The right table for a misplaced key, else the nearest known key, else the list.
    `fields`: a table that is not the job file's of that name (daemon.toml's [gpu])."""
    if fields is not None and fields is not _TABLES.get(table):
        known = list(fields.fields)
        return _did_you_mean(key, known) or f"known keys in [{table}]: {', '.join(known)}"
    if owners := _owners(key, besides=table):
        return f"belongs in [{owners[0]}]"
    known = list(_TABLES[table].fields)
    if hint := _did_you_mean(key, known):
        return hint
    for other, spec in _TABLES.items():
        close = difflib.get_close_matches(key, list(spec.fields), n=1, cutoff=0.8)
        if other != table and close:
            return f"did you mean {close[0]} in [{other}]?"
    return f"known keys in [{table}]: {', '.join(known)}"


# --------------------------------------------------------------------- JSON


def spec_to_json(spec: JobSpec) -> dict[str, Any]:
    """The whole spec as JSON-safe data (dataclass field names; paths as strings)."""
    result = _jsonable(spec)
    assert isinstance(result, dict)
    del result["warnings"]  # not part of the job: `ftsup check --json` lists them apart
    return result


def _jsonable(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value
