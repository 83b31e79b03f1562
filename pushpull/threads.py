"""A thread with a clear start and stop: one body, a startup handshake, its failure logged once."""

import threading
import time

POLL_INTERVAL = 100  # milliseconds a thread blocks before it looks at its stop event
POLL_S = POLL_INTERVAL / 1000  # the same in seconds, for event.wait() and lock.acquire()
STOP_TIMEOUT = 10.0  # seconds threads told to stop get to end before they are called stuck


class StartupError(Exception):
    """A thread could not start its work (a bind failed, a file cannot be read)."""


class ServiceThread(threading.Thread):
    """A named daemon thread running `serve()`; subclasses write only that body.

    `serve()` calls `self.started()` once its sockets are set up; until then
    `start_and_wait()` blocks, and returns the reason when the body raised
    StartupError instead. Any other exception is logged once, with its
    traceback, here at the thread's outermost edge, and `failed` says so.
    """

    def __init__(self, name, log):
        super().__init__(name=name, daemon=True)
        self.log = log
        self.failed = False
        self.startup_error = None
        self._ready = threading.Event()

    def serve(self):
        """The thread's body."""
        raise NotImplementedError

    def started(self):
        """Tell start_and_wait() that the thread is ready for work."""
        self._ready.set()

    def start_and_wait(self, poll_s=0.1):
        """Start the thread and wait until it is ready; returns the startup error, or None."""
        self.start()
        while not self._ready.wait(poll_s):
            if not self.is_alive():
                break
        if self.startup_error is None and (self.failed or not self._ready.is_set()):
            return f"thread {self.name} ended before it was ready"
        return self.startup_error

    def run(self):
        """Run `serve()`; a startup error is kept for start_and_wait(), anything else logged."""
        try:
            self.serve()
        except StartupError as exc:
            self.startup_error = str(exc)
        except Exception:
            self.failed = True
            self.log.exception(f"[ERROR] thread {self.name} failed")
        finally:
            self._ready.set()


def join_stopped(threads, log, timeout=STOP_TIMEOUT):
    """Join threads already told to stop, within one shared deadline; log any still running.

    Returns True when all of them ended. Each polls its stop event every POLL_INTERVAL,
    so one still running after `timeout` is stuck, and the log says so.
    """
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        log.error(f"[ERROR] threads still running {timeout:g} s after the stop:"
                  f" {', '.join(stuck[:10])}{' ...' if len(stuck) > 10 else ''}")
    return not stuck
