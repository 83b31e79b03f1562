"""Connections across real networks: TCP keepalive, and a worker's links kept in step
with the heartbeat.

On loopback a dead receiver closes its connections and the sender knows at once.
Across machines failure is often silent (a pulled cable, a dead host, a firewall
dropping packets): no FIN or RST arrives, and a PUSH socket keeps handing messages
to a connection that leads nowhere, because data sockets carry no ZMTP heartbeats
(see health.set_heartbeats). The heartbeat monitor's probe does, and calls
the receiver down; ReceiverLinks makes each worker act on that verdict (what a
receiver seen down may have lost is ReceiverHealth.lapse_bound, `at_risk`);
await_late_verdicts keeps the run's verdict from coming before the heartbeat's on
a cut in its last seconds.
"""

import time

import zmq

from pushpull.cli import wants_ipv6
from pushpull.health import detection_bound
from pushpull.security import apply_client_keys

RECONNECT_INTERVAL = 100  # milliseconds between reconnection attempts
TCP_KEEPALIVE_IDLE = 10  # seconds a connection is idle before the kernel probes the peer
TCP_KEEPALIVE_INTERVAL = 2  # seconds between two keepalive probes
TCP_KEEPALIVE_COUNT = 5  # unanswered probes before the kernel drops the connection
DROP_SETTLE_S = 0.05  # seconds for libzmq's I/O thread to end a dropped connection


def keep_alive(sock):
    """TCP keepalive on every connection of `sock`: a peer that vanished without a FIN
    (a crashed host, a cut cable) is dropped within IDLE + INTERVAL x COUNT s of silence."""
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTERVAL)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_COUNT)


def set_link_options(sock, config):
    """The options every sender socket toward a receiver shares (data PUSH, heartbeat
    probe, confirmation SUB), set before it connects; `config`: the sender's Config."""
    sock.setsockopt(zmq.IPV6, wants_ipv6(config.endpoints))
    # A hung listener's port still accepts TCP; without a handshake limit it
    # would look connected for 30 s after a reconnect.
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(config.heartbeat_interval * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL)
    keep_alive(sock)
    apply_client_keys(sock, config.curve_keys)


def await_late_verdicts(channel, health, interval, sending_ended, stop, log):
    """Unless every receiver reported the run: wait until the heartbeat could have seen a
    silent cut made before the end of sending (its detection bound after it), so that
    at_risk counts what the cut kept. Ends early once every report is in, or on `stop`
    (Ctrl+C).

    A cut in the last seconds of a run leaves the last messages in a connection that
    leads nowhere; with a short --report-timeout the sender would judge before the
    heartbeat's verdict.
    """
    if channel.all_reported() or not health.is_up() or stop.is_set():
        return
    left = sending_ended + detection_bound(interval) - time.monotonic()
    if left > 0:
        log.info(f"[WAIT] {left:.1f} s more for the heartbeat: a receiver cut off silently"
                 " in the run's last seconds is seen only then (not every receiver reported)")
        channel.wait_for_reports(left, stop)


class ReceiverLinks:
    """One worker's connections to its receivers, kept in step with the heartbeat.

    A receiver the heartbeat calls down gets no more messages from this worker. How:
    - kept (one receiver): the worker keeps the connection and pauses while its
      receiver is down, as for a killed receiver; after a heal TCP delivers what
      the connection held, so a cut that heals in time loses nothing;
    - dropped (`drop`, several receivers): the worker disconnects from it, so PUSH
      deals only to the live ones, and connects again when the heartbeat calls it
      up. libzmq discards what it still held for that connection (the sender's
      sockets connect with ZMQ_IMMEDIATE, so a disconnect ends the connection's
      session, which throws its queue and its engine's batch away whatever the
      linger); only what the kernel had taken is delivered after a heal. So what
      the connection may have held stays at risk even when the receiver comes back;
      the receivers' reports of the run say what arrived.
    Only the worker's own thread uses this object (and its socket).
    """

    def __init__(self, sock, endpoints, health, drop):
        self.sock = sock
        self.endpoints = endpoints
        self.health = health
        self.drop = drop
        self.seen = -1  # health.changes when this worker last followed it
        self.paused = False  # every receiver this worker sends to is down
        self.connected = set()

    def connect_all(self):
        """Connect to every receiver."""
        for endpoint in self.endpoints:
            self.sock.connect(endpoint)
        self.connected = set(self.endpoints)

    def follow(self):
        """Act on the heartbeat's verdicts; True when it dropped a connection: settle()
        before the next send."""
        health = self.health
        self.seen = health.changes
        dropped = False
        for endpoint in self.endpoints:
            if health.is_down(endpoint):
                if self.drop and endpoint in self.connected:
                    self.sock.disconnect(endpoint)
                    self.connected.discard(endpoint)
                    dropped = True
            elif health.is_endpoint_up(endpoint):
                self._back(endpoint)
        self.paused = all(health.is_down(ep) for ep in self.connected)
        return dropped

    def settle(self, stop):
        """After a drop: let the socket take it in before it sends again.

        libzmq ends a dropped connection in its I/O thread, and the socket learns
        it only when it next processes commands (throttled on the send path): sent
        at once, a message could still be dealt to the dropped connection, and be
        thrown away with its queue.
        """
        stop.wait(DROP_SETTLE_S)
        self.sock.getsockopt(zmq.EVENTS)  # processes the socket's pending commands

    def _back(self, endpoint):
        """The receiver is up again: reconnect if this worker dropped it."""
        if endpoint not in self.connected:
            self.sock.connect(endpoint)
            self.connected.add(endpoint)
