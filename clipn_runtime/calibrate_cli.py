"""``clipn-calibrate``: thresholds with a stated false-alarm rate, from the user's own held-out ID images."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from clipn_runtime import clikit
from clipn_runtime.clikit import EXIT_OK, EXIT_PARTIAL
from clipn_runtime.errors import UserError

log = logging.getLogger("clipn_runtime")

HELP = """Calibrate a bundle's OOD decisions on held-out images of your own classes.

\b
ID_INPUTS are image files, folders (--recursive for subfolders) or @list.txt
files: images that are in-distribution (of the bundle's classes, drawn the way
your deployment's images are), and NOT the images you evaluate on. For every
method (atd, ctw, msp, mcm, maxlogit, energy) the threshold is set so that a
new ID image is flagged OOD with probability at most 1 - TPR:

\b
  split conformal rule: with n calibration images, the threshold is the
  k-th smallest OOD-ness score (-ID-score), k = ceil((n + 1) * TPR); an image
  is OOD when its OOD-ness exceeds it.

\b
The guarantee assumes the calibration images and future ID images are
exchangeable (the same source, the same way of drawing them); it holds for any
n and any method, on average over calibration sets. It promises nothing about
how many OOD images are caught: measure that with clipn-eval. Fewer than
ceil(TPR / (1 - TPR)) images (19 for 0.95) cannot give it and are refused.

\b
The thresholds belong to the engine, precision and class list they were
measured with (clipn-detect refuses them with another). They are written into
the bundle (a calibration-*.json listed in clipn.json, replacing any earlier
one) or, with -o FILE, into a sidecar file for a read-only bundle:
clipn-detect --calibration FILE.

\b
Examples:
  clipn-calibrate holdout/ -r -e bundle/
  clipn-calibrate holdout/ -e bundle/ --tpr 0.99 -o bundle.calibration.json
  clipn-detect images/ -e bundle/ --method energy        # uses the thresholds

\b
Exit codes: 0 calibrated; 1 calibrated, but some images could not be read
(left out, counted in the file); 2 usage, bundle or input error (too few
images, a video or shard among the inputs); 130 interrupted (nothing written).
"""


@click.command("clipn-calibrate", cls=clikit.Command, help=HELP)
@click.argument("inputs", nargs=-1, required=True, metavar="ID_INPUTS...")
@click.option("-e", "--engine", "bundle", envvar="CLIPN_ENGINE", metavar="DIR", help="The bundle ($CLIPN_ENGINE).")
@click.option(
    "--tpr",
    default="0.95",
    show_default=True,
    help="Target share of ID images kept (1 - the false-alarm rate), as a decimal: 0.95, 0.99.",
)
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    type=clikit.OutputPath("file"),
    help="Write a sidecar file instead of the bundle (for a read-only bundle); pass it to clipn-detect "
    "--calibration FILE.",
)
@click.option("-r", "--recursive", is_flag=True, help="Descend into subfolders of folder ID_INPUTS.")
@click.option(
    "-b", "--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Images per batch."
)
@clikit.device_option(
    clikit.ENGINE_DEVICES,
    "auto",
    clikit.ENGINE_DEVICE_HELP + " The thresholds hold for the engine that ran here only.",
    why_not=clikit.GPU_BY_ENVIRONMENT,
)
@clikit.engine_choice_options
@clikit.threads_option("the engine (onnxruntime or OpenVINO)")
@clikit.verbosity_options
@clikit.version_option
def main(**options: Any) -> int:
    return _run(**options)


def _run(
    inputs: tuple[str, ...],
    bundle: str | None,
    tpr: str,
    output: str | None,
    recursive: bool,
    batch_size: int,
    device: str,
    precision: str | None,
    allow_unchecked: bool,
    threads: int | None,
    quiet: bool,
    verbose: int,
) -> int:
    from clipn_runtime.calibration import calibrate_detector, min_images, parse_tpr, write_to_bundle
    from clipn_runtime.detector import Detector
    from clipn_runtime.inputs import check_list_files, expand_inputs, require_inputs

    target = parse_tpr(tpr)
    if bundle is None:
        raise UserError("give --engine BUNDLE_DIR (or set CLIPN_ENGINE)")
    if output is None:
        problem = clikit.output_problem(bundle, "dir")
        if problem is not None:  # checked before the work, which would be lost otherwise
            raise UserError(f"{problem}: give -o FILE to write a sidecar file instead")
    check_list_files(inputs)
    items = list(require_inputs(expand_inputs(inputs, recursive=recursive), recursive=recursive))
    other = [i for i in items if i.kind != "image"]
    if other:
        raise UserError(
            f"{other[0].path}: calibrate on images ({other[0].kind}s are not taken: the guarantee is per image)"
        )
    missing = [i.path for i in items if not os.path.isfile(i.path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{missing[0]}: no such file{more}; every calibration image must be readable")
    if len(items) < min_images(target):
        raise UserError(
            f"{len(items)} image(s) found; a TPR of {tpr} needs at least {min_images(target)} held-out ID images"
        )
    detector = Detector(
        bundle,
        device=device,
        batch_size=batch_size,
        threads=threads,
        precision=precision,
        allow_unchecked=allow_unchecked,
        use_calibration=False,
    )
    with tqdm(total=len(items), unit="img", disable=quiet, desc="calibrating") as bar:
        calib, errors = calibrate_detector(
            detector, [i.path for i in items], target, on_image=lambda: bar.update(1)
        )
    where = Path(output) if output is not None else write_to_bundle(bundle, calib)
    if output is not None:
        from clipn_runtime.fileio import atomic_write

        atomic_write(where, calib.to_json())
    _print(calib, where, detector.engine.describe())
    return EXIT_PARTIAL if errors else EXIT_OK


def _print(calib: Any, where: Path, engine: str) -> None:
    click.echo(f"calibrated on {calib.n} ID images, target TPR {calib.rule.split('@')[1]} ({engine}):")
    click.echo(f"{'method':<10} {'threshold (OOD-ness >)':>24} {'rank k of n':>12}")
    for m, t in calib.thresholds.items():
        click.echo(f"{m:<10} {t.threshold:>24.6g} {f'{t.rank}/{calib.n}':>12}")
    click.echo(f"written: {where}")
