"""HTTP routes of the Network's releases, artifacts and root rotations (``ReleaseDesk``).

Operator routes (service token):

- ``PUT  /network/v1/artifacts/{address}`` raw bytes -> ``{"sha256", "size"}`` (400 when the
  bytes do not hash to ``address``)
- ``POST /network/v1/releases`` signed Release envelope -> ``{"release_hash", "version"}``
- ``POST /network/v1/roots`` signed root N+1 envelope -> ``{"version"}``
- ``GET  /network/v1/releases/nodes`` -> what each node last reported about its updates
  (the ``update_status`` of its heartbeats)

Node routes (node session token, like every other node route):

- ``GET /network/v1/nodes/release?root_version=N`` -> ``{"roots": [root envelopes newer than
  N], "release": the current Release envelope or null}``
- ``GET /network/v1/nodes/artifacts/{address}`` -> the artifact bytes (404 unknown)
"""

from __future__ import annotations

import attrs

from resultity_core import InvalidRequestError
from resultity_servers._http import Request, Response

from ._app import NetworkApp
from ._http_util import PREFIX, Reply, error_response
from ._releases import ReleaseDesk

__all__ = ["ReleaseRoutes", "attach_releases", "release_routes"]


class ReleaseRoutes:
    """The release routes of one ``NetworkApp``; ``statuses`` holds the nodes' reports."""

    def __init__(self, app: NetworkApp, desk: ReleaseDesk) -> None:
        self.app = app
        self.desk = desk
        self.statuses = app.update_statuses  # filled by the heartbeat route

    async def put_artifact(self, request: Request) -> Reply:
        address = self.desk.put_artifact(request.path_params["address"], request.body)
        return Response.json({"sha256": address, "size": len(request.body)})

    async def publish_release(self, request: Request) -> Reply:
        digest = self.desk.publish_release(request.body, self.app.clock())
        assert self.desk.release is not None
        return Response.json({"release_hash": digest, "version": self.desk.release.version})

    async def publish_root(self, request: Request) -> Reply:
        root = self.desk.publish_root(request.body, self.app.clock())
        coordinator = self.app.coordinator
        if coordinator.settings.trust_root is not None:
            coordinator.settings = attrs.evolve(coordinator.settings, trust_root=root)
        return Response.json({"version": root.version})

    async def node_statuses(self, request: Request) -> Reply:
        return Response.json({"data": [dict(v, node_id=k) for k, v in
                                       sorted(self.statuses.items())]})

    async def node_release(self, request: Request) -> Reply:
        self.app._node(request)
        raw = request.query_params().get("root_version", ["0"])[0]
        if not raw.isdigit():
            raise InvalidRequestError("root_version must be a non-negative integer",
                                      param="root_version")
        envelope = self.desk.release_envelope
        return Response.json({
            "_type": "release_pointer",
            "roots": self.desk.roots_after(int(raw)),
            "release": envelope.to_payload() if envelope is not None else None,
        })

    async def node_artifact(self, request: Request) -> Reply:
        self.app._node(request)
        data = self.desk.artifact(request.path_params["address"])
        if data is None:
            return error_response(404, "no artifact with this address", "unknown_artifact")
        return Response(200, (("content-type", "application/octet-stream"),), data)



def attach_releases(app: NetworkApp, desk: ReleaseDesk) -> ReleaseRoutes:
    """Add the release routes (module docstring) to ``app``; returns them."""
    routes = ReleaseRoutes(app, desk)
    table = [
        ("PUT", "/artifacts/{address}", app._service(routes.put_artifact)),
        ("POST", "/releases", app._service(routes.publish_release)),
        ("POST", "/roots", app._service(routes.publish_root)),
        ("GET", "/releases/nodes", app._service(routes.node_statuses)),
        ("GET", "/nodes/release", routes.node_release),
        ("GET", "/nodes/artifacts/{address}", routes.node_artifact),
    ]
    for method, path, handler in table:
        app.router.add(method, PREFIX + path, app._guard(handler))
    setattr(app, "_release_routes", routes)  # noqa: B010 - NetworkApp does not declare it
    return routes


def release_routes(app: NetworkApp) -> ReleaseRoutes | None:
    """Return the release routes attached to ``app`` (its ``desk`` and node reports)."""
    routes = getattr(app, "_release_routes", None)
    return routes if isinstance(routes, ReleaseRoutes) else None
