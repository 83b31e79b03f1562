"""The sender's view of its receivers: one link state per endpoint, fed by a socket monitor
watching sockets that carry ZMTP heartbeats.

The heartbeat monitor thread (in the sender script) owns the probe socket and
writes a ReceiverHealth; workers and main only read it.
"""

import enum
import struct
import threading

import zmq


class LinkState(enum.Enum):
    """The heartbeat monitor's view of one receiver endpoint."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    REJECTED = "rejected"  # the receiver refused us: libzmq will not retry


HEARTBEAT_TIMEOUT_MARGIN = 0.5  # seconds a ZMTP ping waits for an answer beyond half an interval
HEARTBEAT_MIN_MS = 50  # milliseconds: the shortest ZMTP heartbeat interval set
VERDICT_MARGIN = 0.5  # seconds for a verdict to get from libzmq's timer to ReceiverHealth

# The socket-monitor events that change a link's state (a data receiver's, as the probe
# sees it, and a confirmation channel's): connected, or lost / refused.
MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                  | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


# A monitor message's first frame: the event (uint16), then its value (uint32), native order
# (libzmq's zmq_socket_monitor; the parse zmq.utils.monitor makes).
MONITOR_EVENT = struct.Struct("=H")


def monitor_event(monitor):
    """The event number of the next message on a socket monitor (its endpoint frame dropped)."""
    # zmq.utils.monitor.recv_monitor_message parses the same, but importing it imports
    # zmq.asyncio: asyncio was 26 ms of the sender's 0.21 s start, inside every
    # end-to-end figure (2) (bench/README.md, "Profiles").
    return MONITOR_EVENT.unpack_from(monitor.recv_multipart()[0])[0]


def heartbeat_ms(interval):
    """The ZMTP heartbeat interval, in ms, of probes for `interval` s of HEARTBEAT_INTERVAL."""
    return max(HEARTBEAT_MIN_MS, int(interval * 1000) // 2)


def set_heartbeats(sock, interval):
    """ZMTP heartbeats, for the probe and the confirmation channel: they find a hung receiver.

    Data sockets go without: a heartbeat timeout would drop the connection and
    every message queued on it, where a receiver that was only paused (SIGSTOP)
    should get them all once it resumes. libzmq 4.3.5 can also abort when a
    heartbeat fires on a connection stopped at its high-water mark.
    """
    ping = heartbeat_ms(interval)
    # Detection worst case is IVL + TIMEOUT (detection_bound).
    sock.setsockopt(zmq.HEARTBEAT_IVL, ping)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ping + int(HEARTBEAT_TIMEOUT_MARGIN * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TTL, int(interval * 1000) * 2)


def detection_bound(interval):
    """Seconds after a silent cut by which the heartbeat calls the receiver down, at the
    latest: one ping interval, then the ping's timeout (set_heartbeats), and the margin
    of the verdict's way to ReceiverHealth on a busy machine."""
    return 2 * heartbeat_ms(interval) / 1000 + HEARTBEAT_TIMEOUT_MARGIN + VERDICT_MARGIN


class ReceiverHealth:
    """Written by the heartbeat monitor only; read by workers and main."""

    def __init__(self, endpoints):
        self.states = {ep: LinkState.UNKNOWN for ep in endpoints}
        self.down_transitions = 0
        self.changes = 0  # bumped on every state change: workers compare it before each send
        self.seen_up = set()  # endpoints that were up at least once
        # (endpoint, each worker's sent count) when the heartbeat called an endpoint that
        # was up down, once messages were sent: the instance behind it may be gone with
        # what it held, even if one is up there again (a restart).
        self.lapses = []
        self.sent_counts = None  # () -> each worker's sent count; set once the workers exist
        self._any_up = threading.Event()

    def is_up(self):
        """True while at least one receiver is connected and answering."""
        return self._any_up.is_set()

    def is_endpoint_up(self, ep):
        """True while the receiver at `ep` is connected and answering."""
        return self.states.get(ep) is LinkState.UP

    def is_down(self, ep):
        """True while the heartbeat calls receiver `ep` down (silent, gone, not reachable)."""
        return self.states[ep] is LinkState.DOWN

    def all_rejected(self):
        """True when every receiver refused this sender's handshake."""
        return all(s is LinkState.REJECTED for s in self.states.values())

    def set_state(self, ep, state):
        """Record a new state; returns True when it changed."""
        old = self.states[ep]
        if old is state:
            return False
        if state is LinkState.UP:
            self.seen_up.add(ep)
        self.states[ep] = state
        if state is LinkState.DOWN and old is LinkState.UP:
            self.down_transitions += 1
            counts = tuple(self.sent_counts()) if self.sent_counts else ()
            if any(counts):
                self.lapses.append((ep, counts))
        if any(s is LinkState.UP for s in self.states.values()):
            self._any_up.set()
        else:
            self._any_up.clear()
        self.changes += 1
        return True

    def lapse_bound(self, per_connection, sent):
        """Messages the lapses may have lost, at most: per lapse and worker, what the worker
        had sent when the heartbeat spoke (and one more: a send may have crossed the
        verdict), up to what its connection holds (`per_connection`) and what it sent in
        all (`sent`: each worker's final count)."""
        return sum(min(count + 1, final, per_connection)
                   for _, counts in self.lapses for count, final in zip(counts, sent))

    def awaited(self):
        """The endpoints that are up or not judged yet: a new connection waits for these."""
        return {ep for ep, s in self.states.items() if s in (LinkState.UP, LinkState.UNKNOWN)}

    def describe(self):
        """'up', 'down', or one word per endpoint when there are several."""
        if len(self.states) == 1:
            return next(iter(self.states.values())).value
        return " ".join(f"{ep}={s.value}" for ep, s in self.states.items())


def link_change(event, state, curve):
    """(new state, reason) for a socket-monitor event on a link now in `state`, or None.

    `curve`: the sender uses CURVE, so a failed handshake means a wrong key.
    """
    if state is LinkState.REJECTED and event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return None  # the refusal stands until a handshake succeeds
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return LinkState.UP, "connected"
    if event == zmq.EVENT_DISCONNECTED:
        return LinkState.DOWN, "connection lost or heartbeat timed out"
    if event == zmq.EVENT_CONNECT_RETRIED:
        return LinkState.DOWN, "not reachable"
    # libzmq does not reconnect after these two: waiting would be in vain.
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return LinkState.REJECTED, "refused our CURVE key or address"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return LinkState.REJECTED, "handshake refused (CURVE on one side only?)"
    if curve:
        # A wrong server key fails every handshake while libzmq retries forever.
        return LinkState.REJECTED, "CURVE handshake failed (wrong --curve-server-public?)"
    return LinkState.DOWN, f"handshake failed ({zmq.Event(event).name})"

