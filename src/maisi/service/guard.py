"""The ASGI guard in front of every route: body size limit, bearer token and request rate per client."""

from __future__ import annotations

import hmac
import json
import math
import threading
import time
from collections import deque

from maisi.service.config import ServeOptions

OPEN_PATHS = ("/v1/health/",)  # no token, no rate limit: load balancers and probes poll these
PAGE_PATHS = ("/web/",)  # the web page's assets, and "/" itself: no token (the page asks for it), rate limited
WINDOW_S = 60.0


class BodyTooLarge(Exception):
    pass


class RateLimiter:
    """At most `per_minute` requests per client in any 60 s window (a sliding window of timestamps)."""

    def __init__(self, per_minute: float) -> None:
        self.limit = int(per_minute)
        self.seen: dict[str, deque[float]] = {}
        self.lock = threading.Lock()

    def retry_after(self, client: str, now: float | None = None) -> float:
        """0 when the request may go ahead (and it is counted), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self.lock:
            q = self.seen.setdefault(client, deque())
            while q and q[0] <= now - WINDOW_S:
                q.popleft()
            if len(q) >= self.limit:
                return q[0] + WINDOW_S - now
            q.append(now)
            if len(self.seen) > 10_000:  # forget idle clients
                self.seen = {c: d for c, d in self.seen.items() if d and d[-1] > now - WINDOW_S}
            return 0.0


async def _send_json(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: 413 past `max_upload_mb`, 401 without the bearer token (the page excepted), 429 past the
    rate limit."""

    def __init__(self, app, options: ServeOptions) -> None:
        self.app, self.options = app, options
        self.limiter = RateLimiter(options.rate_limit) if options.rate_limit > 0 else None
        self.token = options.token.encode() if options.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.options.max_upload_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode() or "0"
        too_large = f"the request body is larger than this server's limit of {self.options.max_upload_mb:g} MB"
        if length.isdigit() and int(length) > limit:
            return await _send_json(send, 413, too_large)
        path = scope["path"]
        if not path.startswith(OPEN_PATHS):
            page = path == "/" or path.startswith(PAGE_PATHS)
            if self.token is not None and not page and not self._authorised(headers.get(b"authorization", b"")):
                return await _send_json(send, 401, "this server needs a bearer token: send the header "
                                        "'Authorization: Bearer <token>' with the token it was started with",
                                        {"WWW-Authenticate": "Bearer"})
            if self.limiter is not None:
                client = (scope.get("client") or ("?", 0))[0]
                wait = self.limiter.retry_after(client)
                if wait > 0:
                    return await _send_json(send, 429, f"too many requests: at most {self.limiter.limit} per minute "
                                            f"per client; retry in {math.ceil(wait)} s",
                                            {"Retry-After": str(math.ceil(wait))})
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, too_large)

    def _authorised(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.token)
