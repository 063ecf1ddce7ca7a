"""How the scripts talk to the shell: one-line errors and exit codes.

Every user-facing failure in this project is raised as `SystemExit("error: <what>: <where>")`, from
wherever it is found (a flag, a data file, a checkpoint). `run(main)` is each script's entry point:
it prints that one line to stderr and exits with code 2, the code of a usage error, the code
argparse itself uses. Ctrl-C outside the training loop (which saves first, see train.py) exits with
130 and no traceback.

    0    done
    1    the run stopped on its own (a loss that is not finite: train.py says where)
    2    bad input: a flag out of range, an unreadable or malformed file, a wrong checkpoint
    130  interrupted (Ctrl-C); 143: terminated (SIGTERM). train.py saves a checkpoint first
"""
import argparse
import sys

USAGE_ERROR, INTERRUPTED, TERMINATED = 2, 130, 143


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not the whole usage text) and exit code 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


def check(ok, message):
    """A flag's range check: `check(args.beta >= 0, "--beta must be >= 0")`."""
    if not ok:
        raise SystemExit(f"error: {message}")


def run(main, argv=None):
    """Calls main(argv); turns our one-line SystemExit messages into exit code 2."""
    try:
        return main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            raise SystemExit(USAGE_ERROR) from None
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
