"""What a test's process asked the Prefect server (the ``prefect_requests`` fixture of
tests/api/conftest.py fills it)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Answers after which memdump's trigger (and Prefect's client) send the same request again.
from api.runs import RETRY_STATUS as BUSY


@dataclass
class PrefectRequests:
    """The requests this process sent the Prefect server, in order: ``sent`` as
    "METHOD /path" (the path after the API's, ids written {id}), ``rows`` how many rows
    each answer held (a JSON list's length; None for anything else), ``status`` each
    answer's HTTP status."""

    sent: list[str] = field(default_factory=list)
    rows: list[int | None] = field(default_factory=list)
    status: list[int] = field(default_factory=list)

    def clear(self) -> None:
        self.sent.clear()
        self.rows.clear()
        self.status.clear()

    def plan(self) -> list[str]:
        """``sent`` without the attempts a busy server refused (BUSY) that were made again
        at once: what the caller asked for, whatever the server's load. A loaded test
        server's SQLite answers 503 now and then (CI, 69a8e8a: one trigger's
        create_flow_run sent twice); any other answer, a 404 included, stays."""
        return [
            req
            for i, (req, code) in enumerate(zip(self.sent, self.status, strict=True))
            if not (code in BUSY and self.sent[i + 1 : i + 2] == [req])
        ]

    def rows_of(self, request: str) -> list[int | None]:
        return [n for s, n in zip(self.sent, self.rows, strict=True) if s == request]
