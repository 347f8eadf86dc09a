"""User errors, and how every entry point reports them.

A user error is a mistake in what the user gave (a config key or value, a data file, a path, a
checkpoint, the machine's device, disk or permissions): it ends the program with one line on stderr
that names the file and line, the key or the path, and what to do, and exit code 2 (no traceback
unless `--debug` or DUALNER_DEBUG=1 asks for one). Anything else is a bug of ours and keeps its
traceback (exit code 1).

Exit codes that job scripts can test:
    0   finished
    2   user error (EXIT_USER_ERROR)
    3   stopped by a non-finite loss (train.nonfinite_loss=stop; EXIT_NONFINITE)
    75  stopped before the last step, resumable: a signal (SIGTERM, SIGUSR1, SIGINT) or
        run.max_steps_per_job (EXIT_STOPPED; EX_TEMPFAIL, "try again")
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_STOPPED = 75
DEBUG_ENV = "DUALNER_DEBUG"


class UserError(Exception):
    """A mistake in the user's input; the message names the file, key or path."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError, ValueError):
    """A configuration mistake; the message names the key (and file)."""


class DataFormatError(UserError, ValueError):
    """A data file that cannot be read; the message names the file and line."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder named in the config or on the command line does not exist."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file."""


class RunLockedError(UserError):
    """Another live run holds the output folder."""


class BadRecordsError(DataFormatError):
    """More bad corpus records than data.max_bad_records; raised on every rank after a checkpoint."""

    every_rank = True  # the rank that read the record names it


class NonFiniteLossError(UserError, FloatingPointError):
    exit_code = EXIT_NONFINITE
    every_rank = True  # the rank that saw it names the micro batch; the others say "on another rank"


_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.ENOTDIR: "a path component is a file, not a folder",
                 errno.EEXIST: "exists and is not a folder", errno.EISDIR: "is a folder, not a file"}


def describe_os_error(error: BaseException) -> str | None:
    """One line for the operating system errors a user can fix (disk full, read-only, permissions,
    a file where a folder belongs); None for the others. DeepSpeed's and torch's savers wrap them in
    RuntimeError ("basic_ios::clear", "file write failed"), so the chain is searched too."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            where = error.filename or "a file"
            advice = ("free some space or choose another run.output_dir"
                      if error.errno in (errno.ENOSPC, errno.EDQUOT) else "choose another path")
            return f"cannot write {where}: {_WRITE_ERRNOS[error.errno]}; {advice}"
        if isinstance(error, RuntimeError) and ("basic_ios::clear" in str(error) or "file write failed" in str(error)):
            return (f"a write failed ({str(error)[:120]}): the disk is probably full or read-only; free "
                    f"some space or choose another run.output_dir")
        error = error.__cause__ or error.__context__
    return None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_entry_point(main: Callable[[], int | None]) -> None:
    """Run a launcher's body and exit with its code, reporting user errors as one line."""
    debug = "--debug" in sys.argv or os.environ.get(DEBUG_ENV) == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        code = main() or 0
    except UserError as error:
        if debug:
            raise
        # Every rank detects the same input mistakes; one line from rank 0 is enough, unless the
        # error is about what one rank saw.
        if _rank() == 0 or getattr(error, "every_rank", False):
            print(f"dualner: error{f' (rank {_rank()})' if _rank() else ''}: {error}", file=sys.stderr, flush=True)
        code = error.exit_code
    except Exception as error:  # noqa: BLE001 (only operating-system mistakes are turned into a line)
        message = describe_os_error(error)
        if message is None or debug:
            raise
        print(f"dualner: error{f' (rank {_rank()})' if _rank() else ''}: {message}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    sys.stdout.flush()
    if code in (EXIT_USER_ERROR, EXIT_NONFINITE):
        _exit_after_error(code)
    sys.exit(code)


def _exit_after_error(code: int) -> None:
    """Exit with `code` after a reported error, running the exit handlers (the run lock's release,
    log flushes) but not the C++ static destructors: past an error, the process group's threads can
    abort the process there ("terminate called without an active exception", exit 134) after the
    error line, and the job script would see 134 instead of the documented code."""
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
