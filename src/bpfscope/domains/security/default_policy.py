"""The policy `bpfscope secure` loads by default: the common attacks, modelled on Falco's rules and
event-generator actions and on Tetragon's example policies, each written for what tracepoints see.

Where it can, a rule matches kernel-resident data, which the process cannot change after the check: the
path of the file an openat returned (sys_exit_openat's fd, resolved in the fd table: relative paths and
symbolic links resolved too), the file an exec runs. Rules on a syscall's string arguments (openat's
flags with its filename, unlink, symlink, chmod) read user memory at the syscall's entry: a racing
thread can change it after the check (TOCTOU); they are there to catch the usual tools, not a
determined attacker. `bpfscope secure --print-default-policy` prints this text.
"""

DEFAULT_POLICY = """\
# bpfscope secure: the default policy. Each rule: a tracepoint, what it reads, and selectors.
apiVersion: cilium.io/v1alpha1
kind: TracingPolicy
metadata:
  name: sensitive-files
spec:
  tracepoints:
  # Reading credentials, sudoers, SSH private keys: the path of the file the kernel opened.
  - subsystem: syscalls
    event: sys_exit_openat
    message: "Sensitive file opened"
    tags: [credential-access]
    args:
    - name: ret
      type: fd
      label: file
    selectors:
    - matchArgs:
      - name: ret
        operator: Equal
        values: [/etc/shadow, /etc/gshadow, /etc/sudoers, /etc/security/opasswd]
      matchBinaries:
      - operator: NotIn
        values: [/usr/bin/passwd, /usr/sbin/chpasswd, /usr/bin/chage, /usr/sbin/unix_chkpwd, /usr/bin/login,
                 /usr/sbin/sshd, /usr/bin/su, /usr/bin/sudo, /usr/sbin/useradd, /usr/sbin/usermod,
                 /usr/sbin/userdel, /usr/sbin/groupadd, /usr/sbin/pwck, /usr/sbin/grpck, /usr/bin/gpasswd]
    - matchArgs:
      - name: ret
        operator: Postfix
        values: [/.ssh/id_rsa, /.ssh/id_ed25519, /.ssh/id_ecdsa, /.ssh/id_dsa, _host_rsa_key,
                 _host_ed25519_key, _host_ecdsa_key]
      matchBinaries:
      - operator: NotIn
        values: [/usr/sbin/sshd, /usr/bin/ssh, /usr/bin/ssh-agent, /usr/bin/ssh-add, /usr/bin/ssh-keygen]
---
apiVersion: cilium.io/v1alpha1
kind: TracingPolicy
metadata:
  name: file-tampering
spec:
  tracepoints:
  # Writing below system directories, cron and the boot scripts; truncating logs; the kernel's
  # escape hatches (core_pattern, release_agent). Package managers write there by design.
  - subsystem: syscalls
    event: sys_enter_openat
    message: "System file opened for writing"
    tags: [persistence, defense-evasion]
    args:
    - name: filename
    - name: flags
    selectors:
    - matchArgs:
      - name: flags
        operator: Mask
        values: [0x203]          # O_WRONLY | O_RDWR | O_TRUNC
      - name: filename
        operator: Prefix
        values: [/etc/, /usr/bin/, /usr/sbin/, /bin/, /sbin/, /usr/lib/, /lib/, /boot/,
                 /var/spool/cron/, /root/.ssh/authorized_keys]
      matchBinaries:
      - operator: NotIn
        values: [/usr/bin/dpkg, /usr/bin/apt, /usr/bin/apt-get, /usr/lib/apt/methods/http,
                 /usr/bin/passwd, /usr/sbin/useradd, /usr/sbin/usermod, /usr/sbin/chpasswd,
                 /usr/sbin/ldconfig, /usr/sbin/update-alternatives, /usr/bin/update-alternatives]
    - matchArgs:
      - name: flags
        operator: Mask
        values: [0x200]          # O_TRUNC
      - name: filename
        operator: Prefix
        values: [/var/log/]
      matchBinaries:
      - operator: NotIn
        values: [/usr/sbin/logrotate, /usr/sbin/rsyslogd, /usr/lib/systemd/systemd-journald]
    - matchArgs:
      - name: flags
        operator: Mask
        values: [0x3]            # O_WRONLY | O_RDWR
      - name: filename
        operator: Postfix
        values: [/core_pattern, /release_agent, /sysrq-trigger]
  - subsystem: syscalls
    event: sys_enter_truncate
    message: "Log file truncated"
    tags: [defense-evasion]
    args:
    - name: path
    selectors:
    - matchArgs:
      - name: path
        operator: Prefix
        values: [/var/log/]
      matchBinaries:
      - operator: NotIn
        values: [/usr/sbin/logrotate]
  - subsystem: syscalls
    event: sys_enter_unlinkat
    message: "Log or shell history deleted"
    tags: [defense-evasion]
    args:
    - name: pathname
    selectors:
    - matchArgs:
      - name: pathname
        operator: Postfix
        values: [.bash_history, .zsh_history, /var/log/wtmp, /var/log/btmp, /var/log/lastlog,
                 /var/log/auth.log, /var/log/syslog]
  - subsystem: syscalls
    event: sys_enter_symlinkat
    message: "Symbolic link to a sensitive file"
    tags: [credential-access]
    args:
    - name: oldname
    selectors:
    - matchArgs:
      - name: oldname
        operator: Equal
        values: [/etc/shadow, /etc/gshadow, /etc/sudoers, /root/.ssh/id_rsa, /etc/passwd]
  - subsystem: syscalls
    event: sys_enter_fchmodat
    message: "Setuid or setgid bit set"
    tags: [privilege-escalation]
    args:
    - name: mode
    selectors:
    - matchArgs:
      - name: mode
        operator: Mask
        values: [0o6000]
      matchBinaries:
      - operator: NotIn
        values: [/usr/bin/dpkg]
---
apiVersion: cilium.io/v1alpha1
kind: TracingPolicy
metadata:
  name: process-execution
spec:
  tracepoints:
  # What runs: shells under servers, programs from temporary or memory-backed places, setuid programs
  # a user gained root through. The binary is the file the kernel runs (links resolved).
  - subsystem: sched
    event: sched_process_exec
    message: "Suspicious program started"
    tags: [execution]
    args:
    - name: filename
    selectors:
    - matchBinaries:
      - operator: In
        values: [/bin/sh, /bin/bash, /usr/bin/bash, /usr/bin/dash, /usr/bin/zsh, /usr/bin/fish, /bin/busybox]
      matchParentBinaries:
      - operator: In
        values: [/usr/sbin/nginx, /usr/sbin/apache2, /usr/sbin/httpd, /usr/bin/node, /usr/sbin/haproxy,
                 /usr/lib/postgresql/15/bin/postgres, /usr/bin/redis-server, /usr/sbin/php-fpm8.2,
                 /usr/sbin/mysqld, /usr/bin/java]
    - matchBinaries:
      - operator: Prefix
        values: [/tmp/, /dev/shm/, /var/tmp/, /run/user/, "/memfd:"]
    - matchArgs:
      - name: process.euid
        operator: Equal
        values: [0]
      - name: process.uid
        operator: NotEqual
        values: [0]
      matchBinaries:
      - operator: NotIn
        values: [/usr/bin/passwd, /usr/bin/su, /usr/bin/sudo, /usr/bin/mount, /usr/bin/umount, /usr/bin/chsh,
                 /usr/bin/chfn, /usr/bin/newgrp, /usr/bin/gpasswd, /usr/lib/openssh/ssh-keysign,
                 /usr/lib/dbus-1.0/dbus-daemon-launch-helper, /usr/bin/pkexec, /usr/bin/fusermount3]
---
apiVersion: cilium.io/v1alpha1
kind: TracingPolicy
metadata:
  name: privilege-and-kernel
spec:
  tracepoints:
  # Attaching to another process; setuid(0) without the right to it; kernel modules (this kernel has
  # none: the attempt is the event, on raw_syscalls for init_module and finit_module, x86_64 numbers).
  - subsystem: syscalls
    event: sys_enter_ptrace
    message: "Process attached with ptrace"
    tags: [privilege-escalation, credential-access]
    args:
    - name: request
    - name: pid
    selectors:
    # A sampling profiler or debugger attaches to every thread of its target at each sample: py-spy at
    # 100 Hz on a 9-thread process made 2,718 events in 3 s. Once a second per tracing process (the
    # first attach always reported; the rest counted as rate-limited).
    - matchArgs:
      - name: request
        operator: In
        values: [16, 0x4206, 4, 5]   # PTRACE_ATTACH, PTRACE_SEIZE, PTRACE_POKETEXT, PTRACE_POKEDATA
      matchActions:
      - action: Post
        rateLimit: 1s
  - subsystem: syscalls
    event: sys_enter_setuid
    message: "setuid(0) by a process without CAP_SETUID"
    tags: [privilege-escalation]
    args:
    - name: uid
    selectors:
    - matchArgs:
      - name: uid
        operator: Equal
        values: [0]
      matchCapabilities:
      - type: Effective
        operator: NotIn
        values: [CAP_SETUID]
  - subsystem: raw_syscalls
    event: sys_enter
    message: "Kernel module load attempted"
    tags: [persistence, defense-evasion]
    args:
    - name: id
    selectors:
    - matchArgs:
      - name: id
        operator: In
        values: [175, 313]
---
apiVersion: cilium.io/v1alpha1
kind: TracingPolicy
metadata:
  name: network-and-escape
spec:
  tracepoints:
  # A shell's standard streams on a socket (reverse shell); connections to the container runtimes'
  # sockets and to the ports of reverse shells and miners; leaving a container's mounts.
  - subsystem: syscalls
    event: sys_enter_dup2
    message: "Standard stream redirected to a socket"
    tags: [execution, command-and-control]
    args:
    - name: oldfd
      type: fd
    - name: newfd
    selectors:
    - matchArgs:
      - name: oldfd
        operator: Prefix
        values: ["socket:"]
      - name: newfd
        operator: In
        values: [0, 1, 2]
  - subsystem: syscalls
    event: sys_enter_dup3
    message: "Standard stream redirected to a socket"
    tags: [execution, command-and-control]
    args:
    - name: oldfd
      type: fd
    - name: newfd
    selectors:
    - matchArgs:
      - name: oldfd
        operator: Prefix
        values: ["socket:"]
      - name: newfd
        operator: In
        values: [0, 1, 2]
  - subsystem: syscalls
    event: sys_enter_connect
    message: "Connection to a container runtime socket or a suspicious port"
    tags: [command-and-control, privilege-escalation]
    args:
    - name: uservaddr
      type: sockaddr
      label: address
    selectors:
    - matchArgs:
      - name: uservaddr
        operator: Postfix
        values: [/docker.sock, /containerd.sock, /crio.sock, /podman.sock]
      matchBinaries:
      - operator: NotIn
        values: [/usr/bin/docker, /usr/local/bin/docker, /usr/bin/podman, /usr/bin/crictl, /usr/bin/ctr]
    - matchArgs:
      - name: uservaddr
        operator: DPort
        values: [4444, 1337, 31337, 3333, 5555, 14444, 45700, 6667]
  - subsystem: syscalls
    event: sys_enter_chroot
    message: "chroot inside a container"
    tags: [privilege-escalation]
    args:
    - name: filename
    selectors:
    - matchNamespaces:
      - namespace: Mnt
        operator: NotIn
        values: [host_ns]
      # The runtimes set containers up with mounts and setns: not them. (runc runs a copy of itself,
      # named /runc, from a file of no mount: a name another program could take, a known limit.)
      matchBinaries: &runtimes
      - operator: NotIn
        values: [/runc, /usr/sbin/runc, /usr/bin/runc, /usr/bin/crun, /usr/bin/conmon,
                 /usr/bin/containerd-shim-runc-v2]
  - subsystem: syscalls
    event: sys_enter_setns
    message: "Namespace entered from a container"
    tags: [privilege-escalation]
    args:
    - name: fd
    selectors:
    - matchNamespaces:
      - namespace: Mnt
        operator: NotIn
        values: [host_ns]
      matchBinaries: *runtimes
  - subsystem: syscalls
    event: sys_enter_mount
    message: "Mount inside a container"
    tags: [privilege-escalation]
    args:
    - name: dev_name
    - name: dir_name
    selectors:
    - matchNamespaces:
      - namespace: Mnt
        operator: NotIn
        values: [host_ns]
      matchBinaries: *runtimes
"""
