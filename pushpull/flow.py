"""Flow control between threads: stop signals."""

import os
import signal
import sys
import threading

class StopSignals:
    """Counts Ctrl+C / SIGTERM: the first sets `first`, the second `second`, a third exits.

    With exit_on_second the second signal exits at once, even while the main
    thread is blocked in a flush.
    """

    def __init__(self, exit_on_second=False):
        self.first = threading.Event()
        self.second = threading.Event()
        self.exit_on_second = exit_on_second
        self.count = 0

    def install(self):
        """Handle SIGINT, and SIGTERM and Windows' SIGBREAK (Ctrl+Break) where they exist."""
        signal.signal(signal.SIGINT, self._handle)
        for name in ("SIGTERM", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self.first.set()
        elif self.count == 2 and not self.exit_on_second:
            self.second.set()
        else:
            sys.stderr.write("interrupted again: exiting at once\n")
            os._exit(130)
