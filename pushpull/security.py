"""CURVE keys (pyzmq's certificate format, zmq.auth); the receiver's ZAP gatekeeper,
server-side CURVE, and its watch over who connects."""

import collections
import os
import time

import zmq
import zmq.auth
from zmq.auth.base import Authenticator
from zmq.auth.thread import AuthenticationThread, ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message


class KeyFileError(Exception):
    """A certificate file is missing, unreadable or of the wrong kind."""


SECRET_FILE_MODE = 0o600  # a secret key file is readable by its owner only


def generate_keys(directory):
    """Write server and client certificates (public and secret) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in ("server", "client"):
        secret = os.path.join(directory, f"{name}.key_secret")
        # zmq.auth writes with open("w"), which keeps an existing file's mode: made
        # private first, the secret is never readable by others, not even for a moment.
        os.close(os.open(secret, os.O_WRONLY | os.O_CREAT, SECRET_FILE_MODE))
        os.chmod(secret, SECRET_FILE_MODE)
        paths += zmq.auth.create_certificates(directory, name)
    return paths


def load_secret_certificate(path):
    """(public, secret) keys from a *.key_secret file."""
    public, secret = _load_certificate(path)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(path):
    """The public key from a certificate file (.key or .key_secret)."""
    return _load_certificate(path)[0]


def load_client_keys(secret_path, server_public_path):
    """The sender's CURVE keys (public, secret, server public), or None without a secret
    certificate; KeyFileError if a certificate is unusable."""
    if not secret_path:
        return None
    public, secret = load_secret_certificate(secret_path)
    return public, secret, load_public_key(server_public_path)


def _load_certificate(path):
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read certificate {path}: {exc}") from None


def apply_client_keys(sock, keys):
    """Make `sock` a CURVE client: keys is (public, secret, server public), or None for none."""
    if keys:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys


# ---------------------------------------------------------------------------
# The receiver: who may connect (ZAP, CURVE), and who tried
# ---------------------------------------------------------------------------
ZAP_DOMAIN = "global"  # the ZAP domain the receiver's sockets and the authenticator share
# The monitor events PeerWatch reads.
REFUSED_REMEMBERED = 10000  # (address, reason) pairs the [AUTH] log remembers at most
PEER_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def load_server_keys(secret_path, allow_dir):
    """The receiver's CURVE keys (public, secret) from its secret certificate, or None
    without one; KeyFileError if it, or the directory of allowed clients, is unusable."""
    if allow_dir and not os.path.isdir(allow_dir):
        raise KeyFileError(f"--curve-allow {allow_dir} is not a directory")
    return load_secret_certificate(secret_path) if secret_path else None


def apply_server_security(sock, server_keys):
    """Put a server socket under the gatekeeper, and CURVE when server_keys (public, secret)."""
    # With a ZAP domain every peer passes the authenticator, and libzmq refuses
    # ZMTP/1.0 peers: without it, raw bytes on the port are read as old-protocol
    # frames and can come out as messages.
    sock.zap_domain = ZAP_DOMAIN.encode()
    if server_keys:
        sock.curve_publickey, sock.curve_secretkey = server_keys
        sock.curve_server = True


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
            self.on_event(recv_monitor_message(monitor)["event"])
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
