"""Kernel isolation layers for sandbox processes: namespaces, separate uids, rlimits, prctl, seccomp.

Everything here is done in-process (ctypes over libc, ``os.setresuid``, pyseccomp over
libseccomp); the only external programs are ``newuidmap``/``newgidmap`` (the ``uidmap`` package),
and only for a normal (non-root) user. Two moments use it:

* the zygote, once at start-up: :func:`isolate_zygote` moves it into new network, IPC, UTS and
  pid namespaces (as a normal user inside a new user namespace) and forks: the zygote that
  serves is pid 1 of its own pid namespace, so no process outside it can be named from inside;
  :func:`build_seccomp_program` compiles the filter once;
* each child, right after fork and before it reads any model code: :func:`harden_child` applies
  rlimits, moves to a uid and gid of its own (unique among live children, shared with no
  process outside the sandbox), sets ``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_DUMPABLE=0``, clears
  capabilities and installs the precompiled filter.

The seccomp policy (:data:`SYSCALL_POLICY`, argued syscall by syscall in ``docs/sandbox.md``) is
an allow-list whose default action is EPERM, so forbidden calls surface in Python as
``PermissionError`` rather than killing the process. Every allowed call acts only on the calling
process itself or on descriptors it already holds; where a call could name something else (a
pid, a path, another process's clock, a signal owner), its arguments are filtered so it cannot.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

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
CLONE_NEWPID = 0x20000000
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
F_GETFD, F_SETFD, F_GETFL, F_SETFL = 1, 2, 3, 4
O_ASYNC = 0o20000

#: The host name (and NIS domain name) inside the sandbox's own UTS namespace.
SANDBOX_HOSTNAME = "sandbox"
#: As root, children run as uid (and gid) ``CHILD_ID_BASE + host pid``: unique among live
#: children, and inside the range systemd documents as unused (0x70000000-0x7FFDFFFF), so no
#: account or other process of the host has it. pid_max is at most 2**22.
CHILD_ID_BASE = 0x70000000
CHILD_ID_SPAN = 1 << 22

#: Why each allowed syscall cannot reach outside the calling child (docs/sandbox.md has the long
#: form). The filter allows exactly these; the ones in ``_ARGUMENT_RULES`` only with those arguments.
SYSCALL_POLICY: dict[str, str] = {
    # memory of the calling process
    "brk": "grows its own heap",
    "mmap": "maps its own memory; a descriptor it maps can only be one it holds (its pixel buffer; "
            "pipes and /dev/null cannot be mapped)",
    "munmap": "its own mappings", "mremap": "its own mappings", "mprotect": "its own mappings",
    "madvise": "advice on its own mappings (poisoning pages needs a capability it lacks)",
    # descriptors the child already holds: /dev/null (0-2), its request, response and readiness pipes
    "read": "descriptors it holds; it can neither open nor receive new ones",
    "readv": "as read", "write": "as read", "writev": "as read", "close": "as read",
    "lseek": "as read (pipes refuse it)",
    "fcntl": "only F_GETFD, F_SETFD, F_GETFL and F_SETFL without O_ASYNC: never a signal owner "
             "(F_SETOWN, F_SETSIG), lease, lock or notification",
    # signals of the calling process
    "rt_sigaction": "its own handlers", "rt_sigprocmask": "its own mask", "rt_sigreturn": "its own frames",
    "sigaltstack": "its own signal stack", "restart_syscall": "resumes its own interrupted call",
    "exit": "ends itself", "exit_group": "ends itself",
    # facts about itself, seen from inside its own namespaces
    "getpid": "its pid in its own pid namespace", "gettid": "as getpid", "getppid": "the zygote (pid 1)",
    "getuid": "its own ids", "geteuid": "its own ids", "getgid": "its own ids", "getegid": "its own ids",
    "uname": "its own UTS namespace (host name 'sandbox'); the kernel release is the host's",
    "getcwd": "always / (chdir is not allowed)",
    "getrusage": "its own usage (or its children's: it has none)",
    "getrlimit": "its own limits",
    "prlimit64": "only pid 0 (itself) and only to read (new limit NULL): it cannot raise a limit",
    "sched_getaffinity": "only pid 0 (itself)",
    "sched_yield": "its own scheduling",
    # time
    "clock_gettime": "only clock ids 0-15 (system clocks and its own CPU clocks); the negative ids "
                     "that name another process's CPU clock are refused",
    "clock_getres": "as clock_gettime", "clock_nanosleep": "as clock_gettime",
    "gettimeofday": "the system clock", "time": "the system clock", "nanosleep": "sleeps itself",
    # threads' bookkeeping (no thread can be created: clone is not allowed)
    "futex": "addresses in its own memory", "set_robust_list": "its own list", "set_tid_address": "its own",
    "rseq": "its own", "arch_prctl": "its own thread's registers",
    "getrandom": "random bytes",
}

_CLOCK_IDS_MAX = 15


class LayerUnavailable(RuntimeError):
    """An isolation layer cannot be set up on this host; the message says why."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} failed: {os.strerror(err)}")


# -- the zygote's namespaces ------------------------------------------------------------------------


@dataclass
class Isolation:
    """What :func:`isolate_zygote` set up, as the serving zygote (pid 1 of its namespace) sees it."""

    layers: dict[str, dict[str, Any]]
    child_ids: tuple[int, int] | None
    """``(base, span)``: a child takes uid and gid ``base + host_pid % span``; None: children keep
    the zygote's ids (a normal user without subordinate ids)."""
    setgroups: bool
    """Whether children may (and so must) clear their supplementary groups."""
    trainer_uid: int
    """The uid of the trainer (the process that started the zygote) as seen from inside."""


def _subordinate_range(path: str, user: str, uid: int) -> tuple[int, int] | None:
    """The first ``start:count`` range of ``/etc/subuid`` (or subgid) for this user, or None."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if (len(fields) == 3 and fields[0] in (user, str(uid)) and fields[1].isdigit() and fields[2].isdigit()
                and int(fields[2]) >= 2):
            return int(fields[1]), int(fields[2])
    return None


@dataclass
class _SubordinateIds:
    uid_start: int
    gid_start: int
    count: int
    """Ids mapped from inside id 1 on (inside 0 is the user's own)."""


def _subordinate_ids(uid: int, user: str) -> _SubordinateIds | None:
    """The user's subordinate ids, when ``newuidmap`` / ``newgidmap`` can map them here."""
    subuid = _subordinate_range("/etc/subuid", user, uid)
    subgid = _subordinate_range("/etc/subgid", user, uid)
    if not (shutil.which("newuidmap") and shutil.which("newgidmap") and subuid and subgid):
        return None
    return _SubordinateIds(subuid[0], subgid[0], min(subuid[1], subgid[1]))


def isolate_zygote() -> Isolation:
    """Enter new network, IPC, UTS and pid namespaces, then fork: the caller returns as pid 1 of
    the new pid namespace; the original process waits for it and exits with its status.

    As root the namespaces are entered directly and children take uids of their own from
    ``CHILD_ID_BASE``. As a normal user they are entered inside a new user namespace; with
    ``newuidmap``/``newgidmap`` and subordinate ids (``/etc/subuid``, ``/etc/subgid``) the
    namespace maps inside id 0 to the user and 1.. to the subordinate ids, and children take
    those; without them only the user's own id is mapped and the ``separate_uid`` layer is
    reported missing. Raises LayerUnavailable when the kernel refuses the namespaces (nothing
    has changed then).
    """
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
    if os.geteuid() == 0:
        _unshare(flags)
        isolation = Isolation(layers={"separate_uid": {
            "ok": True, "detail": f"children run as uid and gid {CHILD_ID_BASE:#x} + host pid"}},
            child_ids=(CHILD_ID_BASE, CHILD_ID_SPAN), setgroups=True, trainer_uid=0)
        detail = "network, IPC, UTS and pid namespaces"
    else:
        user = pwd.getpwuid(uid).pw_name
        subordinate = _subordinate_ids(uid, user)
        mapper = _start_mapper(uid, gid, subordinate) if subordinate else None
        try:
            _unshare(flags | CLONE_NEWUSER)
        except LayerUnavailable:
            if mapper is not None:
                _finish_mapper(mapper, go=False)
            raise
        mapped = mapper is not None and _finish_mapper(mapper, go=True)
        if mapped:
            assert subordinate is not None
            isolation = Isolation(layers={"separate_uid": {
                "ok": True, "detail": f"children run as subordinate ids from uid {subordinate.uid_start}"}},
                child_ids=(1, subordinate.count - 1), setgroups=True, trainer_uid=0)
        else:
            # The kernel requires setgroups to be denied before an unprivileged gid_map is written.
            for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                               ("/proc/self/gid_map", f"{gid} {gid} 1")):
                with open(path, "w") as f:
                    f.write(text)
            fix = (f"install `uidmap` (newuidmap, newgidmap) and give the user subordinate ids "
                   f"(usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user})"
                   if subordinate is None else "newuidmap/newgidmap refused the user's subordinate ids")
            isolation = Isolation(layers={"separate_uid": {
                "ok": False, "detail": f"children would share uid {uid} with the trainer: {fix}"}},
                child_ids=None, setgroups=False, trainer_uid=uid)
        detail = "user, network, IPC, UTS and pid namespaces"
    name = SANDBOX_HOSTNAME.encode()
    _check(_libc.sethostname(name, len(name)), "sethostname")
    _check(_libc.setdomainname(name, len(name)), "setdomainname")
    _become_pid_one()
    isolation.layers["pid_namespace"] = {"ok": os.getpid() == 1,
                                         "detail": f"the zygote is pid {os.getpid()} of its own pid namespace"}
    isolation.layers["network_namespace"] = {"ok": _only_loopback(), "detail": detail}
    isolation.layers["host_name"] = {"ok": os.uname().nodename == SANDBOX_HOSTNAME,
                                     "detail": f"the code sees host name {os.uname().nodename!r}"}
    return isolation


def without_namespaces(reason: str) -> Isolation:
    """The isolation left when the kernel refused the namespaces (``reason``): as root children
    still take uids of their own; every namespace layer is reported missing."""
    root = os.geteuid() == 0
    missing = {"ok": False, "detail": reason}
    layers = {"network_namespace": missing, "pid_namespace": missing, "host_name": missing,
              "separate_uid": {"ok": root, "detail": f"children run as uid and gid {CHILD_ID_BASE:#x} + host pid"
                               if root else "no user namespace: children would share the trainer's uid"}}
    return Isolation(layers=layers, child_ids=(CHILD_ID_BASE, CHILD_ID_SPAN) if root else None, setgroups=root,
                     trainer_uid=0 if root else os.getuid())


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise LayerUnavailable(f"unshare(namespaces) failed: {os.strerror(err)}")


def _start_mapper(uid: int, gid: int, ids: _SubordinateIds) -> tuple[int, int]:
    """Fork (still outside the new user namespace) a helper that maps our ids once told to."""
    read_end, write_end = os.pipe()
    target = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(write_end)
            if os.read(read_end, 1) == b"m":
                runs = [subprocess.run([tool, str(target), "0", str(own), "1", "1", str(start), str(ids.count - 1)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, check=False)
                        for tool, own, start in (("newuidmap", uid, ids.uid_start), ("newgidmap", gid, ids.gid_start))]
                code = 0 if all(run.returncode == 0 for run in runs) else 1
        finally:
            os._exit(code)
    os.close(read_end)
    return pid, write_end


def _finish_mapper(mapper: tuple[int, int], go: bool) -> bool:
    """Tell the helper to map (``go``: we are in the new user namespace now) or to quit; wait for it."""
    pid, write_end = mapper
    os.write(write_end, b"m" if go else b"x")
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _become_pid_one() -> None:
    """Fork into the new pid namespace; the parent only waits and passes on the exit status.

    The child dies with its parent (``PR_SET_PDEATHSIG``), and every process of the namespace dies
    with the child (it is the namespace's init), so killing the process the pool started ends them all.
    """
    pid = os.fork()
    if pid == 0:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        return
    # The waiting parent holds no descriptor the zygote uses: a dead zygote closes the control socket.
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    os._exit(max(0, os.waitstatus_to_exitcode(status)))


def _only_loopback() -> bool:
    with open("/proc/self/net/dev") as f:
        names = {line.split(":")[0].strip() for line in f.readlines()[2:]}
    return names == {"lo"}


def host_pid_of(pidfd: int) -> int:
    """The host's pid of a process the zygote holds a pidfd for (the kernel's fdinfo, read through
    the host's /proc, gives it in the host's numbering)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise OSError(errno.ENOENT, "no Pid line in the pidfd's fdinfo")


def host_pid_of_self() -> int:
    """This process's pid in the host's pid namespace (the host's /proc names it)."""
    return int(os.readlink("/proc/self"))


# -- seccomp ---------------------------------------------------------------------------------------


def build_seccomp_program() -> bytes:
    """The allow-list filter of :data:`SYSCALL_POLICY` compiled to classic BPF bytes, ready for
    ``prctl(PR_SET_SECCOMP)``.

    Raises LayerUnavailable when pyseccomp or libseccomp is missing.
    """
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # OSError: the module is present but libseccomp.so is not
        raise LayerUnavailable(f"seccomp needs pyseccomp and libseccomp.so.2 ({exc})") from None
    arch = pyseccomp.system_arch()
    filt = pyseccomp.SyscallFilter(pyseccomp.ERRNO(errno.EPERM))
    # A syscall of another ABI (x32, int 0x80) is refused like any other, not run unchecked.
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.ERRNO(errno.EPERM))
    argument_rules = {
        # F_SETFL only without O_ASYNC; never F_SETOWN / F_SETOWN_EX / F_SETSIG (a signal sent by the
        # kernel to a pid or process group of the caller's choosing), leases, locks, notifications.
        "fcntl": [[pyseccomp.Arg(1, pyseccomp.EQ, cmd)] for cmd in (F_GETFD, F_SETFD, F_GETFL)]
        + [[pyseccomp.Arg(1, pyseccomp.EQ, F_SETFL), pyseccomp.Arg(2, pyseccomp.MASKED_EQ, O_ASYNC, 0)]],
        # Itself only (pid 0), read only (new limit NULL): no limit can be raised, no other process seen.
        "prlimit64": [[pyseccomp.Arg(0, pyseccomp.EQ, 0), pyseccomp.Arg(2, pyseccomp.EQ, 0)]],
        "sched_getaffinity": [[pyseccomp.Arg(0, pyseccomp.EQ, 0)]],
        # Clock ids 0-15 only: a negative id names another process's CPU clock.
        **{name: [[pyseccomp.Arg(0, pyseccomp.LE, _CLOCK_IDS_MAX)]]
           for name in ("clock_gettime", "clock_getres", "clock_nanosleep")},
    }
    for name in SYSCALL_POLICY:
        if pyseccomp.resolve_syscall(arch, name) < 0:
            continue
        for conditions in argument_rules.get(name, [[]]):
            filt.add_rule(pyseccomp.ALLOW, name, *conditions)
    # clone3 passes its flags behind a pointer that BPF cannot read; ENOSYS makes libc fall back to
    # clone, which is refused (no process or thread can be created).
    filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
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


# -- each child -------------------------------------------------------------------------------------


@dataclass
class ChildLimits:
    """The per-child limits, computed by the zygote before each fork."""

    address_space_bytes: int
    """RLIMIT_AS: the zygote's own virtual size plus the per-call memory budget."""
    cpu_s: int
    """RLIMIT_CPU, soft = hard: the child cannot raise it (and cannot even call setrlimit), and
    past it the kernel sends SIGKILL. A backstop: the zygote's wall-clock deadlines and the frozen
    idle sessions bound the CPU a child can use long before."""
    open_files: int = 16
    """RLIMIT_NOFILE; the child needs only the descriptors it inherits."""


def child_id(isolation: Isolation | None) -> int | None:
    """The uid and gid a new child takes (call in the child, before :func:`harden_child`)."""
    if isolation is None or isolation.child_ids is None:
        return None
    base, span = isolation.child_ids
    return base + host_pid_of_self() % span


def harden_child(limits: ChildLimits, seccomp_program: bytes | None, zygote_pid: int,
                 ids: int | None, setgroups: bool) -> None:
    """Apply every layer to the calling (freshly forked) child. Raises OSError if any step fails.

    ``ids``: the uid and gid to take (None: keep the current ones). Order matters: rlimits while
    still privileged, then the id change (which resets the parent-death signal, so that is set
    after it), then no-new-privs (required before an unprivileged seccomp load), then the filter
    last, since it forbids most of the calls above.
    """
    resource.setrlimit(resource.RLIMIT_AS, (limits.address_space_bytes, limits.address_space_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    # No new processes or threads at all: seccomp already denies clone, this is a second lock.
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    if ids is not None:
        if setgroups:
            os.setgroups([])
        os.setresgid(ids, ids, ids)
        os.setresuid(ids, ids, ids)
    die_with_parent(zygote_pid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    _clear_capabilities()
    if seccomp_program is not None:
        _install_seccomp(seccomp_program)


def die_with_parent(zygote_pid: int) -> None:
    """Be killed when the zygote dies (and exit now if it already has)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != zygote_pid:  # the zygote died before the death signal was armed
        os._exit(1)


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


def read_proc_status_layers(host_pid: int, seccomp_expected: bool,
                            isolation: Isolation) -> dict[str, dict[str, object]]:
    """Check a hardened child from the outside, in /proc/<host pid>/status: no-new-privs, ids
    (seen from the zygote's user namespace), seccomp mode."""
    with open(f"/proc/{host_pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    uids = {int(u) for u in fields["Uid"].split()}
    shared = uids & {0, isolation.trainer_uid}
    report: dict[str, dict[str, object]] = {
        "no_new_privs": {"ok": fields["NoNewPrivs"].strip() == "1", "detail": f"NoNewPrivs {fields['NoNewPrivs'].strip()}"},
        "unprivileged_uid": {"ok": not shared, "detail": f"children run as uid {min(uids)}" + (
            " (the trainer's or root's)" if shared else "")},
    }
    if seccomp_expected:
        mode = fields["Seccomp"].strip()
        report["seccomp_mode"] = {"ok": mode == "2", "detail": f"Seccomp {mode} (2 = filter)"}
    return report
