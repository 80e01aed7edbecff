"""The entry point shared by both scripts: parse the family's flags, train, report errors."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence

from .arguments import parse_args
from .errors import InputError
from .family import SD, SDXL


def run(argv: Sequence[str] | None = None, *, sdxl: bool = False):
    """Parse ``argv`` for SD or SDXL and train; what tests and the scripts both call."""
    args = parse_args(argv, sdxl=sdxl)
    # Imported after parsing so that --help and bad flags answer without loading torch.
    from .training import train

    # stdout carries only what the command answers (the --dry_run plan): some libraries log there
    # (DeepSpeed binds its logger to stdout when imported).
    with contextlib.redirect_stdout(sys.stderr):
        result = train(args, SDXL if sdxl else SD)
    if result.plan is not None:
        print(json.dumps(result.plan, indent=2))
    return result


def main(sdxl: bool = False) -> None:
    try:
        run(sys.argv[1:], sdxl=sdxl)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
