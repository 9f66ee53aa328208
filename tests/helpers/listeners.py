"""Listening TCP sockets and who holds them, read from /proc (independently of
memdump.children, whose port check the tests judge), and a process that holds a port."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def _addr(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def listening(port: int) -> list[tuple[str, str]]:
    """(local address, socket inode) of every TCP socket listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            host, hport = f[1].rsplit(":", 1)
            if int(hport, 16) == port and f[3] == "0A":
                out.append((_addr(host), f[9]))
    return out


def socket_owners(inode: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{p}/fd/{fd}") == f"socket:[{inode}]":
                    out.append(int(p))
                    break
            except OSError:
                continue
    return out


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def hold_port(port: int, host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """A child process listening on ``host:port`` until killed (stop it by its pid)."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket()\n"
        f"s.bind(({host!r}, {port}))\n"
        "s.listen()\n"
        "print('listening', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"listening\n"
    deadline = time.monotonic() + 10
    while not listening(port):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc
