"""Ctrl+C and SIGTERM, counted for the main thread of either script: the first asks for a
stop, the second for a faster one, a third exits at once."""

import os
import signal
import time


SIGNAL_WAKE_S = 0.05  # seconds: how soon a waiting main thread sees a signal's flag


class SignalFlag:
    """What a signal handler sets: a plain attribute, never a lock. A handler runs in the
    main thread between two bytecodes, so a threading.Event it set could be one whose
    lock the main thread held at that moment (inside its own wait()): the handler then
    waited for itself, and the receiver never heard Ctrl+C (issue 19, case 11)."""

    def __init__(self):
        self.flag = False

    def is_set(self):
        """True once the signal came."""
        return self.flag

    def wait(self, timeout):
        """Wait up to `timeout` s for the signal (seen within SIGNAL_WAKE_S); is_set()."""
        deadline = time.monotonic() + timeout
        while not self.flag:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, SIGNAL_WAKE_S))
        return self.flag


class StopSignals:
    """Counts Ctrl+C / SIGTERM: the first sets `first`, the second `second`, a third exits
    at once, after `last_words()` (if set) has said what that drops and cleaned up.

    With exit_on_second the second signal exits at once, even while the main
    thread is blocked in a flush. The handler takes no lock: see SignalFlag.
    """

    def __init__(self, exit_on_second=False):
        self.first = SignalFlag()
        self.second = SignalFlag()
        self.exit_on_second = exit_on_second
        self.count = 0
        self.last_words = None  # () -> text: the exit at once's line (set by the script)

    def install(self):
        """Handle SIGINT, and SIGTERM and Windows' SIGBREAK (Ctrl+Break) where they exist."""
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)

    def ignore(self):
        """Ignore them from now on: the process is exiting with its status decided (a
        signal during the interpreter's shutdown would kill it by the signal)."""
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self.first.flag = True
        elif self.count == 2 and not self.exit_on_second:
            self.second.flag = True
        else:
            words = ""
            if self.last_words is not None:
                try:
                    words = self.last_words()
                except Exception as exc:  # noqa: BLE001 (exiting at once whatever it was)
                    words = f"(could not count what is dropped: {exc!r})"
            # os.write: no buffer lock, which the interrupted main thread may hold.
            os.write(2, f"interrupted again: exiting at once{words}\n".encode())
            os._exit(130)


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGBREAK")  # where the platform has them
