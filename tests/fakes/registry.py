"""A container registry on loopback that speaks the part of the registry HTTP API (v2) `make submit` uses.

``HEAD /v2/<repository>/manifests/<tag>`` answers 200 for the images it holds and 404 for the others; with
``token_auth`` it first answers 401 with a ``WWW-Authenticate: Bearer realm=...`` challenge and accepts only the
token its ``/token`` endpoint hands out, as hosted registries do.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "pull-token-for-tests"


class FakeRegistry:
    def __init__(self, token_auth: bool = False):
        self.images: set[str] = set()  # "<repository>:<tag>"
        self.token_auth = token_auth
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                registry.requests.append(("GET", self.path, self.headers.get("Authorization")))
                if self.path.startswith("/token"):
                    self._reply(200, {"Content-Type": "application/json"}, json.dumps({"token": TOKEN}).encode())
                else:
                    self._reply(404)

            def do_HEAD(self):
                registry.requests.append(("HEAD", self.path, self.headers.get("Authorization")))
                parts = self.path.split("/manifests/")
                if not self.path.startswith("/v2/") or len(parts) != 2:
                    return self._reply(404)
                repository, tag = parts[0][len("/v2/"):], parts[1]
                if registry.token_auth and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    challenge = (f'Bearer realm="{registry.url}/token",service="fake-registry",'
                                 f'scope="repository:{repository}:pull"')
                    return self._reply(401, {"WWW-Authenticate": challenge})
                if f"{repository}:{tag}" in registry.images:
                    return self._reply(200, {"Docker-Content-Digest": "sha256:" + "0" * 64,
                                             "Content-Type": "application/vnd.oci.image.index.v1+json"})
                self._reply(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeRegistry:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
