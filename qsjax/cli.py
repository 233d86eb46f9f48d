"""Shared command-line plumbing: user errors print as one line and exit with status 2."""

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors (unknown flag, bad value) are one `error: ...` line, status 2."""

    def error(self, message):
        message = " ".join(message.split())
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """An error the user can fix (a bad argument, a missing file): shown without a traceback."""


def run_cli(main, argv=None):
    """Run `main(argv)` and exit with its return value; a UsageError prints `error: ...` and exits 2."""
    try:
        status = main(argv)
    except UsageError as error:
        message = " ".join(str(error).split())  # always a single line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
