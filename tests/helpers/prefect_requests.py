"""What a test's process asked the Prefect server (the ``prefect_requests`` fixture of
tests/api/conftest.py fills it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrefectRequests:
    """The requests this process sent the Prefect server, in order: ``sent`` as
    "METHOD /path" (the path after the API's, ids written {id}), ``rows`` how many rows
    each answer held (a JSON list's length; None for anything else)."""

    sent: list[str] = field(default_factory=list)
    rows: list[int | None] = field(default_factory=list)

    def clear(self) -> None:
        self.sent.clear()
        self.rows.clear()

    def rows_of(self, request: str) -> list[int | None]:
        return [n for s, n in zip(self.sent, self.rows, strict=True) if s == request]
