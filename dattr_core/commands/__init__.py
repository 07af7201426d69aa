"""CLI subcommands, one module per area; each exposes `register(subparsers)`.

A subcommand sets `func=` to a function taking the parsed args and returning an exit code.
"""
