"""Pods named through the Kubernetes API: the node's pods listed with the service account's token, a pod
UID found in a cgroup path named namespace/name, a failed listing keeping the last one; outside a
cluster no API is asked."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator

import pytest

from bpfscope.agent.kubernetes import PodDirectory

PODS = {
    "items": [
        {"metadata": {"uid": "0b6c-uid-a", "namespace": "shop", "name": "cart-7d9f"}},
        {"metadata": {"uid": "0b6c-uid-b", "namespace": "kube-system", "name": "coredns-1"}},
    ]
}


@pytest.fixture
def api() -> Iterator[tuple[str, list]]:
    asked: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append((self.path, self.headers.get("Authorization")))
            if len(asked) > 1:  # the API is away after the first listing
                self.send_response(503)
                self.end_headers()
                return
            body = json.dumps(PODS).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


def test_pods_are_named_from_the_api(api: tuple[str, list]) -> None:
    url, asked = api
    pods = PodDirectory(url, "sa-token", "node-1")
    pods.refresh()
    path, auth = asked[0]
    assert urllib.parse.unquote(path) == "/api/v1/pods?fieldSelector=spec.nodeName=node-1"
    assert auth == "Bearer sa-token"
    event = {"process": {"pod": {"uid": "0b6c-uid-a"}}, "parent": {"pid": 1}}
    assert pods.annotate(event)["process"]["pod"] == {
        "uid": "0b6c-uid-a",
        "namespace": "shop",
        "name": "cart-7d9f",
    }
    pods.refresh()  # refused: the last listing stays
    assert pods.failures == 1 and pods.name("0b6c-uid-b") == {"namespace": "kube-system", "name": "coredns-1"}


def test_outside_a_cluster_no_api_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert PodDirectory.in_cluster("node-1") is None
