"""``clipn-detect``: score images and videos with a bundle, torch-free."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
from tqdm import tqdm

from clipn_runtime.errors import UserError

if TYPE_CHECKING:
    from clipn_runtime.output import Tally

log = logging.getLogger("clipn_runtime")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

HELP = """Score images and videos for out-of-distribution content with a clipn-ood bundle.

\b
INPUTS are image files, folders (add --recursive for subfolders), @list.txt
(one path per line) and video files or stream URLs (.mp4, .mkv, rtsp://…; needs
the `video` extra). Every image gets one record: pred (class), prob, p_no, ctw,
atd, p_ood and ood (the decision of --method). A file that cannot be read gets a
record with `error` set; the run always goes on.

\b
Examples:
  clipn-detect images/ --engine bundle/ --classes classes.txt
  clipn-detect images/ -e ov-bundle/ --classes other.txt       # open-vocabulary bundle: new classes
  clipn-detect images/ -r -e bundle/ -o results.jsonl          # JSONL to a file
  clipn-detect @todo.txt -e bundle/ -o results.csv --resume    # continue a run
  clipn-detect clip.mp4 -e bundle/ --every 10 --smoothing 0.3  # every 10th frame
  CLIPN_ENGINE=bundle/ clipn-detect a.jpg b.png --format table

\b
Output goes to stdout (a table on a terminal, JSONL when piped) or to -o FILE
(format from its extension: .jsonl, .csv, .txt = table). A summary (counts and
images/s) goes to stderr.

\b
Open-vocabulary bundles (clipn-export --open-vocabulary) take any --classes
list: the new class banks are computed once with the bundle's ONNX text
encoders (no torch) and cached in DIR/banks/ (or banks/ in the user cache,
$CLIPN_CACHE or ~/.cache/clipn-ood, when DIR is read-only); --prompts changes the templates they use.

\b
Exit codes: 0 every input scored; 1 some inputs failed (see their `error`);
2 usage or bundle error; 130 interrupted (all finished results are written:
rerun with --resume).
"""


def _setup_logging(verbose: int, quiet: bool) -> Callable[[], None]:
    """Send clipn_runtime's log to stderr for this command; returns what undoes it (main() may be called
    in-process, by tests or other apps)."""
    saved = (list(log.handlers), log.level, log.propagate)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("clipn-detect: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False

    def restore() -> None:
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
        log.propagate = saved[2]

    return restore


@dataclass(frozen=True)
class DetectOptions:
    """Everything one ``clipn-detect`` invocation was asked for (the click options, by name)."""

    inputs: tuple[str, ...]
    bundle: str | None
    classes: str | None
    prompts: str | None
    method: str
    fmt: str | None
    output: str | None
    resume: bool
    overwrite: bool
    recursive: bool
    batch_size: int
    device: str
    precision: str | None
    threads: int | None
    workers: int | None
    every: int
    smoothing: float | None
    max_pixels: int | None
    quiet: bool
    verbose: int


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True, metavar="INPUTS...")
@click.option(
    "-e",
    "--engine",
    "bundle",
    envvar="CLIPN_ENGINE",
    metavar="DIR",
    help="The bundle directory written by clipn-export. Default: $CLIPN_ENGINE.",
)
@click.option(
    "--classes",
    metavar="FILE",
    help="Your class list (one per line, or 'imagenet'). An open-vocabulary bundle computes (and caches) class "
    "banks for any list; any other bundle must have exactly these classes — if not, clipn-detect prints the "
    "clipn-export commands that build a bundle for them and exits with 2.",
)
@click.option(
    "--prompts",
    metavar="SPEC",
    help="Open-vocabulary bundles: the prompt templates for the class banks — clipn (the 128 official), clean, "
    "openai (80) or a file (one template with {} per line, or yes<TAB>no). Default: the bundle's own. Fewer "
    "templates make new banks proportionally faster to compute.",
)
@click.option(
    "--method",
    type=click.Choice(["atd", "ctw"]),
    default="atd",
    show_default=True,
    help="Which CLIPN rule decides `ood`: ATD (agent-to-decide) or CTW (competing-to-win).",
)
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "table"]),
    help="Output format. Default: from -o's extension, else a table on a terminal and JSONL when piped.",
)
@click.option("-o", "--output", metavar="FILE", help="Write results here instead of stdout.")
@click.option(
    "--resume", is_flag=True, help="Append to -o FILE, skipping inputs (and video frames) already in it."
)
@click.option("--overwrite", is_flag=True, help="Replace -o FILE if it already has results.")
@click.option("-r", "--recursive", is_flag=True, help="Descend into subfolders of folder INPUTS.")
@click.option(
    "-b", "--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Images per batch."
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
    default="auto",
    show_default=True,
    help="auto: the bundle's TensorRT plan if it runs here, else onnxruntime with TensorRT → CUDA → CPU as "
    "available (GPUs need onnxruntime-gpu).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    help="Which of the bundle's engines to run. Default: the first one it lists.",
)
@click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads. Default: all cores.")
@click.option(
    "--workers", type=click.IntRange(1), help="Image decoding threads (overlapped with inference). Default: ≤ 4."
)
@click.option(
    "--every", default=1, show_default=True, type=click.IntRange(1), help="Videos: score every N-th frame."
)
@click.option(
    "--smoothing",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    metavar="ALPHA",
    help="Videos: add an exponential moving average (weight ALPHA on the new frame) of the OOD probability.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    help="Refuse larger images as decompression bombs. Default: Pillow's limit (about 89 million pixels).",
)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr (and the summary).")
@click.option("-v", "--verbose", count=True, help="Debug logging.")
def main(**options: Any) -> None:
    o = DetectOptions(**options)
    restore_logging = _setup_logging(o.verbose, o.quiet)
    try:
        code = _run(o)
    except UserError as e:
        click.echo(f"clipn-detect: error: {e}", err=True)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        click.echo("clipn-detect: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_SOME_FAILED
    finally:
        restore_logging()
    sys.exit(code)


def _run(o: DetectOptions) -> int:
    # Imported here so that `clipn-detect --help` stays instant.
    from PIL import Image

    from clipn_runtime.bundle import load_manifest
    from clipn_runtime.classes import load_classes
    from clipn_runtime.detector import Detection, Detector
    from clipn_runtime.inputs import check_list_files, expand_inputs
    from clipn_runtime.openvocab import open_vocabulary_spec
    from clipn_runtime.output import Done, Tally, choose_format, is_nonempty_file, make_writer, read_done
    from clipn_runtime.prompts import load_prompts
    from clipn_runtime.video import VideoError
    from clipn_runtime.vocab import check_classes

    if not o.bundle:
        raise UserError("no bundle: pass --engine DIR (a directory written by clipn-export) or set CLIPN_ENGINE")
    fmt = choose_format(o.fmt, o.output, sys.stdout.isatty())
    if o.resume and not o.output:
        raise UserError("--resume continues an earlier -o FILE; pass the same -o FILE as that run")
    if o.resume and o.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if o.output and not o.resume and not o.overwrite and is_nonempty_file(o.output):
        raise UserError(
            f"{o.output} already has results; add --resume to continue that run or --overwrite to replace it"
        )
    check_list_files(o.inputs)
    # This run records decompression bombs as error records; PIL's warning about them would only be noise, and
    # PIL's own hard limit must not undercut a higher --max-pixels.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    if o.max_pixels is not None and o.max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = o.max_pixels

    manifest = load_manifest(o.bundle)
    # Every class-list problem is reported before the engine loads: a bad file, or a list this bundle cannot
    # take (the message holds the clipn-export commands that fix it).
    names = load_classes(o.classes) if o.classes is not None else list(manifest.classes)
    if o.classes is not None:
        check_classes(manifest, names, bundle_dir=o.bundle, classes_file=o.classes)
    prompt_set = load_prompts(o.prompts) if o.prompts is not None else None
    if prompt_set is not None:
        open_vocabulary_spec(manifest, o.bundle)
    done = read_done(o.output, fmt) if o.resume and o.output else Done()
    if o.resume and len(done):
        log.info("resuming %s: %d records already there", o.output, len(done))
    detector = Detector(
        o.bundle,
        device=o.device,
        method=o.method,
        batch_size=o.batch_size,
        threads=o.threads,
        precision=o.precision,
        decode_workers=o.workers,
        max_pixels=o.max_pixels,
        verify_hashes=False,  # load_manifest above just checked them
    )
    try:
        detector.set_classes(names, prompt_set, source=o.classes or "classes", progress=not o.quiet)
    except BaseException:
        detector.close()
        raise
    fh: IO[str]
    if o.output:
        Path(o.output).parent.mkdir(parents=True, exist_ok=True)
        fh = open(o.output, "a" if o.resume else "w", encoding="utf-8", newline="")  # noqa: SIM115 (_finish closes it)
    else:
        fh = sys.stdout
    writer = make_writer(fmt, fh, csv_header=not (o.resume and is_nonempty_file(o.output or "")))
    tally = Tally()
    bar = tqdm(
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        # records on a terminal already show progress; a bar would interleave with them
        disable=True if o.quiet or (not o.output and sys.stdout.isatty()) else None,
    )
    t0 = time.perf_counter()

    def emit(batch: list[Detection]) -> None:
        if batch:
            writer.write_batch(batch)
            for d in batch:
                tally.add(d)
            bar.update(len(batch))

    def not_done(path: str) -> bool:
        if done.has(path):
            tally.skipped += 1
            return False
        return True

    try:
        for kind, group in itertools.groupby(
            expand_inputs(o.inputs, recursive=o.recursive), key=lambda it: it.kind
        ):
            if kind == "image":
                for batch in detector.iter_batches(it.path for it in group if not_done(it.path)):
                    emit(batch)
                continue
            for item in group:
                if not not_done(item.path):
                    continue
                try:
                    for batch in detector.iter_video_batches(
                        item.path,
                        every=o.every,
                        smoothing=o.smoothing,
                        skip_frames=done.frames.get(item.path, set()),
                    ):
                        emit(batch)
                except VideoError as e:
                    emit([Detection.failed(item.path, o.method, str(e))])
    except KeyboardInterrupt:
        _finish(bar, fh, o.output, tally, t0, detector.engine.describe())
        where = f"; rerun with --resume -o {o.output} to continue" if o.output else ""
        click.echo(f"clipn-detect: interrupted — every finished result is written{where}", err=True)
        return EXIT_INTERRUPTED
    _finish(bar, fh, o.output, tally, t0, detector.engine.describe())
    detector.close()
    if tally.scored + tally.errors + tally.skipped == 0:
        log.warning("no inputs found")
    return EXIT_SOME_FAILED if tally.errors else EXIT_OK


def _finish(bar: tqdm, fh: IO[str], output: str | None, tally: Tally, t0: float, engine: str) -> None:
    bar.close()
    if output:
        fh.close()
    else:
        fh.flush()
    click.echo(f"clipn-detect: {tally.line(time.perf_counter() - t0, engine)}", err=True)
    if output:
        click.echo(f"clipn-detect: results in {os.fspath(output)}", err=True)
