"""Request-rate quotas: token buckets per job token and per client address.

A client that may create jobs and upload multi-GB files must not be able to starve the other
jobs by sheer request volume, so every authenticated request is charged to its job's bucket
and every job creation to the client address's bucket; an empty bucket is a 429 with
`Retry-After`. Buckets live in memory (one web process); the table is bounded, the least
recently used bucket is dropped first (a dropped bucket starts full again, which only errs on
the side of the client).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from medblindtuner.service.errors import TooManyRequests

MAX_BUCKETS = 100_000


class RateLimiter:
    """Token buckets keyed by a string: `rate_per_s` sustained, `burst` at once."""

    def __init__(self, rate_per_s: float, burst: int, what: str) -> None:
        self.rate = float(rate_per_s)
        self.burst = float(max(burst, 1))
        self.what = what
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def charge(self, key: str, cost: float = 1.0) -> None:
        """Take `cost` from `key`'s bucket, or raise 429 saying when to come back."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            level, stamp = self._buckets.pop(key, (self.burst, now))
            level = min(self.burst, level + (now - stamp) * self.rate)
            if level < cost:
                self._buckets[key] = (level, now)
                wait = (cost - level) / self.rate
                raise TooManyRequests(f"too many requests for {self.what}; retry in "
                                      f"{wait:.1f} s", retry_after_s=wait)
            self._buckets[key] = (level - cost, now)
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)

    def exhausted(self, key: str) -> bool:
        """True while `key`'s bucket cannot pay for one request (nothing is charged)."""
        if self.rate <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            level, stamp = self._buckets.get(key, (self.burst, now))
            return min(self.burst, level + (now - stamp) * self.rate) < 1.0

    def retry_after_s(self) -> float:
        return 1.0 / self.rate if self.rate > 0 else 1.0
