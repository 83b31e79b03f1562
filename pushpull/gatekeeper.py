"""The receiver's gatekeeper: who may connect (ZAP, CURVE), and its watch over who tried.

Its own module so that the sender, which needs only keys (pushpull/security.py), does not
import zmq.auth.thread: that imports asyncio, 26 ms of every sender start (bench/README.md,
"Profiles").
"""

import collections
import time

import zmq
import zmq.auth
from zmq.auth.base import Authenticator
from zmq.auth.thread import AuthenticationThread, ThreadAuthenticator

from pushpull.health import monitor_event
from pushpull.security import ZAP_DOMAIN

REFUSED_REMEMBERED = 10000  # (address, reason) pairs the [AUTH] log remembers at most
# The monitor events PeerWatch reads.
PEER_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


START_POLL = 0.1  # seconds between looks at a starting ZAP thread still alive


class GatekeeperError(Exception):
    """The ZAP authentication thread could not start."""


class Gatekeeper(ThreadAuthenticator):
    """pyzmq's ZAP authenticator thread, logging each refused peer as [AUTH] once per
    address and reason per `interval` seconds, however often it retries."""

    def __init__(self, ctx, log, interval):
        super().__init__(ctx)
        self.app_log = log
        self.interval = interval
        self._address = "?"
        self._logged = {}  # (address, reason) -> when it was last logged

    def start(self):
        """pyzmq's start(), its thread named "gatekeeper", waited for as long as it lives.

        pyzmq's own start() gives the thread 10 s, then raises with the ZAP socket left
        open: ctx.term() then waits for that socket for ever, and the receiver would
        hang silent, deaf to Ctrl+C. Here a thread that ends before it is ready raises
        GatekeeperError at once; either way every socket opened here is closed first.
        """
        thread_pipe = None
        try:
            Authenticator.start(self)  # the ZAP socket
            self.pipe = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
            self.pipe.linger = 1
            self.pipe.bind(self.pipe_endpoint)
            thread_pipe = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
            thread_pipe.linger = 1
            thread_pipe.connect(self.pipe_endpoint)
            self.thread = AuthenticationThread(authenticator=self, pipe=thread_pipe)
            self.thread.name = "gatekeeper"
            self.thread.start()
            while not self.thread.started.wait(START_POLL):
                if not self.thread.is_alive():
                    raise GatekeeperError("the ZAP authentication thread ended before it"
                                          " was ready")
        except BaseException:
            self._close_after_failure(thread_pipe)
            raise

    def _close_after_failure(self, thread_pipe):
        """Close the ZAP socket and both pipes: a socket left open hangs ctx.term()."""
        if self.thread is not None and self.thread.is_alive():
            self.stop()  # TERMINATE: the thread ends once started; pipe and ZAP socket closed
            return
        # No thread to answer: pyzmq's stop() would send TERMINATE to nobody, for ever.
        for sock in (thread_pipe, self.pipe):  # the thread's run() closed the first, if it ran
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        self.pipe = self.thread = None
        Authenticator.stop(self)  # the ZAP socket

    async def handle_zap_message(self, msg):
        """Remember the peer's address for the reply, then authenticate as pyzmq does."""
        if len(msg) >= 6:
            self._address = msg[3].decode("utf-8", "replace")
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous"):
        if status_code != b"200":
            peer = (self._address, status_text)
            now = time.monotonic()
            if now - self._logged.get(peer, -self.interval) >= self.interval:
                if len(self._logged) >= REFUSED_REMEMBERED:
                    self._logged.clear()  # bounded: addresses come from the network
                self._logged[peer] = now
                self.app_log.warning(f"[AUTH] refused peer {self._address}:"
                                     f" {status_text.decode('utf-8', 'replace')}")
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def start_gatekeeper(ctx, log, allow_ips, curve, curve_allow, interval):
    """Start ZAP authentication: open to all unless CURVE or an IP allow list is on.

    With curve, clients need a key from the directory curve_allow (None: any key).
    A refused peer is logged once per address and reason per `interval` seconds.
    """
    gatekeeper = Gatekeeper(ctx, log, interval)
    gatekeeper.start()  # GatekeeperError, its sockets closed, if its thread cannot start
    try:
        if allow_ips:
            # Bound to IPv6 (--bind ::), a socket sees an IPv4 peer as ::ffff:a.b.c.d.
            mapped = [f"::ffff:{ip}" for ip in allow_ips if ":" not in ip]
            gatekeeper.allow(*allow_ips, *mapped)
        if curve:
            gatekeeper.configure_curve(domain=ZAP_DOMAIN,
                                       location=curve_allow or zmq.auth.CURVE_ALLOW_ANY)
    except BaseException:
        gatekeeper.stop()  # else its sockets would hang ctx.term() for ever
        raise
    return gatekeeper


def security_warnings(log, bind, port, curve, curve_allow):
    """Say plainly when the receiver is open to anyone who can reach it."""
    if bind in ("*", "0.0.0.0", "::") and not curve:
        log.warning(f"[AUTH] bound to every interface without CURVE: anyone who can reach"
                    f" port {port} can send (docs/network-failures.md)")
    elif curve and not curve_allow:
        log.warning("[AUTH] CURVE on without --curve-allow: traffic is encrypted, but any"
                    " client key is accepted")


class PeerWatch:
    """Counts a server socket's peers, and the connections refused or dropped before their
    handshake ended, from its monitor socket (get_monitor_socket(PEER_EVENTS)).

    Writes counters.peers, .rejected, .rejected_connections and .invalid. libzmq
    reports no file descriptor with a successful handshake, so connections are
    matched in aggregate: a DISCONNECTED while some accepted connection has no
    handshake result yet is taken as a drop before the handshake (junk bytes: libzmq
    drops them without a handshake event). If a result then arrives that the drop
    made impossible, the guess is undone; so it is counted, and its [INVALID] line
    logged, only once it has stood `settle` s, the longest a handshake may take, with
    no result that would undo it. A stop counts no guess that had not settled: the
    counts are never a guess.
    A peer that left or fell silent in mid-handshake (HANDSHAKE_FAILED_NO_DETAIL: a
    sender that closed at once, a port scan) is no invalid input: it is not counted.
    Refused CURVE handshakes count peers, not handshakes: a refused client retries,
    and libzmq names no address, so refusals less than `settle` s apart count once.
    """

    def __init__(self, counters, warnings, curve, settle):
        self.counters = counters
        self.warnings = warnings  # a logs.RateLimitedLog
        self.curve = curve
        self.settle = settle
        self.accepted = 0
        self.handshakes = 0  # succeeded or failed
        self.dropped = 0  # closed before any handshake result
        self.guesses = collections.deque()  # when each standing drop guess was made
        self.settled = 0  # drop guesses counted (settled)
        self.last_refusal = None  # when the last refused handshake was seen

    @property
    def unresolved(self):
        """Accepted connections with no handshake result yet."""
        return self.accepted - self.handshakes - self.dropped

    def read(self, monitor):
        """Take every waiting event off the monitor socket."""
        while monitor.poll(0):
            self.on_event(monitor_event(monitor))
        self.report_guesses()

    def report_guesses(self):
        """Count and log the drop guesses that stood for `settle` s: no handshake result
        undid them. A guess not settled yet is in no count (settled())."""
        now = time.monotonic()
        while self.guesses and now - self.guesses[0] >= self.settle:
            self.guesses.popleft()
            self.settled += 1
            self.counters.rejected_connections += 1
            self.counters.invalid += 1
            self.warnings.warning("handshake", "[INVALID] connection dropped: not a ZeroMQ"
                                               " peer: connection closed before a ZeroMQ"
                                               " handshake")

    def on_event(self, event):
        """Count one monitor event."""
        counters = self.counters
        if event == zmq.EVENT_ACCEPTED:
            self.accepted += 1
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._resolved()
            counters.peers += 1
        elif event == zmq.EVENT_DISCONNECTED:
            if self.unresolved > 0:  # a guess, counted once it settles
                self.dropped += 1
                self.guesses.append(time.monotonic())
            else:
                counters.peers = max(0, counters.peers - 1)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH or (
                event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and self.curve):
            # Refused by ZAP (logged with its address by the Gatekeeper), or a peer
            # whose CURVE handshake could not work.
            self._resolved(failed=True)
            self._refused()
            if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self.warnings.warning("auth-protocol", "[AUTH] refused a peer whose CURVE"
                                                       " handshake failed (no client key,"
                                                       " or a wrong server key)")
        else:
            self._resolved(failed=True)
            if event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and not self.curve:
                counters.rejected_connections += 1
                counters.invalid += 1
                self.warnings.warning("handshake", "[INVALID] connection dropped: not a"
                                                   " ZeroMQ peer: handshake failed"
                                                   f" ({zmq.Event(event).name})")

    def _refused(self):
        """Count a refused handshake as a new peer unless it follows another within `settle` s."""
        now = time.monotonic()
        if self.last_refusal is None or now - self.last_refusal >= self.settle:
            self.counters.rejected += 1
        self.last_refusal = now

    def _resolved(self, failed=False):
        """A handshake ended; correct an earlier drop that was really this connection's."""
        self.handshakes += 1
        if self.unresolved < 0:  # a DISCONNECTED taken for a drop was a peer's leaving
            self.dropped -= 1
            self.counters.peers = max(0, self.counters.peers - 1)
            if self.guesses:
                self.guesses.pop()  # not counted yet, its line not logged
            else:  # settled before: counted, now undone
                self.settled -= 1
                self.counters.rejected_connections -= 1
                self.counters.invalid -= 1
        if failed:
            self.counters.peers += 1  # its DISCONNECTED follows and takes it off again
