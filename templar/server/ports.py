"""Ports and addresses for the servers Templar starts: the defaults Triton listens on, free ports for tests and
side-by-side servers, and host:port formatting (IPv6 in brackets)."""

from __future__ import annotations

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


def free_ports(count: int, host: str = DEFAULT_HOST) -> list[int]:
    """`count` distinct free ports. The sockets are held until all are chosen: ports picked one at a time can repeat
    (the kernel may hand out a just-released port again), and a server given one port twice refuses to start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = DEFAULT_HOST) -> int:
    return free_ports(1, host)[0]


def free_server_ports(host: str = DEFAULT_HOST) -> dict[str, int]:
    """Distinct free gRPC, HTTP and metrics ports, as EmbeddedTriton's keyword arguments."""
    return dict(zip(("grpc_port", "http_port", "metrics_port"), free_ports(3, host)))
