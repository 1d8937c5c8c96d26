"""How a trial ended, in words: shared by trials.csv (tune/export.py) and the progress display
(tune/progress.py). No Ray, no torch: the CLI imports it."""

from __future__ import annotations

TRIAL_STATUSES = ("completed", "stopped_by_asha", "errored")


def trial_status(metrics: dict, search_epochs: int, errored: bool) -> str:
    """How a trial that ended ended (one of TRIAL_STATUSES), from its last report: `completed`
    when it ran all search epochs or its own early stopping ended it, else `stopped_by_asha`.
    trials.csv and the progress display (tune/progress.py) both use it."""
    if errored:
        return "errored"
    if int(metrics.get("epoch", 0) or 0) >= search_epochs or metrics.get("stopped_early"):
        return "completed"
    return "stopped_by_asha"


def error_line(error: BaseException) -> str:
    """One line that says what went wrong: the exception at the bottom of a Ray traceback
    (`FileNotFoundError: ...`), not Ray's `ray::ImplicitFunc.train()` header line."""
    import re

    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit|Interrupt|Died)\b.*:", ln)]
    return (named[-1] if named else lines[0] if lines else type(error).__name__)[:300]
