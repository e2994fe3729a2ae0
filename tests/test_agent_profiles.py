"""Profile windows pushed as pprof to a Pyroscope-style ``/ingest`` and a Parca-style ``WriteRaw``
receiver, each decoding what it gets as those servers do (multipart or Connect JSON, then pprof): the
window's span, its name and rate, and the CPU a known process burnt in a known function."""

from __future__ import annotations

import base64
import email.parser
import http.server
import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent import start_agent

from bpfscope.domains.profile.formats import parse_pprof
from bpfscope.domains.profile.profiles import Profile

BURNER = textwrap.dedent(
    """
    import hashlib, time
    def gamma_burn(end):
        h = b"g"
        while time.time() < end:
            h = hashlib.sha256(h).digest()
    gamma_burn(time.time() + 8)
    print(time.process_time())
    """
)


class Receiver(http.server.ThreadingHTTPServer):
    """Keeps (query, profile) for every push, decoded as the server it stands for would."""

    def __init__(self, kind: str) -> None:
        self.pushes: list[tuple[dict, Profile]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                url = urllib.parse.urlparse(self.path)
                if kind == "pyroscope":
                    assert url.path == "/ingest"
                    head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                    form = email.parser.BytesParser().parsebytes(head + body)
                    (part,) = [
                        p
                        for p in form.get_payload()
                        if p.get_param("name", header="content-disposition") == "profile"
                    ]
                    raw, query = part.get_payload(decode=True), dict(urllib.parse.parse_qsl(url.query))
                else:
                    assert url.path == "/parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw"
                    (series,) = json.loads(body)["series"]
                    raw = base64.b64decode(series["samples"][0]["rawProfile"])
                    query = {label["name"]: label["value"] for label in series["labels"]["labels"]}
                outer.pushes.append((query, parse_pprof(raw)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(params=["pyroscope", "parca"])
def receiver(request: pytest.FixtureRequest) -> Iterator[tuple[str, Receiver]]:
    server = Receiver(request.param)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield request.param, server
    finally:
        server.shutdown()
        server.server_close()


def test_profiles_pushed_as_pprof(receiver: tuple[str, Receiver], tmp_path: Path) -> None:
    kind, server = receiver
    port = server.server_address[1]
    off = "{enabled: false}"
    agent = start_agent(
        tmp_path,
        f"collectors: {{health: {off}, security: {off}, requests: {off}, profile: {{interval: 2s}}}}\n"
        f'exporters: {{profiles: {{enabled: true, kind: {kind}, endpoint: "http://127.0.0.1:{port}"}}}}\n',
    )
    try:
        burner = subprocess.Popen([sys.executable, "-c", BURNER], stdout=subprocess.PIPE, text=True)
        cpu_s = float(burner.communicate(timeout=60)[0])
        time.sleep(3)
    finally:
        agent.proc.terminate()
        agent.proc.communicate(timeout=60)
    assert len(server.pushes) >= 3
    burnt = 0
    for query, profile in server.pushes:
        if kind == "pyroscope":
            assert query["name"].startswith("process_cpu{") and "service_name=bpfscope" in query["name"]
            assert query["format"] == "pprof" and query["sampleRate"] == "19"
            assert 0 < int(query["until"]) - int(query["from"]) <= 3
        else:
            assert query["__name__"] == "process_cpu" and query["service_name"] == "bpfscope"
        assert profile.kind == "cpu" and profile.samples
        burnt += sum(
            n
            for (thread, frames), n in profile.samples.items()
            if any(f.function == "gamma_burn" for f in frames)
        )
    # At 19 Hz the CPU time the burner had (8 s of a whole CPU on an idle machine: about 150 samples;
    # 3.2 s on this 2-CPU machine at a load average of 8) is worth cpu_s * 19 samples: at least half of
    # them name the Python function (60 of 61 did in a run of `bpfscope profile --unwind fp` here).
    assert burnt >= max(0.5 * 19 * cpu_s, 10), (burnt, cpu_s)
