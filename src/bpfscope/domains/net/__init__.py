"""Network I/O: TCP connections, retransmits and socket buffers (net.bpf.h: connection keys and socket
owners; conn.py: their user-space side; diag.py: sock_diag in every network namespace)."""

TOOLS = {
    "tcptop": "Top TCP connections by throughput: process, addresses, rx/tx kB.",
    "tcpretrans": "Each TCP retransmit (timeout, fast, TLP, SYN), or counts and % per connection.",
    "tcplife": "Each closed TCP connection: process, addresses, bytes, duration.",
    "tcpconn": "TCP connects, accepts and failures, by process and remote.",
    "sockstat": "Socket queues against their buffers (saturation %), buffer-full events.",
}
RULES = [(80, "health:TcpRule"), (90, "health:SocketBufferRule")]
