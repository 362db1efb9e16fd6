"""The `citrus-edge` command line. Thin: parse, build a config, call one library function.

One module per command group (`*_command.py`, `*_commands.py`), registered on the typer apps of
`cli_app.py`. Every stage is imported inside the command that needs it, so `citrus-edge --help`
stays fast and never imports torch.

Conventions: `-h`/`--help` and `-v`/`--verbose` work on every command (before or after its
name); help and errors are plain text (no console markup, so `[tensorrt]` or a file called
`[bold]x.dcm` print as they are); `--json` prints machine-readable output on stdout.
Exit codes: 0 done; 1 a typed error (one line: `error: <Type>: <what and what to do>`);
2 a usage error (unknown option, bad value); 3 `plan`: the model does not fit the target;
4 `run --video`: the key frame gave no `[SEG]`, so nothing was tracked; 130 interrupted.
"""

from citrus_edge.cli.cli_app import (
    EXIT_DOES_NOT_FIT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_TRACKED,
    EXIT_USAGE,
    app,
    command,
    console,
    data_app,
    engines_app,
    entry,
    error_line,
    main,
    model_app,
)

# Imported for their side effect too: each registers its commands on the apps above, and the
# order of these lines is the order `citrus-edge --help` lists them in (keep it; no sorting).
# isort: off
from citrus_edge.cli.model_commands import model_slice
from citrus_edge.cli.data_commands import data_phantoms
from citrus_edge.cli.eval_command import eval_cmd
from citrus_edge.cli.plan_commands import plan_cmd, recipes_cmd, targets_cmd
from citrus_edge.cli.export_command import export_cmd
from citrus_edge.cli.engines_commands import engines_build
from citrus_edge.cli.run_command import run_cmd
from citrus_edge.cli.bench_command import bench_cmd
from citrus_edge.cli.sweep_command import sweep_cmd
from citrus_edge.cli.listen_command import listen_cmd
from citrus_edge.cli.build_command import build_cmd
from citrus_edge.cli.quantize_command import quantize_cmd
from citrus_edge.cli.distill_command import distill_cmd
from citrus_edge.cli.serve_command import serve_cmd
# isort: on

__all__ = [
    "EXIT_DOES_NOT_FIT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOTHING_TRACKED",
    "EXIT_USAGE",
    "app",
    "bench_cmd",
    "build_cmd",
    "command",
    "console",
    "data_app",
    "data_phantoms",
    "distill_cmd",
    "engines_app",
    "engines_build",
    "entry",
    "error_line",
    "eval_cmd",
    "export_cmd",
    "listen_cmd",
    "main",
    "model_app",
    "model_slice",
    "plan_cmd",
    "quantize_cmd",
    "recipes_cmd",
    "run_cmd",
    "sweep_cmd",
    "serve_cmd",
    "targets_cmd",
]
