"""`ftsup demo` end to end, the path a new user takes (shortened to a few steps)."""

from __future__ import annotations

import json

from tests.supervisor_harness import Harness


def test_demo_runs_crashes_once_resumes_and_answers(harness: Harness) -> None:
    result = harness.cli("demo", "--steps", "90", "--json", timeout=600)
    summary = json.loads(result.stdout)
    assert summary["state"] == "finished", summary
    assert summary["steps"] == 90
    assert summary["attempts"] == 2 and summary["restarts"] == 1
    # Killed at step 30 or a little later; resumed from a checkpoint (every 11 steps).
    (resumed,) = summary["resumed_from"]
    step = int(resumed.rsplit("checkpoint-", 1)[1])
    assert step % 11 == 0 and 22 <= step < 90
    assert len(summary["answers"]) == 4 and all(a["answer"] for a in summary["answers"])
    events = harness.cli_json("events", "ftsup-demo")["events"]
    exits = [e for e in events if e["kind"] == "attempt_exited"]
    assert "SIGKILL" in exits[0]["message"] and "finished" in exits[1]["message"]

    # `ftsup export JOB`: the job's newest checkpoint, LoRA merged, loads without peft.
    out = harness.work / "exported"
    exported = json.loads(harness.cli("export", "ftsup-demo", "--out", str(out), "--json").stdout)
    assert exported["checkpoint"].endswith("checkpoint-90") and exported["merged"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not (out / "adapter_config.json").exists()
    harness.cli("shutdown")
