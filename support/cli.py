"""How the scripts talk to the shell: one-line errors, exit codes, and output nobody reads any more.

Every user-facing failure in this project is raised as `SystemExit("error: <what>: <where>")`, from
wherever it is found (a flag, a data file, a checkpoint). `run(main)` is each script's entry point:
it prints that one line to stderr and exits with code 2, the code of a usage error, the code
argparse itself uses. A run that cannot go on raises `Stopped("error: ...")` instead: the same one
line, exit code 1. Ctrl-C outside the training loop (which saves first, see train.py) exits with
130 and no traceback. Output whose reader went away (`| head -1`, a `tee` that died, an SSH connection
that hung up) is dropped, and the script goes on (`survive_closed_output`).

    0    done
    1    the run stopped on its own: a loss that is not finite, a step out of GPU memory, a checkpoint
         that cannot be written (a full disk, no permission); one line says where, the last
         complete checkpoint is kept
    2    bad input: a flag out of range, an unreadable or malformed file, a wrong checkpoint
    130  interrupted (Ctrl-C); 143: terminated (SIGTERM); 129: hung up (SIGHUP). train.py saves first
"""
import argparse
import errno
import os
import sys

STOPPED, USAGE_ERROR, INTERRUPTED, TERMINATED, HUNG_UP = 1, 2, 130, 143, 129


class Stopped(SystemExit):
    """A run that cannot go on: `raise Stopped("error: ...")` prints that one line and exits 1
    (through `run`, and also without it: Python exits 1 on a SystemExit that carries text)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not the whole usage text) and exit code 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


def check(ok, message):
    """A flag's range check: `check(args.beta >= 0, "--beta must be >= 0")`."""
    if not ok:
        raise SystemExit(f"error: {message}")


class DropsUnreadOutput:
    """sys.stdout or sys.stderr whose reader may go away. The first write or flush that finds no
    reader (EPIPE from a closed pipe; EIO from a terminal that hung up) points the stream's file
    descriptor at os.devnull: later output, and the interpreter's last flush at exit, go nowhere,
    and the script goes on. Without it a print, or a progress bar, raises BrokenPipeError."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):  # encoding, isatty, fileno, ... of the stream itself
        return getattr(self.stream, name)

    def write(self, text):
        self._unless_unread(self.stream.write, text)
        return len(text)

    def flush(self):
        self._unless_unread(self.stream.flush)

    def _unless_unread(self, call, *args):
        try:
            call(*args)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO):
                raise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            self.stream.flush()  # what was waiting in the buffer goes to os.devnull too


def survive_closed_output():
    """Wraps sys.stdout and sys.stderr in DropsUnreadOutput, for the rest of the process (the
    interpreter flushes them at exit). Streams that are no files (a test's capture) stay as they are."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        if not isinstance(stream, DropsUnreadOutput):
            setattr(sys, name, DropsUnreadOutput(stream))


def run(main, argv=None):
    """Calls main(argv); turns our one-line SystemExit messages into exit code 2 (Stopped: 1), and
    output whose reader went away into no output."""
    survive_closed_output()
    try:
        return main(argv)
    except Stopped as e:
        print(e.code, file=sys.stderr)
        raise SystemExit(STOPPED) from None
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            raise SystemExit(USAGE_ERROR) from None
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
