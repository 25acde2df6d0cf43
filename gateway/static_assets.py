"""The live page's files, served so a CDN can front them: content-hashed names, immutable; the page itself revalidated.

At start, :class:`StaticAssets` reads the page's assets from ``gateway/static/`` (ES modules, the stylesheet, the
favicon: every file but the HTML templates), names each by its content (``app.js`` → ``/static/app.<hash>.js``) and
renders ``ticker.html`` with those names: ``{{app.js}}`` becomes the hashed URL and ``{{importmap}}`` an import
map from every module's plain URL to its hashed one, so modules import each other by plain relative names
(``./format.js``) and the browser fetches the hashed files. No build step: the files are served as written.

Caching: a hashed URL never changes content, so it is ``public, max-age=31536000, immutable``; the HTML is
``no-cache`` (revalidated with its ETag on every visit), so a deploy is live at the next page load. A plain name
(``/static/app.js``) is served too, ``no-cache``, for tools and embedders that cannot know the hash. The page
carries a Content-Security-Policy allowing only this origin's scripts (and the import map, by its hash) and
``Referrer-Policy: no-referrer``, because its URL may hold a connection token (``/?token=…``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

STATIC_DIR = Path(__file__).parent / "static"
PAGE_TEMPLATE = "ticker.html"
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
_PLACEHOLDER = re.compile(r"\{\{([A-Za-z0-9_.-]+)\}\}")
_HASH_CHARS = 12  # hex digits of SHA-256 in a file name: collisions between two versions of a file are not a concern


@dataclass(frozen=True, slots=True)
class Asset:
    name: str  # as in gateway/static/, e.g. "app.js"
    hashed: str  # e.g. "app.3f2a9c01b7de.js"
    body: bytes
    media_type: str
    etag: str

    @property
    def url(self) -> str:
        return f"/static/{self.hashed}"


class StaticAssets:
    """The page and its assets, read and hashed once; :meth:`routes` serves them."""

    def __init__(self, directory: Path = STATIC_DIR, template: str = PAGE_TEMPLATE) -> None:
        self.assets: dict[str, Asset] = {}
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.suffix in MEDIA_TYPES:
                body = path.read_bytes()
                digest = hashlib.sha256(body).hexdigest()[:_HASH_CHARS]
                hashed = f"{path.stem}.{digest}{path.suffix}"
                self.assets[path.name] = Asset(path.name, hashed, body, MEDIA_TYPES[path.suffix], f'"{digest}"')
        self._by_hashed = {asset.hashed: asset for asset in self.assets.values()}
        self.import_map = orjson.dumps(
            {
                "imports": {
                    f"/static/{asset.name}": asset.url for asset in self.assets.values() if asset.name.endswith(".js")
                }
            }
        ).decode()
        self.page = self._render((directory / template).read_text(encoding="utf-8")).encode()
        self.page_etag = f'"{hashlib.sha256(self.page).hexdigest()[:_HASH_CHARS]}"'
        script_hash = base64.b64encode(hashlib.sha256(self.import_map.encode()).digest()).decode()
        self.page_headers = {
            "Cache-Control": REVALIDATE,
            "ETag": self.page_etag,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": (
                f"default-src 'self'; script-src 'self' 'sha256-{script_hash}'; style-src 'self'; "
                "img-src 'self' data:; connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'"
            ),
        }

    def url(self, name: str) -> str:
        """The hashed URL of an asset, e.g. ``url("app.js") == "/static/app.<hash>.js"``."""
        return self.assets[name].url

    def _render(self, template: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            key = match.group(1)
            if key == "importmap":
                return self.import_map
            if key not in self.assets:
                raise LookupError(f"{PAGE_TEMPLATE} names {key!r}, which is not in {STATIC_DIR}")
            return self.assets[key].url

        return _PLACEHOLDER.sub(substitute, template)

    # ---- serving ----
    async def serve_page(self, request: Request) -> Response:
        if _matches(request, self.page_etag):
            return Response(status_code=304, headers=self.page_headers)
        return Response(self.page, media_type="text/html; charset=utf-8", headers=self.page_headers)

    async def serve_asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        asset = self._by_hashed.get(name)
        cache = IMMUTABLE
        if asset is None:
            asset = self.assets.get(name)
            cache = REVALIDATE
        if asset is None:
            return Response("not found\n", status_code=404, media_type="text/plain; charset=utf-8")
        headers = {"Cache-Control": cache, "ETag": asset.etag, "X-Content-Type-Options": "nosniff"}
        if _matches(request, asset.etag):
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    async def serve_favicon(self, request: Request) -> Response:
        # Browsers ask for /favicon.ico when a page (or a plain URL such as /livez) names no icon.
        headers = {"Location": self.url("favicon.svg"), "Cache-Control": "max-age=86400"}
        return Response(status_code=308, headers=headers)

    def routes(self) -> list[Route]:
        return [
            Route("/", self.serve_page),
            Route("/static/{name}", self.serve_asset),
            Route("/favicon.ico", self.serve_favicon),
        ]


def _matches(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    return header is not None and (header.strip() == "*" or etag in (tag.strip() for tag in header.split(",")))
