"""One `Source` over several daemons (`ftsup tui --host n1 --host n2`, issue 17).

A multi-node job runs under the same name on every node, each node with its
own daemon. `MultiSource` presents those daemons to the app as ONE daemon, so
the app, its model and its screens stay as they are:

* jobs are named `JOB@LABEL` (every job name in answers and events is
  rewritten; a request naming `JOB@LABEL` goes to LABEL's daemon as `JOB`);
* requests that name no job (`status`, `events`, `gpus`, `queue`) go to every
  reachable daemon and the answers are merged; an unreachable one is left out;
* GPUs are renumbered `slot * GPU_STRIDE + index` (node 0 keeps its indices)
  and carry `label` ("n2:0"), which the GPU strip and map show instead;
* event ids become unique and ordered by time across daemons, and `after_id`
  is translated per daemon (the newest raw id each one delivered);
* one lost node does not blank the others: `Connected` is posted whenever a
  daemon comes or goes while another is up (the app reloads; the header's
  `nodes` text says who is down), `Disconnected` only when all are down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from textual.message import Message
from textual.notifications import Notification, Notify, SeverityLevel

from ftsup.supervisor.protocol import EventKind, RequestError, RequestType
from ftsup.tui.messages import Connected, DaemonEvent, Disconnected
from ftsup.tui.source import NotConnected, Post, Source

log = logging.getLogger("ftsup.tui")

SEPARATOR = "@"
GPU_STRIDE = 100  # node k's GPU i is GPU k*100+i towards the app
_ID_LOW_BITS = 10  # raw id bits kept under the millisecond in a merged event id
FAN_OUT = frozenset(
    {RequestType.STATUS, RequestType.LIST, RequestType.EVENTS, RequestType.GPUS}
    | {RequestType.QUEUE, RequestType.PING}
)
JOB_ARGS = ("job", "name")
START_REFUSED = (
    "with several daemons, start the job with `ftsup start JOB.toml` on each node "
    "(or attach the TUI to that node alone)"
)


def join_name(name: str, label: str) -> str:
    return f"{name}{SEPARATOR}{label}"


def split_name(shown: str, labels: Mapping[str, object]) -> tuple[str, str]:
    """`JOB@LABEL` -> (JOB, LABEL); RequestError not_found for any other name."""
    name, sep, label = shown.rpartition(SEPARATOR)
    if not sep or not name or label not in labels:
        known = ", ".join(labels)
        raise RequestError(
            "not_found", f"no job named {shown!r} (jobs here are JOB@NODE; nodes: {known})"
        )
    return name, label


@dataclass
class _Node:
    """What the MultiSource knows about one daemon's link."""

    slot: int
    up: bool = False
    ever_up: bool = False
    daemon: dict[str, Any] | None = None
    reason: str | None = None
    attempt: int = 0
    retry_in: float | None = None
    last_raw_id: int = 0  # the newest event id of this daemon handed to the app


class MultiSource:
    """The `Source` for several labelled sources (label -> e.g. a DaemonConnection)."""

    def __init__(self, sources: Mapping[str, Source]) -> None:
        if not sources:
            raise ValueError("MultiSource needs at least one source")
        for label in sources:
            if not label or SEPARATOR in label:
                raise ValueError(f"bad node label {label!r} (non-empty, no {SEPARATOR!r})")
        self.sources = dict(sources)
        self.nodes = {label: _Node(slot) for slot, label in enumerate(self.sources)}
        self.target = "  ".join(f"{label}={s.target}" for label, s in self.sources.items())
        self._post: Post | None = None

    def now(self) -> float:
        return time.time()

    # the link -------------------------------------------------------------------
    async def run(self, post: Post) -> None:
        self._post = post
        tasks = [
            asyncio.ensure_future(self._run_one(label, source))
            for label, source in self.sources.items()
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_one(self, label: str, source: Source) -> None:
        """One daemon's loop, restarted if it fails: one broken node must not end the others."""

        def relay(message: Message) -> object:
            self._relay(label, message)
            return None

        while True:
            try:
                await source.run(relay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in one link; keep the others and say so
                log.exception("the connection to %s failed", label)
                relay(Disconnected(f"internal error: {exc!r}", 1, 1.0))
                await asyncio.sleep(1.0)

    def _relay(self, label: str, message: Message) -> None:
        post = self._post
        assert post is not None
        node = self.nodes[label]
        if isinstance(message, DaemonEvent):
            post(DaemonEvent(self.event_out(label, message.event)))
        elif isinstance(message, Connected):
            back = node.ever_up and not node.up
            node.up = node.ever_up = True
            node.daemon = dict(message.daemon)
            node.reason, node.attempt, node.retry_in = None, 0, None
            post(Connected(self.daemon_info()))
            if back and self._others_up(label):
                self._notify(post, f"{label}: daemon reachable again", "information")
        elif isinstance(message, Disconnected):
            was_up = node.up
            node.up = False
            node.reason, node.attempt, node.retry_in = (
                message.reason,
                message.attempt,
                message.retry_in,
            )
            if self._others_up(label):
                if was_up:  # the header and the roster change; retries stay quiet
                    post(Connected(self.daemon_info()))
                    self._notify(
                        post,
                        f"{label}: daemon unreachable ({message.reason}); its jobs are "
                        "hidden until it is back",
                        "warning",
                    )
            else:
                post(Disconnected(self._down_reason(), message.attempt, message.retry_in))
        else:
            post(message)

    def _others_up(self, label: str) -> bool:
        return any(node.up for other, node in self.nodes.items() if other != label)

    def _down_reason(self) -> str:
        return "; ".join(
            f"{label}: {node.reason or 'not connected'}" for label, node in self.nodes.items()
        )

    @staticmethod
    def _notify(post: Post, text: str, severity: SeverityLevel) -> None:
        timeout = 8.0 if severity == "warning" else 5.0
        post(Notify(Notification(text, "node", severity, timeout)))

    def nodes_text(self) -> str:
        """`n1 ✓  n2 reconnecting…`: the header's word on every daemon."""
        parts = []
        for label, node in self.nodes.items():
            if node.up:
                parts.append(f"{label} ✓")
            else:
                parts.append(f"{label} {'reconnecting…' if node.ever_up else 'connecting…'}")
        return "  ".join(parts)

    def daemon_info(self) -> dict[str, Any]:
        """What `Connected` carries: every daemon's handshake, and the `nodes` text."""
        return {
            "nodes": self.nodes_text(),
            "nodes_down": [label for label, node in self.nodes.items() if not node.up],
            "daemons": {label: node.daemon for label, node in self.nodes.items() if node.up},
        }

    async def close(self) -> None:
        for source in self.sources.values():
            with contextlib.suppress(Exception):
                await source.close()

    # requests -------------------------------------------------------------------
    async def request(self, kind: str, **args: Any) -> dict[str, Any]:
        key = next((k for k in JOB_ARGS if isinstance(args.get(k), str)), None)
        if key is not None:
            name, label = split_name(args[key], self.sources)
            answer = await self.sources[label].request(kind, **{**args, key: name})
            return self.answer_out(label, kind, answer)
        if kind == RequestType.START:
            raise RequestError("several_daemons", START_REFUSED)
        if kind not in FAN_OUT:
            raise RequestError(
                "several_daemons", f"{kind}: names no job; with several daemons ask one node"
            )
        return await self._fan_out(kind, args)

    async def _fan_out(self, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        labels = list(self.sources)
        asks: list[Awaitable[dict[str, Any]]] = [
            self.sources[label].request(kind, **self._args_for(label, kind, args))
            for label in labels
        ]
        results = await asyncio.gather(*asks, return_exceptions=True)
        answers: dict[str, dict[str, Any]] = {}
        refused: RequestError | None = None
        for label, result in zip(labels, results, strict=True):
            if isinstance(result, RequestError):
                refused = refused or result
            elif isinstance(result, NotConnected):
                continue  # a node that is down is left out
            elif isinstance(result, BaseException):
                raise result
            else:
                answers[label] = self.answer_out(label, kind, result)
        if not answers:
            if refused is not None:
                raise refused
            raise NotConnected("no daemon is reachable")
        return MERGERS.get(kind, _merge_first)(answers)

    def _args_for(self, label: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        """`after_id` means "after the newest event I have": per daemon, its own newest."""
        if kind == RequestType.EVENTS and args.get("after_id"):
            return {**args, "after_id": self.nodes[label].last_raw_id}
        return args

    # rewriting ------------------------------------------------------------------
    def gpu_index(self, label: str, index: Any) -> Any:
        if isinstance(index, bool) or not isinstance(index, int):
            return index
        return self.nodes[label].slot * GPU_STRIDE + index

    def event_id(self, label: str, raw: int, ts: Any) -> int:
        """Unique across daemons, and ordered by time (the timeline sorts by id)."""
        ms = int(ts * 1000) if isinstance(ts, int | float) and math.isfinite(ts) else 0
        low = raw & ((1 << _ID_LOW_BITS) - 1)
        return ((ms << _ID_LOW_BITS) | low) * len(self.nodes) + self.nodes[label].slot

    def event_out(self, label: str, event: dict[str, Any]) -> dict[str, Any]:
        out = dict(event)
        job = out.get("job")
        if isinstance(job, str):
            out["job"] = join_name(job, label)
        elif out.get("message") and out.get("kind") != EventKind.LAGGED:
            out["message"] = f"[{label}] {out['message']}"  # a node-wide event: say which node
        raw = out.get("id")
        if isinstance(raw, int) and not isinstance(raw, bool):
            node = self.nodes[label]
            node.last_raw_id = max(node.last_raw_id, raw)
            out["id"] = self.event_id(label, raw, out.get("ts"))
        data = out.get("data")
        if isinstance(data, dict):
            out["data"] = self._data_out(label, str(out.get("kind")), data)
        return out

    def _data_out(self, label: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        if kind == EventKind.GPU:
            return self.gpu_out(label, data)
        if "index" in data and kind in (EventKind.GPU_FAULT, EventKind.GPU_RESET):
            data["index"] = self.gpu_index(label, data["index"])
        if kind == EventKind.PLACED and isinstance(data.get("gpus"), list):
            data["gpus"] = [self.gpu_index(label, i) for i in data["gpus"]]
        if kind == EventKind.PREEMPTED and isinstance(data.get("for"), str):
            data["for"] = join_name(data["for"], label)
        return data

    def gpu_out(self, label: str, gpu: dict[str, Any]) -> dict[str, Any]:
        out = dict(gpu)
        if "index" in out:
            out["label"] = f"{label}:{out['index']}"
            out["index"] = self.gpu_index(label, out["index"])
        if isinstance(out.get("jobs"), list):
            out["jobs"] = [join_name(j, label) if isinstance(j, str) else j for j in out["jobs"]]
        return out

    def job_out(self, label: str, job: dict[str, Any]) -> dict[str, Any]:
        out = dict(job)
        if isinstance(out.get("name"), str):
            out["name"] = join_name(out["name"], label)
        if isinstance(out.get("gpu_devices"), list):
            out["gpu_devices"] = [self.gpu_index(label, i) for i in out["gpu_devices"]]
        return out

    def answer_out(self, label: str, kind: str, answer: dict[str, Any]) -> dict[str, Any]:
        """One daemon's answer with its job names, GPU indices and event ids rewritten."""
        out = dict(answer)
        if isinstance(out.get("jobs"), list):  # status / list without a job
            out["jobs"] = [
                self.job_out(label, j) if isinstance(j, dict) else j for j in out["jobs"]
            ]
        elif kind in (RequestType.STATUS, RequestType.START) and "name" in out:
            out = self.job_out(label, out)
        if isinstance(out.get("events"), list):
            if kind == RequestType.GPUS:
                out["events"] = [_reindexed(self, label, e) for e in out["events"]]
            else:
                out["events"] = [
                    self.event_out(label, e) if isinstance(e, dict) else e for e in out["events"]
                ]
        if kind == RequestType.GPUS and isinstance(out.get("gpus"), list):
            out["gpus"] = [
                self.gpu_out(label, g) if isinstance(g, dict) else g for g in out["gpus"]
            ]
        if kind == RequestType.QUEUE:
            out = self._queue_out(label, out)
        return out

    def _queue_out(self, label: str, answer: dict[str, Any]) -> dict[str, Any]:
        out = dict(answer)
        holding = []
        for entry in out.get("holding") or []:
            if isinstance(entry, dict):
                entry = dict(entry)
                if isinstance(entry.get("job"), str):
                    entry["job"] = join_name(entry["job"], label)
                entry["gpus"] = [self.gpu_index(label, i) for i in entry.get("gpus") or []]
            holding.append(entry)
        out["holding"] = holding
        waiting = []
        for entry in out.get("waiting") or []:
            if isinstance(entry, dict):
                entry = dict(entry)
                if isinstance(entry.get("job"), str):
                    entry["job"] = join_name(entry["job"], label)
                if isinstance(entry.get("after"), list):
                    entry["after"] = [
                        join_name(a, label) if isinstance(a, str) else a for a in entry["after"]
                    ]
                if isinstance(entry.get("devices"), list):
                    entry["devices"] = [self.gpu_index(label, i) for i in entry["devices"]]
            waiting.append(entry)
        out["waiting"] = waiting
        foreign = out.get("foreign_mib")
        if isinstance(foreign, dict):
            out["foreign_mib"] = {
                str(self.gpu_index(label, int(k))) if str(k).isdigit() else k: v
                for k, v in foreign.items()
            }
        return out


def _reindexed(source: MultiSource, label: str, entry: Any) -> Any:
    """A GPU fault record inside a `gpus` answer: its index renumbered."""
    if isinstance(entry, dict) and "index" in entry:
        return {**entry, "index": source.gpu_index(label, entry["index"])}
    return entry


# merging fan-out answers (already rewritten, label -> answer) --------------------
def _labelled_text(answers: Mapping[str, dict[str, Any]], key: str) -> str | None:
    texts = {label: a.get(key) for label, a in answers.items() if a.get(key)}
    if not texts:
        return None
    if len(set(map(str, texts.values()))) == 1 and len(texts) == len(answers):
        return str(next(iter(texts.values())))
    return "; ".join(f"{label}: {text}" for label, text in texts.items())


def _merge_status(answers: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    jobs = [job for a in answers.values() for job in a.get("jobs") or []]
    counts: dict[str, int] = {}
    for answer in answers.values():
        for key, value in (answer.get("counts") or {}).items():
            if isinstance(value, int):
                counts[key] = counts.get(key, 0) + value
    degraded = {label: a["degraded"] for label, a in answers.items() if a.get("degraded")}
    merged: dict[str, Any] = {
        "jobs": jobs,
        "degraded": "; ".join(f"{k}: {v}" for k, v in degraded.items()) or None,
    }
    if counts:
        merged["counts"] = counts
    return merged


def _merge_events(answers: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    events = [e for a in answers.values() for e in a.get("events") or [] if isinstance(e, dict)]
    events.sort(key=lambda e: e.get("id") or 0)
    return {"events": events}


def _merge_gpus(answers: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    first = next(iter(answers.values()))
    available = [a.get("available", a.get("active")) for a in answers.values()]
    return {
        **first,
        "available": any(v is True for v in available),
        "status": _labelled_text(answers, "status"),
        "reason": _labelled_text(answers, "reason"),
        "driver": _labelled_text(answers, "driver"),
        "gpus": [g for a in answers.values() for g in a.get("gpus") or []],
        "events": [e for a in answers.values() for e in a.get("events") or []],
        "simulated": any(a.get("simulated") is True for a in answers.values()),
    }


def _merge_queue(answers: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    foreign: dict[str, Any] = {}
    for answer in answers.values():
        if isinstance(answer.get("foreign_mib"), dict):
            foreign.update(answer["foreign_mib"])
    limits = [a["foreign_limit_mib"] for a in answers.values() if "foreign_limit_mib" in a]
    merged: dict[str, Any] = {
        "holding": [h for a in answers.values() for h in a.get("holding") or []],
        "waiting": [w for a in answers.values() for w in a.get("waiting") or []],
        "foreign_mib": foreign,
    }
    if limits:
        merged["foreign_limit_mib"] = min(limits)
    return merged


def _merge_first(answers: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    return next(iter(answers.values()))


MERGERS: dict[str, Callable[[Mapping[str, dict[str, Any]]], dict[str, Any]]] = {
    RequestType.STATUS: _merge_status,
    RequestType.LIST: _merge_status,
    RequestType.EVENTS: _merge_events,
    RequestType.GPUS: _merge_gpus,
    RequestType.QUEUE: _merge_queue,
}
