"""Post-resume check: did the loss jump after a resume?

A resume that restored the wrong optimizer state, data position or weights
usually shows up as a loss far from where the run left off. Pure: the daemon
feeds the losses logged before the interruption and the first ones after.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_THRESHOLD = 0.2
DEFAULT_WINDOW = 5


def loss_jump(
    before: Sequence[float],
    after: Sequence[float],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    window: int = DEFAULT_WINDOW,
) -> str | None:
    """A warning when the mean of the first `window` losses after the resume
    differs from the mean of the last `window` before it by more than
    `threshold` (relative); None when fine or when there is too little data."""
    last = [x for x in before[-window:] if x == x]  # NaN != NaN: skip them
    first = [x for x in after[:window] if x == x]
    if not last or not first:
        return None
    old = sum(last) / len(last)
    new = sum(first) / len(first)
    if old == 0:
        return None
    change = (new - old) / abs(old)
    if abs(change) <= threshold:
        return None
    return (
        f"loss after the resume {new:.4g} vs {old:.4g} before it ({change:+.0%}, "
        f"threshold {threshold:.0%}): check the checkpoint and the job's configuration"
    )
