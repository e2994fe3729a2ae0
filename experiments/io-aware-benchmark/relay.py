#!/usr/bin/env python3
"""A network delay: every IP packet routed through the namespace it runs in is held a fixed time.

netem (the kernel's delay qdisc) is not built on these machines, so the delay is made here: the
namespace's policy routing sends every packet that arrives from its two links into a TUN device; this
program reads each one, holds it DELAY ms, and writes it back into the TUN device, whence the kernel
routes it on as usual (rig.py sets up the namespace and routes). Addresses and ports are unchanged: a
connection through the delay is the same connection at both ends.

    python3 relay.py DEVICE DELAY_MS

It runs as SCHED_FIFO (it is the experiment's instrument: its own waits for a CPU must not add to the
delay it injects) and prints "ready" once the device is open.
"""

from __future__ import annotations

import collections
import fcntl
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def main() -> None:
    device, delay_ms = sys.argv[1], float(sys.argv[2])
    delay_ns = int(delay_ms * 1e6)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI))
    print("ready", flush=True)
    held: collections.deque[tuple[int, bytes]] = collections.deque()
    while True:
        now = time.monotonic_ns()
        while held and held[0][0] <= now:
            os.write(fd, held.popleft()[1])
        # select() waits to the microsecond (poll and epoll round up to milliseconds).
        timeout = None if not held else max(0.0, (held[0][0] - now) / 1e9)
        if select.select([fd], [], [], timeout)[0]:
            arrived = time.monotonic_ns()
            while True:
                try:
                    held.append((arrived + delay_ns, os.read(fd, 65536)))
                except BlockingIOError:
                    break


if __name__ == "__main__":
    main()
