"""Network namespaces the fault tests create and delete: a peer on a network of its own.

``Namespace`` is a netns joined to this machine by a veth pair (the host end ``host_ip``, the
namespace end ``ip``), optionally behind a firewall that lets it dial out only (as behind NAT:
replies come back, nothing new comes in) or on a rate-limited link (``tc tbf``; ``netem`` does
not exist in this kernel). ``Forward`` exposes a loopback service of this machine to it. Both
need root, ``ip`` and ``iptables``: without them the tests skip, saying so, except in CI (``CI``
set), where ``.ci/run`` installs them and a skip would hide a gap.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import threading
import urllib.parse

import pytest
from swarm_helpers import stop_and_check

from hivetrain.settings import SwarmSettings
from hivetrain.swarm.launcher import Swarm

_COUNTER = itertools.count()


def require_netns() -> None:
    missing = [tool for tool in ("ip", "iptables", "tc") if shutil.which(tool) is None]
    reason = ""
    if os.geteuid() != 0:
        reason = "network namespaces need root"
    elif missing:
        reason = f"missing {', '.join(missing)}: apt-get install iproute2 iptables"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


class Namespace:
    """``with Namespace(dial_out_only=True) as ns:`` a netns at ``ns.ip``, reached from here at ``ns.host_ip``."""

    def __init__(self, dial_out_only: bool = False, rate_mbit: float | None = None):
        index = next(_COUNTER) % 200
        tag = f"{os.getpid() % 10000}x{index}"
        self.name = f"hive-{tag}"
        self.host_if, self.ns_if = f"hh{tag}"[:15], f"hn{tag}"[:15]
        subnet = 10 + (os.getpid() % 200)
        self.host_ip, self.ip = f"10.{subnet}.{index}.1", f"10.{subnet}.{index}.2"
        self.dial_out_only, self.rate_mbit = dial_out_only, rate_mbit

    def __enter__(self) -> "Namespace":
        require_netns()
        try:
            _run("ip", "netns", "add", self.name)
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _run("ip", "link", "set", self.ns_if, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            _run(*self.exec("ip", "addr", "add", f"{self.ip}/24", "dev", self.ns_if))
            _run(*self.exec("ip", "link", "set", self.ns_if, "up"))
            _run(*self.exec("ip", "link", "set", "lo", "up"))
            if self.dial_out_only:  # what a NAT or a stateful firewall leaves: replies in, nothing new
                _run(*self.exec("iptables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT"))
                _run(
                    *self.exec(
                        "iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"
                    )
                )
                _run(*self.exec("iptables", "-P", "INPUT", "DROP"))
            if self.rate_mbit:
                self.limit(self.rate_mbit)
        except BaseException:
            self.close()
            raise
        return self

    def limit(self, rate_mbit: float) -> None:
        """Rate-limit the namespace's uplink (``tc tbf``), now or again."""
        _run(
            *self.exec(
                "tc",
                "qdisc",
                "replace",
                "dev",
                self.ns_if,
                "root",
                "tbf",
                "rate",
                f"{rate_mbit}mbit",
                "burst",
                "32kbit",
                "latency",
                "400ms",
            )
        )
        self.rate_mbit = rate_mbit

    def exec(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: same pid, so signals reach it)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        subprocess.run(
            ["ip", "link", "del", self.host_if], capture_output=True, timeout=30
        )  # gone with the netns, normally

    def __exit__(self, *exc) -> None:
        self.close()


class Forward:
    """Relays TCP connections to ``host:port`` (``listen_ip``:``self.port`` -> 127.0.0.1:``target_port``), from a
    thread."""

    def __init__(self, listen_ip: str, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.server = socket.create_server((listen_ip, 0))
        self.port = self.server.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Forward":
        self.server.settimeout(0.5)
        self._spawn(self._accept)
        return self

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                self._spawn(self._pump, a, b)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(1.0)
        try:
            while not self._stop.is_set():
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            source.close()  # each socket is the source of one pump

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.server.close()
        for thread in self._threads:
            thread.join(timeout=3)


@contextlib.contextmanager
def reaching_the_swarm(swarm, ns: Namespace):
    """The environment of a miner inside ``ns``: the swarm's bootstrap and Redis, which listen on this
    machine's loopback, relayed to ``ns.host_ip`` for as long as the block runs."""
    redis = urllib.parse.urlsplit(swarm.role_urls["miner"])
    with (
        Forward(ns.host_ip, urllib.parse.urlsplit(swarm.bootstrap_url).port) as boot,
        Forward(ns.host_ip, redis.port) as store,
    ):
        yield {
            "HIVE_BOOTSTRAP_URL": f"http://{ns.host_ip}:{boot.port}",
            "HIVE_REDIS_URL": swarm.role_urls["miner"].replace(
                f"@127.0.0.1:{redis.port}/", f"@{ns.host_ip}:{store.port}/"
            ),
        }


@contextlib.contextmanager
def fault_swarm(ns: Namespace, tmp_path, run_id: str, miners: int, env: dict, listen_ip: str | None = None):
    """A tiny swarm of ``miners`` (no validator) whose DHT peers listen at ``listen_ip`` (``ns.host_ip`` unless
    given), where ``ns`` reaches them; yields it, started, and the environment a miner inside ``ns`` needs
    (``reaching_the_swarm``). Stopped at the end, and checked to have left nothing behind."""
    settings = SwarmSettings(
        miners=miners,
        workdir=str(tmp_path),
        preset="tiny",
        bootstrap_port=0,
        validator=False,
        run_id=run_id,
        stop_timeout=45,
    )
    swarm = Swarm(settings, extra_env={**env, "HIVE_HOST_MADDRS": f'["/ip4/{listen_ip or ns.host_ip}/tcp/0"]'})
    try:
        swarm.start()
        with reaching_the_swarm(swarm, ns) as reached:
            yield swarm, reached
    finally:
        stop_and_check(swarm)
