"""Several processes (hosts) as one JAX runtime: how the commands start it, and the rules they follow
when a mesh spans processes.

    python -m qsjax.eval --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 --mesh data=2,model=8  # host 0
    python -m qsjax.eval --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1 --mesh data=2,model=8  # host 1

Every process runs the same command on the same inputs (model, text, prompts, flags) with its own
devices; `jax.devices()` then lists every process's devices, and the mesh spans them all
(`sharding.parse_mesh`). The rules:

- inputs: every process holds the whole batch and places the rows its own devices hold
  (`sharding.shard_batch`);
- results: rows split over processes are gathered where a command reads them (`sharding.to_host`);
- output: process 0 alone writes stdout, --json and progress bars (`is_writer`);
- errors: a user error found by any process ends every process with status 2 (`together`): a
  process that stopped alone would leave the others waiting for it in their first collective.

JAX's CPU collectives (Gloo) print connection lines on the process's stdout; stdout carries results,
so `start` points the process-level stdout at stderr and keeps Python's `sys.stdout` for results.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import threading

import numpy as np

from qsjax.runtime.cli import UsageError, exit_status, print_error

FLAGS = ("--coordinator", "--num-processes", "--process-id")
MESSAGE_BYTES = 1024  # an error message as exchanged between processes (longer ones are cut)


def add_distributed_args(parser, mesh_help: str) -> None:
    """The "devices and processes" options: --mesh (`mesh_help`: what its axes split), then the processes'."""
    group = parser.add_argument_group(
        "devices and processes (several hosts: run the same command in every process, with the same --coordinator "
        "and --num-processes and its own --process-id; --mesh must then span the devices of all of them)"
    )
    group.add_argument("--mesh", metavar="SPEC", help=mesh_help)
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's host and a free port on it")
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    group.add_argument("--process-id", type=int, metavar="I",
                       help="this process's number, 0..N-1 (process 0 writes the output)")
    group.add_argument("--coordinator-timeout", type=float, metavar="SECONDS",
                       help="how long to wait for every process to join (default 300)")


def split_address(address: str) -> tuple[str, int]:
    """'host:1234' or '[::1]:1234' -> (host, port); raises UsageError otherwise."""
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator {address!r}: expected HOST:PORT with a port in 1..65535, "
                         "e.g. --coordinator 10.0.0.1:1234")
    return host, int(port)


def check_distributed_args(args) -> None:
    """The three flags come together, in range; checked before anything loads."""
    given = [flag for flag in FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given and len(given) < len(FLAGS):
        missing = " and ".join(flag for flag in FLAGS if flag not in given)
        raise UsageError(f"{' and '.join(given)} also need{'s' if len(given) == 1 else ''} {missing} "
                         "(several processes need all three)")
    if args.coordinator_timeout is not None and not given:
        raise UsageError("--coordinator-timeout needs --coordinator, --num-processes and --process-id")
    if not given:
        return
    split_address(args.coordinator)
    if args.num_processes < 1:
        raise UsageError(f"--num-processes must be positive, got {args.num_processes}")
    if not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id must be in 0..{args.num_processes - 1} (--num-processes "
                         f"{args.num_processes}), got {args.process_id}")
    if args.coordinator_timeout is not None and not args.coordinator_timeout > 0:
        raise UsageError(f"--coordinator-timeout must be a positive number of seconds, got {args.coordinator_timeout}")


def check_port_free(address: str) -> None:
    """Process 0 serves the coordinator on the port: say so clearly if something else holds it."""
    _, port = split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as e:
            raise UsageError(f"--coordinator {address}: process 0 serves the coordinator on port {port}, but it is "
                             f"taken on this host ({e.strerror or e}); pick a free port") from None


def reachable(address: str) -> bool:
    host, port = split_address(address)
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def keep_stdout_for_results() -> None:
    """Native code's stdout (fd 1) goes to stderr from now on; Python's sys.stdout keeps the real stdout."""
    sys.stdout.flush()
    results = io.TextIOWrapper(os.fdopen(os.dup(sys.stdout.fileno()), "wb"), encoding=sys.stdout.encoding,
                               errors=sys.stdout.errors, line_buffering=sys.stdout.line_buffering)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = results


def start(args) -> None:
    """jax.distributed.initialize from the command line (nothing without --coordinator); call before
    any other JAX work. A process that cannot reach the coordinator, or a coordinator that does not
    hear from every process, ends within --coordinator-timeout with one `error:` line, status 2."""
    if args.coordinator is None:
        return
    import jax

    timeout = args.coordinator_timeout or 300.0
    if args.process_id == 0:
        check_port_free(args.coordinator)
    keep_stdout_for_results()
    failure, done = [], threading.Event()

    def connect():
        try:  # JAX's own deadline comes later: it would abort the process with a stack trace
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                       initialization_timeout=int(timeout) + 60)
        except Exception as e:  # noqa: BLE001 - shown as one line
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=connect, name="qsjax-coordinator", daemon=True).start()
    try:
        joined = done.wait(timeout)
    except KeyboardInterrupt as interrupt:  # the connecting thread cannot be stopped: leave at once
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(exit_status(interrupt))
    if not joined:
        if args.process_id != 0 and not reachable(args.coordinator):
            why = f"cannot reach the coordinator (process 0) at {args.coordinator}"
        else:
            why = f"not all {args.num_processes} processes joined"
        print_error(f"--coordinator {args.coordinator}: {why} within {timeout:g} s (this is process "
                    f"{args.process_id}); start every process with the same --coordinator and --num-processes and "
                    "its own --process-id, check that the port is open between the hosts, or raise "
                    "--coordinator-timeout")
        sys.stderr.flush()
        os._exit(2)  # the connecting thread is still inside JAX: no clean-up can run past it
    if failure:
        raise UsageError(f"--coordinator {args.coordinator}: cannot start the distributed runtime ({failure[0]})")


def process_count() -> int:
    import jax

    return jax.process_count() if jax.distributed.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes the output: process 0 (or the only process)."""
    import jax

    return not jax.distributed.is_initialized() or jax.process_index() == 0


def agree(error: UsageError | None) -> None:
    """Every process says whether it failed (one exchange); if any did, every process raises: its own
    error, or else the first process's that failed."""
    if process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    mine = np.zeros(MESSAGE_BYTES, np.uint8)
    if error is not None:
        text = (" ".join(str(error).split()) or "failed").encode("utf-8")[: MESSAGE_BYTES - 1]
        mine[0], mine[1 : 1 + len(text)] = 1, np.frombuffer(text, np.uint8)
    every = multihost_utils.process_allgather(mine)  # [processes, MESSAGE_BYTES]
    failed = np.flatnonzero(every[:, 0])
    if len(failed) == 0:
        return
    if error is not None:
        raise error
    first = int(failed[0])
    message = every[first, 1:].tobytes().rstrip(b"\0").decode("utf-8", "replace")
    raise UsageError(f"process {first}: {message}")


@contextlib.contextmanager
def together():
    """A block of checks that every process runs: a UsageError raised in it by any process is raised
    by all of them as the block ends, so that none goes on alone to wait for the others."""
    error = None
    try:
        yield
    except UsageError as e:
        error = e
    agree(error)
