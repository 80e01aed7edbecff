"""The entry point shared by both scripts: parse the family's flags, train, report errors."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .arguments import parse_args
from .errors import InputError
from .family import SD, SDXL
from .training import RunResult, train


def run(argv: Sequence[str] | None = None, *, sdxl: bool = False) -> RunResult:
    """Parse ``argv`` for SD or SDXL and train; what tests and the scripts both call."""
    return train(parse_args(argv, sdxl=sdxl), SDXL if sdxl else SD)


def main(sdxl: bool = False) -> None:
    try:
        run(sys.argv[1:], sdxl=sdxl)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
