"""jaxgpt's command-line front ends: `jaxgpt.cli.<name>` parses flags, calls the library, prints.

Each module here holds one command's `build_parser()` and `main(argv=None) -> int`; the library
module of the same name ends with a two-line `runpy` shim, so `python -m jaxgpt.<name>` keeps
working while no library module imports this package (imports point one way: cli -> library).

`run` is the one place a user error becomes a one-line message: every `main` is
`return run(_main, argv)`, and a ConfigError raised anywhere below it prints `error: <message>`
to stderr and exits with status 2 (argparse's own status for bad flags); anything else is a bug
and keeps its traceback.
"""

import sys

from jaxgpt.config import ConfigError


def run(main_fn, argv=None) -> int:
    """`main_fn(argv)`'s exit status, or 2 after printing `error: ...` for a ConfigError."""
    try:
        return main_fn(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
