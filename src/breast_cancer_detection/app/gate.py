"""Admission: how many requests may send their body, wait for the model, and run at once."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .limits import ServeLimits
from .refusals import Refused


class Gate:
    """Bounds the work in the server: ``concurrency`` requests run, ``max_queue`` wait, and
    ``max_uploads`` more may be sending their body.

    A request joins the model queue only once its body has arrived, so clients that send
    slowly, or stall, hold an upload place (for at most the upload timeout) and never a
    model slot or a queue place: at most ``concurrency + max_queue`` complete uploads are
    held in memory. Past either bound, requests are refused with 503 instead of piling up.
    """

    def __init__(self, limits: ServeLimits):
        self.concurrency, self.max_queue = limits.max_concurrency, limits.max_queue
        self.max_uploads = limits.max_uploads
        self.admitted = 0
        self.running = 0
        self.uploading = 0
        self.seconds = 1.0  # running mean of the time a request takes, for Retry-After
        self._slots = asyncio.Semaphore(self.concurrency)

    @property
    def waiting(self) -> int:
        """Requests with their body read, waiting for a slot."""
        return self.admitted - self.running

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the recent pace."""
        return max(1, math.ceil(self.seconds * (self.waiting + 1) / self.concurrency))

    @asynccontextmanager
    async def upload(self, timeout: float) -> AsyncIterator[None]:
        """Counts a request in while its body arrives, or refuses it with 503."""
        if self.uploading >= self.max_uploads:
            after = max(1, math.ceil(timeout / 2))
            raise Refused(503, f"the server is busy receiving {self.uploading} other "
                               f"upload(s) (limit {self.max_uploads}); try again in {after} s, "
                               "or raise the limit (bcd serve --max-uploads).",
                          {"Retry-After": str(after)})
        self.uploading += 1
        try:
            yield
        finally:
            self.uploading -= 1

    def refuse_if_full(self) -> None:
        """503 when the queue is full: before a body is read (so a client is not made to send
        megabytes only to be refused), and again when it has arrived."""
        if self.admitted >= self.concurrency + self.max_queue:
            after = self.retry_after()
            raise Refused(503, f"the server is busy ({self.running} request(s) running, "
                               f"{self.waiting} waiting, queue limit {self.max_queue}); try "
                               f"again in {after} s.", {"Retry-After": str(after)})

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Counts the request in for its whole life, or refuses it with 503."""
        self.refuse_if_full()
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Waits for a turn to run (first come, first served)."""
        async with self._slots:
            self.running += 1
            start = time.perf_counter()
            try:
                yield
            finally:
                self.running -= 1
                self.seconds = 0.8 * self.seconds + 0.2 * (time.perf_counter() - start)
