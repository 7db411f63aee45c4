"""Authentication of HTTP requests: every request runs as a user (cf. login binding a uid to a session).

The key travels as `Authorization: Bearer KEY` (what OpenAI and Letta clients
send) or `X-API-Key: KEY`. It is checked, in order, against the server's own
`--api-key` and its per-boot local key (both: the local admin), then the
hashed keys of `llmos users add`. Guarantees:

- while no key is configured (no `--api-key`, no user added) every request is
  the local user, as before users existed, whatever header it carries;
- once one is, a request without a valid key gets 401 in OpenAI's error shape
  and reaches no route (only /health, /metrics and /version stay open);
- a user removed while the server runs is refused from the next request on;
- `request.state.user` is set on every request that reaches a route.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from llmos.kernel.users import LOCAL_USER, User, UserStore

# The dashboard page and its script hold no data (its snapshots are behind the key).
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/dashboard", "/dashboard/dashboard.js",
                        "/dashboard/dashboard.css"})


def request_key(request: Request) -> str | None:
    """The key a request carries: a bearer token, else X-API-Key."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def unauthorized(message: str = "invalid API key") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "authentication_error", "param": None,
                                   "code": "invalid_api_key"}}, status_code=401)


class Authenticator:
    """Maps a request's key to a user."""

    def __init__(self, users: UserStore | None = None, api_key: str | None = None,
                 local_key: str | None = None) -> None:
        self.users, self.api_key, self.local_key = users, api_key, local_key
        self._required = bool(api_key)

    def required(self) -> bool:
        """Whether requests need a key; once true it stays true (users.keys_required never goes back)."""
        if not self._required and self.users is not None:
            self._required = self.users.keys_required()
        return self._required

    def user(self, key: str | None) -> User | None:
        """The user for `key`, or None when the request must be refused."""
        if key is not None:
            for admin_key in (self.api_key, self.local_key):
                if admin_key and hmac.compare_digest(key.encode(), admin_key.encode()):
                    return LOCAL_USER
        if not self.required():
            return LOCAL_USER
        if key is None or self.users is None:
            return None
        return self.users.authenticate(key)


class _AuthMiddleware:
    """Plain ASGI (no per-request task, unlike an `@app.middleware`): authenticate, then pass on."""

    def __init__(self, app: Any, auth: Authenticator) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        if scope["path"] in OPEN_PATHS:
            state["user"] = LOCAL_USER if not self.auth.required() else None
            return await self.app(scope, receive, send)
        key = request_key(Request(scope))
        user = self.auth.user(key)
        if user is None:
            response = unauthorized("missing API key" if key is None else "invalid API key")
            return await response(scope, receive, send)
        state["user"] = user
        await self.app(scope, receive, send)


def install(app: FastAPI, auth: Authenticator) -> None:
    """Authenticate every request of `app` and set `request.state.user`."""
    app.add_middleware(_AuthMiddleware, auth=auth)


def current_user(request: Request) -> User:
    """The authenticated user of a request (a FastAPI dependency)."""
    return request.state.user


CurrentUser = Annotated[User, Depends(current_user)]  # a route parameter: the request's user
