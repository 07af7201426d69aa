"""`dattr ...`: a thin argparse front end. Each area registers its subcommands from
`dattr_core.commands.<area>`; the science stays in the library modules."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .data import DatasetError

AREAS = ("attribute", "demo", "scoring", "finetune", "evaluate")
USER_ERRORS = (DatasetError, ValueError, FileNotFoundError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dattr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for area in AREAS:
        try:
            module = importlib.import_module(f"dattr_core.commands.{area}")
        except ModuleNotFoundError as e:
            if e.name != f"dattr_core.commands.{area}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"dattr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
