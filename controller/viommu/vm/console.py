"""The guest's serial console, driven with pexpect.

Everything the guest prints is kept in a transcript (and a log file), so a caller can take a
mark, act, and then wait for a line that appeared after the mark even if other commands ran
in between. Commands run in the guest's shell with an exit-status marker after them.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import socket
import time
from pathlib import Path

import pexpect
import pexpect.fdpexpect

# Lines the kernel printed (console timestamps are on in Debian kernels).
KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] .*$\n?", re.M)


class ConsoleError(RuntimeError):
    pass


class ConsoleClosed(ConsoleError):
    """QEMU closed the console: it is exiting (or has exited)."""


@dataclasses.dataclass(frozen=True)
class CommandResult:
    command: str
    output: str
    status: int

    def program_lines(self) -> list[str]:
        """Output lines without the kernel's console lines that interleaved with it (a
        command that prints kernel-log lines itself, like dmesg, wants `output`)."""
        return KERNEL_LINE.sub("", self.output).splitlines()

    def check(self) -> CommandResult:
        if self.status != 0:
            raise ConsoleError(f"guest command {self.command!r} exited {self.status}:\n"
                               f"{self.output}")
        return self


class _Transcript:
    """pexpect's logfile_read: keeps every byte the guest printed, and logs it."""

    def __init__(self, log_path: Path) -> None:
        self.text = ""
        self._log = open(log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115

    def write(self, data: str) -> None:
        self.text += data.replace("\r", "")
        self._log.write(data.replace("\r", ""))

    def flush(self) -> None:
        self._log.flush()

    def close(self) -> None:
        self._log.close()


class Console:
    def __init__(self, sock: socket.socket, log_path: Path) -> None:
        self._sock = sock
        self._transcript = _Transcript(log_path)
        self.child = pexpect.fdpexpect.fdspawn(sock.fileno(), encoding="utf-8",
                                               codec_errors="replace", timeout=30)
        self.child.logfile_read = self._transcript
        self._tokens = itertools.count(1)

    @property
    def transcript(self) -> str:
        return self._transcript.text

    def mark(self) -> int:
        """A position in the transcript; wait_for(since=mark) sees only later output."""
        self._pump(0)
        return len(self._transcript.text)

    def _pump(self, timeout: float) -> None:
        """Read whatever the guest printed, waiting up to `timeout` for the first byte."""
        try:
            while True:
                self.child.read_nonblocking(65536, timeout=timeout)
                timeout = 0
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            raise ConsoleClosed("the guest console closed (QEMU exited?)") from None

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 30,
                 since: int = 0) -> re.Match:
        """Wait for a regex (multiline) to match the transcript after `since`."""
        regex = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self._transcript.text, since)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = self._transcript.text[since:][-2000:]
                raise ConsoleError(f"no console line matched {regex.pattern!r} within "
                                   f"{timeout:g} s; console since the mark:\n{tail}")
            self._pump(min(remaining, 0.2))

    def lines_since(self, since: int, pattern: str | re.Pattern) -> list[str]:
        regex = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        self._pump(0)
        return [m.group(0) for m in regex.finditer(self._transcript.text, since)]

    def send_line(self, text: str) -> None:
        self.child.sendline(text)

    def run(self, command: str, timeout: float = 30) -> CommandResult:
        """Run a shell command in the guest: its output and exit status. Kernel console
        lines printed meanwhile are in the output too (see CommandResult.program_lines)."""
        token = next(self._tokens)
        start = self.mark()
        # The marker is printed by a second command, so $? is the first one's status; the
        # pattern needs digits, so an echoed "%d" can never match it.
        self.child.sendline(command)
        self.child.sendline(f"printf '\\n@@rc:{token}:%d@@\\n' $?")
        try:
            self.child.expect(rf"@@rc:{token}:(\d+)@@", timeout=timeout)
        except pexpect.TIMEOUT:
            raise ConsoleError(f"guest command {command!r} did not finish within {timeout:g} s; "
                               f"console:\n{self._transcript.text[start:][-2000:]}") from None
        except pexpect.EOF:
            raise ConsoleClosed(f"the guest console closed while running {command!r}") from None
        status = int(self.child.match.group(1))
        raw = self._transcript.text[start:]
        raw = raw[:raw.rfind(f"@@rc:{token}:")]
        return CommandResult(command, raw.strip("\n"), status)

    def close(self) -> None:
        try:
            self._pump(0)  # the last of it, into the log
        except ConsoleClosed:
            pass  # nothing more to read
        self._transcript.close()
        self._sock.close()
