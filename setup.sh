#!/usr/bin/env bash
# Set up bpfscope on a Debian or Ubuntu machine, as root, then run it or its tests.
#
#   ./setup.sh                 install what is missing, then run the main job (bpfscope check)
#   ./setup.sh test [ARGS]     install what is missing (with test tools), then run the tests: the unit
#                              tier (pure Python), then the kernel tier (as root); ARGS go to pytest
#   ./setup.sh run ARGS...     install what is missing, then run `bpfscope ARGS...`
#
# Idempotent: a second run installs nothing and starts at once.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")"
VENV=.venv
mode=${1:-main}
[ $# -gt 0 ] && shift

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (bpfscope loads BPF programs and installs Debian packages)" >&2
    exit 2
fi

# Debian packages: build (clang, libbpf-dev, bpftool), run (libbpf1), the Python environment, and for
# the tests, benchmarks and experiments the peers we compare against (bpftrace, fio, iostat from sysstat,
# iperf3) and the servers and tools the scenarios run (nginx, haproxy, PostgreSQL, nftables, iproute2,
# mkfs.ext4 for a private file system).
packages=(clang libbpf-dev libbpf1 bpftool linux-libc-dev python3 python3-venv python3-pip mount util-linux)
if [ "$mode" = test ]; then
    packages+=(bpftrace fio sysstat libcap2-bin procps iproute2 iperf3 nftables nginx haproxy postgresql-15 e2fsprogs)
    # The profilers' tests build C, Rust and Go programs and compare with perf (and py-spy, from PyPI).
    packages+=(gcc libc6-dev rustc golang-go linux-perf python3.11-dev)
    # bpfscope secure's tests: a real container runtime and a locally built image (debootstrap), the
    # red-team suite's tools (setpriv from util-linux, passwd, dpkg-deb).
    packages+=(podman runc debootstrap passwd)
    # The agent's tests: a real Prometheus scraping it, and its web UI in a real headless Chromium
    # (driven by Playwright from PyPI, which downloads no browser of its own).
    packages+=(prometheus chromium)
    # bpfscope requests's tests and benchmarks: real servers and their clients (Redis and
    # redis-benchmark, MariaDB and mariadb-slap, dnsmasq as a DNS resolver, wrk as an HTTP load generator).
    packages+=(redis-server redis-tools mariadb-server mariadb-client dnsmasq-base wrk)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libbpf attaches classic tracepoints through tracefs, which a fresh machine may not have mounted.
if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing
fi

# Debian's own Python (3.11 on Debian 12) keeps the environment independent of any other Python.
python=/usr/bin/python3
extras=""
[ "$mode" = test ] && extras="[test]"
stamp="$VENV/.installed$extras"
if [ ! -x "$VENV/bin/python" ]; then
    "$python" -m venv "$VENV"
fi
# Reinstall when the sources are newer than the last install (the BPF objects are built by it).
if [ ! -e "$stamp" ] || [ -n "$(find pyproject.toml setup.py src -newer "$stamp" -name '*.py' -o -newer "$stamp" -name '*.c' -o -newer "$stamp" -name '*.h' -o -newer "$stamp" -name '*.toml' | head -1)" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -e ".$extras"
    touch "$stamp"
fi

case "$mode" in
    main) exec "$VENV/bin/bpfscope" check ;;
    run) exec "$VENV/bin/bpfscope" "$@" ;;
    test)
        if [ $# -gt 0 ]; then exec "$VENV/bin/python" -m pytest "$@"; fi
        # The pure-Python tier first (seconds, no kernel), then the kernel tier.
        "$VENV/bin/python" -m pytest -q tests/unit
        exec "$VENV/bin/python" -m pytest -q --ignore=tests/unit ;;
    *) echo "setup.sh: unknown mode '$mode' (use: test, run)" >&2; exit 2 ;;
esac
