"""The live page's files over HTTP, as a CDN in front of the gateway would see them: hashed names served immutable,
the HTML revalidated, an import map that leaves no module unhashed, conditional requests, and the security headers
of a page whose URL may carry a token."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.static_assets import IMMUTABLE, STATIC_DIR, StaticAssets
from shared.broker.memory import MemoryBroker
from tests.harness import running_gateway

ASSET_URL = re.compile(r'(?:href|src)="(/static/[^"]+)"')
RELATIVE_IMPORT = re.compile(r'(?:import|from)\s*\(?\s*"(\./[^"]+)"')


def inline_import_map(page: str) -> str:
    match = re.search(r'<script type="importmap">(.*?)</script>', page, re.S)
    assert match is not None, "the page has no import map"
    return match.group(1)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(MemoryBroker()) as gw, httpx.AsyncClient(base_url=gw.http_base) as http:
        yield http


async def test_the_page_is_revalidated_and_names_its_assets_by_content(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert page.headers["referrer-policy"] == "no-referrer"  # the URL may hold ?token=
    assert "{{" not in page.text
    again = await client.get("/", headers={"If-None-Match": page.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")

    urls = ASSET_URL.findall(page.text)
    assert {re.sub(r"\.[0-9a-f]{12}\.", ".", url) for url in urls} >= {
        "/static/app.js",
        "/static/ticker.css",
        "/static/favicon.svg",
    }
    for url in urls:
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["cache-control"] == IMMUTABLE == "public, max-age=31536000, immutable"
        digest = hashlib.sha256(asset.content).hexdigest()[:12]
        assert url.split(".")[-2] == digest, f"{url} is not named by its content"
        assert asset.headers["x-content-type-options"] == "nosniff"
        revalidated = await client.get(url, headers={"If-None-Match": asset.headers["etag"]})
        assert revalidated.status_code == 304


async def test_the_import_map_hashes_every_module_the_page_can_import(client: httpx.AsyncClient) -> None:
    page = (await client.get("/")).text
    import_map = orjson.loads(inline_import_map(page))
    imports: dict[str, str] = import_map["imports"]
    modules = sorted(path.name for path in STATIC_DIR.glob("*.js"))
    assert sorted(name.removeprefix("/static/") for name in imports) == modules
    for module in modules:
        served = await client.get(imports[f"/static/{module}"])
        assert served.headers["content-type"] == "text/javascript; charset=utf-8"
        for target in RELATIVE_IMPORT.findall(served.text):
            # Relative imports resolve next to the module (/static/...), where the map turns them into hashed URLs.
            assert f"/static/{target.removeprefix('./')}" in imports, f"{module} imports {target}, which is not mapped"
    # The Content-Security-Policy lets exactly this inline import map run, and scripts of this origin only.
    csp = (await client.get("/")).headers["content-security-policy"]
    digest = base64.b64encode(hashlib.sha256(inline_import_map(page).encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}'" in csp and "default-src 'self'" in csp


async def test_plain_stale_and_unknown_names(client: httpx.AsyncClient) -> None:
    plain = await client.get("/static/app.js")  # for tools that cannot know the hash: served, but revalidated
    assert (plain.status_code, plain.headers["cache-control"]) == (200, "no-cache")
    assert (await client.get("/static/app.000000000000.js")).status_code == 404  # a previous deploy's name
    assert (await client.get("/static/nope.js")).status_code == 404
    assert (await client.get("/static/ticker.html")).status_code == 404  # the template is not an asset
    icon = await client.get("/favicon.ico")
    assert icon.status_code == 308
    assert re.fullmatch(r"/static/favicon\.[0-9a-f]{12}\.svg", icon.headers["location"])
    svg = await client.get(icon.headers["location"])
    assert svg.headers["content-type"] == "image/svg+xml" and svg.content.startswith(b"<svg")


def test_a_template_naming_a_missing_asset_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text('<script src="{{missing.js}}"></script>')
    with pytest.raises(LookupError, match=r"missing\.js"):
        StaticAssets(tmp_path, "page.html")
