"""orders: an invoice service in Python (CPython 3.11). GET /invoice renders an order of 400 lines as
text: render_invoice -> format_line is its hot path, pure Python.

    python3.11 orders.py PORT
"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VAT = 0.2


def line_total(quantity: int, unit_cents: int) -> int:
    cents = quantity * unit_cents
    return cents + round(cents * VAT)


def format_line(number: int, quantity: int, unit_cents: int) -> str:
    total = line_total(quantity, unit_cents)
    item = f"item-{number * 7919 % 10007}"
    return f"{number:>4} {item:<12} {quantity:>3} x {unit_cents / 100:>8.2f} = {total / 100:>10.2f}"


def render_invoice(order: int) -> str:
    lines = [format_line(n, 1 + (order + n) % 9, 100 + (order * n) % 9900) for n in range(400)]
    return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    wbufsize = 1 << 16  # header and body in one write (apart, they wait out the client's delayed ACK)
    orders = 0

    def do_GET(self) -> None:
        Handler.orders += 1
        body = render_invoice(Handler.orders).encode() if self.path.startswith("/invoice") else b"not found\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
