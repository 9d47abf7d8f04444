"""DataDirLock: one llmpulse process per embedded data directory, and a helpful refusal.

chDB holds a file lock on its data directory, and a second process that opens it gets
"Cannot lock file .../status. Another server instance in same directory is already running".
We take our own ``flock`` first and record who holds it (pid, command, and the HTTP address
when it is ``llmpulse serve``), so the second process can say which process holds the
directory and how to query through it instead. Within one process the lock is shared
(chDB itself allows many clients on one engine): it is reference-counted per directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "llmpulse.lock"

_held: dict[Path, tuple[int, int, dict[str, Any]]] = {}
"""Directory → (fd, users, holder info) for the locks this process holds."""
_guard = threading.Lock()


class DataDirBusy(RuntimeError):
    """Another process owns the data directory; the message says which and what to do."""

    def __init__(self, data_dir: Path, holder: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.holder = holder
        pid = holder.get("pid", "?")
        what = holder.get("purpose", "an llmpulse process")
        since = holder.get("started_at")
        when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        server = holder.get("server_url")
        hint = (
            f"It serves queries at {server}: run the command with `--server {server}` "
            "(or let it find the server automatically), or stop that process first."
            if server
            else "Stop that process first, or point this command at another --data-dir."
        )
        super().__init__(
            f"The data directory {data_dir} is in use by `{what}` (pid {pid}{when}); "
            f"embedded ClickHouse (chDB) allows one process per data directory. {hint}"
        )


def read_holder(data_dir: Path) -> dict[str, Any] | None:
    try:
        text = (data_dir / LOCK_NAME).read_text()
        data = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.path = self.data_dir / LOCK_NAME
        self._acquired = False

    def acquire(self, purpose: str) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with _guard:
            held = _held.get(self.data_dir)
            if held is not None:
                fd, users, info = held
                _held[self.data_dir] = (fd, users + 1, info)
                self._acquired = True
                return
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DataDirBusy(self.data_dir, read_holder(self.data_dir) or {}) from None
            info = {"pid": os.getpid(), "purpose": purpose, "argv": sys.argv, "started_at": time.time()}
            _held[self.data_dir] = (fd, 1, info)
            _write(fd, info)
            self._acquired = True

    def update(self, **info: Any) -> None:
        """Advertise more about the holder (the server records its URL here)."""
        with _guard:
            fd, _, current = _held[self.data_dir]
            current.update(info)
            _write(fd, current)

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        with _guard:
            fd, users, info = _held[self.data_dir]
            if users > 1:
                _held[self.data_dir] = (fd, users - 1, info)
                return
            del _held[self.data_dir]
            try:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def _write(fd: int, info: dict[str, Any]) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
