"""A small HTTP/1.1 load generator: sequential latency and concurrent throughput over keep-alive.

One client for every server measured, so ratios compare servers, not clients. It is a thin asyncio
client over raw sockets (no per-request client library work), because on 2 cores a heavy client
steals the CPU the servers need and adds the same constant to both sides of a ratio.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


class Connection:
    """One keep-alive connection; `request` sends one request and reads the whole reply."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> Reply:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:
            body = await self.reader.read()
            self.close()
            return Reply(status, body)
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(status, body)

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        out = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return out
            out += chunk[:-2]


def post_request(url: str, body: dict | bytes) -> bytes:
    """Raw bytes of a keep-alive POST with a JSON body."""
    parts = urlsplit(url)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


@dataclass
class Latency:
    samples_ms: list[float]

    def quantile(self, q: float) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, int(q * len(s)))]

    @property
    def p50(self) -> float:
        return self.quantile(0.50)

    @property
    def p99(self) -> float:
        return self.quantile(0.99)


async def sequential(url: str, body: dict, num_requests: int, warmup: int = 100) -> Latency:
    """Latency of one request at a time over one keep-alive connection (every reply must be 200)."""
    raw = post_request(url, body)
    conn = Connection(url)
    try:
        for _ in range(warmup):
            _check(await conn.request(raw))
        samples = []
        for _ in range(num_requests):
            start = time.perf_counter()
            reply = await conn.request(raw)
            samples.append((time.perf_counter() - start) * 1e3)
            _check(reply)
        return Latency(samples)
    finally:
        conn.close()


@dataclass
class Load:
    seconds: float
    rows_per_request: int
    statuses: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    latency: Latency = field(default_factory=lambda: Latency([]))

    @property
    def ok(self) -> int:
        return self.statuses[200]

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.failures.values())

    @property
    def predictions_per_s(self) -> float:
        return self.ok * self.rows_per_request / self.seconds

    @property
    def success_rate(self) -> float:
        return self.ok / self.total if self.total else 0.0


async def concurrent(
    url: str,
    bodies: list[dict],
    rows_per_request: int,
    concurrency: int,
    seconds: float,
    *,
    retries: int = 0,
) -> Load:
    """`concurrency` connections sending back to back for `seconds`.

    A connection error or a 5xx counts as a failure unless a retry (up to `retries`, on a fresh
    connection) succeeds: `retries=0` measures the server alone.
    """
    raws = [post_request(url, b) for b in bodies]
    load = Load(seconds, rows_per_request)
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(k: int) -> None:
        conn = Connection(url)
        i = k
        while time.perf_counter() < deadline:
            raw = raws[i % len(raws)]
            i += concurrency
            start = time.perf_counter()
            for attempt in range(retries + 1):
                try:
                    reply = await conn.request(raw)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    conn.close()
                    outcome: int | str = type(exc).__name__
                else:
                    outcome = reply.status
                if outcome == 200 or (isinstance(outcome, int) and outcome < 500) or attempt == retries:
                    break
            if isinstance(outcome, int):
                load.statuses[outcome] += 1
            else:
                load.failures[outcome] += 1
            load.latency.samples_ms.append((time.perf_counter() - start) * 1e3)
        conn.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    load.seconds = time.perf_counter() - started
    return load


def _check(reply: Reply) -> None:
    if reply.status != 200:
        raise RuntimeError(f"benchmark request failed: {reply.status} {reply.body[:200]!r}")


def post_until(url: str, body: dict, *, accept=None, timeout_s: float = 60.0, every_s: float = 0.2) -> dict:
    """POST until the server answers 200 with a JSON body `accept` approves; returns that body.

    For a service that is starting or hot-reloading: refused connections and non-200 answers are
    retried until `timeout_s`, then the last answer is reported (RuntimeError: the system's failure).
    """

    async def once() -> Reply:
        conn = Connection(url)
        try:
            return await conn.request(post_request(url, body))
        finally:
            conn.close()

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            reply = asyncio.run(once())
            if reply.status == 200:
                answer = reply.json()
                if accept is None or accept(answer):
                    return answer
                last = f"200 {str(answer)[:300]}"
            else:
                last = f"HTTP {reply.status}: {reply.body[:300]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"POST {url}: no accepted answer within {timeout_s:.0f} s (last: {last})")
        time.sleep(every_s)
