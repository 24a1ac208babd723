"""The server's socket file: where it lives, replacing a stale one, refusing a live one, its permissions."""
from __future__ import annotations

import os
import socket
import stat


def default_socket_path() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "kvmux.sock")
    return f"/tmp/kvmux-{os.getuid()}.sock"


class SocketInUse(RuntimeError):
    """Another process is serving on the path, or the path is not a socket."""


def claim(path: str) -> None:
    """Make `path` free to bind: remove a stale socket file, refuse a live one or any other file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody listens: a server died without cleaning up. Its file is ours to replace.
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketInUse(f"a server is already listening on {path}; stop it or choose another --socket")


def bind(path: str, mode: int = 0o600) -> socket.socket:
    """A listening-ready socket bound at `path` whose file has permissions `mode`."""
    if len(os.fsencode(path)) >= 108:
        raise ValueError(f"socket path {path!r} is too long for a Unix socket (at most 107 bytes)")
    claim(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the file private from the moment it exists, so no other
    # user can connect in the window before chmod widens it to `mode`.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    return sock


def remove(path: str, inode: int) -> None:
    """Unlink the socket file, unless another server has since replaced it."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
