"""SIGTERM (a cluster's time limit, `timeout`) and SIGINT (Ctrl-C) stop a run cleanly.

While a Trainer runs, both go through Lightning's SIGTERM handling: the batch in progress
finishes, `StreamCheckpoint` saves where a streaming run stops (an epoch-based one resumes from
its last epoch's end), and Lightning raises `SIGTERMException` at the batch's end. Outside a
Trainer (building the run, between fit and test) the signal raises `Interrupted` at once. A
second Ctrl-C raises KeyboardInterrupt wherever the run is.
"""

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A signal stopped the run outside a Trainer (a BaseException, like KeyboardInterrupt, so
    that no `except Exception` takes it for an error)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class Interruption:
    """`with Interruption() as stop:` ... `stop.signum` is the first signal received, or None;
    `stop.exit_code` is the shell's code for it (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self):
        self.signum = None
        self._before = {}

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __enter__(self):
        self._before = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._before.items():
            signal.signal(s, handler)
        return False

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = self.signum or signum
        current = signal.getsignal(signal.SIGTERM)
        if current == self._handle:  # no Trainer is running (it would have put its own handler first)
            raise Interrupted(signum)
        if signum == signal.SIGINT:
            current(signal.SIGTERM, frame)  # Lightning's handler; it calls this one back, which returns
