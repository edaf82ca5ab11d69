"""``clipn-eval``: AUROC / FPR95 of every method on an ID folder vs OOD folders, with a report folder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from clipn_eval.evaluate import SORTED_FOLDERS, Scorer
from clipn_runtime.errors import UserError

log = logging.getLogger("clipn_eval")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
ALL_METHODS = ("atd", "ctw", "msp", "mcm", "maxlogit", "energy")

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
            raise UserError(f"--ood {v!r}: expected NAME=DIR, e.g. --ood SUN=data/SUN")
        if name in {n for n, _ in out}:
            raise UserError(f"--ood: the name {name!r} is used twice")
        out.append((name, Path(folder)))
    return out


def _methods(value: str) -> list[str]:
    methods = [m.strip().lower() for m in value.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise UserError(f"--methods: unknown {bad or value!r}; choose from {','.join(ALL_METHODS)}")
    return methods


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--engine", "-e", type=click.Path(path_type=Path), help="Bundle directory written by clipn-export.")
@click.option("--id", "id_dir", required=True, type=click.Path(path_type=Path), help="Folder of ID images.")
@click.option("--ood", "ood", multiple=True, required=True, metavar="NAME=DIR", help="An OOD set (repeatable).")
@click.option("--methods", default=",".join(ALL_METHODS), show_default=True, help="Comma-separated methods.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("report"), show_default=True)
@click.option(
    "--class-map",
    metavar="FILE|sorted",
    help="ID folder → class: a file of 'folder<TAB>class name' lines, or 'sorted' (i-th sorted folder = class i, "
    "e.g. ImageNet wnid folders with --classes imagenet).",
)
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True
)
@click.option(
    "--precision", type=click.Choice(["fp32", "fp16", "int8"]), help="Which engine of the bundle to use."
)
@click.option("--no-plots", is_flag=True, help="Skip the ROC and histogram PNGs.")
@click.option("--torch", "use_torch", is_flag=True, help="Reference path: the PyTorch model instead of an engine.")
@click.option(
    "--checkpoint", type=click.Path(path_type=Path), help="With --torch: CLIPN checkpoint (ours or official)."
)
@click.option("--model", help="With --torch: open_clip model name or model-config JSON (default: the --engine's).")
@click.option("--pretrained", help="With --torch: open_clip tag or weights file for the base CLIP.")
@click.option("--classes", help="With --torch: class list file or 'imagenet' (default: the --engine's).")
@click.option("--prompts", help="With --torch: clipn|clean|openai|FILE (default: the --engine's, else clipn).")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def main(
    engine: Path | None,
    id_dir: Path,
    ood: tuple[str, ...],
    methods: str,
    output: Path,
    class_map: str | None,
    batch_size: int,
    device: str,
    precision: str | None,
    no_plots: bool,
    use_torch: bool,
    checkpoint: Path | None,
    model: str | None,
    pretrained: str | None,
    classes: str | None,
    prompts: str | None,
    verbose: bool,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if use_torch:
            if checkpoint is None:
                raise UserError("--torch needs --checkpoint")
            scorer: Scorer = _torch_scorer(engine, checkpoint, model, pretrained, classes, prompts, batch_size)
        elif engine is None:
            raise UserError("give --engine BUNDLE_DIR (or --torch --checkpoint CKPT for the PyTorch reference)")
        else:
            from clipn_eval.evaluate import EngineScorer

            scorer = EngineScorer(engine, device=device, batch_size=batch_size, precision=precision)
        code = evaluate(
            scorer,
            id_dir,
            _parse_ood(ood),
            _methods(methods),
            output,
            class_map=class_map,
            plots=not no_plots,
            meta={"engine": str(engine) if engine else None, "torch": use_torch},
        )
    except UserError as e:
        click.echo(f"clipn-eval: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("clipn-eval: interrupted; per-image scores so far are kept — rerun to continue", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code)


def _torch_scorer(
    engine: Path | None,
    checkpoint: Path,
    model: str | None,
    pretrained: str | None,
    classes_spec: str | None,
    prompts: str | None,
    batch_size: int,
) -> Scorer:
    from clipn_eval.evaluate import TorchScorer
    from clipn_runtime.bundle import load_manifest
    from clipn_runtime.classes import load_classes
    from clipn_runtime.prompts import PromptSet, load_prompts

    prompt_set: PromptSet | None = load_prompts(prompts) if prompts else None
    classes: list[str] | None = None
    scale: float | None = None
    if engine is not None:  # checking an export: use everything it was made from unless overridden
        m = load_manifest(engine, verify_hashes=False)
        model = model or _model_spec(m.model, engine)
        pretrained = pretrained or m.model.get("pretrained")
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
        prompts=prompt_set or load_prompts("clipn"),
        scale=scale,
        batch_size=batch_size,
    )


def _model_spec(model: dict[str, object], bundle: Path) -> str:
    """The open_clip name the manifest records, else its model config written to a temporary JSON file."""
    import json
    import tempfile

    import open_clip

    name = str(model.get("name"))
    if name in open_clip.list_models():
        return name
    if not isinstance(model.get("config"), dict):
        raise UserError(f"{bundle}: the manifest does not name an open_clip model; pass --model")
    path = Path(tempfile.mkdtemp(prefix="clipn-eval-")) / "model.json"
    path.write_text(json.dumps(model["config"]), encoding="utf-8")
    return str(path)


def evaluate(
    scorer: Scorer,
    id_dir: Path,
    oods: list[tuple[str, Path]],
    methods: list[str],
    out: Path,
    *,
    class_map: str | Path | None = None,
    plots: bool = True,
    meta: dict[str, object] | None = None,
    progress: bool = True,
) -> int:
    """Score, compute the metrics, write the report, print the table; the exit code (0 or 1)."""
    from clipn_eval.evaluate import (
        ImageSet,
        ScoreCache,
        collect_images,
        folder_labels,
        id_accuracy,
        read_class_map,
        score_set,
    )
    from clipn_eval.report import markdown_table, metric_rows, write_report

    id_paths = collect_images(id_dir)
    ood_sets = [ImageSet(name, folder, collect_images(folder)) for name, folder in oods]
    mapping = class_map if class_map is None or class_map == SORTED_FOLDERS else read_class_map(class_map)
    id_set = ImageSet("ID", id_dir, id_paths, folder_labels(id_dir, id_paths, scorer.classes, mapping))
    cache = ScoreCache(out / "scores" / scorer.key())

    scored_id = score_set(scorer, id_set, cache, progress=progress)
    scored_ood = {s.name: score_set(scorer, s, cache, progress=progress) for s in ood_sets}
    for s in (scored_id, *scored_ood.values()):
        if not s.ok_paths:
            raise UserError(f"no image of the {s.name} set could be scored (first error: {s.errors[0].error})")
    acc = id_accuracy(id_set, scored_id)
    ood_scores = {k: v.scores for k, v in scored_ood.items()}
    rows = metric_rows(scored_id.scores, ood_scores, methods)
    errors = [e for s in (scored_id, *scored_ood.values()) for e in s.errors]
    info = {
        **(meta or {}),
        "scorer": scorer.key(),
        "id": str(id_dir),
        "ood": {n: str(f) for n, f in oods},
        "errors": [{"path": e.path, "error": e.error} for e in errors],
    }
    write_report(out, rows, scored_id.scores, ood_scores, methods, id_accuracy=acc, meta=info, plots=plots)
    click.echo(markdown_table(rows, acc))
    for e in errors:
        click.echo(f"clipn-eval: skipped {e.path}: {e.error}", err=True)
    click.echo(f"report written to {out}/", err=True)
    return EXIT_SOME_FAILED if errors else EXIT_OK


if __name__ == "__main__":
    main()
