"""A small routed network of Linux network namespaces, for tests of real network failures.

    sender host --- router --- receiver host a
                          \\-- receiver host b   (when a test asks for two receivers)

On loopback a dead receiver's kernel closes its connections and the sender knows at
once. Across machines failure is often silent: no FIN, no RST. Here each host is a
namespace joined to a router namespace by a veth pair, and the router can drop a
host's packets silently (a blackhole rule), or only those to one port (a firewall), slow
its link (tc tbf), or lose the host with its processes (a silent cut, then kill -9).

Every test gets its own namespaces and interfaces (their names carry a per-test tag),
addressed from 10.231.0.0/16, an address range used only inside them: link N is
10.231.N.0/24, the router is .1 and the host .2 on each. Teardown kills every process
and deletes every namespace (their veths go with them), whether the test passed or not.
Tests that use the fixture are skipped, with the reason, where namespaces cannot be made.
"""

import itertools
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import READY_LINE, RECEIVER, SENDER, Proc

NAMESPACE_PREFIX = "ppnet"  # namespaces are named ppnet-PID-N-ROLE (PID: the test process)
SENDER_LINK = 1  # 10.231.1.0/24 joins the sender host to the router
FIRST_RECEIVER_LINK = 2  # receiver host a on 10.231.2.0/24, b on 10.231.3.0/24
RECEIVER_NAMES = ("a", "b")
RECEIVER_PORT = 5560  # the seed's port: every host namespace has its own ports
CUT_PRIORITY = 100  # priority of the router's blackhole rules (before the main table)
COMMAND_TIMEOUT = 10  # seconds any ip/tc command may take
_networks = itertools.count()


@dataclass(frozen=True)
class Host:
    """One host namespace, joined to the router by one veth pair."""

    name: str  # "sender", "a" or "b"
    ns: str  # its namespace
    link: int  # N of 10.231.N.0/24
    veth: str  # its end of the veth pair
    router_veth: str  # the router's end, toward this host

    @property
    def addr(self):
        """The host's address."""
        return f"10.231.{self.link}.2"

    @property
    def gateway(self):
        """The router's address on this host's link."""
        return f"10.231.{self.link}.1"

    def endpoint(self, port=RECEIVER_PORT):
        """tcp://ADDRESS:PORT of this host."""
        return f"tcp://{self.addr}:{port}"


def run_command(*args, check=True):
    """Run a command (ip, tc, ...) to completion; a failure raises with its stderr."""
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done


def ip_in(ns, *args):
    """Run `ip -n NS ARGS...`: an ip(8) command acting inside namespace `ns`."""
    return run_command("ip", "-n", ns, *args)


def unavailable_reason():
    """Why namespaces cannot be made here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    return None


def remove_stale_namespaces():
    """Delete namespaces left by a test process that died before its teardown."""
    listing = run_command("ip", "netns", "list", check=False).stdout.split()
    for name in (n for n in listing if n.startswith(NAMESPACE_PREFIX + "-")):
        owner = name.split("-")[1]
        if not owner.isdigit():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            kill_everything_in(name)
            run_command("ip", "netns", "del", name, check=False)
        except PermissionError:
            pass  # alive


def kill_everything_in(ns):
    """kill -9 every process still running in namespace `ns` (started by the harness)."""
    for pid in run_command("ip", "netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


class Network:
    """The namespaces of one test, the processes running in them, and the faults to inject."""

    def __init__(self, workdir, receivers):
        number = next(_networks)
        tag = f"{os.getpid():x}{number % 256:02x}"  # veth names: v + tag + role <= 15 chars
        names = ("sender", *RECEIVER_NAMES[:receivers])
        links = (SENDER_LINK, *range(FIRST_RECEIVER_LINK, FIRST_RECEIVER_LINK + receivers))
        prefix = f"{NAMESPACE_PREFIX}-{os.getpid()}-{number}"
        self.workdir = workdir
        self.router = f"{prefix}-router"
        hosts = [Host(name, f"{prefix}-{name}", link, f"v{tag}{name[0]}", f"v{tag}r{name[0]}")
                 for name, link in zip(names, links)]
        self.sender_host, self.receiver_hosts = hosts[0], hosts[1:]
        self.namespaces = []  # made so far, deleted at teardown
        self.procs = []  # every process started, each with its .host

    @property
    def hosts(self):
        """The sender host, then the receiver hosts."""
        return [self.sender_host, *self.receiver_hosts]

    def build(self):
        """Make the router and the hosts, link and address them, and route between them."""
        self._add_namespace(self.router)
        self.run_in(self.router, sys.executable, "-c",
                    "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')")
        for host in self.hosts:
            self._add_namespace(host.ns)
            # Made inside the host's namespace, its peer moved to the router's: neither
            # end ever exists in the machine's own namespace.
            ip_in(host.ns, "link", "add", host.veth, "type", "veth",
                  "peer", "name", host.router_veth, "netns", self.router)
            ip_in(host.ns, "addr", "add", f"{host.addr}/24", "dev", host.veth)
            ip_in(self.router, "addr", "add", f"{host.gateway}/24", "dev", host.router_veth)
            ip_in(host.ns, "link", "set", host.veth, "up")
            ip_in(self.router, "link", "set", host.router_veth, "up")
            ip_in(host.ns, "route", "add", "default", "via", host.gateway)

    def _add_namespace(self, name):
        run_command("ip", "netns", "add", name)
        self.namespaces.append(name)
        ip_in(name, "link", "set", "lo", "up")

    def teardown(self):
        """Kill every process, then delete every namespace (and so every veth)."""
        try:
            for proc in self.procs:
                proc.cleanup()
        finally:
            for name in reversed(self.namespaces):
                kill_everything_in(name)
                run_command("ip", "netns", "del", name, check=False)
            self.namespaces.clear()

    # -- processes ---------------------------------------------------------------------
    def start(self, host, script, args, name):
        """Run `script` with `args` inside `host`'s namespace; output in WORKDIR/NAME.out."""
        proc = Proc(script, args, self.workdir, name, prefix=("ip", "netns", "exec", host.ns))
        proc.host = host
        self.procs.append(proc)
        return proc

    def receiver(self, *args, host=None, port=RECEIVER_PORT, wait_ready=True, name=None):
        """Start a receiver on `host` (receiver host a by default), bound to its address."""
        host = host or self.receiver_hosts[0]
        name = name or f"receiver_{host.name}{len(self.procs)}"
        # Every host runs in the one work directory: each receiver its own spill file.
        spill_file = self.workdir / f"spill_{host.name}_{port}.bin"
        proc = self.start(host, RECEIVER, ["--port", str(port), "--bind", host.addr,
                                           "--spill-file", str(spill_file), *args], name)
        proc.endpoint = host.endpoint(port)
        if wait_ready:
            proc.wait_for_output(READY_LINE)
        return proc

    def sender(self, *args, endpoints=None, name=None):
        """Start a sender on the sender host, to `endpoints` (every receiver host's by default)."""
        endpoints = endpoints or [host.endpoint() for host in self.receiver_hosts]
        connect = [a for ep in endpoints for a in ("--connect", ep)]
        return self.start(self.sender_host, SENDER, [*connect, *args],
                          name or f"sender{len(self.procs)}")

    def run(self, host, *command, check=True):
        """Run a command inside `host`'s namespace to completion; the CompletedProcess."""
        return self.run_in(host.ns, *command, check=check)

    @staticmethod
    def run_in(ns, *command, check=True):
        """Run a command inside namespace `ns` (a name) to completion."""
        return run_command("ip", "netns", "exec", ns, *command, check=check)

    # -- faults ------------------------------------------------------------------------
    def partition(self, host):
        """Cut `host` off silently: the router drops every packet to or from it (no FIN,
        RST or ICMP gets through; connections stay open at both ends)."""
        for direction in ("to", "from"):
            ip_in(self.router, "rule", "add", direction, host.addr, "blackhole",
                  "priority", str(CUT_PRIORITY))

    def heal(self, host):
        """Undo partition(host): packets flow again; TCP resends what it held."""
        for direction in ("to", "from"):
            ip_in(self.router, "rule", "del", direction, host.addr, "blackhole",
                  "priority", str(CUT_PRIORITY))

    def firewall(self, host, port):
        """A firewall that silently drops every TCP packet to `host`:`port` (SYNs included)
        and lets the host's other ports through."""
        ip_in(self.router, "rule", "add", "to", host.addr, "ipproto", "tcp", "dport", str(port),
              "blackhole", "priority", str(CUT_PRIORITY))

    def kill_host(self, host):
        """The host dies silently: cut it off, then kill -9 its processes (their kernel's
        FIN or RST is dropped in the router). heal(host) is the host coming back empty."""
        self.partition(host)
        for proc in self.procs:
            if proc.host is host and proc.popen.poll() is None:
                proc.signal(signal.SIGKILL)
                proc.wait(10)

    def slow_link(self, host, rate="10mbit"):
        """Limit the router's link toward `host` to `rate` (tc tbf): the sending direction."""
        if shutil.which("tc") is None:
            pytest.skip("no tc command (iproute2)")
        self.run_in(self.router, "tc", "qdisc", "add", "dev", host.router_veth,
                    "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")

    def fast_link(self, host):
        """Undo slow_link(host)."""
        self.run_in(self.router, "tc", "qdisc", "del", "dev", host.router_veth, "root")

    # -- what the network does -----------------------------------------------------------
    def tcp_probe(self, host, port, timeout=1.0):
        """Connect from the sender host to `host`:`port`: 'connected', 'refused' (an RST
        came back), 'unreachable' (an ICMP error came back) or 'timeout' (silence)."""
        code = ("import socket\n"
                "try:\n"
                f"    socket.create_connection(({host.addr!r}, {port}), timeout={timeout})\n"
                "    print('connected')\n"
                "except ConnectionRefusedError:\n"
                "    print('refused')\n"
                "except TimeoutError:\n"
                "    print('timeout')\n"
                "except OSError:\n"
                "    print('unreachable')\n")
        return self.run(self.sender_host, sys.executable, "-c", code).stdout.strip()

    def established(self, host):
        """How many TCP connections the sender host has open to `host`."""
        out = self.run(self.sender_host, "ss", "-Htn", "state", "established",
                       "dst", host.addr).stdout
        return len(out.splitlines())


@pytest.fixture
def network(tmp_path):
    """Factory: network(receivers=1 or 2) builds a Network; all of it is gone at teardown."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    remove_stale_namespaces()
    made = []

    def build(receivers=1):
        net = Network(tmp_path, receivers)
        made.append(net)
        try:
            net.build()
        except RuntimeError as exc:
            if not net.namespaces:  # the very first `ip netns add` failed
                pytest.skip(f"cannot make network namespaces: {exc}")
            raise
        return net

    yield build
    for net in made:
        net.teardown()
