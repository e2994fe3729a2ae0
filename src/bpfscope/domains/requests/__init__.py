"""Requests: every request and response processes exchange over TCP and UDP, plain or TLS (OpenSSL),
captured from socket calls (requests.bpf.c), parsed per protocol (protocols/) and paired, in Pixie's
tables (records.py)."""

TOOLS = {
    "requests": "Each request and its response: HTTP, gRPC, DNS, PostgreSQL, Redis; latency.",
}
