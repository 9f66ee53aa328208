"""Request-size limit, enforced while the body is read (Content-Length can lie or be
absent with chunked encoding), so an oversized body is refused before it is buffered."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {"detail": f"Request body too large (max {self.max_bytes} bytes)"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        seen = 0
        over = False
        answered = False

        async def limited_receive() -> Message:
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise _TooLarge
            return msg

        async def guarded_send(msg: Message) -> None:
            # FastAPI turns any error while reading the body into its own 400; once the
            # limit was hit, whatever the app answers is replaced by the 413.
            nonlocal answered
            if over:
                if not answered:
                    answered = True
                    await self._refuse(send)
                return
            answered = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if over and not answered:
            answered = True
            await self._refuse(send)


def json_content_type(headers: Any) -> bool:
    """application/json or any ``+json`` type, parameters (charset) allowed."""
    ctype = str(headers.get("content-type", "")).split(";")[0].strip().lower()
    return ctype == "application/json" or (
        ctype.startswith("application/") and ctype.endswith("+json")
    )
