"""The escape suite: ways out of the sandbox, each run against the real sandbox and against controls.

Model-written code is an adversary that knows our source. Every attack runs three times:

* ``hardened`` -- every protection on, as in training: the attack must fail, the model must read
  the expected error, and the same pool must then serve a normal call correctly;
* ``kernel_only`` -- the Python-level guards (restricted ``import``, the ``os.system`` audit hook)
  switched off: the attack must still fail, so the kernel layers stop it, not a Python guard;
* ``control`` -- every protection switched off (``cv_ray.sandbox.protections``): the attack must
  *succeed*. An attack that fails here fails for the wrong reason (a typo, a guard it never got
  past, file permissions) and proves nothing about the sandbox.

Whether an attack got through is judged outside the sandbox, from evidence it cannot forge: a
marker file on disk, a victim process dead, a TCP server that saw a connection, a secret (an
environment variable of this process and a world-readable file in a world-accessible directory, so
that only the sandbox's layers can keep them out) in what the model reads. Where the hardened
error class comes from a Python-level guard rather than the kernel, the attack says so
(``guard=``): with the guard off the attack still fails, with a less helpful message.

The parent's own defences (a forged reply, a child that outlives its reply, the code's exit status,
a closed result channel) have their attacks at the end, each with its control.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from cv_ray.sandbox import SandboxPool, messages
from cv_ray.sandbox.config import SandboxConfig
from cv_ray.sandbox.pool import classify_exit
from cv_ray.sandbox.protections import Protections

FORBIDDEN = "file, network and process access are not available"
MODES = ("hardened", "kernel_only", "control")
PROTECTIONS = {
    "hardened": Protections(),
    "kernel_only": Protections(python_guards=False),
    "control": Protections(kernel=False, python_guards=False, clean_environment=False, host_paths_hidden=False,
                           parent_guards=False),
}


def _still_serves(pool, photo) -> None:
    r = pool.run("result = image.transpose(Image.Transpose.ROTATE_270)", [photo])
    assert r.ok, r.error
    assert np.array_equal(np.asarray(r.image), np.asarray(photo.transpose(Image.Transpose.ROTATE_270)))


# -- the host: secrets, a marker directory, victims -------------------------------------------------


@dataclass
class Target:
    """What one attack run may reach: paths and processes of the host, made for this test only."""

    secret: str
    secret_file: str
    host_dir: str
    marker: str
    """A path that must not exist after the attack (checked absent before it)."""
    victim: subprocess.Popen | None = None
    server: socket.socket | None = None
    """Listening, never accepting: a connection made in the call waits in its backlog."""
    zygotes: tuple = ()
    """The processes the pool started, as the test found them before the call."""

    @property
    def fields(self) -> dict[str, object]:
        return {"secret": self.secret_file, "secret_size": len(self.secret), "host_dir": self.host_dir,
                "marker": self.marker, "victim": self.victim.pid if self.victim else -1,
                "port": self.server.getsockname()[1] if self.server else -1}


@pytest.fixture(scope="module")
def host_dir(host_secret):
    """A world-accessible directory holding a world-readable secret file: only the sandbox's own
    layers (not file permissions) can keep a child running under another uid away from it."""
    path = tempfile.mkdtemp(prefix="cvray-escapes-")
    os.chmod(path, 0o777)
    secret = os.path.join(path, "secret.txt")
    with open(secret, "w") as f:
        f.write(host_secret)
    os.chmod(secret, 0o644)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def target(request, host_dir, host_secret):
    """A fresh marker path (absent: checked), and a victim process and a TCP server when asked for."""
    marker = os.path.join(host_dir, f"pwned-{request.node.name}".replace("/", "_")[:120])
    if os.path.exists(marker):
        os.remove(marker)
    assert not os.path.exists(marker)
    t = Target(host_secret, os.path.join(host_dir, "secret.txt"), host_dir, marker)
    t.victim = subprocess.Popen(["sleep", "600"])
    t.server = socket.create_server(("127.0.0.1", 0))
    yield t
    t.victim.kill()
    t.victim.wait()
    t.server.close()
    if os.path.exists(marker):
        os.remove(marker)


# -- evidence ------------------------------------------------------------------------------------------


def _secret_read(t: Target, r, restarts: int) -> bool:
    return t.secret in r.stdout + (r.error or "")


def _marker_written(t: Target, r, restarts: int) -> bool:
    return os.path.exists(t.marker)


def _printed(text: str) -> Callable[[Target, object, int], bool]:
    return lambda t, r, restarts: text in r.stdout


def _dying(proc: subprocess.Popen) -> bool:
    """Dead, exiting, or with a SIGKILL pending: every attack here sends its signal (or makes the
    kernel send it, when the parent reads the reply) before ``pool.run`` returns. The one state
    these cannot see, a SIGKILL just taken off the queue and the exit not yet begun, lasts a few
    instructions; a short wait covers it."""
    if proc.poll() is not None:
        return True
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{proc.pid}/stat") as f:
            flags = int(f.read().rsplit(")", 1)[1].split()[6])
    except FileNotFoundError:
        return True
    pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
    if status["State"].split()[0] in ("Z", "X") or flags & 0x4 or pending & (1 << (signal.SIGKILL - 1)):
        return True  # 0x4: PF_EXITING
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        return False
    return True


def _victim_dead(t: Target, r, restarts: int) -> bool:
    assert t.victim is not None
    return _dying(t.victim)


def _zygote_killed(t: Target, r, restarts: int) -> bool:
    return any(_dying(proc) for proc in t.zygotes)


def _zygote_restarted(t: Target, r, restarts: int) -> bool:
    return restarts > 0


def _connected(t: Target, r, restarts: int) -> bool:
    """A connect() that returned in the child left an established connection in the backlog."""
    assert t.server is not None
    t.server.setblocking(False)
    try:
        conn, _ = t.server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def _host_path_shown(t: Target, r, restarts: int) -> bool:
    return messages.HOST_PATH.search(r.stdout) is not None


@dataclass(frozen=True)
class Attack:
    code: str
    """Python the model might write; ``{secret}``, ``{marker}``, ``{victim}``, ... are filled in."""
    succeeded: Callable[[Target, object, int], bool]
    error_class: str | None = "forbidden"
    """What the model reads in the hardened run (None: the call itself may succeed, harmlessly)."""
    guard: str | None = None
    """Set when that error class comes from a Python-level guard rather than the kernel."""


_LIBC = 'ctypes = Image.sys.modules["ctypes"]\nlibc = ctypes.CDLL(None, use_errno=True)\n'
_CHECK = 'def check(rc, what):\n    if rc < 0:\n        raise PermissionError(ctypes.get_errno(), what)\n    return rc\n'
_ARM_SIGIO = """
fcntl = Image.sys.modules["fcntl"]
os = Image.os
struct = Image.sys.modules["struct"]
for fd in range(3, 16):
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        continue
    if flags & os.O_ACCMODE == os.O_WRONLY:  # our response pipe
        fcntl.fcntl(fd, fcntl.F_SETOWN, {pid})
        fcntl.fcntl(fd, 10, 9)  # F_SETSIG: SIGKILL instead of SIGIO
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC)
        # A reply of our own, then stay alive (holding the armed pipe) until the parent has read it.
        meta = b'{{"ok": false, "error": "armed", "error_class": "runtime"}}'
        os.write(fd, struct.pack("<4sIIIIB", b"CVR1", len(meta), 0, 0, 0, 0) + meta)
        for _ in range(10**8):
            try:
                os.kill({pid}, 0)
            except OSError:
                break
result = image
"""

ATTACKS: dict[str, Attack] = {
    "subclass_walk_system": Attack("""
for cls in ().__class__.__base__.__subclasses__():
    if cls.__name__ == "_wrap_close":
        host_os = cls.__init__.__globals__
result = host_os["system"]("touch {marker}")
""", _marker_written, guard="the os.system audit hook (the kernel refuses the fork; os.system would return -1)"),
    "subclass_walk_open": Attack("""
host_os = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "_wrap_close"][0].__init__.__globals__
fd = host_os["open"]("{secret}", host_os["O_RDONLY"])
print(host_os["read"](fd, 100))
""", _secret_read),
    "module_attribute_pivot": Attack('Image.os.system("touch {marker}")', _marker_written,
                                     guard="the os.system audit hook"),
    "computed_getattr_listdir": Attack("""
g = getattr(Image.open, "__glo" + "bals__")
print(g["os"].listdir("{host_dir}"))
""", _printed("secret.txt")),
    "generator_frame_walk": Attack("""
def gen():
    yield g.gi_frame.f_back
g = gen()
frame = next(g)
while frame.f_back is not None:
    frame = frame.f_back
host = frame.f_globals
print(sorted(host["os"].environ.items()))
print(host["os"].read(host["os"].open("{secret}", 0), 100))
""", _secret_read),
    "traceback_frame_walk": Attack("""
try:
    1 / 0
except ZeroDivisionError as exc:
    frame = exc.__traceback__.tb_frame
while frame.f_back is not None:
    frame = frame.f_back
print(frame.f_builtins["open"]("{secret}").read())
""", _secret_read),
    "format_string_leak": Attack("""
print("{{0.__globals__[os].environ}}".format(Image.open))
print(open("{secret}").read())
""", _secret_read),
    "environment": Attack("print(dict(Image.os.environ))\nresult = image", _secret_read, error_class=None),
    "ctypes_openat": Attack(_LIBC + _CHECK + """
fd = check(libc.syscall(257, -100, b"{secret}", 0), "openat")
print(Image.os.read(fd, 100))
""", _secret_read),
    "ctypes_fork": Attack(_LIBC + _CHECK + """
pid = check(libc.syscall(57), "fork")
if pid == 0:
    libc.syscall(60, 0)
print("forked", pid > 0)
""", _printed("forked True")),
    "os_fork": Attack("""
pid = Image.os.fork()
if pid == 0:
    Image.os._exit(0)
print("forked")
""", _printed("forked")),
    "thread": Attack("""
_thread = Image.sys.modules["_thread"]
lock = _thread.allocate_lock()
lock.acquire()
_thread.start_new_thread(lock.release, ())
lock.acquire()
print("threaded")
""", _printed("threaded")),
    "read_secret_file": Attack('print(open("{secret}").read())', _secret_read),
    "read_parent_environ": Attack('print(open("/proc/%d/environ" % Image.os.getppid(), "rb").read())', _secret_read),
    "write_file": Attack('open("{marker}", "w").write("x")', _marker_written),
    "spawn_posix_spawn": Attack('Image.os.waitpid(Image.os.posix_spawn("/bin/sh", ["sh", "-c", "touch {marker}"], {{}}), 0)',
                                _marker_written),
    "spawn_exec": Attack('Image.os.execv("/bin/sh", ["sh", "-c", "touch {marker}"])', _marker_written),
    "kill_parent": Attack("Image.os.kill(Image.os.getppid(), 9)", _zygote_killed),
    "kill_host_process": Attack("Image.os.kill({victim}, 9)", _victim_dead),
    # Class 1: the kernel sends a signal of the code's choosing to a pid of its choosing when the
    # parent reads the reply (O_ASYNC on the response pipe, owner and signal set by fcntl).
    "sigio_kill_host_process": Attack(_ARM_SIGIO.replace("{pid}", "{victim}"), _victim_dead),
    "tcp_to_host": Attack("""
sock = Image.sys.modules["socket"]
s = sock.create_connection(("127.0.0.1", {port}), timeout=2)
s.sendall(b"hello")
""", _connected),
    # Class 2: stat by path with AT_EMPTY_PATH set: the kernel still resolves a non-empty path.
    "stat_host_file": Attack(_LIBC + _CHECK + """
struct = Image.sys.modules["struct"]
buf = ctypes.create_string_buffer(256)
check(libc.syscall(262, -100, b"{secret}", buf, 0x1000), "newfstatat")
print("size=%d" % struct.unpack_from("<q", buf.raw, 48)[0])
""", lambda t, r, restarts: f"size={len(t.secret)}" in r.stdout),
    "statx_host_file": Attack(_LIBC + _CHECK + """
struct = Image.sys.modules["struct"]
buf = ctypes.create_string_buffer(512)
check(libc.syscall(332, -100, b"{secret}", 0x1000, 0xfff, buf), "statx")
print("size=%d" % struct.unpack_from("<Q", buf.raw, 40)[0])
""", lambda t, r, restarts: f"size={len(t.secret)}" in r.stdout),
    "stat_host_process": Attack(_LIBC + _CHECK + """
buf = ctypes.create_string_buffer(256)
check(libc.syscall(262, -100, b"/proc/{victim}", buf, 0x1000), "newfstatat")
print("found")
""", _printed("found")),
    # The audit of the remaining syscalls: every one that can name another process by pid, tried on
    # a host process (hidden by the pid namespace too) and on the zygote (visible: pid 1, the parent).
    "probe_other_process": Attack(_LIBC + """
reached = []
for pid in ({victim}, Image.os.getppid()):
    mask = ctypes.create_string_buffer(128)
    if libc.sched_getaffinity(pid, 128, mask) == 0:
        reached.append(("sched_getaffinity", pid))
    old = ctypes.create_string_buffer(16)
    if libc.syscall(302, pid, 0, None, old) == 0:
        reached.append(("prlimit64", pid))
    ts = ctypes.create_string_buffer(16)
    if libc.syscall(228, (~pid << 3) | 2, ts) == 0:  # clock_gettime of its CPU clock
        reached.append(("clock_gettime", pid))
    head, size = ctypes.c_void_p(), ctypes.c_size_t()
    if libc.syscall(274, pid, ctypes.byref(head), ctypes.byref(size)) == 0:
        reached.append(("get_robust_list", pid))
if reached:
    print("reached", reached)
else:
    raise PermissionError(1, "nothing reached")
""", _printed("reached")),
    # Class 4's relative: the code sets its own CPU limit (here to its current value: any setting
    # at all is refused, so no soft limit can be raised towards the hard one).
    "set_cpu_limit": Attack(_LIBC + _CHECK + """
limit = (ctypes.c_uint64 * 2)()
check(libc.syscall(302, 0, 0, None, limit), "prlimit64 (read)")
check(libc.syscall(302, 0, 0, limit, None), "prlimit64 (set)")
print("set", list(limit))
""", _printed("set")),
    # A syscall through the i386 ABI (int 0x80), which a filter checking x86_64 numbers alone would miss.
    "foreign_abi_int80": Attack(_LIBC + """
mmap = Image.sys.modules["mmap"]
buf = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40, prot=7)  # MAP_32BIT
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
buf.write(bytes([0xb8, 5, 0, 0, 0, 0xbb]) + (base + 64).to_bytes(4, "little") + bytes([0x31, 0xc9, 0xcd, 0x80, 0xc3]))
buf.seek(64)
buf.write(b"{secret}" + bytes(1))
fd = ctypes.CFUNCTYPE(ctypes.c_int)(base)()  # mov eax, 5 (open); mov ebx, path; xor ecx, ecx; int 0x80
if fd < 0:
    raise PermissionError(-fd, "int 0x80 open")
print(Image.os.read(fd, 100))
""", _secret_read),
    # Class 9: what the model reads shows neither the host's name nor its paths.
    "host_name": Attack('print("nodename=" + Image.os.uname().nodename)\nresult = image',
                        lambda t, r, restarts: f"nodename={socket.gethostname()}" in r.stdout, error_class=None),
    "host_paths": Attack("""
import numpy, cv2
print(Image.__file__, numpy.__file__, cv2.__file__, Image.open.__code__.co_filename)
print(Image.sys.path, Image.sys.prefix, Image.sys.executable, Image.os.environ.get("LD_LIBRARY_PATH"))
result = image
""", _host_path_shown, error_class=None),
}


@pytest.fixture(scope="module")
def escape_pools(pool):
    """One pool per mode (the hardened one is the suite's shared pool). The control inherits this
    process's environment, which holds the host secret (set by the shared pool's fixture).

    Their stdout limit is the shared pool's, far above the default 2,000 characters: a CI machine's environment is
    long, and a reply cut before the secret would fail the control run for the wrong reason."""
    cfg = SandboxConfig(workers_per_executor=1, timeout_s=5.0, memory_mb=512, max_stdout_chars=pool.cfg.max_stdout_chars)
    extra = {mode: SandboxPool(cfg, _protections=PROTECTIONS[mode]) for mode in ("kernel_only", "control")}
    yield {"hardened": pool, **extra}
    for p in extra.values():
        p.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_escape(escape_pools, photo, target, name, mode):
    attack = ATTACKS[name]
    pool = escape_pools[mode]
    restarts = pool.stats().get("zygote_restarts", 0)
    target.zygotes = tuple(slot.zygote.proc for slot in pool._slots)
    r = pool.run(attack.code.format(**target.fields), [photo])
    succeeded = attack.succeeded(target, r, pool.stats().get("zygote_restarts", 0) - restarts)
    if mode == "control":
        assert succeeded, f"the attack fails with every protection off, so it proves nothing: {r.error_class} " \
                          f"{r.error} {r.stdout}"
        return
    assert not succeeded, (r.error_class, r.error, r.stdout)
    if mode == "hardened" and attack.error_class is not None:
        assert (r.error_class, FORBIDDEN in (r.error or "")) == (attack.error_class, True), (r.error, r.stdout)
    assert target.secret not in r.stdout + (r.error or "")
    _still_serves(pool, photo)


def test_the_hardened_environment_is_reached_and_empty(pool, photo, host_secret):
    """The environment walk does reach the child's environment (it is just clean)."""
    r = pool.run("print(dict(Image.os.environ))\nresult = image", [photo])
    assert r.ok and "OMP_NUM_THREADS" in r.stdout and "CVRAY_TEST_SECRET" not in r.stdout
    assert "PYTHONPATH" not in r.stdout  # dropped once the zygote imported everything


def test_host_paths_read_as_lib(pool, photo):
    r = pool.run("print(Image.__file__)\nprint(Image.open.__code__.co_filename)\nresult = image", [photo])
    assert r.ok and r.stdout.startswith("<lib>") and "<lib>" in r.stdout.splitlines()[1], r.stdout


# -- class 1 between trajectories: one session kills another's child --------------------------------


@pytest.fixture(scope="module")
def session_pools(pool):
    cfg = SandboxConfig(workers_per_executor=1, timeout_s=5.0, memory_mb=512, session="trajectory")
    pools = {mode: SandboxPool(cfg, _protections=PROTECTIONS[mode]) for mode in MODES}
    yield pools
    for p in pools.values():
        p.close()


@pytest.mark.parametrize("mode", MODES)
def test_one_session_cannot_kill_another(session_pools, photo, mode):
    """Class 1: a session arms its response pipe so that the kernel sends SIGKILL to another
    trajectory's session child (same worker) when the parent reads its reply."""
    pool = session_pools[mode]
    assert pool.run("kept = 'alpha'\nresult = image", [photo], session_id=f"victim-{mode}").ok
    victim_pid = pool._slots[0].sessions[f"victim-{mode}"].pid  # as the children see it (their own namespace)
    r = pool.run(_ARM_SIGIO.format(pid=victim_pid), [photo], session_id=f"attacker-{mode}")
    after = pool.run("print(kept)\nresult = image", [photo], session_id=f"victim-{mode}")
    succeeded = after.error_class == "runtime" and "NameError" in (after.error or "")
    if mode == "control":
        assert succeeded, (r.error, after.error, after.stdout)
    else:
        assert not succeeded and after.ok and after.stdout == "alpha\n", (after.error_class, after.error)
        if mode == "hardened":
            assert r.error_class == "forbidden" and "F_SETOWN" in r.error
    for sid in (f"victim-{mode}", f"attacker-{mode}"):
        pool.close_session(sid)


# -- the parent's own defences ---------------------------------------------------------------------

#: The code writes a reply of its own on its response pipe (the parent reads it as the call's
#: result), then goes on running.
_FORGE = """
os = Image.os
struct = Image.sys.modules["struct"]
meta = {meta}
for fd in range(3, 16):
    try:
        os.lseek(fd, 0, 1)
        continue  # a file (our pixel buffer), not the response pipe
    except OSError:
        pass
    try:
        os.write(fd, struct.pack("<4sIIIIB", b"CVR1", len(meta), 0, 0, 0, 0) + meta)
        break
    except OSError:
        continue
{then}
"""
_FORGED_ERROR = """b'{"ok": false, "error": "forged", "error_class": "runtime"}'"""
_SPIN = "x = 0\nwhile True:\n    x += 1"


@pytest.fixture(scope="module")
def long_pools(pool):
    """Pools whose deadline (60 s) is far beyond anything a test waits for: a child that is gone
    while the test runs was ended by the parent, not by its deadline."""
    made = {}
    for session in ("call", "trajectory"):
        cfg = SandboxConfig(workers_per_executor=1, timeout_s=60.0, memory_mb=512, session=session)
        for mode in ("hardened", "control"):
            made[session, mode] = SandboxPool(cfg, _protections=PROTECTIONS[mode])
    yield made
    for p in made.values():
        p.close()


def _descriptors() -> tuple[int, int]:
    """``(pixel buffers, everything else)`` among this process's open descriptors (a buffer holds
    two: its memfd and the mapping's own duplicate; other pools of the suite hold theirs)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the directory's own descriptor
            continue
    buffers = sum("cv_ray-pixels" in link for link in links)
    return buffers, len(links) - buffers


def _settle(zygote, timeout: float = 30.0) -> None:
    """Wait (on the zygote's reports, not on a clock) until every released child is reported dead."""
    deadline = time.monotonic() + timeout
    while zygote._awaiting_exit and time.monotonic() < deadline:
        zygote._receive(0.05)
    assert not zygote._awaiting_exit, "a released child is still alive"


@pytest.mark.parametrize("meta, unbounded_error", [
    ('b"[" * 20000 + b"]" * 20000', RecursionError),
    ("""b'{"ok": true, "x": ' + b"9" * 5000 + b"}" """, ValueError),
], ids=["deep_nesting", "huge_integer"])
def test_a_forged_reply_cannot_crash_or_leak_the_parent(long_pools, photo, meta, unbounded_error):
    """Class 3: a reply the code forged (deeply nested or huge-number JSON) is a clear error for
    that call; the parent neither raises nor keeps the child's descriptors or pixel buffer.

    Control: the same bytes crash Python's JSON parser when nothing bounds it.
    Mutant: ``parse_meta`` calling ``json.loads`` without the depth and number limits (and the pool
    without its release on every path).
    """
    with pytest.raises(unbounded_error):
        json.loads(eval(meta))  # our own literal: the same bytes the child writes
    pool = long_pools["call", "hardened"]
    zygote = pool._slots[0].zygote
    pool.run("result = image", [photo])  # a spare is ready, buffers exist
    _settle(zygote)
    held, count = _descriptors(), len(zygote._buffers)
    for _ in range(8):
        r = pool.run(_FORGE.format(meta=meta, then=_SPIN), [photo])
        assert (r.ok, r.error_class) == (False, "runtime") and "result channel" in r.error
    _settle(zygote)
    assert not zygote._tracked
    # Buffers are lent again (a few are in flight: the spare's, and ones whose child's death was
    # not reported before the next fork), not one more 64 MB buffer per call; no other descriptor stays.
    assert len(zygote._buffers) <= 6
    now = _descriptors()
    assert now[1] == held[1] and now[0] - held[0] == 2 * (len(zygote._buffers) - count)
    _still_serves(pool, photo)


@pytest.mark.parametrize("mode", ["hardened", "control"])
def test_a_call_child_is_killed_when_its_call_ends(long_pools, photo, mode):
    """Class 4 (call mode): the code forges a reply and goes on running; the parent returns the
    reply and the child ends at once, not at its 60 s deadline.

    Mutant: ``zygote.release(child, kill=False)`` for a call that got its reply.
    """
    pool = long_pools["call", mode]
    zygote = pool._slots[0].zygote
    _settle(zygote)
    r = pool.run(_FORGE.format(meta=_FORGED_ERROR, then=_SPIN), [photo])
    assert r.error == "forged"
    (child,) = zygote._awaiting_exit.values()
    if mode == "control":  # nothing ends it: it runs on, in its own right
        assert _state(child.host_pid) == "R"
        os.kill(child.host_pid, signal.SIGKILL)
    _settle(zygote)


def _state(host_pid: int) -> str:
    with open(f"/proc/{host_pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(host_pid: int, want: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    state = _state(host_pid)
    while state != want and time.monotonic() < deadline:
        time.sleep(0.01)
        state = _state(host_pid)
    return state


@pytest.mark.parametrize("mode", ["hardened", "control"])
def test_a_session_child_gets_no_cpu_between_its_calls(long_pools, photo, mode):
    """Class 4 (session mode): after a forged reply the code keeps running, its deadline cleared;
    the parent stops the child (SIGSTOP) until its next call, whose deadline bounds it again.

    Mutant: ``ZygoteProcess.execute`` without the SIGSTOP after a session reply.
    """
    pool = long_pools["trajectory", mode]
    r = pool.run(_FORGE.format(meta=_FORGED_ERROR, then=_SPIN), [photo], session_id="spinner")
    assert r.error == "forged"
    child = pool._slots[0].sessions["spinner"]
    if mode == "control":
        assert _state(child.host_pid) == "R"
    else:
        assert _wait_state(child.host_pid, "T") == "T"  # SIGSTOP sent before run() returned; it lands at once
    pool.close_session("spinner")


def test_the_codes_exit_status_is_never_an_infrastructure_failure(long_pools, photo):
    """Class 5: the code exits with the status the child uses for its own set-up failures (70);
    the call is the code's failure (``runtime``), run once, with no zygote restart.

    Control: the same status from a child that was not ready yet is the infrastructure's.
    Mutant: classify_exit reading exit status 70 as ``sandbox`` whatever the readiness.
    """
    assert classify_exit({"ready": False, "reason": "exited", "code": 70}, 5.0, 512)[0] == "sandbox"
    pool = long_pools["call", "hardened"]
    zygote = pool._slots[0].zygote
    served, restarts = zygote.served, pool.stats().get("zygote_restarts", 0)
    for status in (70, 71):
        r = pool.run(f"Image.os._exit({status})", [photo])
        assert r.error_class == "runtime" and f"exit status {status}" in r.error
    assert zygote.served == served + 2 and pool.stats().get("zygote_restarts", 0) == restarts
    assert pool._slots[0].zygote is zygote


_CLOSE_CHANNEL = """
os = Image.os
for fd in range(3, 16):
    try:
        os.close(fd)
    except OSError:
        continue
x = 0
while True:
    x += 1
"""


@pytest.mark.parametrize("mode", ["hardened", "control"])
def test_closing_the_result_channel_is_the_codes_error(long_pools, photo, mode):
    """The code closes its pipes and keeps running: the parent kills it at once and reports a
    runtime error; without that, the parent waits for an exit report that never comes and
    restarts the zygote (an infrastructure failure the code could trigger at will).

    Mutant: no kill when the reply pipe ends without a reply (``guards`` ignored in execute).
    """
    pool = long_pools["call", mode]
    restarts = pool.stats().get("zygote_restarts", 0)
    r = pool.run(_CLOSE_CHANNEL, [photo])
    restarted = pool.stats().get("zygote_restarts", 0) > restarts
    if mode == "control":
        assert restarted, (r.error_class, r.error)
    else:
        assert not restarted and r.error_class == "runtime" and "result channel" in r.error


def test_an_outside_sigkill_is_not_reported_as_memory(photo):
    """Class 9: a ready child killed from outside (not by us, its CPU limit or the OOM killer) is an
    infrastructure failure, retried once on a fresh zygote, never the model's ``memory`` error.

    The child is a session's, ready since its first call; it is killed once its second call began.
    Mutant: classify_exit's old rule, SIGKILL with reason ``exited`` -> ``memory``.
    """
    cfg = SandboxConfig(workers_per_executor=1, timeout_s=2.0, memory_mb=512, session="trajectory")
    with SandboxPool(cfg) as small:
        assert small.run("result = image", [photo], session_id="s").ok
        zygote, child = small._slots[0].zygote, small._slots[0].sessions["s"]
        served = zygote.served
        results = []
        call = threading.Thread(target=lambda: results.append(small.run("while True:\n    pass", [photo], session_id="s")))
        call.start()
        deadline = time.monotonic() + 30
        while zygote.served == served and time.monotonic() < deadline:  # the second call has begun
            time.sleep(0.005)
        os.kill(child.host_pid, signal.SIGKILL)
        call.join(timeout=60)
        (r,) = results
        assert r.error_class == "timeout"  # the retry, on a fresh zygote, ran into the deadline
        assert small.stats().get("zygote_restarts", 0) == 1 and small.stats().get("memory", 0) == 0


# -- resource bombs and state -----------------------------------------------------------------------


def test_a_long_loop_times_out(pool, photo):
    r = pool.run("while True:\n    pass", [photo])
    assert r.error_class == "timeout", r.error
    assert r.seconds >= pool.cfg.timeout_s  # the deadline is a wall clock armed after the call began
    _still_serves(pool, photo)


@pytest.fixture(scope="module")
def patient_pool():
    """Memory bombs on a loaded machine can take seconds to hit the limit: a deadline they never meet."""
    with SandboxPool(SandboxConfig(workers_per_executor=1, timeout_s=60.0, memory_mb=512,
                                   max_output_pixels=2048 * 2048)) as p:
        yield p


@pytest.mark.parametrize("code, error_class", [
    ("blob = bytearray(50 * 2**30)", "memory"),
    ("result = Image.new('RGB', (60000, 60000))", "memory"),
    ("result = Image.new('L', (2500, 2500))", "bad_image"),
])
def test_resource_bombs(patient_pool, photo, code, error_class):
    r = patient_pool.run(code, [photo])
    assert r.error_class == error_class, r.error
    _still_serves(patient_pool, photo)


def test_the_memory_limit_is_the_kernels(escape_pools, photo):
    """The memory bomb's control: with the kernel layers off the same 1.5 GB allocation succeeds."""
    code = "blob = np.empty(1536 * 2**20, np.uint8)\nresult = image"  # reserved, never touched
    assert escape_pools["hardened"].run(code, [photo]).error_class == "memory"
    assert escape_pools["kernel_only"].run(code, [photo]).error_class == "memory"
    assert escape_pools["control"].run(code, [photo]).ok


def test_monkeypatching_does_not_leak_into_later_calls(pool, photo):
    r = pool.run("Image.Image.rotate = lambda self, *a, **k: self\nresult = image.rotate(90)", [photo])
    assert r.ok
    for _ in range(3):  # whichever worker serves them, every later call sees the real rotate
        later = pool.run("result = image.rotate(90, expand=True)", [photo])
        assert later.image.size == (photo.height, photo.width)


def test_every_allowed_syscall_is_argued_in_the_docs():
    """docs/sandbox.md carries the syscall-by-syscall argument; it must list exactly the allow-list."""
    from pathlib import Path

    from cv_ray.sandbox.hardening import SYSCALL_POLICY

    doc = (Path(__file__).resolve().parents[2] / "docs" / "sandbox.md").read_text()
    table = doc.split("<!-- syscalls -->")[1]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE))
    assert documented == set(SYSCALL_POLICY), documented ^ set(SYSCALL_POLICY)
