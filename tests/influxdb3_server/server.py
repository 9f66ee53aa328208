"""One public port for HTTP/1.1 and gRPC, like InfluxDB 3's :8181.

An asyncio front accepts every connection and looks at its first bytes: the HTTP/2
connection preface that gRPC clients open with means Arrow Flight, so the connection is
spliced to the pyarrow Flight server on an internal loopback port; anything else is
served as HTTP/1.1 by `http.serve_http`, which lets h11 speak the protocol (keep-alive,
since the client pools connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType

from tests.influxdb3_server.flight import InfluxFlightServer
from tests.influxdb3_server.http import HttpApi, serve_http
from tests.influxdb3_server.store import Store

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_PUBLIC_PATHS = frozenset({"/health", "/api/v1/health"})


class InfluxDB3TestServer:
    """An InfluxDB 3 stand-in for tests: start, stop (an outage), start again on the same port.

    Data lives in `store` and survives stop/start. With ``token=None`` no request is
    authenticated (``influxdb3 serve --without-auth``). `public_paths` are served without a
    token, like ``--disable-authz health``. `read_tokens` may query but not write (403),
    like InfluxDB 3 Enterprise's read-only resource tokens.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = "secret",  # noqa: S107 - a test fixture, not a credential
        public_paths: frozenset[str] = DEFAULT_PUBLIC_PATHS,
        read_tokens: frozenset[str] = frozenset(),
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.read_tokens = read_tokens
        self.store = Store()
        self._api = HttpApi(self.store, token, public_paths, read_tokens)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flight: InfluxFlightServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> InfluxDB3TestServer:
        if self.running:
            raise RuntimeError("the server is already running")
        self._flight = InfluxFlightServer(self.store, self.token, self.read_tokens)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"influxdb3-test-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the port and every open connection, so clients fail at once."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
        if self._flight is not None:
            self._flight.shutdown()
        self._loop = self._thread = self._server = self._flight = None

    def __enter__(self) -> InfluxDB3TestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, reuse_address=True
        )
        # Port 0 picks a free port once; later starts reuse it, as a restarted server would.
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        loop = asyncio.get_running_loop()
        await loop.shutdown_default_executor()  # HTTP handlers still running finish first

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            prefix = await _peek_preface(reader)
            if prefix == HTTP2_PREFACE:
                await self._splice_to_flight(reader, writer, prefix)
            elif prefix:
                await serve_http(reader, writer, prefix, self._api.handle)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _splice_to_flight(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: bytes
    ) -> None:
        assert self._flight is not None
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._flight.port)
        up_writer.write(prefix)
        await asyncio.gather(
            _pump(reader, up_writer), _pump(up_reader, writer), return_exceptions=True
        )


async def _peek_preface(reader: asyncio.StreamReader) -> bytes:
    """Read just enough bytes to tell the HTTP/2 preface from an HTTP/1.1 request line."""
    buf = b""
    while len(buf) < len(HTTP2_PREFACE) and HTTP2_PREFACE.startswith(buf):
        chunk = await reader.read(len(HTTP2_PREFACE) - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    finally:
        # One side ending ends the splice: the other pump then sees EOF and stops too.
        dst.close()
