"""Progress of a long stage: a tqdm bar with rate and ETA on a terminal, and a log line every
``every`` seconds otherwise (job logs, SLURM ``.out`` files), so nobody waits blind."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("camsweep")


class Progress:
    """``with Progress(total, "evaluate run") as p: p.update(n)``."""

    def __init__(self, total: int, desc: str, unit: str = "img", every: float = 30.0,
                 stream: Any = None) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(stream, "isatty", lambda: False)())
        self.bar = (tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
                    if self.interactive else None)
        self.n = 0
        self.failed = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1, failed: int | None = None) -> None:
        """``n`` more done; ``failed``: how many failed so far (shown when not 0)."""
        self.n += n
        if failed is not None:
            self.failed = failed
        if self.bar is not None:
            if self.failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``evaluate run: 120/500 img (24%), 3.1 img/s, ETA 2m03s``."""
        elapsed = (now if now is not None else time.monotonic()) - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = (f", ETA {_duration((self.total - self.n) / rate)}"
               if rate > 0 and self.total >= self.n else "")
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}{share}{failed}, "
                f"{rate:.3g} {self.unit}/s{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.n and time.monotonic() - self.start >= self.every:
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
