"""SSH transport (paramiko): strict host keys, key auth, tuned for bulk reads.

Every paramiko/socket exception is mapped to memdump's error tree here, once, by
``map_ssh_error``; nothing above this module sees a paramiko type.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import paramiko
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message
from paramiko.packet import Packetizer
from paramiko.ssh_exception import ConfigParseError, IncompatiblePeer

from memdump.errors import (
    AuthenticationError,
    CommandTimeoutError,
    ConnectError,
    HostKeyError,
    MemdumpError,
    OutputTooLargeError,
    StreamInterruptedError,
    StreamStalledError,
    TransportError,
)
from memdump.settings import HypervisorConfig, SSHTuning
from memdump.transport.base import ByteStream, CommandResult, sh_command_line
from memdump.transport.process import start_stream


def map_ssh_error(exc: BaseException, *, host: str, op: str) -> MemdumpError:
    """Map a paramiko or socket exception to memdump's error tree (most specific first)."""
    fields: dict[str, Any] = {"host": host, "op": op, "cause": type(exc).__name__}
    if isinstance(exc, MemdumpError):
        return exc
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(
            f"{host}: host key mismatch: got {exc.key.get_name()} "
            f"{exc.key.fingerprint}, known_hosts has {exc.expected_key.fingerprint}",
            **fields,
        )
    if isinstance(exc, paramiko.AuthenticationException):
        return AuthenticationError(f"{host}: authentication failed: {exc}", **fields)
    if isinstance(exc, paramiko.ChannelException):
        # The server refused a channel (e.g. MaxSessions): a later attempt may get one.
        return ConnectError(f"{host}: channel refused: {exc}", **fields)
    if isinstance(exc, IncompatiblePeer | ConfigParseError):
        return TransportError(f"{host}: {exc}", **fields)
    if isinstance(exc, TimeoutError | socket.timeout):
        return ConnectError(f"{host}: timed out during {op}", **fields)
    if isinstance(exc, paramiko.SSHException | EOFError):
        if op == "stream":
            return StreamInterruptedError(f"{host}: stream interrupted: {exc}", **fields)
        return ConnectError(f"{host}: SSH failure during {op}: {exc}", **fields)
    if isinstance(exc, OSError):  # includes NoValidConnectionsError, ConnectionRefused
        if op == "stream":
            return StreamInterruptedError(f"{host}: connection lost: {exc}", **fields)
        return ConnectError(f"{host}: cannot connect: {exc}", **fields)
    return TransportError(f"{host}: unexpected {type(exc).__name__} during {op}: {exc}", **fields)


class _RejectUnknownHost(paramiko.RejectPolicy):
    """RejectPolicy, raising memdump's error with the fingerprint the operator must check."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise HostKeyError(
            f"{hostname}: host key {key.get_name()} {key.fingerprint} is not in known_hosts; "
            "refusing to connect",
            host=hostname,
            fingerprint=key.fingerprint,
        )


def _packetizer_class(rekey_bytes: int) -> type[Packetizer]:
    class _Packetizer(Packetizer):
        REKEY_BYTES = rekey_bytes
        REKEY_PACKETS = rekey_bytes
        REKEY_BYTES_OVERFLOW_MAX = rekey_bytes

    return _Packetizer


class SSHTransport:
    def __init__(self, hv: HypervisorConfig, tuning: SSHTuning) -> None:
        hv.check_complete()
        assert hv.host is not None and hv.key_file is not None  # noqa: S101 - checked
        self._hv = hv
        self._host: str = hv.host
        self._tuning = tuning
        self._client: paramiko.SSHClient | None = None
        # Two threads may run commands at once (a live capture's preflight beside the
        # snapshot): one connection between them, made once.
        self._connect_lock = threading.Lock()
        self.description = f"ssh://{hv.user}@{hv.host}:{hv.port}"

    # -- connection ----------------------------------------------------------------------

    def _transport_factory(self, sock: socket.socket, **kwargs: Any) -> paramiko.Transport:
        t = paramiko.Transport(
            sock,
            default_window_size=self._tuning.window_size,
            default_max_packet_size=self._tuning.max_packet_size,
            packetizer_class=_packetizer_class(self._tuning.rekey_bytes),
            **kwargs,
        )
        opts = t.get_security_options()
        available = set(opts.ciphers)
        preferred = [c for c in self._tuning.ciphers if c in available]
        opts.ciphers = tuple(preferred + [c for c in opts.ciphers if c not in preferred])
        return t

    def _connected(self) -> paramiko.SSHClient:
        with self._connect_lock:
            return self._connect()

    def _connect(self) -> paramiko.SSHClient:
        if self._client is not None:
            t = self._client.get_transport()
            if t is not None and t.is_active():
                return self._client
            self.close()
        hv = self._hv
        assert hv.known_hosts is not None and hv.key_file is not None  # noqa: S101
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(hv.known_hosts))
            client.set_missing_host_key_policy(_RejectUnknownHost())
            pkey = paramiko.PKey.from_path(
                hv.key_file,
                hv.key_passphrase.get_secret_value() if hv.key_passphrase else None,
            )
            sock = socket.create_connection(
                (self._host, hv.port), timeout=self._tuning.connect_timeout_sec
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.connect(
                self._host,
                port=hv.port,
                username=hv.user,
                pkey=pkey,
                sock=sock,
                timeout=self._tuning.connect_timeout_sec,
                banner_timeout=self._tuning.connect_timeout_sec,
                auth_timeout=self._tuning.connect_timeout_sec,
                allow_agent=False,
                look_for_keys=False,
                transport_factory=self._transport_factory,  # type: ignore[arg-type]
            )
        except BaseException as exc:
            client.close()
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise map_ssh_error(exc, host=self._host, op="connect") from exc
        t = client.get_transport()
        if t is not None and self._tuning.keepalive_sec:
            t.set_keepalive(self._tuning.keepalive_sec)
        self._client = client
        return client

    def host_key_fingerprint(self) -> str:
        t = self._connected().get_transport()
        if t is None:  # pragma: no cover - _connected returns an active transport
            return ""
        key = t.get_remote_server_key()  # checked against known_hosts on connect
        return f"{key.get_name()} {key.fingerprint}"

    def _open_channel(self, command: str, op: str, stdin: bytes = b"") -> paramiko.Channel:
        client = self._connected()
        try:
            t = client.get_transport()
            assert t is not None  # noqa: S101 - _connected returned an active one
            chan = t.open_session(timeout=self._tuning.connect_timeout_sec)
            chan.exec_command(command)
            if stdin:  # secrets (a dump's token) go here, never on the command line
                chan.sendall(stdin)
            chan.shutdown_write()
            return chan
        except Exception as exc:
            raise map_ssh_error(exc, host=self._host, op=op) from exc

    # -- Transport protocol ----------------------------------------------------------------

    def run(
        self, script: str, args: Sequence[str] = (), *, timeout: float = 60.0, stdin: bytes = b""
    ) -> CommandResult:
        chan = self._open_channel(sh_command_line(script, args), "run", stdin)
        out, err = bytearray(), bytearray()
        caps = (self._tuning.run_max_stdout_bytes, self._tuning.run_max_stderr_bytes)
        deadline = time.monotonic() + timeout
        try:
            while True:
                # Checked on every turn, data or not: a peer that never stops writing
                # must not outrun the deadline.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandTimeoutError(
                        f"{self._host}: command did not finish within {timeout:.0f}s",
                        host=self._host,
                        op="run",
                        timeout=timeout,
                    )
                if chan.recv_ready():
                    self._take(out, chan.recv(_room(out, caps[0])), "stdout", caps[0])
                elif chan.recv_stderr_ready():
                    self._take(err, chan.recv_stderr(_room(err, caps[1])), "stderr", caps[1])
                elif chan.exit_status_ready():
                    # The server sends all output before the exit status.
                    break
                elif chan.closed or not chan.get_transport().is_active():
                    raise ConnectError(
                        f"{self._host}: connection closed before the command finished",
                        host=self._host,
                        op="run",
                    )
                else:
                    chan.status_event.wait(min(0.005, remaining))
            while chan.recv_ready():
                self._take(out, chan.recv(_room(out, caps[0])), "stdout", caps[0])
            while chan.recv_stderr_ready():
                self._take(err, chan.recv_stderr(_room(err, caps[1])), "stderr", caps[1])
            rc = chan.recv_exit_status()
        except MemdumpError:
            _signal_remote(chan)
            raise
        except Exception as exc:
            _signal_remote(chan)
            raise map_ssh_error(exc, host=self._host, op="run") from exc
        finally:
            chan.close()
        return CommandResult(rc, bytes(out), bytes(err))

    def _take(self, buf: bytearray, data: bytes, stream: str, cap: int) -> None:
        buf += data
        if len(buf) > cap:
            raise OutputTooLargeError(
                f"{self._host}: command wrote more than {cap} bytes to {stream}; stopped",
                host=self._host,
                op="run",
                stream=stream,
                limit=cap,
            )

    def stream(self, script: str, args: Sequence[str] = (), *, stdin: bytes = b"") -> ByteStream:
        command = sh_command_line(script, args)
        if self._use_openssh():
            return start_stream(
                self._openssh_argv(command),
                stall=self._tuning.stall_timeout_sec,
                what=self._host,
                check_exit=self._check_openssh_exit,
                stdin=stdin,
            )
        chan = self._open_channel(command, "stream", stdin)
        chan.settimeout(self._tuning.stall_timeout_sec)
        return _SSHByteStream(chan, self._host, self._tuning)

    # -- OpenSSH client for bulk streams -------------------------------------------------

    def _use_openssh(self) -> bool:
        # BatchMode cannot ask for a passphrase: such keys stream through paramiko.
        return (
            self._tuning.stream_client == "openssh"
            and self._hv.key_passphrase is None
            and shutil.which("ssh") is not None
        )

    def _openssh_argv(self, command: str) -> list[str]:
        hv, t = self._hv, self._tuning
        opts = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",  # unknown or changed host key: refuse
            "UserKnownHostsFile": str(hv.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "ForwardAgent": "no",
            "ForwardX11": "no",
            "ClearAllForwardings": "yes",
            "Ciphers": ",".join(t.ciphers),
            "ConnectTimeout": str(max(1, int(t.connect_timeout_sec))),
            "ServerAliveInterval": str(t.keepalive_sec),
            "ServerAliveCountMax": "3",
            "LogLevel": "ERROR",
        }
        argv = ["ssh", "-F", "/dev/null", "-T", "-i", str(hv.key_file), "-p", str(hv.port)]
        for key, value in opts.items():
            argv += ["-o", f"{key}={value}"]
        return [*argv, "-l", hv.user, "--", self._host, command]

    def _check_openssh_exit(self, rc: int, stderr: bytes) -> None:
        """ssh exits 255 for its own failures (the remote scripts never do)."""
        if rc != 255:
            return
        text = stderr.decode("utf-8", "replace").strip()
        fields: dict[str, Any] = {"host": self._host, "op": "stream", "stderr": text[-2000:]}
        if "Host key verification failed" in text or "HOST IDENTIFICATION HAS CHANGED" in text:
            raise HostKeyError(f"{self._host}: host key verification failed: {text}", **fields)
        if "Permission denied" in text:
            raise AuthenticationError(f"{self._host}: authentication failed: {text}", **fields)
        if any(s in text for s in ("Connection refused", "timed out", "No route", "resolve")):
            raise ConnectError(f"{self._host}: cannot connect: {text}", **fields)
        raise StreamInterruptedError(f"{self._host}: ssh connection lost: {text}", **fields)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _room(buf: bytearray, cap: int) -> int:
    """How much to ask for: one byte past the cap at most, so going over is seen without
    ever holding more than cap + 1 bytes."""
    return max(1, min(1 << 20, cap + 1 - len(buf)))


def _signal_remote(chan: paramiko.Channel, name: str = "TERM") -> None:
    """Ask sshd to signal the command's process group (RFC 4254 6.9 "signal") before the
    channel closes: a command that stopped writing would not notice the close (a writer
    dies of SIGPIPE). OpenSSH honours it for non-root logins only (root sessions run
    without privilege separation); paramiko has no client-side API for it."""
    if chan.closed:
        return
    with contextlib.suppress(Exception):  # best effort on a connection that may be gone
        m = Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(chan.remote_chanid)
        m.add_string("signal")
        m.add_boolean(False)
        m.add_string(name)
        chan.transport._send_user_message(m)  # type: ignore[union-attr]


class _SSHByteStream:
    def __init__(self, chan: paramiko.Channel, host: str, tuning: SSHTuning) -> None:
        self._chan = chan
        self._host = host
        self._recv_size = tuning.recv_size
        self._stall = tuning.stall_timeout_sec

    def read(self) -> bytes:
        return self.read_at_most(self._recv_size)

    def readinto(self, view: memoryview) -> int:
        data = self.read_at_most(len(view))
        view[: len(data)] = data
        return len(data)

    def read_at_most(self, n: int) -> bytes:
        try:
            return self._chan.recv(min(n, self._recv_size))
        except TimeoutError as exc:
            raise StreamStalledError(
                f"{self._host}: no data for {self._stall:.0f}s", host=self._host, op="stream"
            ) from exc
        except Exception as exc:
            raise map_ssh_error(exc, host=self._host, op="stream") from exc

    def finish(self, timeout: float) -> CommandResult:
        chan = self._chan
        if not chan.status_event.wait(timeout):
            chan.close()
            raise StreamInterruptedError(
                f"{self._host}: no exit status within {timeout:.0f}s after the stream ended",
                host=self._host,
                op="stream",
            )
        err = bytearray()
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(1 << 20)
        rc = chan.exit_status
        chan.close()
        if rc == -1:
            # paramiko's value when the channel closed without an exit-status message.
            raise StreamInterruptedError(
                f"{self._host}: connection closed before the remote command exited",
                host=self._host,
                op="stream",
                stderr=err.decode("utf-8", "replace")[-2000:],
            )
        return CommandResult(rc, b"", bytes(err))

    def abort(self) -> None:
        # Best effort on a connection that may already be dead: paramiko can raise
        # (EOFError, socket errors) while sending the close, and an abort must not turn
        # the error that caused it into another one.
        with contextlib.suppress(Exception):
            self._chan.close()
