"""Out of descriptors, a live process must not read as gone (issue 12, defect 2).

`/proc/PID/stat` cannot be opened under EMFILE; before the fix that was taken
for "the process is gone", so a daemon out of descriptors would record a live
run as ended. The check runs in a child process whose descriptor table is
really full.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, os, resource, subprocess, sys
    from ftsup.supervisor import procinfo

    sleeper = subprocess.Popen(["sleep", "60"])
    start = procinfo.process_start_time(sleeper.pid)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    held = []
    while True:
        try:
            held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    try:
        open("/proc/self/stat", "rb")
        full = False
    except OSError:
        full = True
    result = {
        "table_full": full,
        "same": procinfo.is_same_process(sleeper.pid, start),
        "start": procinfo.process_start_time(sleeper.pid),
        "expected_start": start,
    }
    for fd in held:
        os.close(fd)
    sleeper.kill()
    sleeper.wait()
    result["after_exit"] = procinfo.is_same_process(sleeper.pid, start)
    print(json.dumps(result))
    """
)


def test_a_live_process_is_not_gone_when_descriptors_run_out() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["table_full"], "the test did not exhaust the descriptor table"
    # The spare descriptor lets the read go through; before the fix this was False.
    assert result["same"] is True
    assert result["start"] == result["expected_start"]
    # ...and a process that really exited is still recognised as gone.
    assert result["after_exit"] is False
