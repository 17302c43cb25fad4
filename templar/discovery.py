"""Endpoint discovery for the reward client: gRPC's `dns:` naming, so one name stands for every replica behind it.

    dns:///templar-rm.templar.svc.cluster.local:8001     the system resolver (a Kubernetes headless Service)
    dns://10.0.0.10:53/templar-rm.templar.svc:8001        ask that DNS server (no port: 53)

`resolve` turns such a target into the `host:port` of every address the name has now (A and AAAA records, sorted,
IPv6 in brackets); the reward client resolves again every `dns_refresh_s` seconds and after a failure, so replicas that
appear get requests and replicas that vanish stop getting them. A plain `host:port` is not a DNS target and stays as
it is. Asking a given server is a small DNS client of its own (RFC 1035 over UDP, no dependency), used where the
system resolver cannot be pointed at another server (tests, a resolver next to the trainer).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from templar.errors import ConfigError, ServingError

DNS_SCHEME = "dns:"
RECORD_TYPES = {1: socket.AF_INET, 28: socket.AF_INET6}  # A, AAAA


@dataclass(frozen=True)
class DnsTarget:
    host: str  # the name to resolve
    port: int  # the gRPC port every address serves on
    server: tuple[str, int] | None = None  # the DNS server to ask; None: the system resolver

    def __str__(self) -> str:
        authority = "" if self.server is None else f"{_bracket(self.server[0])}:{self.server[1]}"
        return f"dns://{authority}/{self.host}:{self.port}"


def is_dns_target(url: str) -> bool:
    return url.strip().startswith(DNS_SCHEME)


def parse_dns_target(url: str) -> DnsTarget:
    """`dns:[//authority/]host:port` (gRPC's naming); a ConfigError names what is wrong."""
    text = url.strip()
    if not text.startswith(DNS_SCHEME):
        raise ConfigError(f"{url!r} is not a dns: target (dns:///host:port)")
    rest = text[len(DNS_SCHEME):]
    server = None
    if rest.startswith("//"):
        authority, _, rest = rest[2:].partition("/")
        if authority:
            server = _host_port(authority, default_port=53, what=f"the DNS server of {url!r}")
    host, port = _host_port(rest, default_port=None, what=url)
    return DnsTarget(host, port, server)


def resolve(target: DnsTarget, timeout_s: float = 2.0) -> list[str]:
    """Every `host:port` the name stands for now, sorted; a ServingError when the name has no address."""
    if target.server is None:
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ServingError(f"{target}: the name does not resolve ({exc.strerror})") from None
        addresses = {info[4][0] for info in infos}
    else:
        addresses = set()
        for record_type in RECORD_TYPES:
            addresses |= set(query(target.server, target.host, record_type, timeout_s))
    if not addresses:
        raise ServingError(f"{target}: the name has no address")
    return sorted(f"{_bracket(a)}:{target.port}" for a in addresses)


def query(server: tuple[str, int], name: str, record_type: int, timeout_s: float = 2.0) -> list[str]:
    """The addresses of one A (1) or AAAA (28) query to `server`, over UDP."""
    ident = int.from_bytes(os.urandom(2), "big")
    question = b"".join(bytes([len(label)]) + label.encode("idna") for label in name.rstrip(".").split("."))
    packet = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + b"\0" + struct.pack(">HH", record_type, 1)
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendto(packet, server)
            reply, _ = sock.recvfrom(4096)
        except OSError as exc:
            raise ServingError(f"DNS server {server[0]}:{server[1]} did not answer for {name}: {exc}") from None
    return _answers(reply, ident, record_type)


def _answers(reply: bytes, ident: int, record_type: int) -> list[str]:
    got, flags, questions, answers = struct.unpack(">HHHH", reply[:8])
    if got != ident or not flags & 0x8000:
        raise ServingError("DNS: a reply to another query")
    rcode = flags & 0xF
    if rcode == 3:  # NXDOMAIN: the name has no records (no replica at all)
        return []
    if rcode:
        raise ServingError(f"DNS: the server answered with error code {rcode}")
    offset = 12
    for _ in range(questions):
        offset = _skip_name(reply, offset) + 4
    found = []
    for _ in range(answers):
        offset = _skip_name(reply, offset)
        kind, _cls, _ttl, length = struct.unpack(">HHIH", reply[offset:offset + 10])
        offset += 10
        if kind == record_type and kind in RECORD_TYPES:
            found.append(socket.inet_ntop(RECORD_TYPES[kind], reply[offset:offset + length]))
        offset += length
    return found


def _skip_name(data: bytes, offset: int) -> int:
    while True:
        length = data[offset]
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return offset + 2
        if length == 0:
            return offset + 1
        offset += length + 1


def _host_port(text: str, *, default_port: int | None, what: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
    if not host:
        raise ConfigError(f"{what}: no host name")
    if not port:
        if default_port is None:
            raise ConfigError(f"{what}: no port (dns:///host:port)")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: port {port!r} is not a port number")
    return host, int(port)


def _bracket(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
