#!/usr/bin/env bash
# The eBPF tutorial, end to end: each step prints a heading, what it shows, the command and its real
# output, measured on a workload this script runs itself (files in a temporary directory, removed at
# the end). See README.md beside it for the walkthrough text.
#
#   ./run.sh            every step (about 10 s)
#   ./run.sh 3 5        only steps 3 and 5
#
# Run as root from a checkout in which ./setup.sh has been run (it creates .venv with bpfscope).
# TUTORIAL_TMP picks the directory for the temporary files (default /var/tmp): it must be on a disk,
# not tmpfs, for the block I/O steps to see any I/O.
set -euo pipefail

HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BPFSCOPE=$REPO/.venv/bin/bpfscope
PYTHON=$REPO/.venv/bin/python

if [ "$(id -u)" != 0 ]; then
    echo "run.sh: run as root: the tutorial loads eBPF programs into the kernel" >&2
    exit 2
fi
if [ ! -x "$BPFSCOPE" ]; then
    echo "run.sh: bpfscope is not installed yet: run $REPO/setup.sh first (as root), then this again" >&2
    exit 2
fi

WORK=$(mktemp -d -p "${TUTORIAL_TMP:-/var/tmp}" bpfscope-tutorial.XXXXXX)
TOOL_PID=
CGROUP=
cleanup() {
    if [ -n "$TOOL_PID" ]; then
        kill -INT "$TOOL_PID" 2>/dev/null || true
        wait "$TOOL_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    if [ -n "$CGROUP" ]; then
        # Empty once the last workload process has been reaped, which can take a moment.
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            rmdir "$CGROUP" 2>/dev/null && break
            sleep 0.1
        done
    fi
}
trap cleanup EXIT

# The workloads run in a cgroup v2 group of their own, as a container's processes do, so that a tool
# given --cgroup sees them and nothing else the machine is doing. Without cgroup v2 (or when it cannot
# be written) they run where they are and those tools see the whole machine.
CGROUP_ARGS=()
cgroup2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)
if [ -n "$cgroup2" ] && mkdir "$cgroup2/bpfscope-tutorial-$$" 2>/dev/null; then
    CGROUP=$cgroup2/bpfscope-tutorial-$$
    # Can a process be moved in? (A subshell tries, and leaves the cgroup empty again as it exits.)
    if (echo $BASHPID >"$CGROUP/cgroup.procs") 2>/dev/null; then
        CGROUP_ARGS=(--cgroup "$CGROUP")
    else
        rmdir "$CGROUP"
        CGROUP=
    fi
fi

STEPS=("$@")
wanted() { [ ${#STEPS[@]} -eq 0 ] || [[ " ${STEPS[*]} " == *" $1 "* ]]; }

# A heading (bold on a terminal), then the lines that say what the step shows.
BOLD= PLAIN=
if [ -t 1 ]; then
    BOLD=$'\033[1m' PLAIN=$'\033[0m'
fi
step() {
    printf '\n%s==== %s ====%s\n' "$BOLD" "$1" "$PLAIN"
    shift
    printf '%s\n' "$@"
}

# A command line as one would type it (arguments with spaces or quotes in single quotes).
quote() {
    local arg words=()
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
            words+=("$arg")
        else
            words+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    echo "${words[*]}"
}

# during WORKLOAD TOOL-ARGS...: run `bpfscope TOOL-ARGS` while the shell command WORKLOAD runs, as a
# person would in two terminals: start the tool, wait until it says it is tracing, run the workload,
# then, a moment later, press Ctrl-C (SIGINT), which ends every bpfscope tool with its summary.
during() {
    local workload=$1
    shift
    printf '\n# workload: %s\n$ bpfscope %s\n' "$workload" "$(quote "$@")"
    # Emptied first: the tool's redirection happens in the background job, and until then the file
    # would still hold the previous step's "Tracing" line (or not exist yet).
    : >"$WORK/tool.err"
    # Job control on: the tool gets its own process group and keeps SIGINT, which a script's
    # background jobs would otherwise ignore.
    set -m
    "$BPFSCOPE" "$@" >"$WORK/tool.out" 2>"$WORK/tool.err" &
    TOOL_PID=$!
    set +m
    local tries=0
    until grep -q '^Tracing' "$WORK/tool.err"; do
        if ! kill -0 "$TOOL_PID" 2>/dev/null || [ $((tries += 1)) -gt 600 ]; then
            cat "$WORK/tool.err" >&2
            echo "run.sh: bpfscope $1 did not start tracing" >&2
            exit 1
        fi
        sleep 0.05
    done
    # A workload may fail on purpose (a missing file, an exit code): that is part of what is shown.
    (
        cd "$WORK"
        [ -z "$CGROUP" ] || echo $BASHPID >"$CGROUP/cgroup.procs"
        exec sh -c "$workload"
    ) >"$WORK/workload.log" 2>&1 || true
    # The moment a person takes to press Ctrl-C: the last events reach the tool before it stops.
    sleep 0.5
    kill -INT "$TOOL_PID"
    local rc=0
    wait "$TOOL_PID" || rc=$?
    TOOL_PID=
    grep '^Tracing' "$WORK/tool.err"
    cat "$WORK/tool.out"
    grep -v '^Tracing' "$WORK/tool.err" || true
    if [ "$rc" != 0 ]; then
        echo "run.sh: bpfscope $1 exited with $rc" >&2
        exit 1
    fi
}

START=$SECONDS
printf 'bpfscope eBPF tutorial on %s %s; temporary files in %s\n' "$(uname -s)" "$(uname -r)" "$WORK"
# The kernel runs one tracing program per CPU at a time and skips one that would start while another is
# in progress there: other busy eBPF tools on this machine can make the counts below come out short.
if command -v bpftool >/dev/null; then
    others=$(bpftool prog show --json 2>/dev/null | "$PYTHON" -c '
import json, sys
kinds = {"tracepoint", "raw_tracepoint", "kprobe", "perf_event", "tracing"}
print(sum(p.get("type") in kinds for p in json.load(sys.stdin)))' 2>/dev/null || echo 0)
    if [ "$others" != 0 ]; then
        echo "Note: $others tracing programs of other tools are loaded; while they are busy, counts below can"
        echo "come out short (README.md, 'When counts come out short')."
    fi
fi
if [ -n "$CGROUP" ]; then
    printf 'Workloads run in the cgroup %s\n' "$CGROUP"
else
    echo "No writable cgroup v2: workloads run in this shell's cgroup, --cgroup steps see the whole machine"
fi

if wanted 1; then
    step "1. Program types and hooks: bpfscope doctor" \
        "doctor loads a tiny program of each type, attaches it to its hook and fires it, here and now." \
        "'yes' means this kernel runs it; 'no' on kprobe, fentry or lsm means tools must use the stable" \
        "hooks instead (tracepoint, raw_tp, tp_btf, perf_event, uprobe), which is all bpfscope needs."
    printf '\n$ bpfscope doctor\n'
    "$BPFSCOPE" doctor 2>&1
    printf '\n$ bpfscope doctor --json   # the same, for scripts: what works and what is missing\n'
    "$BPFSCOPE" doctor --json | "$PYTHON" -c '
import json, sys
checks = [r for r in map(json.loads, sys.stdin) if r["record"] == "doctor"]
print("works here:  ", ", ".join(c["name"] for c in checks if c["ok"]))
print("missing here:", ", ".join(c["name"] for c in checks if not c["ok"]) or "nothing")'
fi

if wanted 2; then
    step "2. Which syscalls, how many, how slow: bpfscope syscount" \
        "Counts and latency histograms are kept in kernel maps (raw_syscalls tracepoints); the table is" \
        "read once at the end; --cgroup keeps to the workload's cgroup, filtered in the kernel." \
        "Workload: find walks /usr (newfstatat, getdents64, openat...) while dd copies 20,000 blocks of" \
        "4 KiB (20,000 reads of /dev/zero, 20,000 writes)."
    during "find /usr -xdev >/dev/null & dd if=/dev/zero of=syscount.dd bs=4k count=20000 status=none; wait" \
        syscount -L -r 8 "${CGROUP_ARGS[@]}"
fi

if wanted 3; then
    step "3. One-liners on any tracepoint: bpfscope trace" \
        "One precompiled program, configured from the tracepoint's format file: count by keys, sum," \
        "histogram, or print fields, with filters that run in the kernel."
    echo
    echo "3a. Block I/O by process: who issues the disk requests, and how many bytes."
    during "dd if=/dev/zero of=direct.bin bs=1M count=200 oflag=direct status=none" \
        trace block:block_rq_issue --count-by comm --sum bytes -r 5
    echo
    echo "3b. I/O sizes as the disk completes them: 200 MiB read in 1 MiB direct reads, then 5,000 reads"
    echo "    of 4 KiB: two modes, 8 sectors (4 KiB) and about 2048 sectors (1 MiB, split where the file's"
    echo "    extents or the device's limits cut it)."
    during "dd if=direct.bin of=/dev/null bs=1M iflag=direct status=none; \
dd if=direct.bin of=/dev/null bs=4k count=5000 iflag=direct status=none" \
        trace block:block_rq_complete --hist nr_sector
    echo
    echo "3c. Which files a program opens, filtered in the kernel on its name: cat opens the dynamic"
    echo "    loader's cache and libc before the files it was given (one of which does not exist)."
    echo "bpfscope tutorial" >"$WORK/notes.txt"
    during "cat notes.txt missing.txt" \
        trace syscalls:sys_enter_openat --filter 'comm == "cat"' --print pid,comm,filename
    echo
    echo "3d. Which programs are started, counted by path: a loop runs date and uname 20 times each."
    during 'for i in $(seq 20); do date; uname -r; done' \
        trace sched:sched_process_exec --count-by filename -r 5 "${CGROUP_ARGS[@]}"
fi

if wanted 4; then
    step "4. New processes as they start and end: bpfscope execsnoop" \
        "One line per exec() with its arguments, and with --exits one per exit with its code and run" \
        "time; --cgroup keeps to the workload's cgroup. Workload: a shell script runs three short" \
        "commands, tries a program that does not exist (-x shows the failed exec) and exits with 3."
    # Without a cgroup of its own, the workload is the only child this script starts while
    # execsnoop runs, apart from the polling in `during`.
    only_workload=("${CGROUP_ARGS[@]}")
    [ -n "$CGROUP" ] || only_workload=(--ppid $$)
    during 'date +%s; uname -r; sleep 0.1; /no/such/program; exit 3' \
        execsnoop --exits -x -t "${only_workload[@]}"
fi

if wanted 5; then
    step "5. A custom tool on the Python API: custom_tool.py + custom_tool.bpf.c" \
        "read(2) per process: count, bytes, EOF, errors, and log-linear histograms of the size each read" \
        "returned and of its latency. The .bpf.c is compiled at start-up, loaded with BpfObject, and its" \
        "maps are read as numpy arrays typed from BTF. Here it runs dd from its first instruction: the" \
        "dynamic loader reads libc's ELF header (832 bytes), the C library may read its locale alias file," \
        "then come dd's 512 reads of 64 KiB, a last short read of 1,000 bytes and the read that finds the" \
        "end of the file."
    head -c $((32 * 1024 * 1024 + 1000)) /dev/zero >"$WORK/reads.bin"
    printf '\n$ python custom_tool.py -- dd if=reads.bin of=/dev/null bs=64k\n'
    (cd "$WORK" && "$PYTHON" "$HERE/custom_tool.py" -- dd if=reads.bin of=/dev/null bs=64k status=none) 2>&1
fi

printf '\nThe tutorial ran in %d s.\n' $((SECONDS - START))
