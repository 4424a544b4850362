"""A router of ``(method, path)`` to async handlers, itself usable as the server's handler."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ._types import (
    ErrorResponder,
    Handler,
    Request,
    Response,
    StreamingResponse,
    json_error_response,
)

__all__ = ["Router"]


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.strip("/").split("/")) if path.strip("/") else ()


def _is_param(segment: str) -> bool:
    return len(segment) > 2 and segment.startswith("{") and segment.endswith("}")


class Router:
    """Map ``(method, path)`` to handlers; paths may hold ``{name}`` segments.

    Static paths are matched first, then patterns in the order they were added. An unknown
    path gets 404 and a known path with another method gets 405 with an ``allow`` header, both
    built by ``error_response``. ``HEAD`` falls back to the ``GET`` handler (the server sends
    no body for it).
    """

    def __init__(self, error_response: ErrorResponder = json_error_response) -> None:
        self._static: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[tuple[str, ...], dict[str, Handler]]] = []
        self._error_response = error_response

    def add(self, method: str, path: str, handler: Handler) -> None:
        """Register ``handler`` for ``method`` on ``path``; raises ValueError on a duplicate."""
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        method = method.upper()
        segments = _split(path)
        if any(_is_param(s) for s in segments):
            existing = [m for pattern, m in self._patterns if pattern == segments]
            methods = existing[0] if existing else {}
            if not existing:
                self._patterns.append((segments, methods))
        else:
            methods = self._static.setdefault("/" + "/".join(segments), {})
        if method in methods:
            raise ValueError(f"route {method} {path} is already registered")
        methods[method] = handler

    def route(self, method: str, path: str) -> Callable[[Handler], Handler]:
        """Return a decorator that registers the decorated handler (see ``add``)."""

        def register(handler: Handler) -> Handler:
            self.add(method, path, handler)
            return handler

        return register

    def _match(self, path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
        exact = self._static.get(path)  # the common case, without splitting the path
        if exact is not None:
            return exact, {}
        segments = _split(path)
        static = self._static.get("/" + "/".join(segments))
        if static is not None:
            return static, {}
        for pattern, methods in self._patterns:
            if len(pattern) != len(segments):
                continue
            params: dict[str, str] = {}
            for want, got in zip(pattern, segments, strict=True):
                if _is_param(want):
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return methods, params
        return None

    async def __call__(self, request: Request) -> Response | StreamingResponse:
        """Dispatch ``request``; returns the handler's response, or a 404/405 error response."""
        match = self._match(request.path)
        if match is None:
            return self._error_response(404, f"no route for {request.path}")
        methods, params = match
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            response = self._error_response(405, f"method {request.method} is not allowed here")
            allow = ", ".join(sorted(methods))
            return attrs.evolve(response, headers=(*response.headers, ("allow", allow)))
        if params:
            request = attrs.evolve(request, path_params=params)
        return await handler(request)
