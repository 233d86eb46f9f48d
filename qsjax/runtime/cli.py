"""Shared command-line plumbing: how every `python -m qsjax.*` command ends.

- A user error (UsageError, or a bad flag) prints one `error: ...` line and exits with status 2.
- Ctrl-C (SIGINT) or SIGTERM prints one `interrupted` line and exits with 130 / 143, no traceback;
  files being written are removed on the way out (they are written under temporary names).
- A closed stdout (`... | head`) ends the command quietly with status 141, like a Unix tool.

Inside `exit_on_interrupt()`, where the main thread may sit in one long compiled XLA call that
Python signal handlers cannot interrupt, a watcher thread ends the process within moments instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors (unknown flag, bad value) are one `error: ...` line, status 2."""

    def error(self, message):
        message = " ".join(message.split())
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """An error the user can fix (a bad argument, a missing file): shown without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def exit_status(interrupt: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def print_error(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)  # always a single line


def _raise_terminated(signum, frame):
    raise Terminated()


def quiet_broken_pipe() -> int:
    """stdout's reader went away: point stdout at /dev/null (so that the interpreter's last flush
    does not complain) and return the status a process killed by SIGPIPE has."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def run_cli(main, argv=None):
    """Run `main(argv)` and exit with its return value (see the module docstring)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        status = main(argv)
        sys.stdout.flush()
    except UsageError as error:
        print_error(error)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(exit_status(interrupt))
    except BrokenPipeError:
        sys.exit(quiet_broken_pipe())
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(status or 0)


@contextlib.contextmanager
def exit_on_interrupt(on_interrupt=None):
    """Within this block, SIGINT or SIGTERM ends the process at once (os._exit, status 130 / 143)
    after `on_interrupt(signum)` has printed what it wants, even while the main thread is inside a
    compiled XLA program.  The C-level signal handler writes the signal number to a pipe from
    whichever thread receives it; a watcher thread reads it.  Nothing may be written to files here
    (an exit in the middle would leave them behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {s: signal.signal(s, lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch():
        while True:
            data = os.read(read_fd, 1)
            if not data:  # the block ended
                return
            signum = data[0]
            if signum in (signal.SIGINT, signal.SIGTERM):
                break
        try:
            if on_interrupt is not None:
                on_interrupt(signum)
            print("interrupted", file=sys.stderr, flush=True)
        finally:
            os._exit(128 + signum)

    watcher = threading.Thread(target=watch, name="qsjax-interrupt", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(write_fd)  # the watcher's read returns b""
        watcher.join()
        os.close(read_fd)


def check_output_file(flag: str, path: str) -> None:
    """Before any slow work: `path` (not "-") must be a file we can create or replace, so that a
    long run never ends unable to write its results.  A symlink is checked (and later written)
    through to its target."""
    if path == "-":
        return
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {os.path.dirname(path) or '.'} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})") from None
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is not writable")


def write_file_atomic(path: str, text: str | bytes) -> None:
    """Write `text` (UTF-8; or bytes as they are) to a temporary file beside `path`'s target, then
    rename it into place: never a half-written file.  The file gets the mode an ordinary write would give it (an existing file's
    mode, else 0666 less the umask), and a symlink stays a symlink (its target is replaced)."""
    target = os.path.realpath(path)
    if os.path.exists(target):
        mode = os.stat(target).st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
