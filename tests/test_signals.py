"""Every signal SLURM or submitit may send to stop a job: loader workers ignore them all, and
in a submitit job SIGUSR1 and SIGUSR2 both reach submitit's requeue handler. (The real
thing, ``scancel --signal=USR1`` on a running job, is in test_slurm.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys

from conftest import ROOT

from pipeline.cluster.job import preempt_signals, route_preempt_signals


def test_the_preemption_signals_include_submitits_own(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert preempt_signals() == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "HUP")
    assert preempt_signals() == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "SIGUSR1")  # already there
    assert len(preempt_signals()) == 3


def test_loader_workers_ignore_every_preemption_signal():
    code = ("import signal; from pipeline.runtime import worker_init; worker_init(0); "
            "print([signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGTERM, "
            "signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                              "SUBMITIT_PREEMPT_SIGNAL": "HUP"}).stdout
    assert out.strip() == "[True, True, True, True, True]"


def test_usr1_reaches_submitits_requeue_handler():
    """As submitit sets it up in a job (its handler on SIGUSR2), plus the routing: a SIGUSR1
    sent to the process runs the same handler, SIGTERM stays submitit's."""
    calls: list[int] = []
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
        route_preempt_signals()
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR2)
        assert calls == [signal.SIGUSR1, signal.SIGUSR2]
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
