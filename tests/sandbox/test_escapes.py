"""The escape suite: known ways out of a restricted ``exec``, each run in a real hardened child.

Every attempt must fail with a clear error (or reach nothing secret), and the same pool must then
serve a normal request correctly. The host secret is an environment variable of this process set
before the pool started, and a world-readable file the test writes.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from PIL import Image

FORBIDDEN = "file, network and process access are not available"


def _still_serves(pool, photo) -> None:
    r = pool.run("result = image.transpose(Image.Transpose.ROTATE_270)", [photo])
    assert r.ok, r.error
    assert np.array_equal(np.asarray(r.image), np.asarray(photo.transpose(Image.Transpose.ROTATE_270)))


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory, host_secret):
    path = tmp_path_factory.mktemp("host") / "secret.txt"
    path.write_text(host_secret)
    path.chmod(0o644)  # world-readable: only the sandbox's own layers can keep it out
    return str(path)


ESCAPES = {
    "subclass_walk": """
for cls in ().__class__.__base__.__subclasses__():
    if cls.__name__ == "_wrap_close":
        host_os = cls.__init__.__globals__
result = host_os["system"]("cat {secret} > /tmp/pwned")
""",
    "subclass_walk_open": """
host_os = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "_wrap_close"][0].__init__.__globals__
fd = host_os["open"]("{secret}", host_os["O_RDONLY"])
print(host_os["read"](fd, 100))
""",
    "module_attribute_pivot": 'Image.os.system("id > /tmp/pwned")',
    "computed_getattr": """
g = getattr(Image.open, "__glo" + "bals__")
print(g["os"].listdir("/"))
""",
    "generator_frame_walk": """
def gen():
    yield g.gi_frame.f_back
g = gen()
frame = next(g)
while frame.f_back is not None:
    frame = frame.f_back
host = frame.f_globals
print(sorted(host["os"].environ.items()))
host["os"].open("{secret}", 0)
""",
    "traceback_frame_walk": """
try:
    1 / 0
except ZeroDivisionError as exc:
    frame = exc.__traceback__.tb_frame
while frame.f_back is not None:
    frame = frame.f_back
print(frame.f_globals.get("os").environ)
builtins_open = frame.f_builtins["open"]
print(builtins_open("/proc/self/environ").read())
""",
    "format_string_leak": """
print("{{0.__globals__[os].environ}}".format(Image.open))
print("{{0.__globals__[sys].modules[os].environ}}".format(Image.open))
open("{secret}")
""",
    "ctypes_raw_syscalls": """
ctypes = Image.sys.modules["ctypes"]
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.syscall(257, -100, b"{secret}", 0)   # openat
if fd < 0:
    raise PermissionError(ctypes.get_errno(), "openat")
print(Image.os.read(fd, 100))
""",
    "ctypes_fork": """
ctypes = Image.sys.modules["ctypes"]
libc = ctypes.CDLL(None, use_errno=True)
pid = libc.syscall(57)   # fork
if pid < 0:
    raise PermissionError(ctypes.get_errno(), "fork")
""",
    "read_shadow": 'print(open("/etc/shadow").read())',
    "read_secret_file": 'print(open("{secret}").read())',
    "read_parent_environ": 'print(open("/proc/%d/environ" % Image.os.getppid(), "rb").read())',
    "write_file": 'open("/tmp/pwned", "w").write("x")',
    "spawn_os_system": 'Image.os.system("touch /tmp/pwned")',
    "spawn_posix_spawn": 'Image.os.posix_spawn("/bin/sh", ["sh", "-c", "touch /tmp/pwned"], {{}})',
    "spawn_exec": 'Image.os.execv("/bin/sh", ["sh", "-c", "touch /tmp/pwned"])',
    "kill_parent": "Image.os.kill(Image.os.getppid(), 9)",
    "fork_bomb": "while True:\n    Image.os.fork()",
    "thread": 'Image.sys.modules["_thread"].start_new_thread(print, ("x",))',
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_is_blocked(pool, photo, secret_file, host_secret, name):
    code = ESCAPES[name].format(secret=secret_file)
    r = pool.run(code, [photo])
    assert not r.ok
    assert r.error_class == "forbidden", (r.error_class, r.error, r.stdout)
    assert FORBIDDEN in r.error
    assert host_secret not in (r.stdout + r.error)
    _still_serves(pool, photo)


def test_no_host_secret_in_the_environment(pool, photo, host_secret):
    r = pool.run("print(dict(Image.os.environ))\nresult = image", [photo])
    assert r.ok and host_secret not in r.stdout and "CVRAY_TEST_SECRET" not in r.stdout
    assert "PYTHONPATH" in r.stdout  # the walk did reach the environment: it is just empty of secrets


def test_tcp_to_localhost_is_blocked(pool, photo, host_secret):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(3.0)
    port = server.getsockname()[1]
    connections = []
    accept = threading.Thread(target=lambda: connections.append(_accept(server)), daemon=True)
    accept.start()
    code = (f'sock = Image.sys.modules["socket"]\n'
            f's = sock.create_connection(("127.0.0.1", {port}), timeout=1)\n'
            f's.sendall(b"{host_secret}")')
    r = pool.run(code, [photo])
    accept.join(timeout=5)
    server.close()
    assert r.error_class == "forbidden" and FORBIDDEN in r.error
    assert connections == [None]
    _still_serves(pool, photo)


def _accept(server):
    try:
        return server.accept()
    except TimeoutError:
        return None


def test_files_were_not_written():
    import os

    assert not os.path.exists("/tmp/pwned")


@pytest.mark.parametrize("code, error_class", [
    ("while True:\n    pass", "timeout"),
    ("blob = bytearray(50 * 2**30)", "memory"),
    ("result = Image.new('RGB', (60000, 60000))", "memory"),
    ("result = Image.new('L', (2500, 2500))", "bad_image"),
])
def test_resource_bombs(pool, photo, code, error_class):
    r = pool.run(code, [photo])
    assert r.error_class == error_class, r.error
    _still_serves(pool, photo)


def test_monkeypatching_does_not_leak_into_later_calls(pool, photo):
    r = pool.run("Image.Image.rotate = lambda self, *a, **k: self\nresult = image.rotate(90)", [photo])
    assert r.ok
    for _ in range(3):  # whichever worker serves them, every later call sees the real rotate
        later = pool.run("result = image.rotate(90, expand=True)", [photo])
        assert later.image.size == (photo.height, photo.width)
