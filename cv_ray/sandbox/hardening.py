"""Kernel isolation layers for sandbox processes: namespaces, uid drop, rlimits, prctl, seccomp.

Everything here is done in-process (ctypes over libc, ``os.setresuid``, pyseccomp over
libseccomp); no external binary is needed. Two moments use it:

* the zygote, once at start-up: :func:`enter_network_isolation` (a new network namespace; as a
  normal user inside a new user namespace) and :func:`build_seccomp_program` (the BPF filter,
  compiled once and kept as bytes);
* each child, right after fork and before it reads any model code: :func:`harden_child` applies
  rlimits, drops to an unprivileged uid (when started as root), sets ``PR_SET_NO_NEW_PRIVS`` and
  ``PR_SET_DUMPABLE=0``, clears capabilities and installs the precompiled filter.

The seccomp policy is an allow-list whose default action is EPERM, so forbidden calls surface in
Python as ``PermissionError`` rather than killing the process: no open/openat/creat, exec, fork
(``clone`` only with ``CLONE_THREAD``; ``clone3`` answers ENOSYS so libc falls back to ``clone``),
socket, kill, ptrace or any other syscall not listed below.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import tempfile
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
CLONE_THREAD = 0x00010000
AT_EMPTY_PATH = 0x1000
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

NOBODY_UID = 65534
NOBODY_GID = 65534

#: Syscalls a sandboxed CPython running PIL / numpy / OpenCV needs after its imports are done,
#: and nothing that reaches files by path, the network, other processes or kernel configuration.
ALLOWED_SYSCALLS = (
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
    # I/O on descriptors the child already holds (its two pipes and /dev/null)
    "read", "readv", "write", "writev", "close", "lseek", "fstat", "fcntl",
    # signals and exit
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "exit", "exit_group",
    # identity and time (read-only facts)
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "uname", "getcwd",
    "clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep",
    "getrusage", "sysinfo", "getrlimit", "setrlimit",
    # threads and synchronisation (clone itself is filtered on its flags below)
    "futex", "set_robust_list", "get_robust_list", "set_tid_address", "rseq", "sched_yield",
    "sched_getaffinity", "arch_prctl", "getrandom", "membarrier",
)


class LayerUnavailable(RuntimeError):
    """An isolation layer cannot be set up on this host; the message says why."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} failed: {os.strerror(err)}")


def enter_network_isolation() -> str:
    """Move this process into a new network namespace (only a downed loopback inside).

    As root: ``unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)``. As a normal user: the same
    inside a new user namespace that maps only the caller's own uid and gid, so nothing gains
    privileges outside. Returns a short description; raises LayerUnavailable when the kernel or
    the host's policy refuses.
    """
    flags = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise LayerUnavailable(f"unshare(network namespace) failed: {os.strerror(err)}")
    if flags & CLONE_NEWUSER:
        # The kernel requires setgroups to be denied before an unprivileged gid_map is written.
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
        return "user+network namespace"
    return "network namespace"


def build_seccomp_program() -> bytes:
    """The allow-list filter compiled to classic BPF bytes, ready for ``prctl(PR_SET_SECCOMP)``.

    Raises LayerUnavailable when pyseccomp or libseccomp is missing.
    """
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # OSError: the module is present but libseccomp.so is not
        raise LayerUnavailable(f"seccomp needs pyseccomp and libseccomp.so.2 ({exc})") from None
    arch = pyseccomp.system_arch()
    filt = pyseccomp.SyscallFilter(pyseccomp.ERRNO(errno.EPERM))
    for name in ALLOWED_SYSCALLS:
        if pyseccomp.resolve_syscall(arch, name) >= 0:
            filt.add_rule(pyseccomp.ALLOW, name)
    # Threads only: a clone without CLONE_THREAD would be a new process.
    filt.add_rule(pyseccomp.ALLOW, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    # clone3 passes its flags behind a pointer that BPF cannot read; ENOSYS makes libc use clone.
    filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    # glibc implements fstat() as fstatat(fd, "", AT_EMPTY_PATH); stat by path stays denied.
    filt.add_rule(pyseccomp.ALLOW, "newfstatat", pyseccomp.Arg(3, pyseccomp.MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH))
    filt.add_rule(pyseccomp.ALLOW, "statx", pyseccomp.Arg(2, pyseccomp.MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH))
    # Resource limits of this process only (pid 0), never of another one.
    filt.add_rule(pyseccomp.ALLOW, "prlimit64", pyseccomp.Arg(0, pyseccomp.EQ, 0))
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        program = f.read()
    if not program or len(program) % 8:
        raise LayerUnavailable(f"libseccomp exported a malformed program ({len(program)} bytes)")
    return program


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _install_seccomp(program: bytes) -> None:
    count = len(program) // 8
    filters = (_SockFilter * count).from_buffer_copy(program)
    prog = _SockFprog(count, ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "prctl(PR_SET_SECCOMP)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _clear_capabilities() -> None:
    """Drop every capability (matters as a normal user inside a user namespace, where the
    process holds all of them over its own namespaces)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


@dataclass
class ChildLimits:
    """The per-child limits, computed by the zygote before each fork."""

    address_space_bytes: int
    """RLIMIT_AS: the zygote's own virtual size plus the per-call memory budget."""
    cpu_hard_s: int
    """Hard RLIMIT_CPU over the child's whole life; the soft limit is set per request."""
    open_files: int = 16
    """RLIMIT_NOFILE; the child needs only the descriptors it inherits."""


def harden_child(limits: ChildLimits, seccomp_program: bytes | None, zygote_pid: int) -> None:
    """Apply every layer to the calling (freshly forked) child. Raises OSError if any step fails.

    Order matters: rlimits while still privileged, then the uid drop (which resets the parent-
    death signal, so that is set after it), then no-new-privs (required before an unprivileged
    seccomp load), then the filter last, since it forbids most of the calls above.
    """
    resource.setrlimit(resource.RLIMIT_AS, (limits.address_space_bytes, limits.address_space_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_hard_s, limits.cpu_hard_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    # No new processes or threads at all: seccomp already denies fork, this also bounds threads.
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(NOBODY_GID, NOBODY_GID, NOBODY_GID)
        os.setresuid(NOBODY_UID, NOBODY_UID, NOBODY_UID)
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != zygote_pid:  # the zygote died before the death signal was armed
        os._exit(1)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    _clear_capabilities()
    if seccomp_program is not None:
        _install_seccomp(seccomp_program)


def virtual_size_bytes() -> int:
    """This process's current virtual size (VmSize), read from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def probe_layers(seccomp_expected: bool) -> dict[str, dict[str, object]]:
    """Check from inside a hardened child that its filter and limits hold: ``{layer: {"ok", "detail"}}``."""
    report: dict[str, dict[str, object]] = {}
    if seccomp_expected:
        fd = _libc.open(b"/proc/self/status", os.O_RDONLY)
        open_errno = ctypes.get_errno()
        sock = _libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
        sock_errno = ctypes.get_errno()
        refused = fd < 0 and open_errno == errno.EPERM and sock < 0 and sock_errno == errno.EPERM
        report["seccomp"] = {"ok": refused, "detail": "open and socket refused with EPERM" if refused
                             else f"open -> {fd} (errno {open_errno}), socket -> {sock} (errno {sock_errno})"}
    as_soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    fsize, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    nproc, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    limited = as_soft != resource.RLIM_INFINITY and fsize == 0 and nproc == 0
    report["rlimits"] = {"ok": limited, "detail": f"AS={as_soft} FSIZE={fsize} NPROC={nproc}"}
    return report


def read_proc_status_layers(pid: int, seccomp_expected: bool) -> dict[str, dict[str, object]]:
    """Check a hardened child from the outside, in /proc/<pid>/status: no-new-privs, uids, seccomp mode."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    uids = [int(u) for u in fields["Uid"].split()]
    report: dict[str, dict[str, object]] = {
        "no_new_privs": {"ok": fields["NoNewPrivs"].strip() == "1", "detail": f"NoNewPrivs {fields['NoNewPrivs'].strip()}"},
        "unprivileged_uid": {"ok": 0 not in uids, "detail": f"children run as uid {uids[0]}"},
    }
    if seccomp_expected:
        mode = fields["Seccomp"].strip()
        report["seccomp_mode"] = {"ok": mode == "2", "detail": f"Seccomp {mode} (2 = filter)"}
    return report
