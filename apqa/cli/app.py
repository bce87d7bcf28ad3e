"""The Typer application, global options and error handling shared by all commands."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from apqa.allocator import prefault_heap, tune_allocator
from apqa.errors import ApqaError
from apqa.log import configure_logging

EXIT_ERROR = 2

#: ``--science-psf`` / ``--template-psf`` of the image commands (``apqa diff``, ``apqa run``).
SciencePsfOption = Annotated[Path | None, typer.Option(
    "--science-psf", help="PSF image (FITS: odd square, centred, detector sampling; STPSF's "
                          "DET_SAMP) to use for the science instead of fitting one.")]
TemplatePsfOption = Annotated[Path | None, typer.Option(
    "--template-psf", help="The same for the template.")]

app = typer.Typer(
    name="apqa",
    help=(
        "Validation, QA and metrics for astronomical alert production.\n\n"
        "Examples:\n\n"
        "  apqa simulate --dataset hits-sim --out sim-out\n\n"
        "  apqa simulate --dataset crowded-sim --visits 2 --detectors 2 --seed 3 --out bulge\n\n"
        "  apqa inspect bulge/raw/raw_520001_01.fits\n\n"
        "  apqa process --exposure image.fits --refcat gaia.parquet --out proc\n\n"
        "  apqa diff --science new.fits --template ref.fits --out diff.fits\n\n"
        "  apqa --version"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err_console = Console(stderr=True, highlight=False)


def _version(value: bool) -> None:
    if value:
        from apqa import __version__

        typer.echo(f"apqa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More logging.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    configure_logging(verbose, quiet)


@contextmanager
def all_cores() -> Iterator[None]:
    """FFTs on every core for the work of one command (scipy.fft uses one thread unless told;
    Dask workers keep that default, so that two workers do not fight over the same cores)."""
    import scipy.fft

    with scipy.fft.set_workers(os.cpu_count() or 1):
        yield


def prose(text: str) -> str:
    r"""Help text with each prose paragraph on one line, for the terminal to wrap.

    Rich keeps a help text's line breaks and then wraps at the terminal width, which breaks
    source-wrapped paragraphs at odd places on an 80-column terminal. Paragraphs that start
    with spaces (the examples) stay exactly as written.

    Examples
    --------
    >>> prose("Examples:\n\n  apqa diff --out d.fits\n\nOutputs go\nto OUT.")
    'Examples:\n\n  apqa diff --out d.fits\n\nOutputs go to OUT.'
    """
    paragraphs = text.strip("\n").split("\n\n")
    return "\n\n".join(p if p.startswith(" ") else " ".join(line.strip() for line in p.splitlines())
                       for p in paragraphs)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on one line to stderr and return the exit to raise."""
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(EXIT_ERROR)


def main() -> None:
    """Console-script entry point: turns apqa errors into one line and exit code 2.

    Only the module of the command asked for is imported (start-up time matters for quick
    commands such as ``apqa diff``); help and unknown commands load them all. The image
    commands (:data:`IMAGE_COMMANDS`) get their heap faulted in while they import, and they
    and ``inject-and-run`` exit without the interpreter's teardown
    (:data:`QUICK_EXIT_COMMANDS`). BLAS libraries start with one thread
    (:func:`one_blas_thread`).
    """
    one_blas_thread()
    tuned = tune_allocator()
    words = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    command = words[0] if words else None
    work = not {"-h", "--help"} & set(sys.argv[1:])
    if work and command in IMAGE_COMMANDS:
        prefault_heap(HEAP_PER_INPUT_BYTE * _input_bytes(sys.argv[1:]), tuned)
    quick_exit = work and command in QUICK_EXIT_COMMANDS
    module = COMMAND_MODULES.get(command) if command else None
    if module is None:
        register_commands()
    else:
        import importlib

        importlib.import_module(f"apqa.cli.{module}")
    try:
        app()
    except ApqaError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    except SystemExit as exc:
        if quick_exit:
            _exit_now(exc.code)
        raise


#: Thread-count variables of the BLAS libraries numpy and scipy may load (OpenBLAS, MKL, BLIS,
#: Apple Accelerate).
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                         "VECLIB_MAXIMUM_THREADS")


def one_blas_thread() -> None:
    """Have the BLAS libraries loaded later in this process use one thread, unless the user
    chose otherwise (an existing variable is kept). Must run before numpy is imported.

    apqa's commands spread their own work over the cores (:mod:`apqa.pipeline.threads`, Dask
    worker processes) and their matrix products are small. A BLAS thread pool beside that
    work spins on the same cores: on 2 cores, with OpenBLAS's default of one thread per core,
    ``apqa diff`` (AL) took 1.79 s instead of 1.57 s and 2.7 CPU-s instead of 2.0, and
    ``apqa run`` 3.76 s instead of 3.37 s (medians, runs alternated).
    """
    for name in BLAS_THREAD_VARIABLES:
        os.environ.setdefault(name, "1")


def _input_bytes(args: list[str]) -> int:
    """Total size of the files named by command-line arguments (``--opt=PATH`` too), outputs
    (``--out``, ``-o``) left out."""
    total = 0
    output_next = False  # the argument after a bare --out / -o
    for arg in args:
        if output_next:
            output_next = False
            continue
        option, equals, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        if option in ("--out", "-o"):
            output_next = not equals
        elif value and os.path.isfile(value):
            total += os.path.getsize(value)
    return total


def _exit_now(code: object) -> NoReturn:
    """Exit after the atexit callbacks and a flush of stdout and stderr, without the
    interpreter's teardown (every module and object freed one by one: 0.2-0.3 s after
    ``apqa diff`` on a 4096x4096 pair). The commands that use it close their files, stores,
    threads and clusters themselves before they return."""
    import atexit

    atexit._run_exitfuncs()  # logging's flush among them
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints it and fails
        print(code, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def register_commands() -> typer.Typer:
    """Import every command module so that ``app`` is complete (used by tests)."""
    import importlib

    for name in COMMAND_MODULES.values():
        importlib.import_module(f"apqa.cli.{name}")
    return app


#: Commands that read images named on the command line (see :func:`main`).
IMAGE_COMMANDS = frozenset({"diff", "run", "process"})
#: Commands that leave without the interpreter's teardown once done (see :func:`_exit_now`):
#: 0.2-0.3 s of ``apqa diff``, 0.7 s of the default ``apqa inject-and-run``.
QUICK_EXIT_COMMANDS = IMAGE_COMMANDS | {"inject-and-run"}
#: Heap such a command fills per byte of its input files (``apqa diff`` on a 4096x4096 pair
#: of plain FITS files peaks at 9.4 times their size).
HEAP_PER_INPUT_BYTE = 8

# Each command lives in its own module of apqa.cli; importing it registers it on ``app``.
COMMAND_MODULES = {"simulate": "simulate", "inspect": "inspect", "process": "process",
                   "diff": "diff", "run": "run", "db": "db", "metrics": "metrics",
                   "gate": "gate", "export": "export", "apdb": "apdb", "inject": "inject",
                   "inject-and-run": "inject_and_run"}
