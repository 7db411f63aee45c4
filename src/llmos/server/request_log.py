"""The server's access log: one line per request at info level, written when its response ends.

Like an OS accounting record, each line says who asked for what and what it
cost: method, path, status, prompt and completion tokens (when the handler
counted them, in `request.state.usage`) and the latency. It is plain ASGI
middleware, so streams are timed to their last byte and a client that leaves
is logged too (status 499).
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("llmos.server")


class RequestLog:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 499  # until a response starts: the client left first

        async def send_and_watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            usage = scope.get("state", {}).get("usage") or {}
            logger.info("%s %s %d tokens_in=%s tokens_out=%s %.3fs", scope["method"], scope["path"], status,
                        usage.get("prompt_tokens", "-"), usage.get("completion_tokens", "-"),
                        time.perf_counter() - start)
