"""``s3kv capacity``: what a fleet would cost in S3 requests, bytes and dollars.

Only option parsing lives here; the model is :mod:`s3kv.capacity`. Unlike
the other commands it needs no bucket and no credentials: it is arithmetic
over a model shape and a workload, for planning before anything is deployed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from s3kv.capacity import Dtype, InputError, StorageClass, build_workload, estimate, render
from s3kv.cli.common import echo, emit_json
from s3kv.config import Settings


def register(app: typer.Typer) -> None:
    app.command(
        "capacity",
        help="Estimate S3 requests, bandwidth, stored bytes and dollars per day for a workload.",
    )(capacity)


def capacity(
    prefill_tokens_per_s: Annotated[
        float, typer.Option("--prefill-tokens-per-s", metavar="TOKENS",
                            help="Tokens each engine prefills (computes) per second.",
                            show_default=False)
    ],
    config: Annotated[
        Path | None, typer.Option("--config", exists=True, dir_okay=False, metavar="FILE",
                                  help="A model's config.json (Hugging Face format).",
                                  show_default=False)
    ] = None,
    layers: Annotated[
        int | None, typer.Option("--layers", help="Layers (without --config).",
                                 show_default=False)
    ] = None,
    kv_heads: Annotated[
        int | None, typer.Option("--kv-heads", help="KV heads in total (without --config).",
                                 show_default=False)
    ] = None,
    head_size: Annotated[
        int | None, typer.Option("--head-size", help="Head size (without --config).",
                                 show_default=False)
    ] = None,
    dtype: Annotated[
        Dtype | None, typer.Option("--dtype",
                                 help="KV cache dtype (default: the config's, else bfloat16).",
                                 show_default=False)
    ] = None,
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size.")] = 1,
    reuse: Annotated[
        float, typer.Option("--reuse", help="Fraction of prompt tokens served from the cache.")
    ] = 0.3,
    chunk_tokens: Annotated[
        int, typer.Option("--chunk-tokens", help="Tokens per stored chunk.")
    ] = Settings.chunk_tokens,
    ttl_days: Annotated[
        float, typer.Option("--ttl-days", help="How long chunks stay stored.")
    ] = 1.0,
    engines: Annotated[int, typer.Option("--engines", help="Engines in the fleet.")] = 1,
    admitted: Annotated[
        float, typer.Option("--admitted",
                            help="Fraction of new chunks saved (e.g. 0.04 for second_sighting).")
    ] = 1.0,
    storage_class: Annotated[
        StorageClass, typer.Option("--class",
                          help="S3 storage class whose prices apply.")
    ] = "standard",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole estimate as JSON.")
    ] = False,
) -> None:
    try:
        w = build_workload(
            prefill_tokens_per_s=prefill_tokens_per_s, config=config, layers=layers,
            kv_heads=kv_heads, head_size=head_size, dtype=dtype, tp=tp, reuse=reuse,
            chunk_tokens=chunk_tokens, ttl_days=ttl_days, engines=engines, admitted=admitted,
            storage_class=storage_class,
        )
    except InputError as exc:
        raise typer.BadParameter(exc.problem, param_hint=f"'{exc.option}'") from None
    result = estimate(w)
    if as_json:
        emit_json(result)
    else:
        echo(render(w, result))
