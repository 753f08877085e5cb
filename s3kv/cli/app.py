"""The ``s3kv`` command and its entry point.

Each command group lives in its own module and registers itself here, so a
command's options, output and tests sit together.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from s3kv.cli import capacity_cmd, doctor, gc_cmd, ls, replay_cmd, verify

app = typer.Typer(
    name="s3kv",
    help="Inspect and maintain the S3 tier of the s3kv vLLM KV-cache connector.",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log requests and decisions to stderr.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # Client libraries log retries and connection details at INFO.
        for name in ("botocore", "aiobotocore", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)


ls.register(app)
gc_cmd.register(app)
verify.register(app)
doctor.register(app)
capacity_cmd.register(app)
replay_cmd.register(app)


def main() -> None:
    code = 0
    try:
        app(prog_name="s3kv", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # Exit without interpreter teardown: the S3 client's native runtime can abort
    # while Python finalises its threads, turning a finished command into SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["app", "main"]
