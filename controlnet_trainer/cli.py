"""The entry point shared by both scripts: parse the family's flags, train, report errors."""

from __future__ import annotations

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

    return train(args, SDXL if sdxl else SD)


def main(sdxl: bool = False) -> None:
    try:
        run(sys.argv[1:], sdxl=sdxl)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
