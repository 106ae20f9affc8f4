"""What to do about an XID: restart the run, stop it (GPU unhealthy), or only warn.

Defaults follow the "Resolution Bucket (Immediate Action)" column of NVIDIA's
Xid catalog (https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html):
RESTART_APP -> "restart" (the application died, the GPU is fine); RESET_GPU,
RESTART_BM and CONTACT_SUPPORT -> "stop" (no run is placed on the GPU until it is
reset); informational XIDs -> "warn". A job overrides any entry with
`[gpu] xid_actions = { 94 = "stop" }`. docs/health.md lists the table with its sources.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

XidAction = Literal["restart", "stop", "warn"]
ACTIONS: tuple[XidAction, ...] = ("restart", "stop", "warn")


@dataclass(frozen=True)
class XidInfo:
    action: XidAction
    description: str


def _table() -> Mapping[int, XidInfo]:
    restart: XidAction = "restart"
    stop: XidAction = "stop"
    warn: XidAction = "warn"
    entries = {
        8: (restart, "GPU stopped processing (channel idle timeout)"),
        13: (restart, "Graphics Engine Exception"),
        31: (restart, "GPU memory page fault"),
        32: (restart, "Invalid or corrupted push buffer stream"),
        43: (restart, "GPU stopped processing"),
        45: (restart, "Preemptive cleanup, due to previous errors"),
        48: (stop, "Double Bit ECC Error"),
        61: (stop, "Internal micro-controller breakpoint/warning"),
        62: (stop, "Internal micro-controller halt"),
        63: (warn, "ECC page retirement or row remapping recording event"),
        64: (stop, "ECC page retirement or row remapper recording failure"),
        69: (restart, "Graphics Engine class error"),
        74: (stop, "NVLINK Error"),
        79: (stop, "GPU has fallen off the bus"),
        92: (warn, "High single-bit ECC error rate"),
        94: (restart, "Contained ECC error"),
        95: (stop, "Uncontained ECC error"),
        109: (restart, "Context Switch Timeout Error"),
        119: (stop, "GSP RPC Timeout"),
        120: (stop, "GSP Error"),
        121: (warn, "C2C Link corrected error"),
        140: (stop, "Unrecovered ECC Error"),
        154: (stop, "GPU Recovery Action Changed (reset or reboot required)"),
    }
    return MappingProxyType({xid: XidInfo(a, d) for xid, (a, d) in entries.items()})


DEFAULT_XIDS: Mapping[int, XidInfo] = _table()
UNKNOWN_XID_ACTION: XidAction = "warn"


def parse_action(value: object) -> XidAction:
    """Validate an action from a job file."""
    for action in ACTIONS:
        if value == action:
            return action
    raise ValueError(f"XID action must be one of {', '.join(ACTIONS)}, got {value!r}")


@dataclass(frozen=True)
class XidPolicy:
    """The defaults plus a job's overrides (`[gpu] xid_actions`)."""

    overrides: Mapping[int, XidAction] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_mapping(cls, raw: Mapping[int, str] | Mapping[str, str]) -> XidPolicy:
        """From `[gpu] xid_actions` (TOML keys are strings); raises ValueError on bad input."""
        parsed: dict[int, XidAction] = {}
        for key, value in raw.items():
            try:
                xid = int(key)
            except ValueError:
                raise ValueError(f"XID must be a number, got {key!r}") from None
            parsed[xid] = parse_action(value)
        return cls(MappingProxyType(parsed))

    def action(self, xid: int) -> XidAction:
        if xid in self.overrides:
            return self.overrides[xid]
        info = DEFAULT_XIDS.get(xid)
        return info.action if info else UNKNOWN_XID_ACTION


def describe(xid: int) -> str:
    """'XID 79: GPU has fallen off the bus', or just 'XID 200' when not in the table."""
    info = DEFAULT_XIDS.get(xid)
    return f"XID {xid}: {info.description}" if info else f"XID {xid}"
