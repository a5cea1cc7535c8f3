"""The typer application object; command modules attach to it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="featcache",
    help="Cache frozen-backbone features once; train classifier heads from the cache in seconds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="List, inspect, verify and remove cache files.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@app.callback()
def _options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show TensorFlow's own start-up and runtime lines "
                                 "(hidden by default, also shown when TF_CPP_MIN_LOG_LEVEL is set)."),
) -> None:
    """Cache frozen-backbone features once; train classifier heads from the cache in seconds."""
