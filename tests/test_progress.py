"""Progress of a long stage: a bar on a terminal, log lines with rate and ETA in job logs."""

from __future__ import annotations

import io
import logging
import re

from pipeline.progress import Progress, _duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_job_logs_get_lines_with_rate_eta_and_failures(caplog):
    with caplog.at_level(logging.INFO, logger="camsweep"), \
            Progress(10, "gradcam run", every=0, stream=io.StringIO()) as p:
        assert p.bar is None  # not a terminal: lines, no bar
        p.update(4)
        p.update(1, failed=1)
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"gradcam run: 4/10 img \(40%\), \S+ img/s, ETA \S+", lines[0])
    assert re.fullmatch(r"gradcam run: 5/10 img \(50%\), 1 failed, \S+ img/s, ETA \S+",
                        lines[1])


def test_a_terminal_gets_a_bar_and_no_log_lines(caplog):
    out = Terminal()
    with caplog.at_level(logging.INFO, logger="camsweep"), \
            Progress(3, "evaluate run", every=0, stream=out) as p:
        p.update(2, failed=1)
    assert caplog.records == []
    assert "evaluate run" in out.getvalue() and "failed=1" in out.getvalue()


def test_durations_read_as_a_person_says_them():
    assert [_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]
