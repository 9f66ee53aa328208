"""Every paramiko exception (and the socket errors under it) maps to memdump's tree."""

import inspect

import paramiko
import paramiko.ssh_exception as px
import pytest

from memdump.errors import (
    AuthenticationError,
    ConnectError,
    HostKeyError,
    MemdumpError,
    StreamInterruptedError,
    TransportError,
)
from memdump.transport.ssh import map_ssh_error


def _instances() -> list[BaseException]:
    key = paramiko.RSAKey.generate(1024)
    other = paramiko.RSAKey.generate(1024)
    made: dict[type, BaseException] = {
        px.BadHostKeyException: px.BadHostKeyException("h", key, other),
        px.BadAuthenticationType: px.BadAuthenticationType("no", ["publickey"]),
        px.PartialAuthentication: px.PartialAuthentication(["publickey"]),
        px.UnableToAuthenticate: px.UnableToAuthenticate("no"),
        px.ChannelException: px.ChannelException(2, "open failed"),
        px.ProxyCommandFailure: px.ProxyCommandFailure("cmd", "err"),
        px.NoValidConnectionsError: px.NoValidConnectionsError(
            {("127.0.0.1", 22): ConnectionRefusedError(111, "refused")}
        ),
        px.ConfigParseError: px.ConfigParseError("bad"),
        px.CouldNotCanonicalize: px.CouldNotCanonicalize("h"),
        px.MessageOrderError: px.MessageOrderError("order"),
        px.IncompatiblePeer: px.IncompatiblePeer("kex"),
    }
    out: list[BaseException] = []
    for _, cls in inspect.getmembers(px, inspect.isclass):
        if issubclass(cls, BaseException) and cls.__module__ == px.__name__:
            out.append(made.get(cls) or cls("message"))
    out += [
        TimeoutError("t"),
        TimeoutError("t"),
        ConnectionResetError(104, "reset"),
        EOFError(),
        OSError(113, "no route"),
    ]
    return out


@pytest.mark.parametrize("op", ["connect", "run", "stream"])
def test_every_paramiko_error_is_mapped(op: str) -> None:
    classes = set()
    for exc in _instances():
        mapped = map_ssh_error(exc, host="hv1", op=op)
        assert isinstance(mapped, MemdumpError), type(exc)
        assert mapped.fields["host"] == "hv1"
        assert mapped.fields["cause"] == type(exc).__name__
        classes.add(type(exc))
    # all exception classes paramiko defines were exercised
    defined = {
        c
        for _, c in inspect.getmembers(px, inspect.isclass)
        if issubclass(c, BaseException) and c.__module__ == px.__name__
    }
    assert defined <= classes


def test_specific_mappings() -> None:
    key, other = paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
    hk = map_ssh_error(px.BadHostKeyException("h", key, other), host="h", op="connect")
    assert isinstance(hk, HostKeyError) and not hk.retryable
    au = map_ssh_error(px.AuthenticationException("x"), host="h", op="connect")
    assert isinstance(au, AuthenticationError) and not au.retryable
    ce = map_ssh_error(ConnectionRefusedError(111, "refused"), host="h", op="connect")
    assert isinstance(ce, ConnectError) and ce.retryable
    si = map_ssh_error(px.SSHException("closed"), host="h", op="stream")
    assert isinstance(si, StreamInterruptedError) and si.retryable
    peer = map_ssh_error(px.IncompatiblePeer("x"), host="h", op="connect")
    assert type(peer) is TransportError and not peer.retryable


def test_abort_of_a_stream_on_a_dead_connection_does_not_raise() -> None:
    from memdump.transport.ssh import _SSHByteStream

    class DeadChannel:
        closes = 0

        def close(self) -> None:
            self.closes += 1
            raise EOFError  # what paramiko raised in CI once the socket was gone

    chan = DeadChannel()
    stream = _SSHByteStream.__new__(_SSHByteStream)
    stream._chan = chan  # type: ignore[assignment]
    stream.abort()  # the channel's EOFError is swallowed: abort is a best effort
    assert chan.closes == 1  # ...but the close was tried
