"""GPU placement: which queued jobs start now, on which GPUs, and why the others wait.

    plan(gpus, holdings, requests, outcomes=..., now=...) -> Plan

A pure function, like the restart policy: no I/O, no clock reads, no globals,
and the same inputs in any order give the same plan. The daemon calls it on
every change (a job queued, ended, a GPU's health or foreign memory changed)
and acts on the answer. The rules, in order:

1. `after`: a job starts only once every job it names has the outcome
   "finished". A predecessor that failed, gave up or was stopped, a name that
   is no job, a blocked predecessor and a cycle leave it `blocked` (someone must
   act: restart the predecessor, or change `after`); any other state waits.
2. Requests that can never be met on this machine (a GPU it does not have,
   more GPUs than it has) are `blocked`; a request for no GPU starts at once.
3. The rest is one queue: priority (higher first), then `seq`, then name. Jobs
   are placed in that order on free GPUs (healthy, held by no job, foreign
   memory below the limit) until one cannot be placed: the head. It gets a
   reservation, the earliest time and GPUs it can start on, assuming that each
   holding ends at its `expected_end` and that one with no end (and foreign
   memory) may end at any moment. Later jobs are backfilled only where they
   cannot delay it: outside the reserved GPUs, or on them when their own
   expected end comes before the reserved start (EASY backfill).
4. When the head cannot be placed, the fewest preemptible running jobs of
   strictly lower priority whose GPUs would let it start (lowest priority
   first) are named in `preempt`; the head reserves those GPUs meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

FINISHED = "finished"
# Predecessor outcomes that a successor never outlives on its own: someone must act.
BLOCKING_OUTCOMES: Mapping[str, str] = {
    "failed": "failed",
    "gave_up": "gave up",
    "stopped": "was stopped (start it again, or drop it from after)",
}


@dataclass(frozen=True)
class GpuView:
    """One GPU as the daemon sees it now."""

    index: int
    healthy: bool
    unhealthy_reason: str | None = None  # e.g. "XID 79"
    foreign_mib: int = 0  # memory held by processes that are no holding job's
    group: int | None = None  # GPUs with one group share an NVLink/PCIe switch


@dataclass(frozen=True)
class Holding:
    """A running (or starting, or restarting) job and the GPUs it holds."""

    job: str
    gpus: tuple[int, ...]
    priority: int = 0
    preemptible: bool = False
    expected_end: float | None = None  # from its ETA (same clock as `now`); None: unknown


@dataclass(frozen=True)
class Request:
    """A job that wants to start. Neither `count` nor `devices` (or 0 / ()): no GPU."""

    job: str
    count: int | None = None  # any N free healthy GPUs
    devices: tuple[int, ...] | None = None  # exactly these GPUs
    priority: int = 0
    seq: int = 0  # submission order (lower first)
    after: tuple[str, ...] = ()  # start only when these jobs finished
    duration: float | None = None  # expected run time in seconds (backfill); None: unknown


@dataclass(frozen=True)
class Reservation:
    """Where and when the head of the queue is expected to start."""

    job: str
    gpus: tuple[int, ...]
    at: float


@dataclass(frozen=True)
class Plan:
    """The decision. Every request is in exactly one of start, waiting, blocked."""

    start: dict[str, tuple[int, ...]]  # job -> GPUs to start it on now (() for no GPU)
    waiting: dict[str, str]  # job -> why it waits
    blocked: dict[str, str]  # job -> why it never starts until someone acts
    preempt: dict[str, str]  # preemptible running job -> the job it makes room for
    order: tuple[str, ...] = ()  # all requests, in queue order (for `ftsup queue`)
    reservation: Reservation | None = None  # the head's, when it has one


def foreign_busy(foreign_mib: int, limit_mib: int) -> bool:
    """Processes that are no job's hold enough memory on a GPU to make it busy."""
    return foreign_mib >= limit_mib


def free_gpus(
    gpus: Sequence[GpuView], holdings: Sequence[Holding], *, foreign_limit_mib: int
) -> frozenset[int]:
    """The GPUs `plan` would give out now: healthy, held by no job, no foreign memory."""
    return _Machine(gpus, holdings, foreign_limit_mib).free


def plan(
    gpus: Sequence[GpuView],
    holdings: Sequence[Holding],
    requests: Sequence[Request],
    *,
    outcomes: Mapping[str, str],
    now: float,
    foreign_limit_mib: int = 1024,
) -> Plan:
    """Decide who starts where now. Raises ValueError on a GPU index or job given twice."""
    m = _Machine(gpus, holdings, foreign_limit_mib)
    names = [h.job for h in holdings] + [r.job for r in requests]
    if len(set(names)) != len(names):
        raise ValueError("a job is given twice (in holdings or requests)")
    ordered = sorted(requests, key=lambda r: (-r.priority, r.seq, r.job))
    holding, queued = {h.job for h in holdings}, {r.job for r in requests}
    blocked = _blocked(ordered, holding, outcomes, m)
    start: dict[str, tuple[int, ...]] = {}
    waiting: dict[str, str] = {}
    queue: list[Request] = []
    for r in ordered:
        if r.job in blocked:
            continue
        pending = _unfinished(r, holding, queued, outcomes)
        if pending:
            waiting[r.job] = "after " + ", ".join(pending)
        elif not r.count and not r.devices:
            start[r.job] = ()
        else:
            queue.append(r)

    free = set(m.free)
    release = {h.job: now if h.expected_end is None else max(now, h.expected_end) for h in holdings}
    given: dict[int, str] = {}  # GPU -> job started on it in this plan
    head: Request | None = None
    reservation: Reservation | None = None
    victims: tuple[str, ...] = ()
    for r in queue:
        if head is None:
            chosen = m.place(r, free)
            if chosen is None:
                head = r
                victims, reservation = _preempt_or_reserve(r, free, given, release, m, now)
                note = "; stopping " + ", ".join(victims) + " to make room" if victims else ""
                waiting[r.job] = m.why(r, free, given, ()) + note
                continue
        else:
            kept = set(reservation.gpus) if reservation else set()
            chosen = m.place(r, free - kept)
            ends = None if r.duration is None else now + r.duration
            if chosen is None and reservation and ends is not None and ends <= reservation.at:
                chosen = m.place(r, free)
            if chosen is None:
                waiting[r.job] = m.why(r, free, given, tuple(sorted(kept & free)), head.job)
                continue
        start[r.job] = chosen
        free -= set(chosen)
        given.update(dict.fromkeys(chosen, r.job))
        release[r.job] = now if r.duration is None else now + r.duration
    return Plan(
        start=start,
        waiting={r.job: waiting[r.job] for r in ordered if r.job in waiting},
        blocked=blocked,
        preempt=dict.fromkeys(victims, head.job) if head else {},
        order=tuple(r.job for r in ordered),
        reservation=reservation,
    )


class _Machine:
    """The GPUs, who holds them, and the placement and reason rules on top."""

    def __init__(self, gpus: Sequence[GpuView], holdings: Sequence[Holding], limit: int) -> None:
        self.gpus = {g.index: g for g in gpus}
        if len(self.gpus) != len(gpus):
            raise ValueError("a GPU index is given twice")
        self.limit = limit
        self.holdings = sorted(holdings, key=lambda h: h.job)
        self.holders: dict[int, list[str]] = {}
        for h in self.holdings:
            for index in sorted(set(h.gpus)):
                self.holders.setdefault(index, []).append(h.job)
        self.free = frozenset(
            i for i, g in self.gpus.items() if self.usable(i) and i not in self.holders
        )

    def usable(self, index: int) -> bool:
        """Could be given out once no job holds it: present, healthy, no foreign memory."""
        g = self.gpus.get(index)
        return g is not None and g.healthy and not foreign_busy(g.foreign_mib, self.limit)

    def place(self, r: Request, pool: Iterable[int]) -> tuple[int, ...] | None:
        """The GPUs `r` gets from `pool`, or None. One topology group if one fits (the
        fullest-used group that does, to keep whole groups for bigger jobs), else the
        lowest indices."""
        pool = set(pool)
        if r.devices:
            wanted = set(r.devices)
            return tuple(sorted(wanted)) if wanted <= pool else None
        n = r.count or 0
        if len(pool) < n:
            return None
        groups: dict[tuple[int, int], list[int]] = {}
        for i in sorted(pool):
            g = self.gpus[i].group
            groups.setdefault((0, g) if g is not None else (1, i), []).append(i)
        fits = [(len(members), members[:n]) for members in groups.values() if len(members) >= n]
        return tuple(min(fits)[1]) if fits else tuple(sorted(pool)[:n])

    def why(
        self,
        r: Request,
        free: set[int],
        given: Mapping[int, str],
        kept: tuple[int, ...],
        head: str = "",
    ) -> str:
        """'needs 2 GPUs: 0,1 used by a, 3 unhealthy (XID 79); free: 2' — what blocks it."""
        if r.devices:
            wanted = sorted(set(r.devices))
            asked = f"needs GPU{'s' if len(wanted) > 1 else ''} {_ids(wanted)}"
        else:
            wanted = sorted(self.gpus)
            asked = f"needs {r.count} GPU{'s' if r.count != 1 else ''}"
        causes: dict[str, list[int]] = {}
        for i in wanted:
            cause = self._cause(i, given, kept, head)
            if cause:
                causes.setdefault(cause, []).append(i)
        parts = [f"{_ids(ids)} {cause}" for cause, ids in causes.items()]
        text = f"{asked}: {', '.join(parts)}" if parts else asked
        spare = sorted(i for i in free if i in wanted and i not in kept)
        return f"{text}; free: {_ids(spare)}" if spare and not r.devices else text

    def _cause(self, i: int, given: Mapping[int, str], kept: tuple[int, ...], head: str) -> str:
        g = self.gpus[i]
        if not g.healthy:
            return f"unhealthy ({g.unhealthy_reason})" if g.unhealthy_reason else "unhealthy"
        if i in self.holders or i in given:
            users = [*self.holders.get(i, ()), *([given[i]] if i in given else [])]
            return "used by " + " and ".join(users)
        if g.foreign_mib >= self.limit:
            return f"used by another process ({_mib(g.foreign_mib)})"
        if i in kept:
            return f"kept for {head}"
        return ""


def _blocked(
    ordered: Sequence[Request], holding: set[str], outcomes: Mapping[str, str], m: _Machine
) -> dict[str, str]:
    """Requests that cannot start until someone acts, with the reason. A depth-first walk
    of the `after` links with its own stack (a long chain must not hit the recursion
    limit); a blocked predecessor's root cause is quoted, not its whole chain."""
    by_name = {r.job: r for r in ordered}
    why: dict[str, str | None] = {}  # decided requests
    root: dict[str, str] = {}  # blocked request -> the cause at the bottom of its chain
    for first in ordered:
        if first.job in why:
            continue
        stack = [(first, iter(first.after))]
        path = [first.job]  # the requests being walked, for naming a cycle
        found: dict[str, str | None] = {first.job: _impossible(first, m)}
        while stack:
            r, predecessors = stack[-1]
            name = next(predecessors, None) if found[r.job] is None else None
            if name is None:  # r is decided: hand a block up to the request that waits for it
                stack.pop()
                path.pop()
                why[r.job] = found.pop(r.job)
                cause = why[r.job]
                if cause is not None:
                    root.setdefault(r.job, cause)
                    if stack:
                        up = stack[-1][0].job
                        found[up] = f"after {r.job}, which is blocked ({root[r.job]})"
                        root[up] = root[r.job]
            elif name in holding:
                continue
            elif name in path:
                cycle = " -> ".join([*path[path.index(name) :], name])
                found[r.job] = f"after {name}: they wait for each other ({cycle})"
            elif name in why:
                if why[name] is not None:
                    found[r.job] = f"after {name}, which is blocked ({root[name]})"
                    root[r.job] = root[name]
            elif name in by_name:
                nxt = by_name[name]
                stack.append((nxt, iter(nxt.after)))
                path.append(name)
                found[name] = _impossible(nxt, m)
            elif name not in outcomes:
                found[r.job] = f"after {name}: no such job"
            elif outcomes[name] in BLOCKING_OUTCOMES:
                found[r.job] = f"after {name}, which {BLOCKING_OUTCOMES[outcomes[name]]}"
    return {r.job: cause for r in ordered if (cause := why[r.job]) is not None}


def _impossible(r: Request, m: _Machine) -> str | None:
    """Why `r` can never be met on this machine, or None."""
    if r.count is not None and r.devices is not None:
        return "asks for both a GPU count and devices"
    if r.count is not None and r.count < 0:
        return f"asks for {r.count} GPUs"
    missing = sorted(set(r.devices or ()) - set(m.gpus))
    if missing:
        have = _ids(sorted(m.gpus)) if m.gpus else "none"
        return f"asks for GPU {_ids(missing)}, which this machine does not have (it has {have})"
    if r.count and r.count > len(m.gpus):
        return f"needs {r.count} GPUs, this machine has {len(m.gpus)}"
    return None


def _unfinished(
    r: Request, holding: set[str], queued: set[str], outcomes: Mapping[str, str]
) -> list[str]:
    """The predecessors `r` still waits for, as 'name (state)'."""
    pending = []
    for name in r.after:
        if name in holding:
            pending.append(f"{name} (running)")
        elif name in queued:
            pending.append(f"{name} (queued)")
        elif outcomes.get(name) != FINISHED:
            pending.append(f"{name} ({outcomes.get(name)})")
    return pending


def _preempt_or_reserve(
    head: Request,
    free: set[int],
    given: Mapping[int, str],
    release: Mapping[str, float],
    m: _Machine,
    now: float,
) -> tuple[tuple[str, ...], Reservation | None]:
    """The victims that let the head start (reserving their GPUs), or its reservation."""
    victims = _victims(head, free, m)
    if victims is not None:
        names, gpus = victims
        return names, Reservation(head.job, gpus, now)
    # The earliest time each GPU can be the head's: free now, or when its holders end.
    when: dict[int, float] = {}
    for i in m.gpus:
        if i in free:
            when[i] = now
        elif m.gpus[i].healthy:
            jobs = [*m.holders.get(i, ()), *([given[i]] if i in given else [])]
            when[i] = max([now, *(release[j] for j in jobs)])
    for t in sorted(set(when.values())):
        chosen = m.place(head, [i for i, w in when.items() if w <= t])
        if chosen is not None:
            return (), Reservation(head.job, chosen, t)
    return (), None  # waits for an unhealthy GPU: nothing to reserve until it is reset


def _victims(
    head: Request, free: set[int], m: _Machine
) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """The fewest preemptible lower-priority holdings whose GPUs let the head start
    (lowest priority first among equally few), with the head's GPUs; or None."""
    candidates = sorted(
        (h for h in m.holdings if h.preemptible and h.priority < head.priority),
        key=lambda h: (h.priority, h.job),
    )
    names = {h.job for h in candidates}
    # A GPU comes free only when every holder of it goes, and only if it is usable.
    gain = {
        h.job: {i for i in h.gpus if m.usable(i) and set(m.holders[i]) <= names} for h in candidates
    }
    wanted = set(head.devices or ()) or set(m.gpus)  # exact devices: only their holders help
    useful = [h for h in candidates if gain[h.job] & wanted]
    most = sorted((len(gain[h.job]) for h in useful), reverse=True)
    for k in range(1, len(useful) + 1):
        if head.count and len(free) + sum(most[:k]) < head.count:
            continue  # no k of them free enough GPUs
        for combo in combinations(useful, k):
            going = {h.job for h in combo}
            pool = set(free)
            for h in combo:
                pool |= {i for i in gain[h.job] if set(m.holders[i]) <= going}
            chosen = m.place(head, pool)
            if chosen is not None:
                return tuple(h.job for h in combo), chosen
    return None


def _ids(indices: Iterable[int]) -> str:
    return ",".join(str(i) for i in indices)


def _mib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib} MiB"
