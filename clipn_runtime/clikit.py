"""What the five clipn-ood CLIs share, so that they agree: exit codes, the error boundary, the common options.

Every CLI is a click command (or group) built with ``cls=Command`` (or ``cls=Group``); that class is the one
boundary where a user mistake becomes one line and exit 2, an interrupt becomes exit 130, a missing optional
dependency names the extra to install, and ``-q``/``-v`` set the log level. The callback returns its exit code.

Torch-free like the rest of clipn_runtime (the torch CLIs import this module, never the reverse).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from clipn_runtime.errors import UserError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PACKAGE = "clipn-ood"
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: The loggers of the packages; a CLI sends all of them to stderr with its own name in front.
PACKAGE_LOGGERS = ("clipn_runtime", "clipn_train", "clipn_export", "clipn_eval", "clipn_demo")

F = TypeVar("F", bound=Callable[..., Any])

# ---- missing optional dependencies ---------------------------------------------------------------------------

#: Third-party modules of each extra (pyproject.toml's optional-dependencies, by import name).
EXTRA_MODULES: dict[str, frozenset[str]] = {
    "train": frozenset({"torch", "torchvision", "open_clip", "safetensors", "webdataset"}),
    "export": frozenset(
        {"torch", "torchvision", "open_clip", "safetensors", "webdataset", "onnx", "onnxscript"}
        | {"onnxconverter_common", "tokenizers"}
    ),
    "openvocab": frozenset({"tokenizers", "ftfy"}),
    "eval": frozenset({"sklearn", "matplotlib"}),
    "video": frozenset({"av"}),
    "shards": frozenset({"webdataset"}),
    "parquet": frozenset({"pyarrow"}),
    "tensorrt": frozenset({"tensorrt", "pycuda"}),
}
EXTRA_MODULES["demo"] = EXTRA_MODULES["export"] | EXTRA_MODULES["eval"]


def extra_for(module: str, needed: Sequence[str] = ()) -> str | None:
    """The extra(s) to install for ``module``: all of ``needed`` (what the command needs) when one of them has
    it, else the smallest extra that has it; None for a module no extra provides (a bug, not a missing install)."""
    top = module.split(".")[0]
    if any(top in EXTRA_MODULES.get(extra, ()) for extra in needed):
        return ",".join(needed)
    having = sorted((len(mods), extra) for extra, mods in EXTRA_MODULES.items() if top in mods)
    return having[0][1] if having else None


class MissingExtra(UserError):
    """An optional dependency is not installed; the message names the extra that installs it."""

    def __init__(self, module: str, extra: str, detail: str = "") -> None:
        why = f" ({detail})" if detail else ""
        noun = "extras" if "," in extra else "extra"
        super().__init__(
            f"{module} cannot be imported here{why}; this needs the `{extra}` {noun}: pip install '{PACKAGE}[{extra}]'"
        )
        self.module, self.extra = module, extra


def missing_extra(error: ImportError, needed: Sequence[str] = ()) -> MissingExtra | None:
    """``error`` as a :class:`MissingExtra` when an extra's module is what failed to import, else None."""
    name = getattr(error, "name", None)
    if not name:
        return None
    extra = extra_for(name, needed)
    if extra is None:
        return None
    top = name.split(".")[0]
    return MissingExtra(top, extra, "" if str(error) == f"No module named '{name}'" else str(error))


# ---- logging -------------------------------------------------------------------------------------------------


def log_level(quiet: bool, verbose: int, default: int = logging.INFO) -> int:
    """-q: warnings and errors only; each -v one step more detail than the command's default."""
    if quiet:
        return logging.WARNING
    return max(logging.DEBUG, default - 10 * verbose)


class _AtLeast(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def setup_logging(prog: str, level: int, fmt: str | None = None) -> Callable[[], None]:
    """Send the packages' logs to stderr, prefixed with ``prog``; returns what undoes it (a CLI's main may be
    called in-process, by tests or other apps). Under torchrun, ranks other than 0 log warnings only."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank:
        level = max(level, logging.WARNING)
        prog = f"{prog} [rank {rank}]"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter((fmt or "{prog}: %(message)s").format(prog=prog), datefmt="%H:%M:%S"))
    # On the handler too: code that lowers a logger's level for a file handler (clipn_train's out.log) must not
    # make stderr chattier than asked. A filter, not setLevel, because tqdm's logging redirect copies filters.
    handler.addFilter(_AtLeast(level))
    saved = []
    for name in PACKAGE_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.level, logger.propagate))
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False

    def restore() -> None:
        for logger, handlers, lvl, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(lvl)
            logger.propagate = propagate

    return restore


# ---- the error boundary --------------------------------------------------------------------------------------


def _echo(prog: str, message: str) -> None:
    # A message quoting a file name that is not UTF-8 shows its bytes as \xNN, as the records do (stderr
    # itself would print the surrogate escape \udcNN).
    from clipn_runtime.inputs import printable

    click.echo(f"{prog}: {printable(message)}", err=True)


def discard_stdout() -> None:
    """Point stdout's file descriptor at the null device: after stdout failed (its reader went away, a full
    disk), what is still buffered would fail again when Python flushes it at exit, with a traceback."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # None (closed), or not a real file (a test's capture)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _root_name(ctx: click.Context) -> str:
    return ctx.find_root().info_name or "clipn"


class _Guarded:
    """The boundary every clipn-ood command runs inside (mixed into click's Command and Group).

    Extra keyword arguments of ``@click.command(cls=Command, ...)``:
    ``interrupted``: what to tell the user after Ctrl-C (e.g. how to continue);
    ``extras``: the extras this command needs (what to install when one of their modules is missing);
    ``log_default``/``log_format``: the log level without -q/-v, and the record format (``{prog}`` = name).
    """

    def __init__(
        self,
        *args: Any,
        interrupted: str = "",
        extras: Sequence[str] = (),
        log_default: int = logging.INFO,
        log_format: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["context_settings"] = {**CONTEXT_SETTINGS, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)
        self.interrupted = interrupted
        self.extras = tuple(extras)
        self.log_default = log_default
        self.log_format = log_format

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        prog = prog_name or getattr(self, "name", None) or "clipn"
        run = super().main  # type: ignore[misc]
        if not standalone_mode:
            return run(args, prog, complete_var, False, **extra)
        try:
            code = run(args, prog, complete_var, False, **extra)
        except click.UsageError as e:
            # A bad value's message says what to do; a missing or unknown option is better answered by the help.
            plain = e.ctx is None or isinstance(e, click.BadParameter)
            hint = "" if plain else f" (see '{e.ctx.command_path} -h')"  # type: ignore[union-attr]
            _echo(prog, f"error: {e.format_message()}{hint}")
            code = EXIT_USAGE
        except click.ClickException as e:
            _echo(prog, f"error: {e.format_message()}")
            code = e.exit_code
        except click.Abort:  # Ctrl-C while click itself was running (parsing, prompts)
            _echo(prog, "interrupted")
            code = EXIT_INTERRUPTED
        sys.exit(code if isinstance(code, int) else EXIT_OK)

    def invoke(self, ctx: click.Context) -> Any:
        prog = _root_name(ctx)
        restore = None
        if "quiet" in ctx.params or "verbose" in ctx.params:
            level = log_level(bool(ctx.params.get("quiet")), int(ctx.params.get("verbose") or 0), self.log_default)
            restore = setup_logging(prog, level, self.log_format)
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except UserError as e:
            _echo(prog, f"error: {e}")
            return EXIT_USAGE
        except ImportError as e:
            missing = missing_extra(e, self.extras)
            if missing is None:
                raise
            _echo(prog, f"error: {missing}")
            return EXIT_USAGE
        except KeyboardInterrupt:
            _echo(prog, f"interrupted; {self.interrupted}" if self.interrupted else "interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader of stdout went away (`| head`): stop quietly, as Unix tools do.
            discard_stdout()
            return EXIT_PARTIAL
        finally:
            if restore is not None:
                restore()


class Command(_Guarded, click.Command):
    """A clipn-ood command: ``@click.command("clipn-x", cls=Command, interrupted=..., extras=...)``."""


class Group(_Guarded, click.Group):
    """A clipn-ood command group (clipn-train); its subcommands use :class:`Command` too."""

    command_class = Command


# ---- common options ------------------------------------------------------------------------------------------


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0+unknown"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"{_root_name(ctx)} ({PACKAGE}) {package_version()}")
        ctx.exit(EXIT_OK)


def version_option(f: F) -> F:
    """``--version``: the installed clipn-ood version."""
    return click.option(
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_print_version,
        help=f"Print the {PACKAGE} version and exit.",
    )(f)


def verbosity_options(f: F) -> F:
    """``-q/--quiet`` and ``-v/--verbose`` (the callback gets ``quiet`` and ``verbose``; the log level is set by
    :class:`Command` before the callback runs; a command may also hide its progress bars on -q)."""
    f = click.option(
        "-v", "--verbose", count=True, show_default=False, help="More detail in the log (repeat for more: -vv)."
    )(f)
    return click.option(
        "-q", "--quiet", is_flag=True, help="Only warnings and errors in the log on stderr (and no progress bars)."
    )(f)


THREADS_HELP = "Intra-op threads of {what}. Default: {default}. On a busy machine 1 can be several times faster."


def threads_option(what: str, default: int | None = None) -> Callable[[F], F]:
    """``--threads N``: intra-op threads of the compute library the command uses (``what`` says which)."""
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=default,
        show_default=default is not None,
        metavar="N",
        help=THREADS_HELP.format(what=what, default=default if default is not None else "all cores"),
    )


#: The one device vocabulary of every clipn-ood CLI; each command accepts the part it can honour.
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "tensorrt", "openvino", "openvino:X")
#: ``why_not`` of the commands whose engine runs on the GPU the process sees (the runtime's): how to pick one.
GPU_BY_ENVIRONMENT = {"cuda:N": "pick the GPU with CUDA_VISIBLE_DEVICES={index} and pass --device cuda"}
_DEVICE_ALIASES = {
    "gpu": "cuda",
    "nvidia": "cuda",
    "trt": "tensorrt",
    "tensor-rt": "tensorrt",
    "ort": "cpu",
    "ov": "openvino",
    "open-vino": "openvino",
}


def _device_kind(value: str) -> str:
    if re.fullmatch(r"cuda:\d+", value):
        return "cuda:N"
    return "openvino:X" if re.fullmatch(r"openvino:[a-z0-9_.]+", value) else value


def _device_suggestion(value: str) -> str | None:
    """The word of the vocabulary the user probably meant (gpu → cuda, cuda1 → cuda:1, typos), or None."""
    guess = re.sub(r"^(gpu|cuda):?(\d+)$", r"cuda:\2", value)
    guess = _DEVICE_ALIASES.get(guess, guess)
    if _device_kind(guess) in DEVICES:
        return guess
    close = difflib.get_close_matches(value, [d for d in DEVICES if not d.endswith((":N", ":X"))], n=1)
    return close[0] if close else None


class DeviceType(click.ParamType):  # type: ignore[type-arg]  # generic only in click ≥ 8.2
    """A ``--device`` value from :data:`DEVICES`, limited to what the command supports: a typo gets a
    suggestion, a device of the vocabulary that this command cannot use gets the reason (``why_not``; ``{index}``
    in it is the N of cuda:N)."""

    name = "device"

    def __init__(self, supported: Sequence[str], why_not: Mapping[str, str] | None = None) -> None:
        bad = set(supported) - set(DEVICES)
        if bad:
            raise ValueError(f"not devices of the vocabulary: {sorted(bad)}")
        self.supported = tuple(d for d in DEVICES if d in supported)
        self.why_not = dict(why_not or {})

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        kind = _device_kind(text)
        choose = f"choose {', '.join(self.supported)}"
        if kind in self.supported:
            return text
        if kind not in DEVICES:
            guess = _device_suggestion(text)
            if guess is None:
                self.fail(f"{value!r} is not a device ({choose})")
            if _device_kind(guess) in self.supported:
                self.fail(f"{value!r} is not a device; did you mean {guess!r}? ({choose})")
            text, kind = guess, _device_kind(guess)
            choose = f"{value!r} would be {guess!r}; {choose}"
        prog = _root_name(ctx) if ctx is not None else "this command"
        reason = self.why_not.get(kind, "").format(index=text.partition(":")[2] or "N")
        self.fail(f"{prog} cannot use {text}{f': {reason}' if reason else ''} ({choose})")

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # ctx: click ≥ 8.2
        return "[" + "|".join(self.supported) + "]"


def device_option(
    supported: Sequence[str], default: str, detail: str, why_not: Mapping[str, str] | None = None
) -> Callable[[F], F]:
    """``--device``, one vocabulary everywhere: auto = the fastest device this machine offers, else the CPU;
    ``detail`` says what runs there for this command and what auto picks."""
    gpu_n = " cuda:N = the N-th GPU." if "cuda:N" in supported else ""
    return click.option(
        "--device",
        type=DeviceType(supported, why_not),
        default=default,
        show_default=True,
        help=f"{detail}{gpu_n}",
    )


#: The devices an engine (a bundle's image engine) runs on: clipn-detect and clipn-eval.
ENGINE_DEVICES = ("auto", "cpu", "cuda", "tensorrt", "openvino", "openvino:X")
ENGINE_DEVICE_HELP = (
    "Where the engine runs. auto: the bundle's TensorRT plan if it runs here, else onnxruntime on a GPU "
    "(TensorRT → CUDA; needs onnxruntime-gpu), else OpenVINO on the CPU where it is installed, else onnxruntime on "
    "the CPU. cpu: onnxruntime on the CPU. openvino: OpenVINO on the CPU. openvino:GPU, openvino:NPU: an Intel "
    "GPU/NPU through OpenVINO (the parity gate runs on the CPU only: needs --allow-unchecked)."
)
RUNTIME_PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def engine_choice_options(f: F) -> F:
    """``--precision`` and ``--allow-unchecked``: which numeric path of a bundle runs
    (:mod:`clipn_runtime.engine_choice`)."""
    f = click.option(
        "--allow-unchecked",
        is_flag=True,
        help="Run a device/precision the bundle's parity gate did not check or did not pass (a warning says "
        "which). Without it, such a choice is refused (exit 2).",
    )(f)
    return click.option(
        "--precision",
        type=click.Choice(RUNTIME_PRECISIONS),
        help="Compute at this precision (bf16: the fp32 engine on OpenVINO with bf16 arithmetic, on CPUs with "
        "AVX-512 BF16 or AMX). Default: the fastest engine that passed the bundle's parity gate for --device; on "
        "a CPU a static int8 engine on OpenVINO where the CPU has VNNI/AMX, then (with AMX) fp32 as bf16 on "
        "OpenVINO, int8 on onnxruntime, fp32, fp16 (docs/detect.md has the order); on a GPU fp16, fp32, int8.",
    )(f)


# ---- output locations ----------------------------------------------------------------------------------------


def _probe_dir(folder: Path) -> str | None:
    """Why nothing can be written in the existing folder ``folder``, or None; creating a file is the only test
    that holds for root and read-only mounts alike (os.access says yes to root)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".clipn-write-test-", dir=folder)
    except OSError as e:
        return f"{folder} is not writable ({e.strerror or e})"
    os.close(fd)
    os.unlink(tmp)
    return None


def output_problem(path: str | os.PathLike[str], kind: Literal["file", "dir"]) -> str | None:
    """Why ``path`` cannot be written as a ``kind`` (file or folder, created with its parents as needed), or
    None when it can. Touches nothing it does not remove again."""
    p = Path(path)
    text = os.fspath(path)
    if kind == "file" and text.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        example = os.path.join(text, "results.jsonl")
        return f"{text} ends with a path separator, so it names a folder; give a file name, e.g. {example}"
    if p.is_dir():
        return f"{p} is a folder; give a file name" if kind == "file" else _probe_dir(p)
    if p.exists():
        if kind == "dir":
            return f"{p} is a file, not a folder"
        if not stat.S_ISREG(p.stat().st_mode):
            return None  # a FIFO or a device: opening it to test would block until a reader comes
        try:
            with open(p, "ab"):  # append mode: the results already there stay as they are
                return None
        except OSError as e:
            return f"cannot write {p} ({e.strerror or e})"
    ancestor = p.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    problem = f"{ancestor} is a file, not a folder" if not ancestor.is_dir() else _probe_dir(ancestor)
    return f"cannot create {p}: {problem}" if problem else None


class OutputPath(click.ParamType):  # type: ignore[type-arg]  # generic only in click ≥ 8.2
    """A path the command will write (a ``file`` or a ``dir``), checked when the options are parsed, so before
    any work: a parent that is a file, a read-only place, a folder where a file is expected all exit 2."""

    def __init__(self, kind: Literal["file", "dir"], path_type: type[str] | type[Path] = str) -> None:
        self.kind, self.path_type = kind, path_type
        self.name = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        problem = output_problem(os.fspath(value), self.kind)
        if problem is not None:
            self.fail(problem)
        return self.path_type(os.fspath(value))
