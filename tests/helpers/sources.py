"""A DumpSource of given bytes for pipeline tests: in chunks, slowly, cut mid-stream or
failing at close."""

from __future__ import annotations

import time

from memdump.errors import StreamInterruptedError


class FakeSource:
    def __init__(
        self,
        data: bytes,
        chunk: int = 300_000,
        *,
        fail_at: int | None = None,
        close_error: Exception | None = None,
        delay: float = 0.0,
    ) -> None:
        self.data, self.chunk, self.fail_at = data, chunk, fail_at
        self.close_error, self.delay = close_error, delay
        self.pos = 0
        self.aborted = False
        self.closed_ok = False

    def readinto(self, view: memoryview) -> int:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise StreamInterruptedError("cut", op="stream")
        if self.delay:
            time.sleep(self.delay)
        out = self.data[self.pos : self.pos + min(self.chunk, len(view))]
        self.pos += len(out)
        view[: len(out)] = out
        return len(out)

    def close_ok(self) -> None:
        if self.close_error is not None:
            raise self.close_error
        self.closed_ok = True

    def abort(self) -> None:
        self.aborted = True
