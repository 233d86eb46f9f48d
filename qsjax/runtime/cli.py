"""Shared command-line plumbing: how every `python -m qsjax.*` command ends.

- A user error (UsageError, or a bad flag) prints one `error: ...` line and exits with status 2.
- Ctrl-C (SIGINT) or SIGTERM prints one `interrupted` line and exits with 130 / 143, no traceback;
  files being written are removed on the way out (they are written under temporary names).
- A closed stdout (`... | head`) ends the command quietly with status 141, like a Unix tool; any
  other failure to write stdout (a full disk, stdout closed at start) is one `error:` line, status
  2, after the output files are written (`write_results`, `stdout_status`).
- Output files (`check_output_file`, `check_not_inputs`, `write_output`) are checked before any
  work, are never one of the command's inputs, and are written without destroying anything: a
  regular file (or a new path) is replaced atomically, a device, FIFO or /dev/stdout is written
  into as a shell redirection would be, never unlinked or renamed over.

Inside `exit_on_interrupt()`, where the main thread may sit in one long compiled XLA call that
Python signal handlers cannot interrupt, a watcher thread ends the process within moments instead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import stat
import signal
import sys
import tempfile
import threading
from typing import NamedTuple


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
    discard_stdout()
    return 128 + signal.SIGPIPE


def run_cli(main, argv=None):
    """Run `main(argv)` and exit with its return value (see the module docstring)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    if sys.stdout is None:  # started with stdout closed: no file opened later may become descriptor 1
        discard_stdout()
    try:
        status = main(argv)
        if sys.stdout is not None:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                raise
            except OSError as e:
                discard_stdout()
                raise UsageError(f"cannot write to stdout ({e.strerror or e})") from None
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


# ---------------------------------------------------------------------------------------------
# Output files: checked before any work, never one of the command's inputs, and written without
# destroying anything (a regular file is replaced atomically; a device, FIFO or /dev/stdout is
# written into, like a shell redirection does)

FD_PATH = re.compile(r"/dev/(?:fd/(\d+)|(stdout)|(stderr))|/proc/(?:self|thread-self|\d+)/fd/(\d+)")


class Target(NamedTuple):
    """Where an output path leads."""

    path: str  # the resolved file (symlinks followed)
    fd: int | None  # /dev/stdout, /dev/stderr, /dev/fd/N: written to this open descriptor
    special: bool  # an existing device, FIFO or socket: opened and written, never replaced


def _named_fd(path: str) -> int | None:
    """The descriptor `path` names, following its symlinks one by one (realpath would follow
    /proc/self/fd/1 on to the file that stdout happens to be)."""
    for _ in range(40):
        match = FD_PATH.fullmatch(os.path.normpath(os.path.abspath(path)))
        if match:
            number, out, err, proc = match.groups()
            return 1 if out else 2 if err else int(number or proc)
        if not os.path.islink(path):
            return None
        path = os.path.join(os.path.dirname(os.path.abspath(path)), os.readlink(path))
    return None


def output_target(path: str) -> Target:
    fd = _named_fd(path)
    target = os.path.realpath(path)
    try:
        mode = os.stat(target).st_mode
    except OSError:
        mode = None
    special = mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)
    return Target(target, fd, special)


DTYPES = ("float32", "bfloat16", "float16")


def add_dtype_argument(group) -> None:
    """--dtype, the same on every command that loads a model."""
    group.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and activations (default float32)")


def check_output_file(flag: str, path: str) -> None:
    """Before any slow work: `path` (not "-") must be a file we can create or replace (or a device,
    FIFO or open descriptor we can write into), so that a long run never ends unable to write its
    results.  A symlink is checked (and later written) through to its target."""
    if path == "-":
        return
    if path == "":
        raise UsageError(f"{flag} is empty; give a file name")
    target, fd, special = output_target(path)
    if fd is not None:
        try:
            os.fstat(fd)
        except OSError:
            raise UsageError(f"{flag} {path}: descriptor {fd} is not open") from None
        return
    if os.path.isdir(target):
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if special:
        if stat.S_ISSOCK(os.stat(target).st_mode):
            raise UsageError(f"{flag} {path} is a socket; give a file name")
        if not os.access(target, os.W_OK):
            raise UsageError(f"{flag} {path}: it is not writable")
        return
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        if os.path.islink(path):
            raise UsageError(f"{flag} {path} links to {target}, whose directory {parent} does not exist")
        raise UsageError(f"{flag} {path}: directory {os.path.dirname(path) or '.'} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})") from None
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is not writable")


def _same_file(output: str, fd: int | None, source: str) -> bool:
    try:
        out_stat = os.fstat(fd) if fd is not None else os.stat(output)
        return os.path.samestat(out_stat, os.stat(source))
    except OSError:  # an output not there yet is the same file only by name
        return fd is None and os.path.realpath(output) == os.path.realpath(source)


def check_not_inputs(outputs, inputs) -> None:
    """Refuse an output that is one of the command's inputs (by its resolved path, or the same file
    under another name: a symlink, a hard link, /dev/stdout redirected to it).  `outputs`: (flag,
    path) pairs, a path None or "-" skipped; `inputs`: (label, path) pairs, e.g. from model_inputs."""
    inputs = [(label, str(p)) for label, p in inputs if p is not None]
    for flag, path in outputs:
        if path in (None, "-", ""):
            continue
        fd = _named_fd(path)
        for label, source in inputs:
            if _same_file(path, fd, source):
                raise UsageError(f"{flag} {path} is the input {label} ({source}); writing it would destroy it, so "
                                 "give another file name")


def model_inputs(model_dir) -> list[tuple[str, str]]:
    """The files of a model directory (config, weights, tokenizer) as inputs for check_not_inputs."""
    try:
        return [("model file", entry.path) for entry in os.scandir(model_dir) if entry.is_file()]
    except OSError:
        return []


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


def write_output(flag: str, path: str, content: str | bytes) -> None:
    """Write an output file (checked by check_output_file): "-" to stdout; /dev/stdout, /dev/fd/N to
    that descriptor; a device or FIFO opened and written into (never unlinked or renamed over); a
    regular file or a new path replaced atomically (write_file_atomic).  Raises UsageError."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        if path == "-":
            if sys.stdout is None:
                raise OSError(errno.EBADF, "stdout is closed")
            if isinstance(content, str):  # as text: stdout may be a text stream only (StringIO, a notebook)
                sys.stdout.write(content)
            else:  # a figure's bytes: a real stdout's byte stream
                sys.stdout.flush()
                sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return
        target, fd, special = output_target(path)
        if fd is not None:
            if fd in (1, 2):
                (sys.stdout if fd == 1 else sys.stderr).flush()
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
        elif special:
            with open(os.open(target, os.O_WRONLY), "wb") as f:
                f.write(data)
        else:
            write_file_atomic(path, data)
    except BrokenPipeError:
        raise
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"{flag} {path}: cannot write it ({getattr(e, 'strerror', None) or e})") from None


# ---------------------------------------------------------------------------------------------
# stdout: a full disk or a closed stdout costs no results


def write_stdout(text: str) -> OSError | None:
    """Write and flush `text` to stdout; returns the error instead of raising it (a full disk,
    a closed pipe, a closed stdout), after which stdout is discarded."""
    if sys.stdout is None:
        return OSError(errno.EBADF, "stdout is closed")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as e:  # ValueError: a closed file object
        discard_stdout()
        return e if isinstance(e, OSError) else OSError(errno.EBADF, "stdout is closed")
    return None


def discard_stdout() -> None:
    """Point descriptor 1 at /dev/null, so that the interpreter's last flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != 1:
        os.dup2(devnull, 1)
        os.close(devnull)


def stdout_status(error: OSError | None, saved: str = "") -> int:
    """How a command ends once its files are written: 0; 141, quietly, for a closed pipe; else one
    error line naming stdout's failure (status 2) and, in `saved`, where the results still are."""
    if error is None:
        return 0
    if isinstance(error, BrokenPipeError):
        return quiet_broken_pipe()
    raise UsageError(f"cannot write to stdout ({error.strerror or error}){saved}")


def write_results(table: str, outputs) -> int:
    """The table to stdout (to stderr when an output is "-", which takes stdout), then every output
    (flag, path, content), each written even when stdout failed -> the exit status (stdout_status);
    an output that cannot be written is one error line that says whether the table was shown."""
    to_stderr = any(path == "-" for _, path, _ in outputs)
    error = None
    if to_stderr:
        print(table, file=sys.stderr, flush=True)
    else:
        error = write_stdout(table + "\n")
    for flag, path, content in outputs:
        try:
            write_output(flag, path, content)
        except BrokenPipeError as e:
            discard_stdout()
            error = error or e
        except UsageError as e:
            shown = "the results are in the table above" if error is None else "stdout failed too"
            raise UsageError(f"{e}; {shown}") from None
    saved = [path for _, path, _ in outputs if path != "-"]
    return stdout_status(error, f"; the results are in {', '.join(saved)}" if saved else "")
