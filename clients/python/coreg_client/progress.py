"""Progress of a training job or a generation, as plain data, and a text progress bar.

`Client.train_from_folder`, `Client.wait` and `Client.generate` take a `progress`
argument: a callable receiving `Progress` values, `True` for `TextProgressBar` on
stderr, or `None`/`False` for nothing.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Mapping, Optional, TextIO, Union


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a long operation stands.

    `phase` is one of "queued", "embedding" (training stage 1), "unet" (stage 2),
    "writing" (the concept is being stored), "optimizing" (test-time optimization
    before generating) and "denoising". `step` of `total` steps of the phase are done;
    `step_seconds` and `eta_seconds` are the service's pace and estimate (None when it
    sent none); `losses` holds a training step's losses by term.
    """

    phase: str
    step: int
    total: int
    step_seconds: Optional[float] = None
    eta_seconds: Optional[float] = None
    losses: Mapping[str, float] = dataclasses.field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]
ProgressArg = Union[None, bool, ProgressCallback]

PHASE_LABELS = {
    "queued": "queued",
    "embedding": "stage 1 (embedding)",
    "unet": "stage 2 (U-Net)",
    "writing": "writing concept",
    "optimizing": "test-time optimization",
    "denoising": "denoising",
}


def format_duration(seconds: float) -> str:
    """`seconds` as `42s`, `3m05s` or `1h02m`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_bar(progress: Progress, width: int = 24) -> str:
    """One line for `progress`, e.g.
    `stage 1 (embedding) [######------------------]   6/24  0.50 s/step  eta 9s`."""
    label = PHASE_LABELS.get(progress.phase, progress.phase)
    total = max(progress.total, 0)
    step = min(max(progress.step, 0), total) if total else max(progress.step, 0)
    if total:
        filled = (step * width) // total
        bar = "#" * filled + "-" * (width - filled)
        digits = len(str(total))
        line = f"{label} [{bar}] {step:>{digits}}/{total}"
    else:
        line = label
    if progress.step_seconds:
        line += f"  {progress.step_seconds:.2f} s/step"
    if progress.eta_seconds is not None and total and step < total:
        line += f"  eta {format_duration(progress.eta_seconds)}"
    if progress.losses:
        loss = progress.losses.get("total")
        if loss is not None:
            line += f"  loss {loss:.4f}"
    return line


class TextProgressBar:
    """Draws `Progress` as a bar on a text stream (stderr by default).

    On a terminal the bar is redrawn in place; elsewhere (a log file, a pipe) a line
    is written when the phase changes, at each tenth of the phase and at its end, so
    logs stay short.
    """

    def __init__(self, stream: Optional[TextIO] = None, width: int = 24):
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
        self._phase: Optional[str] = None
        self._tenth = -1
        self._line_open = False
        self._last_draw = 0.0

    def __call__(self, progress: Progress) -> None:
        line = format_bar(progress, self.width)
        new_phase = progress.phase != self._phase
        done = progress.total > 0 and progress.step >= progress.total
        if self.interactive:
            now = time.monotonic()
            # Redraws at most 20 times a second, except for a phase's first and last.
            if not (new_phase or done or now - self._last_draw >= 0.05):
                return
            self._last_draw = now
            if new_phase and self._line_open:
                self.stream.write("\n")
            self.stream.write("\r" + line + "\x1b[K")
            self._line_open = True
            if done:
                self.stream.write("\n")
                self._line_open = False
        else:
            tenth = (10 * progress.step) // progress.total if progress.total > 0 else 0
            if not (new_phase or tenth > self._tenth or done):
                return
            self._tenth = tenth
            self.stream.write(line + "\n")
        if new_phase:
            self._phase = progress.phase
            if not self.interactive:
                self._tenth = (
                    (10 * progress.step) // progress.total if progress.total > 0 else 0
                )
        self.stream.flush()

    def close(self) -> None:
        """Ends a bar left open on a terminal."""
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False


def resolve_progress(progress: ProgressArg) -> Optional[ProgressCallback]:
    """The callback a `progress` argument stands for."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return TextProgressBar()
    if callable(progress):
        return progress
    raise TypeError(f"progress must be a callable, True, False or None, not {progress!r}")
