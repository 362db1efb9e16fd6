"""The `citrus-edge` typer apps, shared output helpers and the console entry point.

The commands register themselves on these apps when `citrus_edge.cli` imports their modules;
`entry()` runs whatever is registered by then.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from citrus_edge import __version__

EXIT_ERROR, EXIT_USAGE, EXIT_DOES_NOT_FIT, EXIT_NOTHING_TRACKED = 1, 2, 3, 4
EXIT_INTERRUPTED = 130


def _typer(help: str, **kw: Any) -> typer.Typer:
    """A command group with plain-text help (no markup: `[...]` in help text stays) and -h."""
    return typer.Typer(
        help=help,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
        **kw,
    )


app = _typer("Compress, export and run the Citrus-V grounding VLM at the edge.", name="citrus-edge")
data_app = _typer("Calibration and evaluation data.")
app.add_typer(data_app, name="data")
engines_app = _typer("TensorRT engines, compiled on the target device.")
app.add_typer(engines_app, name="engines")
model_app = _typer("Model checkpoints.")
app.add_typer(model_app, name="model")
# stderr: progress and errors; stdout (`_stdout()`): tables and JSON. Neither parses markup,
# so user text and error messages print exactly as they are.
console = Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=1))


def _cell(value: Any) -> Text:
    """A table cell printed verbatim (rich would read `[SEG]` or `[bold]` as markup)."""
    return Text(str(value))


ExistingDir = Annotated[Path, typer.Argument(exists=True, file_okay=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]
# How a quantized LLM's token table is stored (build, quantize, plan): `host_inputs.TABLE_DTYPES`.
EmbeddingsOption = Annotated[
    str,
    typer.Option(
        help="How a quantized LLM's token table is stored: float16, int8 (one scale per row; "
        "half float16's bytes) or float32."
    ),
]
# The options every command that opens a bundle shares (run, bench, serve, listen).
BundleArg = Annotated[
    Path,
    typer.Argument(exists=True, file_okay=False, help="Bundle directory from `citrus-edge build`."),
]
BackendOption = Annotated[str, typer.Option(help="onnxruntime or tensorrt.")]
ProvidersOption = Annotated[
    list[str] | None,
    typer.Option(help="ONNX Runtime execution provider (repeatable; default CPU)."),
]
MaxNewTokensOption = Annotated[int, typer.Option(min=1, help="Generation limit.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"citrus-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """citrus-edge: build, evaluate and run Citrus-V bundles for Jetson, x86 GPUs and CPU."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


def _verbose_after_command(ctx: Any, param: Any, value: bool) -> None:
    if value:
        logging.getLogger().setLevel(logging.INFO)


@functools.cache
def command() -> Any:
    """The click command behind `citrus-edge`, with `-v/--verbose` accepted after any command's
    name too (the root option, copied onto every leaf command; it sets the log level)."""
    root = typer.main.get_command(app)
    (verbose,) = (p for p in root.params if p.name == "verbose")

    def add_verbose(group: Any) -> None:
        for cmd in group.commands.values():
            if hasattr(cmd, "commands"):
                add_verbose(cmd)
                continue
            option = copy.copy(verbose)
            option.expose_value, option.callback = False, _verbose_after_command
            cmd.params.append(option)

    add_verbose(root)
    return root


def error_line(e: BaseException) -> str:
    """The one line a typed error prints: `error: <Type>: <message on one line>`."""
    message = " ".join(str(e).split())
    return f"error: {type(e).__name__}: {message}"


def entry(argv: list[str] | None = None) -> None:
    """Console entry point: typed errors become one plain line on stderr and exit code 1;
    usage errors exit 2 (click's convention); an interrupt exits 130."""
    try:
        command().main(argv, prog_name="citrus-edge")
    except (ValueError, RuntimeError, OSError) as e:
        typer.secho(error_line(e), err=True, fg="red", bold=True)
        raise SystemExit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
