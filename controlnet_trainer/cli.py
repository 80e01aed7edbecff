"""The entry point of every training script: parse the family's flags, resolve them into
settings, train, and report bad input as one paragraph."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence

from . import families
from .arguments import parse_args, resolve
from .errors import InputError
from .families import ModelFamily


def run(argv: Sequence[str] | None = None, *, family: ModelFamily | str = "sd"):
    """Parse ``argv`` for the family (a record or its name) and train; what tests and the scripts call."""
    if isinstance(family, str):
        family = families.by_name(family)
    settings = resolve(parse_args(argv, family), family)
    # Imported after parsing so that --help and bad flags answer without loading the training stack.
    from .training import train

    # stdout carries only what the command answers (the --dry_run plan): some libraries log there
    # (DeepSpeed binds its logger to stdout when imported).
    with contextlib.redirect_stdout(sys.stderr):
        result = train(settings, family)
    if result.plan is not None:
        print(json.dumps(result.plan, indent=2))
    return result


def main(family: str = "sd") -> None:
    try:
        run(sys.argv[1:], family=family)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
