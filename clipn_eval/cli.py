"""``clipn-eval``: AUROC / FPR95 of every method on an ID folder vs OOD folders, with a report folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from clipn_eval.evaluate import EngineScorer, Evaluation, Scorer, evaluate
from clipn_runtime import clikit
from clipn_runtime.clikit import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from clipn_runtime.clikit import EXIT_PARTIAL as EXIT_SOME_FAILED
from clipn_runtime.errors import UserError
from clipn_runtime.inputs import printable
from clipn_runtime.scoring import METHODS

if TYPE_CHECKING:
    from clipn_runtime.bundle import ModelIdentity

log = logging.getLogger("clipn_eval")

__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SOME_FAILED", "EXIT_USAGE", "main"]

HELP = """Evaluate OOD detection: score an ID folder and OOD folders with a bundle (one pass gives
every method), then AUROC and FPR@95%TPR per OOD set, their average, and ID accuracy.

\b
Writes to -o/--output: metrics.csv, metrics.json, metrics.md, roc_<set>.png,
hist_<set>.png, and scores/ (per-image scores: rerun the same command after a
crash and it continues where it stopped). FPR95 is reported in both common
definitions: fpr95_interp (official CLIPN: ROC interpolated at TPR 0.95) and
fpr95_nearest (MCM / Hendrycks et al.: the nearest ROC point).

\b
ID top-1 accuracy is computed when the ID folder is an ImageFolder whose
sub-folder names are class names of the bundle, or map to them through
--class-map FILE ('n01440764<TAB>tench' per line) or --class-map sorted (the
i-th folder in sorted order is class i: ImageNet's wnid folders).

\b
Examples:
  clipn-eval --engine b/ --id imagenet/val --class-map wnids.tsv \\
      --ood iNaturalist=ood/iNaturalist --ood SUN=ood/SUN -o report/
  CLIPN_ENGINE=b/ clipn-eval --id id/ --ood x=ood/ --threads 1 -q
  clipn-eval --torch --checkpoint ckpt.safetensors --engine b/ --id id/ --ood x=ood/ -o ref/

\b
Exit codes: 0 all images scored; 1 some images could not be read (they are
listed in the report and left out of the metrics); 2 usage or input error;
130 interrupted (scores so far are kept).
"""


def _parse_ood(values: tuple[str, ...]) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for v in values:
        name, sep, folder = v.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--ood {printable(v)!r}: expected NAME=DIR, e.g. --ood SUN=data/SUN")
        name = printable(name)  # the set's name goes into the report and the cache's file names: valid UTF-8
        if name in {n for n, _ in out}:
            raise UserError(f"--ood: the name {name!r} is used twice")
        out.append((name, Path(folder)))
    return out


def _methods(value: str) -> list[str] | None:
    """The methods asked for; None for "all" (every method the bundle can score)."""
    if value.strip().lower() == "all":
        return None
    methods = [m.strip().lower() for m in value.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: unknown {bad or value!r}; choose from all,{','.join(METHODS)}")
    return methods


@click.command(
    "clipn-eval",
    cls=clikit.Command,
    help=HELP,
    interrupted="per-image scores so far are kept — rerun to continue",
    extras=("eval",),
    log_default=logging.WARNING,
)
@click.option(
    "--engine",
    "-e",
    envvar="CLIPN_ENGINE",
    type=click.Path(path_type=Path),
    help="Bundle directory written by clipn-export. Default: $CLIPN_ENGINE.",
)
@click.option("--id", "id_dir", required=True, type=click.Path(path_type=Path), help="Folder of ID images.")
@click.option("--ood", "ood", multiple=True, required=True, metavar="NAME=DIR", help="An OOD set (repeatable).")
@click.option(
    "--methods",
    default="all",
    show_default=True,
    help=f"Comma-separated methods ({','.join(METHODS)}), or all: every method the bundle scores (mcm-single "
    "needs MCM's one-prompt bank, which clipn-export bakes in by default).",
)
@click.option(
    "-o",
    "--output",
    type=clikit.OutputPath("dir", Path),
    default=Path("report"),
    show_default=True,
    metavar="DIR",
    help="Report folder (metrics, plots, per-image scores); checked before any work. A rerun continues in it.",
)
@click.option(
    "--class-map",
    metavar="FILE|sorted",
    help="ID folder → class: a file of 'folder<TAB>class name' lines, or 'sorted' (i-th sorted folder = class i, "
    "e.g. ImageNet wnid folders with --classes imagenet).",
)
@click.option(
    "--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True, help="Images per batch."
)
@clikit.device_option(
    clikit.ENGINE_DEVICES,
    "auto",
    clikit.ENGINE_DEVICE_HELP + " With --torch: where PyTorch runs (auto: the GPU if torch sees one).",
    why_not=clikit.GPU_BY_ENVIRONMENT,
)
@clikit.threads_option("the engine (onnxruntime or OpenVINO), or torch with --torch")
@clikit.engine_choice_options
@click.option(
    "--calibration",
    metavar="FILE",
    help="clipn-calibrate's sidecar file; default: the bundle's own calibration, if any. With one, the report adds "
    "each method's achieved TPR and FPR at the calibrated threshold.",
)
@click.option("--no-calibration", is_flag=True, help="Ignore the bundle's calibration.")
@click.option("--no-plots", is_flag=True, help="Skip the ROC and histogram PNGs.")
@click.option("--torch", "use_torch", is_flag=True, help="Reference path: the PyTorch model instead of an engine.")
@click.option(
    "--checkpoint", type=click.Path(path_type=Path), help="With --torch: CLIPN checkpoint (ours or official)."
)
@click.option("--model", help="With --torch: open_clip model name or model-config JSON (default: the --engine's).")
@click.option("--pretrained", help="With --torch: open_clip tag or weights file for the base CLIP.")
@click.option("--classes", help="With --torch: class list file or 'imagenet' (default: the --engine's).")
@click.option("--prompts", help="With --torch: clipn|clean|openai|FILE (default: the --engine's, else clipn).")
@clikit.verbosity_options
@clikit.version_option
def main(
    engine: Path | None,
    id_dir: Path,
    ood: tuple[str, ...],
    methods: str,
    output: Path,
    class_map: str | None,
    batch_size: int,
    device: str,
    threads: int | None,
    precision: str | None,
    allow_unchecked: bool,
    calibration: str | None,
    no_calibration: bool,
    no_plots: bool,
    use_torch: bool,
    checkpoint: Path | None,
    model: str | None,
    pretrained: str | None,
    classes: str | None,
    prompts: str | None,
    quiet: bool,
    verbose: int,
) -> int:
    # clikit.Command turns UserError and Ctrl-C into one line and the documented exit code.
    oods, method_list = _parse_ood(ood), _methods(methods)
    from clipn_train.cli import torch_threads  # click only; torch itself is imported with --torch alone

    with torch_threads(threads if use_torch else None):
        if use_torch:
            if checkpoint is None:
                raise UserError("--torch needs --checkpoint")
            if device == "tensorrt" or device.startswith("openvino"):
                raise UserError(
                    f"--torch runs the PyTorch model; --device {device} is for engines (use auto, cpu, cuda)"
                )
            scorer: Scorer = _torch_scorer(
                engine, checkpoint, model, pretrained, classes, prompts, batch_size, device
            )
        elif engine is None:
            raise UserError(
                "give --engine BUNDLE_DIR or set CLIPN_ENGINE (or --torch --checkpoint CKPT for the PyTorch reference)"
            )
        else:
            scorer = EngineScorer(
                engine,
                device=device,
                batch_size=batch_size,
                precision=precision,
                threads=threads,
                allow_unchecked=allow_unchecked,
                calibration=calibration,
                use_calibration=not no_calibration,
            )
        report = evaluate(
            scorer,
            id_dir,
            oods,
            method_list,
            output,
            class_map=class_map,
            plots=not no_plots,
            meta={"engine": printable(str(engine)) if engine else None, "torch": use_torch},
            progress=not quiet,
        )
    return _print_report(report)


def _torch_scorer(
    engine: Path | None,
    checkpoint: Path,
    model: str | None,
    pretrained: str | None,
    classes_spec: str | None,
    prompts: str | None,
    batch_size: int,
    device: str,
) -> Scorer:
    from clipn_eval.evaluate import TorchScorer
    from clipn_runtime.bundle import load_manifest
    from clipn_runtime.classes import load_classes
    from clipn_runtime.prompts import DEFAULT_PROMPTS, PromptSet, load_prompts
    from clipn_train.distributed import pick_device

    prompt_set: PromptSet | None = load_prompts(prompts) if prompts else None
    classes: list[str] | None = None
    scale: float | None = None
    if engine is not None:  # checking an export: use everything it was made from unless overridden
        m = load_manifest(engine, verify_hashes=False)
        model = model or _model_spec(m.model, engine)
        pretrained = pretrained or m.model.pretrained
        classes, scale = m.classes, m.scoring.scale
        prompt_set = prompt_set or PromptSet.from_dict(m.prompts)
    if classes_spec:
        classes = load_classes(classes_spec)
    if classes is None:
        raise UserError("--torch needs --classes (or an --engine whose classes to use)")
    return TorchScorer(
        checkpoint,
        classes,
        model=model,
        pretrained=pretrained,
        prompts=prompt_set or load_prompts(DEFAULT_PROMPTS),
        scale=scale,
        batch_size=batch_size,
        device=str(pick_device(device)),
    )


def _model_spec(model: ModelIdentity, bundle: Path) -> str:
    """The open_clip name the manifest records, else its model config written to a temporary JSON file."""
    import json
    import tempfile

    import open_clip

    if model.name in open_clip.list_models():
        return model.name
    if model.config is None:
        raise UserError(f"{bundle}: the manifest does not name an open_clip model; pass --model")
    path = Path(tempfile.mkdtemp(prefix="clipn-eval-")) / "model.json"
    path.write_text(json.dumps(model.config), encoding="utf-8")
    return str(path)


def _print_report(report: Evaluation) -> int:
    """The table on stdout, each image that could not be scored on stderr; the exit code."""
    from clipn_eval.report import markdown_table

    click.echo(markdown_table(report.rows, report.id_accuracy))
    for e in report.errors:
        click.echo(f"clipn-eval: skipped {e['path']}: {e['error']}", err=True)
    click.echo(f"report written to {printable(str(report.out_dir))}/", err=True)
    return EXIT_SOME_FAILED if report.errors else EXIT_OK


if __name__ == "__main__":
    main()
