"""Ports and addresses for the servers Templar starts: the defaults Triton listens on, free ports for tests and
side-by-side servers, and host:port formatting (IPv6 in brackets)."""

from __future__ import annotations

import random
import socket

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "metrics": 8002}


def url_host(host: str) -> str:
    """A host as it goes into an address with a port: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def port_available(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself does
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range: the ports outgoing connections (and bind to port 0) are given."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORT_FLOOR = 20000


def free_ports(count: int, host: str = DEFAULT_HOST) -> list[int]:
    """`count` distinct free ports, chosen at random below the kernel's ephemeral range: a port the kernel handed out
    (bind to port 0) is in the range every outgoing connection draws its local port from, so between choosing it and
    the server binding it a client socket on the same machine (another test, another worker) can take it. An IPv6
    host's ports are also checked on the IPv4 loopback, where Triton's HTTP and metrics servers fall back. The
    sockets are held until all are chosen, so one call never returns a port twice."""
    hosts = [host] + ([DEFAULT_HOST] if ":" in host else [])
    ceiling = max(_ephemeral_low(), _PORT_FLOOR + 1000)
    chooser = random.SystemRandom()
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(200 * count):
            if len(ports) == count:
                break
            port = chooser.randrange(_PORT_FLOOR, ceiling)
            sockets = [] if port in ports else _bind_all(hosts, port)
            if sockets:
                held.extend(sockets)
                ports.append(port)
        if len(ports) < count:
            raise OSError(f"found {len(ports)} of {count} free ports between {_PORT_FLOOR} and {ceiling} on {host}")
        return ports
    finally:
        for sock in held:
            sock.close()


def _bind_all(hosts: list[str], port: int) -> list[socket.socket]:
    """Sockets bound to `port` on every host, or [] (and none left open) when one of them is taken."""
    sockets = []
    for host in hosts:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            for other in sockets:
                other.close()
            return []
        sockets.append(sock)
    return sockets


def free_port(host: str = DEFAULT_HOST) -> int:
    return free_ports(1, host)[0]


def free_server_ports(host: str = DEFAULT_HOST) -> dict[str, int]:
    """Distinct free gRPC, HTTP and metrics ports, as EmbeddedTriton's keyword arguments."""
    return dict(zip(("grpc_port", "http_port", "metrics_port"), free_ports(3, host)))
