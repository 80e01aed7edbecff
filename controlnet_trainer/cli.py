"""The entry point of every training script: parse the family's flags, resolve them into
settings, train, and report bad input as one paragraph."""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from collections.abc import Sequence

from . import families
from .arguments import parse_args, resolve
from .errors import InputError
from .families import ModelFamily


@contextlib.contextmanager
def settled_imports():
    """Imports without garbage collection, after which every object alive is frozen.

    The training stack (torch, diffusers, transformers, accelerate, datasets) loads about a
    million objects that live as long as the process. Each full collection walks all of them:
    about half a second on a CPU core, during the imports, in whichever training step a
    collection lands, and once more at exit. ``gc.freeze`` moves them to the permanent
    generation, which no collection visits; objects made afterwards are collected as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def run(argv: Sequence[str] | None = None, *, family: ModelFamily | str = "sd", freeze_imports: bool = False):
    """Parse ``argv`` for the family (a record or its name) and train; what tests and the scripts
    call. ``freeze_imports`` is for a process that exits after the run (see settled_imports)."""
    if isinstance(family, str):
        family = families.by_name(family)
    settings = resolve(parse_args(argv, family), family)
    # Imported after parsing so that --help and bad flags answer without loading the training stack.
    with settled_imports() if freeze_imports else contextlib.nullcontext():
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
        run(sys.argv[1:], family=family, freeze_imports=True)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
