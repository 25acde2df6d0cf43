"""The OpenAPI document and /docs (gateway/rest/openapi.py) against the app that serves them: every REST route is
documented and every documented path served; the parameters' documented bounds and enums are exactly what the API
accepts; the error answers a schemathesis run against the demo rarely or never meets (429, 401, 503, 404, 405)
have the documented status, body and headers; authentication shows in the document only when it is on; /docs
renders from this server (the docs extra) or from the pinned CDN copy. Real gateway, real HTTP client."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from starlette.routing import Route

from gateway.app import create_app
from gateway.rest import params
from gateway.rest.openapi import (
    SWAGGER_UI_CDN,
    SWAGGER_UI_CDN_FILES,
    docs_page,
    openapi_document,
    swagger_ui_directory,
)
from shared.broker.memory import MemoryBroker
from shared.candles.memory import MemoryCandleStore
from shared.settings import Settings
from shared.streams import KLINE_INTERVALS
from tests.harness import RunningGateway, running_gateway

SECRET = "an-openapi-test-secret-of-32-bytes!!"
Document = dict[str, Any]


@pytest.fixture
async def gateway() -> AsyncIterator[RunningGateway]:
    async with running_gateway(MemoryBroker(), candles=MemoryCandleStore(), rest_last_value_wait_s="0") as running:
        yield running


async def fetch_document(base: str) -> Document:
    async with httpx.AsyncClient(base_url=base) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document: Document = response.json()
    return document


def resolve(document: Document, node: Any) -> Any:
    """``node`` with its ``$ref`` (one level) followed."""
    if isinstance(node, dict) and "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return target
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    return []


def parameter(document: Document, path: str, name: str) -> Document:
    for entry in document["paths"][path]["get"]["parameters"]:
        resolved: Document = resolve(document, entry)
        if resolved["name"] == name:
            return resolved
    raise AssertionError(f"{path} documents no parameter {name!r}")


def test_every_rest_route_is_documented_and_every_documented_path_is_served() -> None:
    app = create_app(Settings(), MemoryBroker())
    served = {route.path: route.methods for route in app.routes if isinstance(route, Route)}
    rest = {path for path in served if path.startswith("/api/")}
    document = openapi_document()
    assert rest == set(document["paths"]), "a REST route without OpenAPI, or OpenAPI without a route"
    for path, item in document["paths"].items():
        assert set(item) == {"get"}, path
        assert "GET" in (served[path] or set()), path
    assert {"/openapi.json", "/docs"} <= set(served)


def test_every_reference_resolves_and_every_operation_documents_its_answers() -> None:
    document = openapi_document(auth_modes={"apikey", "jwt"})
    for ref in refs(document):
        assert resolve(document, {"$ref": ref}) is not None, ref
    unused = {
        f"#/components/{kind}/{name}" for kind, entries in document["components"].items() for name in entries
    } - set(refs(document))
    assert unused <= {f"#/components/securitySchemes/{name}" for name in ("apiKey", "bearerJwt", "tokenQuery")}
    for path, item in document["paths"].items():
        operation = item["get"]
        assert {"200", "414", "429", "431", "503"} <= set(operation["responses"]), path
        success = operation["responses"]["200"]
        assert set(success["content"]) == {"application/json"}, path
        assert success["headers"]["X-MBX-USED-WEIGHT-1M"] == {"$ref": "#/components/headers/UsedWeight"}
        if path not in ("/api/v3/ping", "/api/v3/time"):
            assert "400" in operation["responses"] and "401" in operation["responses"], path


def test_authentication_is_documented_as_off_unless_it_is_on() -> None:
    off = openapi_document()
    assert all(
        "security" not in item["get"] and "401" not in item["get"]["responses"] for item in off["paths"].values()
    )
    schemes = off["components"]["securitySchemes"]
    assert schemes["apiKey"] == schemes["apiKey"] | {"type": "apiKey", "in": "header", "name": "X-MBX-APIKEY"}
    assert schemes["bearerJwt"] == schemes["bearerJwt"] | {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert all("on this server: off" in scheme["description"] for scheme in schemes.values())
    assert "Authentication is off" in off["info"]["description"]

    jwt_only = openapi_document(auth_modes={"jwt"})
    assert jwt_only["paths"]["/api/v3/ping"]["get"]["security"] == []
    assert jwt_only["paths"]["/api/v3/klines"]["get"]["security"] == [{"bearerJwt": []}, {"tokenQuery": []}]
    assert "on this server: on" in jwt_only["components"]["securitySchemes"]["bearerJwt"]["description"]
    assert "on this server: off" in jwt_only["components"]["securitySchemes"]["apiKey"]["description"]
    both = openapi_document(auth_modes={"apikey", "jwt"})
    assert {"apiKey": []} in both["paths"]["/api/v3/depth"]["get"]["security"]


async def test_the_served_document_is_the_settings_document(gateway: RunningGateway) -> None:
    document = await fetch_document(gateway.http_base)
    assert document["openapi"] == "3.0.3"
    limit = gateway.app.state.rest.limiter.limit
    assert document == openapi_document(weight_limit_per_min=limit, symbols=Settings().symbols)


async def test_documented_bounds_and_enums_are_what_the_api_accepts(gateway: RunningGateway) -> None:
    document = await fetch_document(gateway.http_base)
    klines, depth = "/api/v3/klines", "/api/v3/depth"
    intervals = parameter(document, klines, "interval")["schema"]["enum"]
    assert intervals == list(KLINE_INTERVALS)
    limit = parameter(document, klines, "limit")["schema"]
    start = parameter(document, klines, "startTime")["schema"]
    zones = parameter(document, klines, "timeZone")["schema"]["enum"]
    technical_intervals = parameter(document, "/api/v1/technical/{symbol}", "interval")["schema"]
    depth_limit = parameter(document, depth, "limit")["schema"]
    base = {"symbol": "BTCUSDT", "interval": "1h"}
    accepted: list[tuple[str, dict[str, Any]]] = [
        *((klines, {**base, "interval": interval}) for interval in intervals),
        (klines, {**base, "limit": limit["minimum"]}),
        (klines, {**base, "limit": limit["maximum"]}),
        (klines, {**base, "startTime": start["minimum"], "limit": 1}),
        (klines, {**base, "endTime": start["maximum"], "limit": 1}),
        *((klines, {**base, "timeZone": zone, "limit": 1}) for zone in zones),
        (depth, {"symbol": "BTCUSDT", "limit": depth_limit["maximum"]}),
        *((f"/api/v1/technical/btcusdt?interval={i}", {}) for i in technical_intervals["enum"][:3]),
    ]
    refused: list[tuple[str, dict[str, Any], int]] = [
        (klines, {**base, "interval": "2m"}, -1120),
        (klines, {**base, "limit": limit["minimum"] - 1}, -1130),
        (klines, {**base, "limit": limit["maximum"] + 1}, -1130),
        (klines, {**base, "endTime": start["maximum"] + 1}, -1130),
        (klines, {**base, "timeZone": "+01:00"}, -1130),
        (klines, {"symbol": "btcusdt", "interval": "1h"}, -1100),  # the symbol pattern is upper case
        ("/api/v3/ticker/price", {"symbol": "BTCUSDT", "symbols": '["BTCUSDT"]'}, -1128),
        ("/api/v3/ticker/price", {"symbols": '["' + '","'.join(["BTCUSDT"] * 2) + '"]'}, -1151),
        (depth, {"symbol": "BTCUSDT", "limit": depth_limit["minimum"] - 1}, -1130),
    ]
    async with httpx.AsyncClient(base_url=gateway.http_base) as client:
        for path, query in accepted:
            response = await client.get(path, params=query)
            # 503: documented, when the book or price is not there yet (no ingest here); never a 400
            assert response.status_code in (200, 503), (path, query, response.text)
        for path, query, code in refused:
            response = await client.get(path, params=query)
            assert (response.status_code, response.json()) == (400, response.json() | {"code": code}), (path, query)
    assert technical_intervals["default"] == "1h"
    assert f"cut to {params.DEPTH_MAX_LIMIT}" in parameter(document, depth, "limit")["description"]


def assert_documented(document: Document, path: str, response: httpx.Response) -> None:
    """``response`` has a documented status for ``path``, Binance's error body, and the documented headers."""
    documented = resolve(document, document["paths"][path]["get"]["responses"][str(response.status_code)])
    assert response.headers["content-type"] in documented["content"], response.headers["content-type"]
    body = response.json()
    assert set(body) == {"code", "msg"} and isinstance(body["code"], int) and isinstance(body["msg"], str)
    for name, header in documented.get("headers", {}).items():
        if resolve(document, header).get("required"):
            assert name.lower() in response.headers, (response.status_code, name)


async def test_error_answers_match_the_document(gateway: RunningGateway) -> None:
    document = await fetch_document(gateway.http_base)
    async with httpx.AsyncClient(base_url=gateway.http_base) as client:
        # No ingest: no exchangeInfo and no price yet, so 503 with Retry-After.
        for path, query in [("/api/v3/exchangeInfo", {}), ("/api/v3/ticker/price", {"symbol": "BTCUSDT"})]:
            response = await client.get(path, params=query)
            assert response.status_code == 503 and response.json()["code"] == -1001
            assert_documented(document, path, response)
        response = await client.get("/api/v3/klines", params={"symbol": "NOPE", "interval": "1h"})
        assert response.status_code == 400 and response.json()["code"] == -1121
        assert_documented(document, "/api/v3/klines", response)
        # An empty symbol is no endpoint at all: 404, in Binance's shape like every answer under /api/.
        response = await client.get("/api/v1/technical/")
        assert (response.status_code, response.json()["code"]) == (404, -1020)
        assert_documented(document, "/api/v1/technical/{symbol}", response)
        response = await client.post("/api/v3/ping")
        assert (response.status_code, response.json()["code"]) == (405, -1020)
        assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}
        assert (await client.get("/no/such/page")).text == "Not Found"  # outside /api/: Starlette's own


async def test_the_429_is_documented() -> None:
    async with (
        running_gateway(MemoryBroker(), rest_weight_limit_per_min="3") as running,
        httpx.AsyncClient(base_url=running.http_base) as client,
    ):
        document = await fetch_document(running.http_base)
        assert "3 per minute" in document["components"]["responses"]["TooManyRequests"]["description"]
        statuses = [(await client.get("/api/v3/ping")).status_code for _ in range(3)]
        response = await client.get("/api/v3/time")
        assert statuses == [200, 200, 200] and response.status_code == 429
        assert_documented(document, "/api/v3/time", response)
        assert response.headers["x-mbx-used-weight-1m"] == "3" and int(response.headers["retry-after"]) >= 1


async def test_with_authentication_on_the_document_says_so_and_the_401_matches_it() -> None:
    async with (
        running_gateway(MemoryBroker(), auth="jwt", jwt_secret=SECRET) as running,
        httpx.AsyncClient(base_url=running.http_base) as client,
    ):
        document = await fetch_document(running.http_base)
        assert "Authentication is on" in document["info"]["description"]
        path, query = "/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h"}
        response = await client.get(path, params=query)
        assert (response.status_code, response.json()["code"]) == (401, -2014)
        assert_documented(document, path, response)
        token = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
        for headers, extra in [({"Authorization": f"Bearer {token}"}, {}), ({}, {"token": token})]:
            assert (await client.get(path, params=query | extra, headers=headers)).status_code == 200
        assert (await client.get("/api/v3/ping")).status_code == 200  # documented with security: []


async def test_docs_page_renders_the_document_from_this_server_when_the_docs_extra_is_installed(
    gateway: RunningGateway,
) -> None:
    assets = swagger_ui_directory()
    async with httpx.AsyncClient(base_url=gateway.http_base) as client:
        page = await client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'url: "openapi.json"' in page.text and 'href="openapi.json"' in page.text
        if assets is None:
            assert SWAGGER_UI_CDN in page.text
            return
        assert "cdn" not in page.text.lower()
        for name, media_type in [("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")]:
            asset = await client.get(f"/docs/assets/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
            assert asset.content == (assets / name).read_bytes()
        for name in ["index.html", "..%2F..%2F__init__.py", "swagger-ui.js.map"]:
            assert (await client.get(f"/docs/assets/{name}")).status_code == 404


def test_without_the_docs_extra_the_page_loads_a_pinned_swagger_ui_checked_by_hash() -> None:
    page = docs_page(None)
    assert "swagger-ui-dist@5." in SWAGGER_UI_CDN and "@latest" not in page
    for name, integrity in SWAGGER_UI_CDN_FILES.items():
        assert f'{SWAGGER_UI_CDN}/{name}" integrity="{integrity}" crossorigin="anonymous"' in page
        assert integrity.startswith("sha384-")
