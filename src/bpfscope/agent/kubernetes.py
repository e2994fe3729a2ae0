"""Pods by UID, from the Kubernetes API where it is reachable (in a pod, through its service account),
so that what the agent finds in cgroup paths (a pod's UID, its container's id: sources/cgroups.py) is
named ``namespace/name``. Outside a cluster there is no API and nothing to ask: cgroup paths alone.

The node's pods are listed every ``refresh_s`` seconds in a thread of its own; a failed listing keeps
the last one and is counted.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REFRESH_S = 30.0


class PodDirectory:
    def __init__(
        self, api: str, token: str, node: str, ca_file: str | None = None, refresh_s: float = REFRESH_S
    ) -> None:
        self.api, self.token, self.node, self.refresh_s = api.rstrip("/"), token, node, refresh_s
        self.context = ssl.create_default_context(cafile=ca_file) if api.startswith("https") else None
        self.pods: dict[str, dict[str, str]] = {}  # uid -> namespace, name
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def in_cluster(cls, node: str) -> PodDirectory | None:
        """The API of the cluster this pod runs in, or None outside one."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        token = SERVICE_ACCOUNT / "token"
        if not host or not port or not token.exists():
            return None
        shown = f"[{host}]" if ":" in host else host
        return cls(
            f"https://{shown}:{port}", token.read_text().strip(), node, str(SERVICE_ACCOUNT / "ca.crt")
        )

    def refresh(self) -> None:
        query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={self.node}"})
        request = urllib.request.Request(
            f"{self.api}/api/v1/pods?{query}", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
                items = json.loads(response.read())["items"]
        except (OSError, ValueError, KeyError):
            self.failures += 1
            return
        self.pods = {
            p["metadata"]["uid"]: {"namespace": p["metadata"]["namespace"], "name": p["metadata"]["name"]}
            for p in items
        }

    def start(self) -> None:
        self.refresh()

        def loop() -> None:
            while not self._stop.wait(self.refresh_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="bpfscope-pods", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def name(self, uid: str | None) -> dict[str, str] | None:
        return self.pods.get(uid) if uid else None

    def annotate(self, event: dict[str, Any]) -> dict[str, Any]:
        """A security event's processes with their pod's namespace and name, where the API knows it."""
        for key in ("process", "parent"):
            process = event.get(key) or {}
            pod = process.get("pod")
            if pod and (named := self.name(pod.get("uid"))) is not None:
                pod.update(named)
        return event
