"""The job spec parser and `ftsup check`: good files parse to the right values,
bad files are refused with the file, the line, the key and a hint."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftsup.supervisor import spec_types
from ftsup.supervisor.durations import format_duration
from ftsup.supervisor.spec import SpecError, SpecIssue, load_spec, parse_spec, spec_to_json
from ftsup.supervisor.spec_types import CheckpointSection, HealthSection, RestartSection

REPO = Path(__file__).resolve().parent.parent

JOB = """\
[job]
name = "demo"
output_dir = "runs/demo"
"""

COMMAND = """\
[command]
argv = ["python", "train.py"]
resume_args = ["--resume_from_checkpoint", "{checkpoint}"]
"""

TRAIN = """\
[train]
model = "Qwen/Qwen2.5-0.5B"
dataset = "data/sft.jsonl"
max_steps = 100
"""


def write(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def refused(text: str, folder: Path) -> SpecError:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, folder / "job.toml")
    return caught.value


# ------------------------------------------------------------- good specs


def test_command_job_values(tmp_path: Path) -> None:
    text = (
        JOB
        + """
[command]
argv = ["llamafactory-cli", "train", "qwen.yaml"]
cwd = "work"
env = { HF_HOME = "/data/hf", WANDB_MODE = "offline" }
resume_args = ["resume_from_checkpoint={checkpoint}"]

[restart]
max_restarts = 5
backoff = "90s"
backoff_max = "2h"
crash_loop = 2
stop_grace = 30
"""
    )
    spec = parse_spec(text, tmp_path / "job.toml")
    assert spec.name == "demo"
    assert spec.output_dir == tmp_path / "runs" / "demo"
    assert spec.source == tmp_path / "job.toml"
    assert spec.text == text
    assert spec.train is None
    assert spec.command is not None
    assert spec.command.argv == ("llamafactory-cli", "train", "qwen.yaml")
    assert spec.command.cwd == tmp_path / "work"
    assert dict(spec.command.env) == {"HF_HOME": "/data/hf", "WANDB_MODE": "offline"}
    assert spec.command.resume_args == ("resume_from_checkpoint={checkpoint}",)
    assert spec.restart == RestartSection(
        max_restarts=5, backoff=90.0, backoff_max=7200.0, crash_loop=2, stop_grace=30.0
    )


def test_defaults(tmp_path: Path) -> None:
    spec = parse_spec(JOB + COMMAND, tmp_path / "job.toml")
    assert spec.command is not None
    assert spec.command.cwd == tmp_path  # the job file's folder
    assert dict(spec.command.env) == {}
    assert spec.restart == RestartSection()
    assert spec.health == HealthSection()
    assert spec.checkpoint == CheckpointSection()
    assert spec.gpu.devices is None
    assert not spec.launch.distributed
    assert spec.notify.on == ("failed", "gave_up", "finished", "gpu_fault", "degraded")


def test_train_job_values(tmp_path: Path) -> None:
    (tmp_path / "local-model").mkdir()
    text = (
        JOB
        + """
[train]
model = "local-model"
tokenizer = "~/tokenizers/qwen"
dataset = ["data/a.jsonl", "../shared/b.jsonl", "/abs/c.jsonl"]
format = "chat"
finetuning_type = "qlora"
lora_rank = 16
learning_rate = 1          # an integer where a float is expected
num_train_epochs = 3
save_every = "10m"
save_total_limit = 2
report_to = "tensorboard"
lora_target = ["q_proj", "v_proj"]
bf16 = true

[health]
hang_timeout = "90s"
startup_timeout = "1h"

[checkpoint]
async_save = false
min_free = "20G"
keep_last = 1

[gpu]
devices = [0, 3]
xid_actions = { 79 = "stop", 31 = "ignore" }

[launch]
nproc_per_node = 2

[notify]
webhook = "https://hooks.example.com/x"
on = "hung"
"""
    )
    spec = parse_spec(text, tmp_path / "job.toml")
    train = spec.train
    assert train is not None
    assert train.model == str(tmp_path / "local-model")  # exists next to the job file
    assert train.tokenizer == os.path.expanduser("~/tokenizers/qwen")
    assert train.dataset == (
        str(tmp_path / "data" / "a.jsonl"),
        str(tmp_path.parent / "shared" / "b.jsonl"),
        "/abs/c.jsonl",
    )
    assert train.learning_rate == 1.0 and isinstance(train.learning_rate, float)
    assert train.num_train_epochs == 3.0
    assert train.save_every == 600.0
    assert train.report_to == ("tensorboard",)
    assert train.lora_target == ("q_proj", "v_proj")
    assert (train.format, train.finetuning_type, train.lora_rank) == ("chat", "qlora", 16)
    assert spec.health.hang_timeout == 90.0 and spec.health.startup_timeout == 3600.0
    assert spec.checkpoint.async_save is False
    assert spec.checkpoint.min_free == 20 * 1024**3
    assert spec.gpu.devices == (0, 3)
    assert dict(spec.gpu.xid_actions) == {79: "stop", 31: "ignore"}
    assert spec.launch.distributed
    assert spec.notify.on == ("hung",)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),  # a hub id stays a string
        ("./models/qwen", "{base}/models/qwen"),
        ("../models/qwen", "{parent}/models/qwen"),
        ("/models/qwen", "/models/qwen"),
        ("~/models/qwen", "{home}/models/qwen"),
    ],
)
def test_model_path_rules(tmp_path: Path, model: str, expected: str) -> None:
    text = JOB + TRAIN.replace("Qwen/Qwen2.5-0.5B", model)
    spec = parse_spec(text, tmp_path / "job.toml")
    assert spec.train is not None
    home = os.path.expanduser("~")
    assert spec.train.model == expected.format(base=tmp_path, parent=tmp_path.parent, home=home)


def test_auto_values_and_durations_in_seconds(tmp_path: Path) -> None:
    text = (
        JOB
        + COMMAND
        + """
[restart]
backoff = 5
backoff_max = 5.5
[health]
hang_timeout = "auto"
[checkpoint]
min_free = "auto"
"""
    )
    spec = parse_spec(text, tmp_path / "job.toml")
    assert (spec.restart.backoff, spec.restart.backoff_max) == (5.0, 5.5)
    assert spec.health.hang_timeout is None
    assert spec.checkpoint.min_free is None


def test_output_dir_relative_to_job_file_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    write(folder, JOB + COMMAND)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(Path("jobs/job.toml"))
    assert spec.source == folder / "job.toml"
    assert spec.output_dir == folder / "runs" / "demo"
    assert spec.output_dir.is_absolute()


def test_spec_is_frozen_and_json_safe(tmp_path: Path) -> None:
    text = JOB + COMMAND + '[gpu]\nxid_actions = { 79 = "stop" }\n'
    spec = parse_spec(text, tmp_path / "job.toml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.job.name = "other"  # type: ignore[misc]
    assert spec.command is not None
    with pytest.raises(TypeError):
        spec.command.env["X"] = "1"  # type: ignore[index]
    data = json.loads(json.dumps(spec_to_json(spec)))
    assert data["job"] == {
        "name": "demo",
        "output_dir": str(tmp_path / "runs" / "demo"),
        "priority": 0,
        "after": [],
        "preemptible": False,
    }
    assert data["command"]["argv"] == ["python", "train.py"]
    assert data["train"] is None
    assert data["gpu"]["xid_actions"] == {"79": "stop"}
    assert data["restart"]["backoff"] == 10.0


def test_examples_validate() -> None:
    for name in ("command-job.toml", "lora-job.toml"):
        spec = load_spec(REPO / "examples" / name)
        assert spec.output_dir.is_absolute()
    assert load_spec(REPO / "examples" / "command-job.toml").command is not None
    assert load_spec(REPO / "examples" / "lora-job.toml").train is not None
    multinode = load_spec(REPO / "examples" / "multinode" / "job.toml").launch
    assert (multinode.nnodes, multinode.min_nodes, multinode.rdzv_last_call) == (2, 1, 60.0)
    assert multinode.elastic_nodes and multinode.world_size == 16


# --------------------------------------------------------------- bad specs

# (id, job file text, a fragment of the line the issue must point at (None: no
# line), the key as rendered, a fragment of the hint)
BAD = [
    ("typo", JOB + COMMAND + '[restart]\nbackof = "10s"\n', "backof", "[restart] backof",
     'did you mean "backoff"?'),
    ("wrong-table", JOB + COMMAND + "[restart]\nsave_steps = 100\n", "save_steps",
     "[restart] save_steps", "belongs in [train]"),
    ("unknown-table", JOB + COMMAND + "[restrat]\nbackoff = 1\n", "[restrat]", "[restrat]",
     "did you mean [restart]?"),
    ("quoted-int", JOB + COMMAND + '[restart]\nmax_restarts = "10"\n', "max_restarts",
     "[restart] max_restarts", "without quotes: 10"),
    ("bool-as-number", JOB + COMMAND + "[restart]\ncrash_loop = true\n", "crash_loop",
     "[restart] crash_loop", "booleans are not numbers"),
    ("float-as-int", JOB + TRAIN.replace("100", "100.0"), "max_steps", "[train] max_steps",
     "write a whole number: 100"),
    ("missing-job", COMMAND, None, "[job]", "add a [job] table"),
    ("missing-output-dir", '[job]\nname = "demo"\n' + COMMAND, "[job]", "[job] output_dir",
     'add: output_dir = "'),
    ("bad-name", JOB.replace('"demo"', '"my job/1"') + COMMAND, "name =", "[job] name",
     "becomes a folder name"),
    ("output-dir-home", JOB.replace('"runs/demo"', '"~"') + COMMAND, "output_dir",
     "[job] output_dir", "a folder of its own"),
    ("output-dir-root", JOB.replace('"runs/demo"', '"/tmp/.."') + COMMAND, "output_dir",
     "[job] output_dir", "a folder of its own"),
    ("unknown-user", JOB.replace('"runs/demo"', '"~nosuchuser-ftsup/x"') + COMMAND,
     "output_dir", "[job] output_dir", "write the full path"),
    ("key-above-tables", 'output_dir = "x"\n' + JOB.replace('output_dir = "runs/demo"\n', "")
     + COMMAND, 'output_dir = "x"', "[job] output_dir", "move it below the [job] header"),
    ("empty-argv", JOB + COMMAND.replace('["python", "train.py"]', "[]"), "argv",
     "[command] argv", "name the program"),
    ("argv-not-strings", JOB + COMMAND.replace('"train.py"', "3"), "argv", "[command] argv",
     'quote it: "3"'),
    ("argv-one-string", JOB + COMMAND.replace('["python", "train.py"]', '"python train.py"'),
     "argv", "[command] argv", '["python", "train.py"]'),
    ("both-kinds", JOB + COMMAND + TRAIN, "[train]", "[train]", "keep [command]"),
    ("neither-kind", JOB, None, "[command]", 'argv = ["python", "train.py"]'),
    ("save-total-limit-1", JOB + TRAIN + "save_total_limit = 1\n", "save_total_limit",
     "[train] save_total_limit", "keep at least 2"),
    ("lora-rank-0", JOB + TRAIN + "lora_rank = 0\n", "lora_rank", "[train] lora_rank",
     "typical ranks"),
    ("cutoff-len-1", JOB + TRAIN + "cutoff_len = 1\n", "cutoff_len", "[train] cutoff_len",
     "the next token"),
    ("val-size-not-whole", JOB + TRAIN + "val_size = 2.5\n", "val_size", "[train] val_size",
     "a fraction below 1"),
    ("val-size-negative", JOB + TRAIN + "val_size = -0.1\n", "val_size", "[train] val_size",
     None),
    ("lora-target-empty", JOB + TRAIN + "lora_target = []\n", "lora_target",
     "[train] lora_target", '["all"]'),
    ("scheduler-needs-kwargs", JOB + TRAIN + 'lr_scheduler_type = "cosine_with_min_lr"\n',
     "lr_scheduler_type", "[train] lr_scheduler_type", None),
    ("plateau-without-split", JOB + TRAIN + 'lr_scheduler_type = "reduce_lr_on_plateau"\n',
     "lr_scheduler_type", "[train] lr_scheduler_type", "set val_size"),
    ("backoff-max-below-backoff", JOB + COMMAND + '[restart]\nbackoff = "5m"\nbackoff_max = "1m"\n',
     "backoff_max", "[restart] backoff_max", "backoff is the first delay"),
    ("bad-duration", JOB + COMMAND + '[restart]\nstop_grace = "2 minutes"\n', "stop_grace",
     "[restart] stop_grace", 'units are ms, s, m, h and d'),
    ("negative-duration", JOB + COMMAND + "[restart]\nbackoff = -1\n", "backoff =",
     "[restart] backoff", None),
    ("huge-duration-number", JOB + COMMAND + "[restart]\nbackoff = 1e300\n", "backoff =",
     "[restart] backoff", 'such as "10m", "2h" or "7d"'),
    ("huge-duration-text", JOB + COMMAND + '[restart]\nstop_grace = "99999999999d"\n',
     "stop_grace", "[restart] stop_grace", 'such as "10m", "2h" or "7d"'),
    ("huge-hang-floor", JOB + COMMAND + '[health]\nhang_floor = "31d"\n', "hang_floor",
     "[health] hang_floor", '"7d"'),
    ("huge-crash-loop", JOB + COMMAND + "[restart]\ncrash_loop = 4611686018427387904\n",
     "crash_loop", "[restart] crash_loop", None),
    ("huge-max-restarts", JOB + COMMAND + "[restart]\nmax_restarts = 1000000000000\n",
     "max_restarts", "[restart] max_restarts", None),
    ("seed-beyond-32-bit", JOB + TRAIN + "seed = 4294967296\n", "seed", "[train] seed",
     "32-bit"),
    ("huge-save-steps", JOB + TRAIN + "save_steps = 9223372036854775807\n", "save_steps",
     "[train] save_steps", None),
    ("toml-syntax", JOB.replace('"demo"', "demo") + COMMAND, "name = demo", "",
     "strings need quotes"),
    ("resume-without-checkpoint", JOB + COMMAND.replace('"{checkpoint}"', '"last"'),
     "resume_args", "[command] resume_args", "leave resume_args out"),
    ("unknown-placeholder", JOB + COMMAND.replace("{checkpoint}", "{ckpt}"), "resume_args",
     "[command] resume_args", "the only placeholder is {checkpoint}"),
    ("bf16-and-fp16", JOB + TRAIN + "bf16 = true\nfp16 = true\n", "fp16", "[train] fp16",
     "keep bf16"),
    ("nothing-to-train", JOB + TRAIN.replace("max_steps = 100", "num_train_epochs = 0"),
     "num_train_epochs", "[train] num_train_epochs", "set max_steps"),
    ("finetuning-type-typo", JOB + TRAIN + 'finetuning_type = "lorra"\n', "finetuning_type",
     "[train] finetuning_type", 'did you mean "lora"?'),
    ("nan-learning-rate", JOB + TRAIN + "learning_rate = nan\n", "learning_rate",
     "[train] learning_rate", None),
    ("env-not-string", JOB + COMMAND + "[command.env]\nHF_HOME = '/x'\nN = 1\n", "N = 1",
     "[command] env.N", 'quote it: "1"'),
    ("webhook-not-http", JOB + COMMAND + '[notify]\nwebhook = "ftp://x/y"\n', "webhook",
     "[notify] webhook", "https://"),
    ("unknown-event", JOB + COMMAND + '[notify]\non = ["fail"]\n', "on =", "[notify] on",
     'did you mean "failed"?'),
    ("xid-action-typo", JOB + COMMAND + '[gpu.xid_actions]\n79 = "stp"\n', "79 =",
     "[gpu] xid_actions.79", 'did you mean "stop"?'),
    ("negative-device", JOB + COMMAND + "[gpu]\ndevices = [0, -1]\n", "devices",
     "[gpu] devices", None),
    ("min-free-bad-size", JOB + COMMAND + '[checkpoint]\nmin_free = "lots"\n', "min_free",
     "[checkpoint] min_free", '"20G"'),
    ("async-save-typo", JOB + COMMAND + "[checkpoint]\nasyncsave = true\n",
     "asyncsave", "[checkpoint] asyncsave", 'did you mean "async_save"?'),
    ("keep-last-0", JOB + COMMAND + "[checkpoint]\nkeep_last = 0\n", "keep_last",
     "[checkpoint] keep_last", None),
    ("hang-timeout-word", JOB + COMMAND + '[health]\nhang_timeout = "soon"\n', "hang_timeout",
     "[health] hang_timeout", "units are"),
    ("multi-node-no-endpoint", JOB + COMMAND + "[launch]\nnnodes = 2\n", "[launch]",
     "[launch] rdzv_endpoint", "host:29500"),
    ("min-nodes-above-nnodes", JOB + COMMAND
     + '[launch]\nnnodes = 2\nmin_nodes = 3\nrdzv_endpoint = "h:1"\n', "min_nodes",
     "[launch] min_nodes", "fewest nodes"),
    ("min-nodes-static", JOB + COMMAND + '[launch]\nnnodes = 2\nmin_nodes = 1\n'
     'rdzv_endpoint = "h:1"\nrdzv_backend = "static"\n', "min_nodes", "[launch] min_nodes",
     'rdzv_backend = "c10d"'),
    ("min-nodes-batch", JOB + TRAIN + "per_device_train_batch_size = 2\n"
     '[launch]\nnnodes = 3\nmin_nodes = 2\nrdzv_endpoint = "h:1"\n', "min_nodes",
     "[launch] min_nodes", "so that it does"),
    ("table-as-value", "restart = 5\n" + JOB + COMMAND, "restart = 5", "[restart]",
     "write a [restart] header"),
    ("missing-model", JOB + TRAIN.replace('model = "Qwen/Qwen2.5-0.5B"\n', ""), "[train]",
     "[train] model", "add: model ="),
    ("output-dir-name-too-long",
     '[job]\nname = "j"\noutput_dir = "/data/' + "x" * 5000 + '"\n' + COMMAND,
     "output_dir", "[job] output_dir", "shorter folder"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "at", "key", "hint"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_spec(tmp_path: Path, text: str, at: str | None, key: str, hint: str | None) -> None:
    source = tmp_path / "job.toml"
    err = refused(text, tmp_path)
    message = str(err)
    assert len(err.issues) == 1, message
    issue = err.issues[0]
    if at is None:
        assert issue.line is None, message
        assert message.startswith(f"{source}: ")
    else:
        expected = next(n for n, line in enumerate(text.split("\n"), 1) if at in line)
        assert issue.line == expected, message
        assert message.startswith(f"{source}:{expected}: ")
    assert f": {key}: " in message if key else issue.key == ""
    if hint is not None:
        assert issue.hint is not None and hint in issue.hint, message
        assert message.endswith(f"; {issue.hint}")


def test_duration_bound_message_names_file_line_key_and_fix(tmp_path: Path) -> None:
    """`backoff = 1e300` used to be accepted (status then printed a 300-digit delay)."""
    err = refused(JOB + COMMAND + "[restart]\nbackoff = 1e300\nbackoff_max = 1e300\n", tmp_path)
    assert [issue.key for issue in err.issues] == ["restart.backoff", "restart.backoff_max"]
    first = str(err.issues[0])
    where = f"{tmp_path / 'job.toml'}:8: [restart] backoff"
    assert first.startswith(f"{where}: must be at most 30 days")
    assert "(2592000 seconds), got 1e+300" in first and first.endswith('or "7d"')


def test_longest_durations_and_largest_counts_are_accepted(tmp_path: Path) -> None:
    text = (
        JOB
        + COMMAND
        + '[restart]\nbackoff = "30d"\nbackoff_max = 2592000\nstop_grace = "720h"\n'
        + "crash_loop = 1000\nmax_restarts = 100000\n"
    )
    restart = parse_spec(text, tmp_path / "job.toml").restart
    assert (restart.backoff, restart.backoff_max, restart.stop_grace) == (2592000.0,) * 3
    assert (restart.crash_loop, restart.max_restarts) == (1000, 100000)


def test_format_duration_never_prints_a_huge_number() -> None:
    assert format_duration(1e300) == ">9999d"
    assert format_duration(float("inf")) == ">9999d"
    assert format_duration(30 * 86400) == "30d00h"


def test_bad_case_table_is_large_enough() -> None:
    assert len(BAD) >= 15
    assert len({case[0] for case in BAD}) == len(BAD)


def test_issue_rendering() -> None:
    issue = SpecIssue(
        Path("job.toml"), 12, "restart.backof", "unknown key", 'did you mean "backoff"?'
    )
    assert str(issue) == 'job.toml:12: [restart] backof: unknown key; did you mean "backoff"?'
    assert issue.render(hint=False) == "job.toml:12: [restart] backof: unknown key"
    assert str(SpecIssue(Path("job.toml"), None, "", "cannot read")) == "job.toml: cannot read"


def test_every_problem_is_reported_in_line_order(tmp_path: Path) -> None:
    text = """\
[job]
name = "bad name"
output_dir = "runs/x"

[command]
argv = []
resume_args = ["--resume"]

[restart]
backof = "10s"
crash_loop = 0

[gpu]
devises = [0]
"""
    err = refused(text, tmp_path)
    found = [(issue.line, issue.key) for issue in err.issues]
    assert found == [
        (2, "job.name"),
        (6, "command.argv"),
        (7, "command.resume_args"),
        (10, "restart.backof"),
        (11, "restart.crash_loop"),
        (14, "gpu.devises"),
    ]
    assert len(str(err).splitlines()) == 6
    assert 'did you mean "devices"?' in str(err)


def test_invalid_keys_do_not_hide_cross_checks(tmp_path: Path) -> None:
    text = JOB + TRAIN + "bf16 = true\nfp16 = true\nlorra_rank = 4\n"
    keys = {issue.key for issue in refused(text, tmp_path).issues}
    assert keys == {"train.fp16", "train.lorra_rank"}


def test_syntax_error_at_end_of_file(tmp_path: Path) -> None:
    err = refused(JOB + "[command]\nargv = [\n", tmp_path)
    assert err.issues[0].line is not None
    assert "invalid TOML" in str(err)


def test_load_spec_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the job file"):
        load_spec(tmp_path / "missing.toml")
    with pytest.raises(SpecError, match="cannot read the job file"):
        load_spec(tmp_path)


def test_spec_error_pickles(tmp_path: Path) -> None:
    err = refused(JOB, tmp_path)
    copy = pickle.loads(pickle.dumps(err))
    assert copy.issues == err.issues
    assert str(copy) == str(err)


# ------------------------------------------------------------- ftsup check


def ftsup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftsup.supervisor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, JOB + COMMAND)
    result = ftsup("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "command" in result.stdout
    assert "python train.py" in result.stdout


def test_check_valid_file_json(tmp_path: Path) -> None:
    path = write(tmp_path, JOB + TRAIN)
    result = ftsup("check", "--json", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["issues"] == []
    assert data["job"]["job"]["name"] == "demo"
    assert data["job"]["train"]["model"] == "Qwen/Qwen2.5-0.5B"


def test_check_invalid_file(tmp_path: Path) -> None:
    path = write(tmp_path, JOB + COMMAND + '[restart]\nbackof = "10s"\n')
    result = ftsup("check", str(path))
    assert result.returncode == 2
    assert f"{path}:8:" in result.stderr
    assert "[restart] backof" in result.stderr
    assert 'did you mean "backoff"?' in result.stderr
    assert result.stdout == ""


def test_check_invalid_file_json(tmp_path: Path) -> None:
    path = write(tmp_path, JOB + "[command]\nargv = []\n[restart]\nbackof = 1\n")
    result = ftsup("check", "--json", str(path))
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["job"] is None
    assert [issue["key"] for issue in data["issues"]] == ["command.argv", "restart.backof"]
    for issue in data["issues"]:
        assert set(issue) == {"file", "line", "key", "message", "hint"}
        assert issue["file"] == str(path)
    assert data["issues"][1] == {
        "file": str(path),
        "line": 7,
        "key": "restart.backof",
        "message": "unknown key",
        "hint": 'did you mean "backoff"?',
    }


# ---------------------------------------------------------------- fuzzing

_SECTIONS = {
    "job": spec_types.JobSection,
    "command": spec_types.CommandSection,
    "train": spec_types.TrainSection,
    "launch": spec_types.LaunchSection,
    "restart": spec_types.RestartSection,
    "health": spec_types.HealthSection,
    "checkpoint": spec_types.CheckpointSection,
    "gpu": spec_types.GpuSection,
    "notify": spec_types.NotifySection,
}
_KEYS = {table: [f.name for f in dataclasses.fields(cls)] for table, cls in _SECTIONS.items()}
_BASES: list[dict[str, dict[str, object]]] = [
    {
        "job": {"name": "demo", "output_dir": "runs/demo"},
        "command": {"argv": ["python", "train.py"]},
    },
    {
        "job": {"name": "demo", "output_dir": "runs/demo"},
        "train": {"model": "Qwen/Qwen2.5-0.5B", "dataset": "d.jsonl"},
    },
]

_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["10m", "auto", "20G", "{checkpoint}", "~", "/", "..", "lora", "stop"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    return str(value)


def _render(tables: dict[str, dict[str, object]]) -> str:
    return "\n".join(
        f"[{name}]\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in keys.items())
        for name, keys in tables.items()
    )


@st.composite
def _documents(draw: st.DrawFn) -> str:
    """A valid job with one table's keys (known ones, mostly) set to arbitrary values."""
    tables = {name: dict(keys) for name, keys in draw(st.sampled_from(_BASES)).items()}
    table = draw(st.sampled_from([*_KEYS, "restrat"]))
    keys = st.sampled_from([*_KEYS.get(table, []), "backof", "save_steps"])
    tables.setdefault(table, {}).update(draw(st.dictionaries(keys, _values, max_size=4)))
    return _render(tables)


_FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(text=st.text(max_size=200))
def test_arbitrary_text_only_raises_spec_error(tmp_path: Path, text: str) -> None:
    try:
        parse_spec(text, tmp_path / "job.toml")
    except SpecError as err:
        assert err.issues
        str(err)


@_FUZZ
@given(text=_documents())
def test_generated_job_files_only_raise_spec_error(tmp_path: Path, text: str) -> None:
    try:
        spec = parse_spec(text, tmp_path / "job.toml")
    except SpecError as err:
        assert err.issues
        json.dumps([issue.to_json() for issue in err.issues])
    else:
        json.dumps(spec_to_json(spec))


def test_unknown_key_outside_any_table(tmp_path: Path) -> None:
    err = refused("colour = 1\n" + JOB + COMMAND, tmp_path)
    assert [(issue.line, issue.key) for issue in err.issues] == [(1, "")]
    assert 'unknown key "colour" outside any table' in str(err)


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * 2000 + "]" * 2000,  # tomllib recurses
        "[job]\nname = " + "1" * 5000,  # beyond Python's int-from-text limit
        "# " + "x" * 70_000,  # larger than any real job file
    ],
    ids=["deep-nesting", "huge-integer", "too-large"],
)
def test_hostile_text_is_a_spec_error(tmp_path: Path, text: str) -> None:
    assert refused(text, tmp_path).issues


def test_huge_hex_integer_is_refused_not_printed(tmp_path: Path) -> None:
    err = refused(JOB + TRAIN + "lora_rank = 0x" + "f" * 5000 + "\n", tmp_path)
    assert "64-bit" in str(err)
