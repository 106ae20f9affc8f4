"""The facts each run must show, judged from what scenarios.py observed.

`ok` is True/False for a fact that separates right from wrong, None for an
observation worth recording (what the log readers give without the bootstrap).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.llamafactory.scenarios import Seen
from bench.llamafactory.workdir import Recipe


@dataclass(frozen=True)
class Fact:
    run: str
    what: str
    value: str
    ok: bool | None


def _live_steps(seen: Seen) -> list[dict[str, Any]]:
    """Distinct steps the daemon showed with a loss, over the whole run."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in seen.live:
        if entry["step"] and entry["loss"] is not None:
            by_step.setdefault(int(entry["step"]), entry)
    return [by_step[s] for s in sorted(by_step)]


def _between_checkpoints(live: list[dict[str, Any]], save_steps: int) -> list[int]:
    """Steps shown live that no checkpoint holds (periodic saves are at multiples)."""
    return [e["step"] for e in live if e["step"] % save_steps != 0]


def _resume(seen: Seen, index: int) -> tuple[int | None, int | None]:
    """(checkpoint step ftsup passed, step transformers says it resumed at)."""
    if not seen.resumes:
        return None, None
    resume = seen.resumes[index]
    given = Path(resume["resume_from"]).name.removeprefix("checkpoint-")
    return (int(given) if given.isdigit() else None), resume["hf_resumed_at_step"]


def _same(seen: Seen) -> Fact:
    same = seen.same_as_reference
    value = (
        f"{same['tensors']} LoRA tensors equal"
        + (", files byte-equal" if same["files_byte_equal"] else "")
        if same["bit_identical"]
        else f"differ: {same['differ'][:4]}"
    )
    return Fact("", "final adapter == uninterrupted reference", value, bool(same["bit_identical"]))


def _finished(seen: Seen, recipe: Recipe) -> Fact:
    state = seen.finished.get("state")
    last = (seen.finished.get("last_exit") or {}).get("last_step")
    return Fact(
        "",
        "job ends finished at max_steps",
        f"{state}, step {last}, {seen.attempts} attempts in all",
        state == "finished" and last == recipe.max_steps,
    )


def judge_instrumented(seen: Seen, recipe: Recipe, run: str) -> list[Fact]:
    facts: list[Fact] = []
    inst = seen.instrumentation or {}
    facts.append(
        Fact(
            run,
            "bootstrap attached to LF's trainer",
            f"{inst.get('state')} ({inst.get('trainer')}, transformers {inst.get('transformers')})",
            inst.get("state") == "attached",
        )
    )
    live = _live_steps(seen)
    between = _between_checkpoints(live, recipe.save_steps)
    early = [e for e in seen.live if e["loss"] is not None and not e["last_checkpoint_step"]]
    before_first = sorted({e["step"] for e in early if e["step"]})
    facts.append(
        Fact(
            run,
            "steps live in ftsup status, with loss",
            f"{len(live)} of {recipe.max_steps} steps seen, {len(between)} between checkpoints; "
            f"{len(before_first)} before the first checkpoint "
            f"(e.g. {live[0]['step'] if live else '-'}: loss {live[0]['loss'] if live else '-'})",
            len(before_first) >= 2,
        )
    )
    every = sorted(set(seen.progress_steps))
    facts.append(
        Fact(
            run,
            "every step + loss in ftsup's progress.jsonl",
            f"{len(seen.progress_steps)} step lines, steps {every[:1]}..{every[-1:]}",
            every == list(range(1, recipe.max_steps + 1)),
        )
    )
    extra = [c for c in seen.checkpoints_before_stop if c % recipe.save_steps != 0]
    asked = seen.save_requested_at or 0
    facts.append(
        Fact(
            run,
            "`ftsup save` writes a checkpoint now",
            f"asked at step {asked} -> checkpoint-{extra[0] if extra else 'none'}",
            bool(extra) and extra[0] > asked and extra[0] < recipe.save_steps,
        )
    )
    stopped = seen.stopped
    last_exit = stopped.get("last_exit") or {}
    stop_step = last_exit.get("last_step")
    newest = seen.checkpoints_after_stop[-1] if seen.checkpoints_after_stop else None
    facts.append(
        Fact(
            run,
            "`ftsup stop` saves the step reached, ends stopped",
            f"asked at {seen.stop_requested_at}; {stopped.get('state')}, exit "
            f"{last_exit.get('returncode')}, stopped at step {stop_step}, "
            f"newest checkpoint-{newest}"
            + (" (+ final adapter written!)" if seen.final_model_after_stop else ""),
            stopped.get("state") == "stopped"
            and last_exit.get("returncode") == 75
            and stop_step == newest
            and stop_step is not None
            and stop_step % recipe.save_steps != 0
            and not seen.final_model_after_stop,
        )
    )
    given, hf = _resume(seen, -1)
    facts.append(
        Fact(
            run,
            "restart resumes at the stop step",
            f"ftsup passed checkpoint-{given}; transformers: resumed at global step {hf}",
            given == stop_step and hf == stop_step,
        )
    )
    facts.append(_finished(seen, recipe))
    facts.append(_same(seen))
    return [Fact(run, f.what, f.value, f.ok) for f in facts]


def judge_uninstrumented(seen: Seen, recipe: Recipe, run: str) -> list[Fact]:
    facts: list[Fact] = []
    shown = sorted({int(e["step"]) for e in seen.live if e["step"]})
    with_loss = sorted({int(e["step"]) for e in seen.live if e["step"] and e["loss"] is not None})
    facts.append(
        Fact(
            run,
            "steps shown by ftsup status (log readers)",
            f"steps {shown}; with loss {with_loss}; "
            f"progress.jsonl: {len(seen.progress_steps)} step lines",
            None,
        )
    )
    given, hf = _resume(seen, 0)
    killed = seen.killed_at or seen.kill_requested_at or 0
    expected = max((c for c in range(0, killed + 1, recipe.save_steps) if c), default=None)
    facts.append(
        Fact(
            run,
            "SIGKILL -> daemon resumes from newest checkpoint",
            f"killed after step {killed}; resumed from checkpoint-{given}, transformers: step {hf}"
            f" ({killed - (hf or 0)} steps redone)",
            given == expected and hf == expected,
        )
    )
    refused = seen.save_refused
    facts.append(
        Fact(
            run,
            "`ftsup save` refused, the run goes on",
            f"exit {refused.get('returncode')}: {str(refused.get('message'))[:90]}",
            refused.get("returncode") not in (None, 0)
            and (seen.stop_requested_at or 0) > (seen.kill_requested_at or 0),
        )
    )
    stopped = seen.stopped
    last_exit = stopped.get("last_exit") or {}
    newest = seen.checkpoints_after_stop[-1] if seen.checkpoints_after_stop else None
    reached = max(seen.stop_requested_at or 0, int(last_exit.get("last_step") or 0))
    facts.append(
        Fact(
            run,
            "`ftsup stop` without the bootstrap",
            f"asked at step {seen.stop_requested_at}, reached {reached}; {stopped.get('state')}, "
            f"exit {last_exit.get('returncode')} signal {last_exit.get('signal')}; newest "
            f"checkpoint-{newest} ({reached - (newest or 0)} steps lost)",
            None,
        )
    )
    given, hf = _resume(seen, -1)
    facts.append(
        Fact(
            run,
            "restart resumes from the newest checkpoint",
            f"checkpoint-{given}; transformers: step {hf}",
            given == newest and hf == newest,
        )
    )
    facts.append(_finished(seen, recipe))
    facts.append(_same(seen))
    return [Fact(run, f.what, f.value, f.ok) for f in facts]
