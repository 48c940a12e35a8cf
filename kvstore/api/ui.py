"""The live status page (CONTRACT §9): GET / and GET /ui serve a self-contained page that
polls /cluster and /metrics and shows the cluster as it changes.

The page is plain HTML/CSS/JS shipped in the package (kvstore/api/ui/, package data):
no build step, no external resource. Each answer carries a strict Content-Security-Policy
that allows scripts and styles from this node only and `connect-src *`, so the page can
keep polling the other members (their URLs come from /cluster) when the node it was
loaded from dies; /cluster and /metrics answer with `Access-Control-Allow-Origin: *` for
that (api/app.py).

Imports: aiohttp, importlib.resources (stdlib).
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

# name -> content type; only these files are served (no path is ever built from a request)
ASSETS: dict[str, str] = {
    "index.html": "text/html",
    "ui.js": "text/javascript",
    "ui.css": "text/css",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src *; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # a new version of the page takes effect on reload, never a stale cached script
    "Cache-Control": "no-cache",
}


def _load_assets() -> dict[str, bytes]:
    folder = resources.files("kvstore.api") / "ui"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def add_ui_routes(app: web.Application) -> None:
    """GET /, /ui, /ui/ (the page) and /ui/{name} (its script and style sheet)."""
    files = _load_assets()   # read once: a few kilobytes, served from memory

    def answer(name: str) -> web.Response:
        return web.Response(body=files[name], content_type=ASSETS[name], charset="utf-8",
                            headers=HEADERS)

    async def page(request: web.Request) -> web.Response:
        return answer("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound(reason=f"no such file: /ui/{name}")
        return answer(name)

    r = app.router
    r.add_get("/", page)
    r.add_get("/ui", page)
    r.add_get("/ui/", page)
    r.add_get("/ui/{name}", asset)


__all__ = ["add_ui_routes", "ASSETS", "CSP"]
