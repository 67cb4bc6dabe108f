"""``edge-serve``: the phone page from the installed package, over plain HTTP, read-only.

A Pi in the clinic serves ``edge_runtime/webapp/`` (the page, its runtime files built at install) and the phone
model with its card from ``edge_runtime/models/`` under ``/model/``; a phone opens it once and then works offline
(its service worker keeps every file). Nothing is ever written: GET and HEAD only, no directory listing, no path
outside those folders, no upload endpoint. A file with a ``.gz`` sibling is sent compressed to a browser that
accepts gzip (the wasm and opencv.js shrink to about a third).

Service workers (offline use) and the page's own SHA-256 check need a secure context: ``http://localhost`` is
one, ``http://<the Pi's address>`` is not; ``--certfile/--keyfile`` serve HTTPS for the second case.
"""
from __future__ import annotations

import gzip
import http.server
import mimetypes
import os
import posixpath
import socket
import ssl
import sys
import urllib.parse
from functools import partial
from pathlib import Path
from typing import Optional

import click

from .console import QUIET, common_options
from .webapp_data import CARD, MODELS_DIR, PHONE_MODEL, WEBAPP_DIR

TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
         ".webmanifest": "application/manifest+json", ".json": "application/json", ".html": "text/html; charset=utf-8",
         ".css": "text/css", ".svg": "image/svg+xml", ".tflite": "application/octet-stream", ".png": "image/png",
         ".jpg": "image/jpeg", ".txt": "text/plain; charset=utf-8"}
# The model folder's files the page may fetch (the rest of the bundle is not the phone's business).
MODEL_FILES = (PHONE_MODEL, CARD)
MODEL_PREFIX = "/model/"
# Headers on every answer: nothing from another origin, no sniffing.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Resource-Policy": "same-origin"}


def resolve(url_path: str, root: Path = WEBAPP_DIR, models: Path = MODELS_DIR) -> Optional[Path]:
    """The file a URL path names, or None: ``/`` is index.html; a path with ``..``, a backslash, a NUL, a hidden
    part or a folder is refused; only the phone model and its card are served from the models folder."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path)
    if "\\" in path or "\x00" in path:
        return None
    if path == "/":
        path = "/index.html"
    if path.startswith(MODEL_PREFIX):
        name = path[len(MODEL_PREFIX):]
        return models / name if name in MODEL_FILES and (models / name).is_file() else None
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") or p.startswith(".") or p == "__pycache__" for p in parts):
        return None
    if posixpath.normpath(path) != path:
        return None
    candidate = root.joinpath(*parts)
    try:
        candidate.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    if candidate.is_file() or Path(str(candidate) + ".gz").is_file():
        return candidate
    return None


class Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of the page's files; everything else 405, anything missing (or a folder) 404."""
    server_version = "edge-serve"
    sys_version = ""
    root: Path = WEBAPP_DIR
    models: Path = MODELS_DIR
    quiet = False

    def _refuse(self, code: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if code == 405:
            self.send_header("Allow", "GET, HEAD")
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send(self, head_only: bool) -> None:
        path = resolve(self.path, self.root, self.models)
        if path is None:
            self._refuse(404, "not found")
            return
        gz = Path(str(path) + ".gz")
        accepts = "gzip" in self.headers.get("Accept-Encoding", "")
        if gz.is_file() and (accepts or not path.is_file()):
            body = gz.read_bytes()
            if not accepts:
                body, encoded = gzip.decompress(body), False
            else:
                encoded = True
        else:
            body, encoded = path.read_bytes(), False
        kind = TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if encoded:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Vary", "Accept-Encoding")
        self.send_header("Cache-Control", "no-cache")
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's names)
        self._send(False)

    def do_HEAD(self):  # noqa: N802
        self._send(True)

    def _not_allowed(self):
        # Read (and drop) a small body first, so the client gets the answer rather than a reset connection.
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and int(length) <= 1 << 16:
            self.rfile.read(int(length))
        else:
            self.close_connection = True
        self._refuse(405, "read-only: GET and HEAD only")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        if not self.quiet:
            sys.stderr.write("%s - %s\n" % (self.address_string(), format % args))


def make_server(host: str, port: int, quiet: bool = False, root: Path = WEBAPP_DIR,
                models: Path = MODELS_DIR) -> http.server.ThreadingHTTPServer:
    handler = type("EdgeHandler", (Handler,), {"quiet": quiet, "root": root, "models": models})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_cls = type("EdgeServer", (http.server.ThreadingHTTPServer,), {"address_family": family,
                                                                          "daemon_threads": True})
    return server_cls((host, port), handler)


def missing_runtime(root: Path = WEBAPP_DIR) -> list:
    """The built runtime files the page needs that are not installed (``make webapp`` copies them)."""
    need = ["vendor/opencv.js", "vendor/litert/index.js", "vendor/litert/wasm-utils.js"]
    return [n for n in need if not (root / n).is_file() and not (root / (n + ".gz")).is_file()]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 serves the clinic's network (the URL to open is printed).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: any free port, printed).")
@click.option("--certfile", type=click.Path(exists=True, dir_okay=False), help="Serve HTTPS with this certificate "
              "(phones need a secure context for offline use when the address is not localhost).")
@click.option("--keyfile", type=click.Path(exists=True, dir_okay=False), help="The certificate's private key.")
@common_options
def main(host: str, port: int, certfile: Optional[str], keyfile: Optional[str], verbosity: int) -> None:
    """Serve the phone page (take a field photo, get the cells, the calls and the slide result) from this install,
    read-only, with no internet.

    \b
    Examples:
      edge-serve                      # http://127.0.0.1:8765/ on this machine
      edge-serve --host 0.0.0.0       # the clinic's phones open the printed URL
      edge-serve --port 9000 -q
    """
    missing = missing_runtime()
    if missing:
        click.echo(f"edge-serve: the page's runtime files are not installed ({', '.join(missing)}); run "
                   "`make webapp` in the source tree (npm ci and the copy step), then reinstall", err=True)
        sys.exit(1)
    server = make_server(host, port, quiet=verbosity <= QUIET)
    scheme = "http"
    if certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    bound_host, bound_port = server.server_address[:2]
    shown = bound_host
    if bound_host in ("0.0.0.0", "::"):
        try:
            shown = socket.gethostbyname(socket.gethostname())
        except OSError:
            shown = bound_host
    if ":" in shown:
        shown = f"[{shown}]"
    click.echo(f"edge-serve: the phone page is at {scheme}://{shown}:{bound_port}/ (read-only; Ctrl-C stops)",
               err=False)
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
