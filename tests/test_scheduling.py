"""GPU placement is a pure function: the issue's scenarios one plan at a time, plus
properties that hold for any machine, holdings and queue."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftsup.supervisor.scheduling import GpuView, Holding, Plan, Request, Reservation, plan

NOW = 1000.0


def gpus(n: int, **only: GpuView) -> list[GpuView]:
    """n healthy GPUs without topology; `only` replaces some (keyed 'g<index>')."""
    return [only.get(f"g{i}", GpuView(i, healthy=True)) for i in range(n)]


def decide(
    machine: Sequence[GpuView],
    holdings: Sequence[Holding] = (),
    requests: Sequence[Request] = (),
    outcomes: Mapping[str, str] | None = None,
) -> Plan:
    return plan(machine, holdings, requests, outcomes=outcomes or {}, now=NOW)


# -- the issue's scenarios -------------------------------------------------------------------


def test_three_pairs_on_four_gpus_two_run_disjoint_the_third_waits_then_takes_the_freed_pair() -> (
    None
):
    jobs = [
        Request("a", count=2, seq=0),
        Request("b", count=2, seq=1),
        Request("c", count=2, seq=2),
    ]
    first = decide(gpus(4), requests=jobs)
    assert first.start == {"a": (0, 1), "b": (2, 3)}
    assert first.waiting == {"c": "needs 2 GPUs: 0,1 used by a, 2,3 used by b"}

    running = [Holding("a", (0, 1)), Holding("b", (2, 3))]
    still = decide(gpus(4), running, [jobs[2]], {"a": "running", "b": "running"})
    assert still.start == {} and still.waiting == first.waiting

    b_ended = decide(gpus(4), running[:1], [jobs[2]], {"a": "running", "b": "finished"})
    assert b_ended.start == {"c": (2, 3)}


def test_after_chain_runs_in_order() -> None:
    a = Request("a", count=1, seq=0)
    b = Request("b", count=1, seq=1, after=("a",))
    c = Request("c", count=1, seq=2, after=("b",))
    first = decide(gpus(4), requests=[a, b, c])
    assert first.start == {"a": (0,)}
    assert first.waiting == {"b": "after a (queued)", "c": "after b (queued)"}

    a_runs = decide(gpus(4), [Holding("a", (0,))], [b, c], {"a": "running"})
    assert a_runs.start == {} and a_runs.waiting["b"] == "after a (running)"

    a_done = decide(gpus(4), [], [b, c], {"a": "finished"})
    assert a_done.start == {"b": (0,)} and a_done.waiting == {"c": "after b (queued)"}

    b_done = decide(gpus(4), [], [c], {"a": "finished", "b": "finished"})
    assert b_done.start == {"c": (0,)}


def test_a_predecessor_in_another_state_keeps_its_successor_waiting() -> None:
    # A job that runs without GPUs is in no holding: its state comes from outcomes.
    p = decide(
        gpus(1), requests=[Request("b", count=1, after=("cpu",))], outcomes={"cpu": "backoff"}
    )
    assert p.waiting == {"b": "after cpu (backoff)"}


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ("failed", "after a, which failed"),
        ("gave_up", "after a, which gave up"),
        ("stopped", "after a, which was stopped (start it again, or drop it from after)"),
    ],
)
def test_a_predecessor_that_did_not_finish_blocks_its_successors(state: str, why: str) -> None:
    b = Request("b", count=1, seq=1, after=("a",))
    c = Request("c", seq=2, after=("b",))  # a CPU job is blocked just the same
    p = decide(gpus(2), requests=[b, c], outcomes={"a": state})
    assert p.blocked == {"b": why, "c": f"after b, which is blocked ({why})"}
    assert p.start == {} and p.waiting == {}


def test_a_long_chain_quotes_the_root_cause_and_needs_no_deep_recursion() -> None:
    chain = [Request(f"j{i}", count=1, seq=i, after=(f"j{i - 1}",)) for i in range(1, 3000)]
    p = decide(gpus(1), requests=chain, outcomes={"j0": "gave_up"})
    assert p.blocked["j1"] == "after j0, which gave up"
    assert p.blocked["j2999"] == "after j2998, which is blocked (after j0, which gave up)"
    assert len(p.blocked) == 2999
    fine = decide(gpus(1), requests=chain, outcomes={"j0": "finished"})
    assert fine.start == {"j1": (0,)} and fine.waiting["j2999"] == "after j2998 (queued)"


def test_an_unknown_predecessor_blocks_and_a_later_submission_unblocks() -> None:
    b = Request("b", count=1, seq=1, after=("a",))
    assert decide(gpus(1), requests=[b]).blocked == {"b": "after a: no such job"}
    # `blocked` is recomputed on every plan: once `a` exists, `b` waits for it.
    p = decide(gpus(1), requests=[Request("a", count=1, seq=2), b])
    assert p.start == {"a": (0,)} and p.waiting == {"b": "after a (queued)"}


def test_jobs_that_wait_for_each_other_are_blocked_not_waiting_forever() -> None:
    x = Request("x", count=1, after=("y",))
    y = Request("y", count=1, seq=1, after=("x",))
    p = decide(gpus(2), requests=[x, y])
    assert set(p.blocked) == {"x", "y"} and not p.start and not p.waiting
    assert "they wait for each other (x -> y -> x)" in p.blocked["x"]
    own = decide(gpus(1), requests=[Request("z", after=("z",))])
    assert own.blocked == {"z": "after z: they wait for each other (z -> z)"}


def test_priority_preempts_a_preemptible_lower_job() -> None:
    low = Holding("low", (0, 1, 2, 3), priority=0, preemptible=True)
    urgent = Request("urgent", count=2, priority=5)
    p = decide(gpus(4), [low], [urgent], {"low": "running"})
    assert p.preempt == {"low": "urgent"}
    assert p.start == {}
    assert p.waiting == {"urgent": "needs 2 GPUs: 0,1,2,3 used by low; stopping low to make room"}
    # Meanwhile the pair it will take is reserved: a later job does not slip in.
    assert p.reservation == Reservation("urgent", (0, 1), NOW)
    after_stop = decide(gpus(4), [], [urgent, Request("low", count=4, seq=9)])
    assert after_stop.start == {"urgent": (0, 1)} and "low" in after_stop.waiting


def test_no_preemption_of_equal_priority_or_non_preemptible_jobs() -> None:
    holdings = [
        Holding("same", (0, 1), priority=5, preemptible=True),
        Holding("fixed", (2, 3), priority=0, preemptible=False),
    ]
    p = decide(gpus(4), holdings, [Request("urgent", count=2, priority=5)])
    assert p.preempt == {} and "urgent" in p.waiting


def test_preemption_names_the_fewest_victims_lowest_priority_first() -> None:
    holdings = [
        Holding("one-a", (0,), priority=0, preemptible=True),
        Holding("one-b", (1,), priority=0, preemptible=True),
        Holding("pair-hi", (2, 3), priority=2, preemptible=True),
        Holding("pair-lo", (4, 5), priority=1, preemptible=True),
    ]
    # Two GPUs: one victim suffices, and of the two pairs the lower priority goes.
    p = decide(gpus(6), holdings, [Request("urgent", count=2, priority=9)])
    assert p.preempt == {"pair-lo": "urgent"}
    # Exactly GPUs 0 and 2: both of their holders must go, nobody else.
    q = decide(gpus(6), holdings, [Request("urgent", devices=(0, 2), priority=9)])
    assert q.preempt == {"one-a": "urgent", "pair-hi": "urgent"}


def test_preemption_is_not_asked_when_it_could_not_make_room() -> None:
    # The only other GPU is unhealthy: stopping `low` frees one GPU, the job needs two.
    machine = gpus(2, g1=GpuView(1, healthy=False, unhealthy_reason="XID 79"))
    p = decide(
        machine, [Holding("low", (0,), preemptible=True)], [Request("hi", count=2, priority=1)]
    )
    assert p.preempt == {}
    assert p.waiting == {"hi": "needs 2 GPUs: 0 used by low, 1 unhealthy (XID 79)"}
    # Nor when the victim's GPU would stay busy with another user's memory.
    busy = gpus(2, g1=GpuView(1, healthy=True, foreign_mib=5000))
    q = decide(
        busy, [Holding("low", (0, 1), preemptible=True)], [Request("hi", count=2, priority=1)]
    )
    assert q.preempt == {}


def test_an_unhealthy_gpu_is_never_given_out() -> None:
    machine = gpus(4, g0=GpuView(0, healthy=False, unhealthy_reason="XID 79"))
    p = decide(
        machine,
        requests=[
            Request("any", count=1, seq=0),
            Request("exact", devices=(0,), seq=1),
            Request("all", count=4, seq=2),
        ],
    )
    assert p.start == {"any": (1,)}
    assert p.waiting["exact"] == "needs GPU 0: 0 unhealthy (XID 79)"
    # Four GPUs exist, so this is not impossible: it waits for the reset.
    assert p.waiting["all"] == "needs 4 GPUs: 0 unhealthy (XID 79), 1 used by any; free: 2,3"
    assert p.blocked == {}


def test_foreign_memory_makes_a_gpu_busy_from_the_threshold_on() -> None:
    machine = [
        GpuView(0, healthy=True, foreign_mib=3200),
        GpuView(1, healthy=True, foreign_mib=1024),
        GpuView(2, healthy=True, foreign_mib=1023),
    ]
    p = decide(machine, requests=[Request("a", count=1), Request("b", count=2, seq=1)])
    assert p.start == {"a": (2,)}
    assert p.waiting["b"] == (
        "needs 2 GPUs: 0 used by another process (3.1 GiB), "
        "1 used by another process (1.0 GiB), 2 used by a"
    )
    loose = plan(machine, [], [Request("b", count=2)], outcomes={}, now=NOW, foreign_limit_mib=4096)
    assert loose.start == {"b": (0, 1)}


def test_the_issues_reason_text() -> None:
    machine = [
        GpuView(0, healthy=True),
        GpuView(1, healthy=True),
        GpuView(2, healthy=True, foreign_mib=3174),
        GpuView(3, healthy=False, unhealthy_reason="XID 79"),
    ]
    p = decide(machine, [Holding("qwen-sft", (0, 1))], [Request("next", count=2)])
    assert p.waiting == {
        "next": "needs 2 GPUs: 0,1 used by qwen-sft, 2 used by another process (3.1 GiB), "
        "3 unhealthy (XID 79)"
    }


def test_count_prefers_one_topology_group_then_lowest_indices() -> None:
    machine = [GpuView(i, healthy=True, group=i // 2) for i in range(4)]  # {0,1} {2,3}
    spread = decide(machine, [Holding("x", (1,))], [Request("pair", count=2)])
    assert spread.start == {"pair": (2, 3)}  # not 0,2 across switches
    # A single GPU goes where it breaks no whole group: next to x.
    single = decide(machine, [Holding("x", (1,))], [Request("one", count=1)])
    assert single.start == {"one": (0,)}
    single_free = decide(machine, [Holding("x", (2,))], [Request("one", count=1)])
    assert single_free.start == {"one": (3,)}
    # No group has three: the lowest indices.
    three = decide(machine, requests=[Request("three", count=3)])
    assert three.start == {"three": (0, 1, 2)}
    assert decide(machine, requests=[Request("all", count=4)]).start == {"all": (0, 1, 2, 3)}
    assert decide(gpus(4), [Holding("x", (1,))], [Request("pair", count=2)]).start == {
        "pair": (0, 2)
    }


def test_backfill_that_would_delay_the_head_is_refused_one_that_cannot_is_allowed() -> None:
    long = Holding("long", (0, 1, 2), expected_end=NOW + 100)
    head = Request("big", count=4, seq=0)
    p = decide(
        gpus(4),
        [long],
        [
            head,
            Request("short", count=1, seq=1, duration=50),
            Request("longer", count=1, seq=2, duration=200),
        ],
    )
    assert p.reservation == Reservation("big", (0, 1, 2, 3), NOW + 100)
    assert p.start == {"short": (3,)}  # it ends before `big` can start
    assert p.waiting["longer"] == "needs 1 GPU: 0,1,2 used by long, 3 used by short"

    q = decide(gpus(4), [long], [head, Request("longer", count=1, seq=2, duration=200)])
    assert q.start == {}
    assert q.waiting["longer"] == "needs 1 GPU: 0,1,2 used by long, 3 kept for big"
    unknown = decide(gpus(4), [long], [head, Request("unknown", count=1, seq=2)])
    assert unknown.start == {} and "3 kept for big" in unknown.waiting["unknown"]


def test_backfill_outside_the_heads_gpus_is_allowed_whatever_its_length() -> None:
    holdings = [Holding("x", (0, 1), expected_end=NOW + 100)]
    jobs = [Request("head", devices=(0, 1), seq=0), Request("other", count=2, seq=1)]
    p = decide(gpus(4), holdings, jobs)
    assert p.reservation == Reservation("head", (0, 1), NOW + 100)
    assert p.start == {"other": (2, 3)}


def test_a_holding_with_no_eta_may_end_at_any_moment_so_nothing_backfills_onto_its_gpus() -> None:
    p = decide(
        gpus(2),
        [Holding("x", (0,))],
        [Request("head", count=2), Request("short", count=1, seq=1, duration=1)],
    )
    assert p.reservation == Reservation("head", (0, 1), NOW)
    assert p.start == {} and p.waiting["short"] == "needs 1 GPU: 0 used by x, 1 kept for head"


def test_a_head_that_waits_for_an_unhealthy_gpu_does_not_idle_the_machine() -> None:
    machine = gpus(2, g1=GpuView(1, healthy=False, unhealthy_reason="XID 79"))
    p = decide(machine, requests=[Request("both", count=2), Request("one", count=1, seq=1)])
    assert p.reservation is None
    assert p.start == {"one": (0,)} and "both" in p.waiting


def test_priority_then_submission_order() -> None:
    jobs = [
        Request("early", count=1, seq=0),
        Request("late-urgent", count=1, seq=5, priority=3),
        Request("middle", count=1, seq=2),
    ]
    p = decide(gpus(1), requests=jobs)
    assert p.order == ("late-urgent", "early", "middle")
    assert p.start == {"late-urgent": (0,)}


def test_a_cpu_job_starts_at_once_with_no_gpus() -> None:
    full = [Holding("x", (0,))]
    p = decide(gpus(1), full, [Request("waits", count=1), Request("cpu", seq=1)])
    assert p.start == {"cpu": ()}
    assert decide(gpus(1), full, [Request("zero", count=0)]).start == {"zero": ()}


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (
            Request("r", devices=(1, 9)),
            "asks for GPU 9, which this machine does not have (it has 0,1,2,3)",
        ),
        (Request("r", count=5), "needs 5 GPUs, this machine has 4"),
        (Request("r", count=1, devices=(0,)), "asks for both a GPU count and devices"),
    ],
)
def test_requests_that_this_machine_can_never_meet_are_blocked(request_: Request, why: str) -> None:
    assert decide(gpus(4), requests=[request_]).blocked == {"r": why}


def test_a_job_given_twice_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="twice"):
        decide(gpus(1), [Holding("a", (0,))], [Request("a", count=1)])
    with pytest.raises(ValueError, match="twice"):
        decide([GpuView(0, True), GpuView(0, True)])


# -- properties ------------------------------------------------------------------------------

NAMES = [f"r{i}" for i in range(8)]
STATES = ["finished", "failed", "gave_up", "stopped", "running", "backoff"]


@st.composite
def situations(
    draw: st.DrawFn,
) -> tuple[list[GpuView], list[Holding], list[Request], dict[str, str], int]:
    n = draw(st.integers(1, 8))
    machine = [
        GpuView(
            i,
            healthy=draw(st.booleans()) or draw(st.booleans()),
            unhealthy_reason=draw(st.sampled_from([None, "XID 79"])),
            foreign_mib=draw(st.sampled_from([0, 0, 0, 512, 1024, 4000])),
            group=draw(st.sampled_from([None, 0, 1, 2])),
        )
        for i in range(n)
    ]
    owners = st.sampled_from([None, None, "h0", "h1", "h2"])
    owner = draw(st.lists(owners, min_size=n, max_size=n))
    holdings = [
        Holding(
            name,
            tuple(i for i in range(n) if owner[i] == name),
            priority=draw(st.integers(0, 3)),
            preemptible=draw(st.booleans()),
            expected_end=draw(st.sampled_from([None, NOW - 5, NOW + 10, NOW + 100])),
        )
        for name in ("h0", "h1", "h2")
        if name in owner
    ]
    requests = []
    afters = st.lists(st.sampled_from([*NAMES, "h0", "done", "bad"]), min_size=1, max_size=2)
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=8)):
        kind = draw(st.sampled_from(["count", "count", "devices", "cpu"]))
        requests.append(
            Request(
                name,
                count=draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3, 4, 9]))
                if kind == "count"
                else None,
                devices=tuple(draw(st.sets(st.integers(0, 9), max_size=3)))
                if kind == "devices"
                else None,
                priority=draw(st.integers(0, 3)),
                seq=draw(st.integers(0, 20)),
                after=tuple(draw(afters)) if draw(st.integers(0, 3)) == 0 else (),
                duration=draw(st.sampled_from([None, 5.0, 50.0, 500.0])),
            )
        )
    outcomes = {"done": "finished", "bad": draw(st.sampled_from(STATES))}
    outcomes |= {n: draw(st.sampled_from(STATES)) for n in NAMES if draw(st.booleans())}
    return machine, holdings, requests, outcomes, draw(st.sampled_from([1024, 4096]))


Situation = tuple[list[GpuView], list[Holding], list[Request], dict[str, str], int]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(situations(), st.randoms(use_true_random=False))
def test_plans_are_sound_and_deterministic(s: Situation, rnd: random.Random) -> None:
    machine, holdings, requests, outcomes, limit = s
    p = plan(machine, holdings, requests, outcomes=outcomes, now=NOW, foreign_limit_mib=limit)

    # Every request is in exactly one of start, waiting, blocked.
    names = [r.job for r in requests]
    assert sorted([*p.start, *p.waiting, *p.blocked]) == sorted(names)
    assert sorted(p.order) == sorted(names)

    # No GPU is given twice, nor while held, unhealthy, foreign-busy or absent.
    view = {g.index: g for g in machine}
    held = {i for h in holdings for i in h.gpus}
    given_out = [i for chosen in p.start.values() for i in chosen]
    assert len(given_out) == len(set(given_out))
    for i in given_out:
        assert i in view and view[i].healthy and view[i].foreign_mib < limit and i not in held

    by_name = {r.job: r for r in requests}
    for job, chosen in p.start.items():
        r = by_name[job]
        if r.devices:
            assert chosen == tuple(sorted(set(r.devices)))
        else:
            assert len(chosen) == (r.count or 0)
        assert all(outcomes.get(a) == "finished" for a in r.after)  # never before its predecessors

    # Preemption: only preemptible, strictly lower-priority holdings, for a waiting job.
    holding = {h.job: h for h in holdings}
    for victim, beneficiary in p.preempt.items():
        assert holding[victim].preemptible and beneficiary in p.waiting
        assert holding[victim].priority < by_name[beneficiary].priority

    # Backfill never takes the head's reserved GPUs unless it ends before the head starts.
    if p.reservation is not None:
        rank = {job: k for k, job in enumerate(p.order)}
        for job, chosen in p.start.items():
            r = by_name[job]
            if rank[job] > rank[p.reservation.job] and set(chosen) & set(p.reservation.gpus):
                assert r.duration is not None and NOW + r.duration <= p.reservation.at

    # Nothing that waits for GPUs would have fitted on what is left free (minus the
    # head's reservation, unless it ends before the head starts): no GPU idles needlessly.
    left = {i for i, g in view.items() if g.healthy and g.foreign_mib < limit} - held
    left -= set(given_out)
    for job, why in p.waiting.items():
        r = by_name[job]
        if not why.startswith("needs"):
            continue
        room = set(left)
        if p.reservation is not None and p.reservation.job != job:
            short = r.duration is not None and NOW + r.duration <= p.reservation.at
            room -= set() if short else set(p.reservation.gpus)
        if r.devices:
            assert not set(r.devices) <= room
        else:
            assert len(room) < (r.count or 0)

    # Deterministic: the same inputs in another order give the same plan.
    for _ in range(2):
        shuffled = plan(
            rnd.sample(machine, len(machine)),
            rnd.sample(holdings, len(holdings)),
            rnd.sample(requests, len(requests)),
            outcomes=dict(rnd.sample(sorted(outcomes.items()), len(outcomes))),
            now=NOW,
            foreign_limit_mib=limit,
        )
        assert shuffled == p
        assert list(shuffled.start.items()) == list(p.start.items())
        assert list(shuffled.waiting.items()) == list(p.waiting.items())


def test_the_benchmark_runs_and_reports_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "scheduling_bench.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--runs", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["scenario"] for r in rows] == ["idle", "full", "degraded", "preempt"]
    assert all(r["jobs"] == 100 and r["gpus"] == 8 for r in rows)
    assert rows[3]["preempt"] > 0 and all(r["preempt"] == 0 for r in rows[:3])
