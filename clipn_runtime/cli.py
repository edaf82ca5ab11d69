"""``clipn-detect``: score images and videos with a bundle, torch-free."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click
from tqdm import tqdm

from clipn_runtime import clikit
from clipn_runtime.clikit import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from clipn_runtime.clikit import EXIT_PARTIAL as EXIT_SOME_FAILED
from clipn_runtime.errors import UserError
from clipn_runtime.scoring import METHODS

if TYPE_CHECKING:
    from clipn_runtime.detector import Detection, Detector
    from clipn_runtime.inputs import InputItem
    from clipn_runtime.output import Tally
    from clipn_runtime.prompts import PromptSet
    from clipn_runtime.results import Results, RunInfo
    from clipn_runtime.video import VideoError

log = logging.getLogger("clipn_runtime")

__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SOME_FAILED", "EXIT_USAGE", "main"]

HELP = """Score images and videos for out-of-distribution content with a clipn-ood bundle.

\b
INPUTS are image files, folders (add --recursive for subfolders), @list.txt
(one path per line), video files or stream URLs (.mp4, .mkv, rtsp://…; needs
the `video` extra) and webdataset tar shards (x.tar, shards/{00000..00099}.tar,
'pipe:cmd'; needs the `shards` extra; records named shard#key). Every image gets one record: pred (class), prob, p_no, ctw,
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
  clipn-detect 'shards/{00000..00099}.tar' -e bundle/ -o scores.parquet

\b
Output goes to stdout (a table on a terminal, JSONL when piped) or to -o FILE
(format from its extension: .jsonl, .csv, .txt = table, .parquet, which
needs the `parquet` extra and cannot be resumed). A summary (counts and
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
    allow_unchecked: bool
    calibration: str | None
    no_calibration: bool
    threads: int | None
    workers: int | None
    every: int
    smoothing: float | None
    max_pixels: int | None
    quiet: bool
    verbose: int


@click.command("clipn-detect", cls=clikit.Command, help=HELP)
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
    type=click.Choice(list(METHODS)),
    default="atd",
    show_default=True,
    help="Which score decides `ood`: CLIPN's ATD (agent-to-decide) or CTW (competing-to-win), by their own "
    "threshold-free rule or by the bundle's calibrated threshold (clipn-calibrate); the baselines msp, mcm, "
    "maxlogit, energy, mcm-single (MCM with one prompt, as its paper) need a calibration. Each record's `rule` "
    "says which decided.",
)
@click.option(
    "--calibration",
    metavar="FILE",
    help="clipn-calibrate's sidecar file (for a read-only bundle). Default: the bundle's own calibration, if any.",
)
@click.option(
    "--no-calibration",
    is_flag=True,
    help="Ignore the bundle's calibration: ATD/CTW decide by their threshold-free rule.",
)
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "table", "parquet"]),
    help="Output format. Default: from -o's extension, else a table on a terminal and JSONL when piped.",
)
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    type=clikit.OutputPath("file"),
    help="Write results here instead of stdout (checked before any work: its folder must be writable).",
)
@click.option(
    "--resume", is_flag=True, help="Append to -o FILE, skipping inputs (and video frames) already in it."
)
@click.option("--overwrite", is_flag=True, help="Replace -o FILE if it already has results.")
@click.option("-r", "--recursive", is_flag=True, help="Descend into subfolders of folder INPUTS.")
@click.option(
    "-b", "--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Images per batch."
)
@clikit.device_option(clikit.ENGINE_DEVICES, "auto", clikit.ENGINE_DEVICE_HELP, why_not=clikit.GPU_BY_ENVIRONMENT)
@clikit.engine_choice_options
@clikit.threads_option("the engine (onnxruntime or OpenVINO)")
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
@clikit.verbosity_options
@clikit.version_option
def main(**options: Any) -> int:
    # clikit.Command turns UserError, Ctrl-C and a closed stdout into one line and the documented exit code.
    with _pil_limits():
        return _run(DetectOptions(**options))


@contextlib.contextmanager
def _pil_limits() -> Iterator[None]:
    """PIL's bomb limit and warning filter are process-wide; a run may change them (--max-pixels), so they are
    put back afterwards for an app that calls main() in-process."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@dataclass
class _Plan:
    """What one run will do, checked before the engine loads (so a mistake costs nothing)."""

    results: Results
    items: Iterator[InputItem]  # streamed: a folder of millions of files is never listed in memory
    names: list[str]
    prompt_set: PromptSet | None
    run_info: RunInfo


def _run(o: DetectOptions) -> int:
    # Imported here so that `clipn-detect --help` stays instant.
    from clipn_runtime.output import Tally, stdout_is_tty

    plan = _plan(o)
    # Whatever ends the run (done, Ctrl-C, a write that fails), the engine is released, the output closed and
    # its lock let go.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(plan.results.close)
        detector = _open_detector(o, plan)
        cleanup.callback(detector.close)
        tally = Tally()
        bar = cleanup.enter_context(
            tqdm(
                unit="img",
                file=sys.stderr,
                dynamic_ncols=True,
                # records on a terminal already show progress; a bar would interleave with them
                disable=True if o.quiet or (not o.output and stdout_is_tty()) else None,
            )
        )
        t0 = time.perf_counter()
        try:
            _score(o, detector, plan, tally, bar)
        except KeyboardInterrupt:
            _finish(
                bar, plan.results, o.output, tally, t0, f"{detector.engine.describe()}; {o.method} {detector.rule}"
            )
            resumable = o.output and plan.results.fmt != "parquet"
            where = f"; rerun with --resume -o {o.output} to continue" if resumable else ""
            click.echo(f"clipn-detect: interrupted — every finished result is written{where}", err=True)
            return EXIT_INTERRUPTED
        _finish(
            bar, plan.results, o.output, tally, t0, f"{detector.engine.describe()}; {o.method} {detector.rule}"
        )
    return EXIT_SOME_FAILED if tally.errors else EXIT_OK


def _plan(o: DetectOptions) -> _Plan:
    """Every check that needs no engine: output, inputs, bundle, classes, prompts, --resume's provenance."""
    from PIL import Image

    from clipn_runtime.bundle import load_manifest
    from clipn_runtime.classes import load_classes
    from clipn_runtime.inputs import check_list_files, expand_inputs, require_inputs
    from clipn_runtime.openvocab import open_vocabulary_spec
    from clipn_runtime.output import choose_format, stdout_is_tty
    from clipn_runtime.prompts import load_prompts
    from clipn_runtime.results import Results, RunInfo
    from clipn_runtime.vocab import check_classes

    if not o.bundle:
        raise UserError("no bundle: pass --engine DIR (a directory written by clipn-export) or set CLIPN_ENGINE")
    fmt = choose_format(o.fmt, o.output, stdout_is_tty())
    results = Results(o.output, fmt, resume=o.resume, overwrite=o.overwrite)
    check_list_files(o.inputs)
    items = require_inputs(expand_inputs(o.inputs, recursive=o.recursive), recursive=o.recursive)
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
        open_vocabulary_spec(manifest, o.bundle, o.classes)
    run_info = RunInfo.create(
        o.bundle,
        manifest,
        names,
        output_format=fmt,
        method=o.method,
        precision=o.precision,
        prompts=prompt_set,
        smoothing=o.smoothing,
        every=o.every,
    )
    results.check(run_info)  # --resume: same setup as the earlier records, before the engine loads
    return _Plan(results, items, names, prompt_set, run_info)


def _open_detector(o: DetectOptions, plan: _Plan) -> Detector:
    """The engine, the run's class banks, and the results file opened with the provenance of both."""
    from clipn_runtime.detector import Detector

    assert o.bundle is not None  # _plan refused a run without one
    detector = Detector(
        o.bundle,
        device=o.device,
        method=o.method,
        batch_size=o.batch_size,
        threads=o.threads,
        precision=o.precision,
        allow_unchecked=o.allow_unchecked,
        calibration=o.calibration,
        use_calibration=not o.no_calibration,
        decode_workers=o.workers,
        max_pixels=o.max_pixels,
        verify_hashes=False,  # _plan's load_manifest just checked them
    )
    try:
        detector.set_classes(plan.names, plan.prompt_set, source=o.classes or "classes", progress=not o.quiet)
        plan.results.open(
            plan.run_info.with_engine(detector.engine_file, detector.numeric_precision, detector.decision_id),
            bundle_dir=o.bundle,
            runner=detector.engine.describe(),
        )
    except BaseException:
        detector.close()
        raise
    return detector


def _score(o: DetectOptions, detector: Detector, plan: _Plan, tally: Tally, bar: tqdm) -> None:
    """Images in batches, videos frame by frame; every finished batch is written before the next starts."""
    from clipn_runtime.detector import Detection
    from clipn_runtime.video import VideoError

    results = plan.results

    def emit(batch: list[Detection]) -> None:
        if batch:
            results.write(batch)
            for d in batch:
                tally.add(d)
            bar.update(len(batch))

    def not_done(path: str) -> bool:
        if results.claim(path):
            return True
        tally.skipped += 1
        return False

    for kind, group in itertools.groupby(plan.items, key=lambda it: it.kind):
        if kind == "image":
            for batch in detector.iter_batches(it.path for it in group if not_done(it.path)):
                emit(batch)
            continue
        if kind == "shard":
            _score_shards((it.path for it in group), detector, results, emit, not_done)
            continue
        for item in group:
            if not not_done(item.path):
                continue
            done = results.frames(item.path)
            scored = 0
            try:
                for batch in detector.iter_video_batches(
                    item.path,
                    every=o.every,
                    smoothing=o.smoothing,
                    skip_frames=done,
                    smoothing_seed=results.smoothed(item.path),
                ):
                    emit(batch)
                    scored += len(batch)
            except VideoError as e:
                emit([Detection.failed(item.path, o.method, _video_failure(e, scored + len(done)))])


def _score_shards(
    shards: Iterable[str],
    detector: Detector,
    results: Results,
    emit: Callable[[list[Detection]], None],
    not_done: Callable[[str], bool],
) -> None:
    """Consecutive tar shards' samples (those not yet in the results) as one stream, so batches span shards; a
    shard read to its end is noted as finished once its last sample is written, so ``--resume`` does not open it
    again."""
    from clipn_runtime.inputs import printable
    from clipn_runtime.shards import ShardStream

    def skip(shard: str) -> bool:
        if results.shard_done(shard):
            log.info("%s: skipped, every sample is already in the results", printable(shard))
            return True
        return False

    stream = ShardStream(shards, skip=skip, claim=not_done)
    for batch in detector.iter_shard_batches(stream):
        emit(batch)
        for shard in stream.written(len(batch)):
            results.finish_shard(shard)
    for shard in stream.written(0):  # shards that ended after the last batch was written, or gave no samples
        results.finish_shard(shard)


def _video_failure(e: VideoError, frames_written: int) -> str:
    """The error record of a video that failed: why, and (when it broke mid-way) that its earlier frames are
    kept and --resume tries it again."""
    if not frames_written:
        return str(e)
    return (
        f"{e}; the {frames_written} frame(s) scored before that are in the results — --resume tries this video "
        "again, skipping them"
    )


def _finish(bar: tqdm, results: Results, output: str | None, tally: Tally, t0: float, engine: str) -> None:
    bar.close()
    results.close()  # before the summary: a failed final flush is reported instead of it
    click.echo(f"clipn-detect: {tally.line(time.perf_counter() - t0, engine)}", err=True)
    if output:
        click.echo(f"clipn-detect: results in {os.fspath(output)}", err=True)
