"""A stand-in for `ssh` in the tunnel tests (no real SSH server in tests).

It understands the two commands `ftsup.tui.ssh` builds: with `-N -L
LOCAL:REMOTE` it forwards the local Unix socket to the remote one for real
(both on this machine), until SIGTERM; otherwise it prints
`$FAKE_SSH_REMOTE_SOCKET`, as the server's `sh` would print the socket path.
`FAKE_SSH_FAIL=1` makes it fail like ssh does (exit 255, a message on stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def forward(local: str, remote: str) -> None:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            r_reader, r_writer = await asyncio.open_unix_connection(remote)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, r_writer), pipe(r_reader, writer))

    with contextlib.suppress(FileNotFoundError):
        os.unlink(local)  # StreamLocalBindUnlink=yes
    server = await asyncio.start_unix_server(on_client, path=local)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(local)


def main(argv: list[str]) -> int:
    if os.environ.get("FAKE_SSH_FAIL"):
        print("ssh: connect to host server port 22: Connection refused", file=sys.stderr)
        return 255
    if "-N" in argv:
        local, remote = argv[argv.index("-L") + 1].split(":", 1)
        asyncio.run(forward(local, remote))
        return 0
    print(os.environ.get("FAKE_SSH_REMOTE_SOCKET", ""))
    Path(os.environ.get("FAKE_SSH_LOG", os.devnull)).write_text(" ".join(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
