"""`python -m stratus.serve serve|chat ...`: the serve and chat verbs on their own, with the
exit codes of `stratus` (2 for a user's mistake)."""

from __future__ import annotations

import argparse
import sys

from stratus.errors import StratusError
from stratus.serve.cli import add_parsers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stratus.serve")
    add_parsers(parser.add_subparsers(dest="verb", required=True, metavar="VERB"))
    args = parser.parse_args(argv)
    try:
        args.func(args, [])
    except StratusError as e:
        print(f"stratus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
