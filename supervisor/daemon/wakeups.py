"""When the pump must read a job's files: on inotify events, never on a fast timer.

A daemon with 8 trainers and 100 queued jobs used to read every job's files
five times a second, and an idle daemon woke as often for nothing. Here the
kernel says which job's folders changed (`runs/<job>/` holds progress.jsonl,
`runs/<job>/attempt-<n>/` the output log); the inotify descriptor is read in
the event loop (no thread). While the pump works or rests, the descriptor is
not listened to, so a burst of appends costs one wake-up, not one per line.

Without inotify (no libc symbol, the instance or watch limit reached) the pump
polls every job at FALLBACK_POLL_S instead, and says so once in the log.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("ftsup.daemon")

FALLBACK_POLL_S = 0.5
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE_SELF = 0x400
IN_IGNORED = 0x8000
IN_Q_OVERFLOW = 0x4000
IN_ONLYDIR = 0x01000000
WATCH_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then `len` bytes of name)


class InotifyUnavailable(OSError):
    pass


class _Libc:
    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
            self.init1 = libc.inotify_init1
            self.add_watch = libc.inotify_add_watch
            self.rm_watch = libc.inotify_rm_watch
        except (OSError, AttributeError) as exc:
            raise InotifyUnavailable(errno.ENOSYS, f"no inotify in libc: {exc}") from None
        self.init1.argtypes = [ctypes.c_int]
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class FolderWatch:
    """inotify on folders, each under a key (a job's name); `on_change(keys)` gets
    the keys whose folders changed, from the event loop."""

    def __init__(self, on_change: Callable[[set[str]], None]) -> None:
        self._libc = _Libc()
        fd = self._libc.init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise InotifyUnavailable(code, f"inotify_init1: {os.strerror(code)}")
        self._fd = fd
        self._on_change = on_change
        self._keys: dict[int, str] = {}  # watch descriptor -> key
        self._folders: dict[str, dict[Path, int]] = {}  # key -> folder -> descriptor
        self._listening = False
        self.overflows = 0

    def watch(self, key: str, folder: Path) -> None:
        """Raises InotifyUnavailable (the limit of watches reached, no such folder)."""
        if folder in self._folders.get(key, {}):
            return
        wd = self._libc.add_watch(self._fd, os.fsencode(folder), WATCH_MASK)
        if wd < 0:
            code = ctypes.get_errno()
            raise InotifyUnavailable(code, f"watching {folder}: {os.strerror(code)}")
        self._keys[wd] = key
        self._folders.setdefault(key, {})[folder] = wd

    def watching(self, key: str) -> set[Path]:
        return set(self._folders.get(key, {}))

    def unwatch(self, key: str, folder: Path | None = None) -> None:
        """Stop watching `folder` of `key` (None: all of them)."""
        folders = self._folders.get(key, {})
        for path in [folder] if folder is not None else list(folders):
            wd = folders.pop(path, None)
            if wd is not None and self._keys.pop(wd, None) is not None:
                self._libc.rm_watch(self._fd, wd)  # gone already: EINVAL, nothing to do
        if not folders:
            self._folders.pop(key, None)

    def listen(self, on: bool) -> None:
        """Listen to the descriptor (or not: the events wait in the kernel, merged)."""
        if on == self._listening:
            return
        loop = asyncio.get_running_loop()
        if on:
            loop.add_reader(self._fd, self._read)
        else:
            loop.remove_reader(self._fd)
        self._listening = on

    def _read(self) -> None:
        changed: set[str] = set()
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                break
            changed |= self._parse(data)
        if changed:
            self._on_change(changed)

    def _parse(self, data: bytes) -> set[str]:
        changed: set[str] = set()
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self.overflows += 1
                changed |= set(self._folders)  # events were lost: every key may have changed
                continue
            key = self._keys.get(wd)
            if key is None:
                continue
            changed.add(key)
            if mask & IN_IGNORED:  # the folder was removed: the kernel dropped the watch
                self._keys.pop(wd, None)
                folders = self._folders.get(key, {})
                for path, known in list(folders.items()):
                    if known == wd:
                        del folders[path]
        return changed

    def close(self) -> None:
        if self._listening:
            self.listen(False)
        os.close(self._fd)


class PumpWakeups:
    """Which jobs the pump must read next, and whether it may sleep until told.

    `changed(names)` (inotify, the event bus) marks jobs due; `wait(timeout)`
    returns when some are, or after `timeout` (None: only an event wakes it).
    `passes` and `reads` count the pump's work: an idle daemon leaves both still.
    """

    def __init__(self) -> None:
        self._due: set[str] = set()
        self._event = asyncio.Event()
        self.passes = 0
        self.reads = 0
        self.waiting_without_timeout = False
        self.watch: FolderWatch | None = None
        self.polling = False

    def open_watch(self) -> None:
        """inotify if it can be had; else the fallback poll, logged once."""
        try:
            self.watch = FolderWatch(self.changed)
        except InotifyUnavailable as exc:
            self.fall_back(str(exc))

    def fall_back(self, reason: str) -> None:
        if self.polling:
            return
        log.warning(
            "progress files are polled every %.1fs instead of watched (%s)", FALLBACK_POLL_S, reason
        )
        self.polling = True
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        self._event.set()  # a pump asleep until an event must start polling now

    def changed(self, names: set[str]) -> None:
        self._due |= names
        self._event.set()

    def take(self) -> set[str]:
        due, self._due = self._due, set()
        self._event.clear()
        return due

    async def wait(self, timeout: float | None) -> None:
        if self._due:
            return
        if self.watch is not None:
            self.watch.listen(True)
        self.waiting_without_timeout = timeout is None
        try:
            if timeout is None:
                await self._event.wait()
            else:
                await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.waiting_without_timeout = False
            if self.watch is not None:
                self.watch.listen(False)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
