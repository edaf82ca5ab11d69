"""``clipn-demo``: the whole chain on a CPU in minutes, on the toy world.

No pretrained CLIP can be downloaded on the machines this project is built on, so the demo makes one: it draws
the toy world (coloured shapes with captions, :mod:`clipn_train.toyworld`), pretrains a tiny open_clip CLIP on it
contrastively, trains CLIPN's "no" tower with the real trainer from a feature cache, exports bundles with the
real exporter (fp32 + int8) and scores held-out ID/OOD splits with the real evaluator. A step-0 CLIPN (the no
tower still equal to the yes tower, its prompts zero) is exported and scored as the control: its "no"
probability is 0.5 for every class, so its ATD score is constant and its AUROC 0.5.

Everything lands under the output folder; each expensive stage writes a ``stage.json`` stamp with its settings
and is skipped on a rerun with the same settings.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from clipn_runtime.errors import UserError

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("atd", "ctw", "msp", "mcm", "maxlogit", "energy")
#: Marks a folder as a demo output, so a rerun may replace its stages but a stranger's folder is never touched.
MARKER = "demo.json"
STAMP = "stage.json"
EXIT_OK = 0
EXIT_EVAL_ERRORS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Templates the toy captions use (clipn_train.toyworld): concept prompts, shape-only, colour-only.
CONCEPT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}.")
SHAPE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.")
COLOUR_TEMPLATES: tuple[str, ...] = ("something {}.",)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and recipes of one demo run (``quick`` or ``full``)."""

    mode: str
    train_images: int
    clip_steps: int
    clip_batch: int
    clip_lr: float
    clipn_epochs: int
    clipn_batch: int
    clipn_lr: float
    eval_per_concept: int
    splits: tuple[str, ...]


# The CLIP recipe follows the toy-world feasibility runs (clipn_train/toyworld.py): batch 128, lr 2e-3, shape
# needs ~1000 steps on 30k images; colour is learnt within ~100 steps, so the quick run keeps to the splits
# that need colour only.
FULL = DemoSettings("full", 30_000, 1000, 128, 2e-3, 2, 128, 1e-3, 24, ("shape", "combo", "colour"))
QUICK = DemoSettings("quick", 2048, 80, 64, 2e-3, 2, 128, 1e-3, 8, ("colour", "colour-hard"))


@dataclass(frozen=True)
class Split:
    """An ID/OOD split of the toy world: the ID class list and which concepts are ID or OOD."""

    name: str
    title: str
    classes: tuple[str, ...]
    #: concept name ("red circle") → its ID class; concepts not in here are OOD.
    id_concepts: dict[str, str]
    ood_concepts: tuple[str, ...]
    templates: tuple[str, ...]


def make_split(name: str) -> Split:
    """The demo's named splits (the first four shapes / colours are ID; combo: two colours per shape)."""
    from clipn_train.toyworld import COLOURS, SHAPES, all_concepts

    concepts = all_concepts()
    if name == "shape":
        ids = SHAPES[:4]
        id_map = {c.name: c.shape for c in concepts if c.shape in ids}
        return Split(
            name, f"shape: {', '.join(ids)} vs other shapes", ids, id_map, _rest(concepts, id_map), SHAPE_TEMPLATES
        )
    if name in ("colour", "colour-hard"):
        # "colour": well-separated hues ID; "colour-hard": ID and OOD hues are neighbours (red/orange, …).
        ids = ("red", "green", "blue", "white") if name == "colour" else ("red", "yellow", "blue", "white")
        id_map = {c.name: c.colour for c in concepts if c.colour in ids}
        return Split(
            name,
            f"colour: {', '.join(ids)} vs other colours",
            tuple(ids),
            id_map,
            _rest(concepts, id_map),
            COLOUR_TEMPLATES,
        )
    if name == "combo":
        # Every shape and every colour is seen in ID, in two combinations each: OOD images are new combinations
        # of known parts (a Latin-square pick: shape i with colours i and i+4).
        picks = [f"{COLOURS[(i + k) % len(COLOURS)]} {s}" for i, s in enumerate(SHAPES) for k in (0, 4)]
        id_map = {p: p for p in picks}
        return Split(
            name,
            "combination: 16 shape-colour pairs vs the other 48",
            tuple(picks),
            id_map,
            _rest(concepts, id_map),
            CONCEPT_TEMPLATES,
        )
    raise UserError(f"unknown split {name!r}; choose from shape, combo, colour, colour-hard")


def _rest(concepts: Sequence[Any], id_map: dict[str, str]) -> tuple[str, ...]:
    return tuple(c.name for c in concepts if c.name not in id_map)


@dataclass
class DemoResult:
    """What a run produced: the summary rows, stage times and paths."""

    out_dir: Path
    settings: DemoSettings
    seed: int
    #: one dict per (split, model, method): split, model ("clipn" | "clipn-int8" | "control"), method, auroc, fpr95
    rows: list[dict[str, Any]] = field(default_factory=list)
    id_accuracy: dict[str, float] = field(default_factory=dict)
    clip_zero_shot: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    parity: dict[str, str] = field(default_factory=dict)
    #: per split, max − min of the control's ATD score over all eval images (0 up to float rounding)
    control_atd_spread: dict[str, float] = field(default_factory=dict)
    eval_errors: int = 0

    def auroc(self, split: str, model: str, method: str) -> float:
        for r in self.rows:
            if (r["split"], r["model"], r["method"]) == (split, model, method):
                return float(r["auroc"])
        raise KeyError((split, model, method))


# --------------------------------------------------------------------------------------------------------------
# stage bookkeeping
# --------------------------------------------------------------------------------------------------------------


def _stage_done(folder: Path, key: dict[str, Any]) -> bool:
    stamp = folder / STAMP
    if not stamp.is_file():
        return False
    try:
        return bool(json.loads(stamp.read_text(encoding="utf-8")) == key)
    except (OSError, ValueError):
        return False


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _stamp(folder: Path, key: dict[str, Any]) -> None:
    (folder / STAMP).write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")


class _Timer:
    def __init__(self, result: DemoResult, echo: Callable[[str], None]) -> None:
        self.result, self.echo = result, echo

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Any:
        self.echo(f"[{name}] {what} …")
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.result.stage_seconds[name] = round(dt, 1)
        self.echo(f"[{name}] done in {dt:.1f} s")


# --------------------------------------------------------------------------------------------------------------
# the chain
# --------------------------------------------------------------------------------------------------------------


def run_demo(
    out_dir: str | Path,
    settings: DemoSettings = FULL,
    seed: int = 0,
    threads: int = 2,
    progress: bool = True,
    echo: Callable[[str], None] = log.info,
) -> DemoResult:
    """Run (or resume) the demo chain in ``out_dir``; returns the combined results."""
    import torch

    from clipn_train import toyworld

    out = Path(out_dir)
    _claim(out)
    result = DemoResult(out, settings, seed)
    timer = _Timer(result, echo)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        splits = [make_split(s) for s in settings.splits]
        base_key = {"seed": seed, "images": settings.train_images}

        # 1. the world: training shards and held-out ID/OOD folders per split
        data_dir = out / "data" / "train"
        with timer.stage("data", f"drawing {settings.train_images} training images and the eval splits"):
            if not _stage_done(data_dir, base_key):
                toyworld.write_shards(
                    _fresh(data_dir), settings.train_images, seed=seed, progress=progress, workers=threads
                )
                _stamp(data_dir, base_key)
            for sp in splits:
                _write_eval_split(out / "data" / "eval" / sp.name, sp, seed, settings.eval_per_concept, progress)
        shard_url = _shard_url(data_dir)

        # 2. pretrain the tiny CLIP
        clip_dir = out / "clip"
        clip_key = {**base_key, **{k: v for k, v in asdict(settings).items() if k.startswith("clip_")}}
        with timer.stage("clip", f"pretraining the tiny CLIP ({settings.clip_steps} steps)"):
            if not _stage_done(clip_dir, clip_key):
                from clipn_train.contrastive import pretrain_clip

                pretrain_clip(
                    shard_url,
                    steps=settings.clip_steps,
                    batch_size=settings.clip_batch,
                    lr=settings.clip_lr,
                    seed=seed,
                    out_dir=_fresh(clip_dir),
                    threads=threads,
                    progress=progress,
                )
                _stamp(clip_dir, clip_key)
            result.clip_zero_shot = _clip_zero_shot(clip_dir, seed)
            echo(
                "[clip] zero-shot accuracy on held-out images: "
                + ", ".join(f"{k} {100 * v:.1f} %" for k, v in result.clip_zero_shot.items())
            )
        model_cfg, weights = str(clip_dir / "open_clip_config.json"), str(clip_dir / "open_clip_model.safetensors")

        # 3. CLIPN's no tower with the real trainer, from cached frozen features
        cache_dir, train_dir = out / "cache", out / "clipn"
        clipn_key = {**clip_key, **{k: v for k, v in asdict(settings).items() if k.startswith("clipn_")}}
        with timer.stage("clipn", "caching frozen features and training the no tower"):
            if not _stage_done(cache_dir, clip_key):
                from clipn_train.cache import build_feature_cache

                if cache_dir.exists():
                    shutil.rmtree(cache_dir)
                build_feature_cache(
                    data=shard_url,
                    output=cache_dir,
                    model=model_cfg,
                    pretrained=weights,
                    variant="learnable",
                    prompts="clean",
                    batch_size=256,
                    workers=0,
                    precision="fp32",
                    dtype="float32",
                    seed=seed,
                )
                _stamp(cache_dir, clip_key)
            if not _stage_done(train_dir, clipn_key):
                _train_clipn(cache_dir, _fresh(train_dir), model_cfg, weights, settings, seed)
                _stamp(train_dir, clipn_key)
        checkpoint = _last_checkpoint(train_dir)

        # 4. bundles: trained CLIPN (fp32 + int8) and the step-0 control, one pair per split
        with timer.stage("export", f"exporting {2 * len(splits)} bundles"):
            for sp in splits:
                bdir = out / "bundles" / sp.name
                key = {**clipn_key, "split": sp.name, "classes": list(sp.classes)}
                for kind, ckpt, int8 in (("clipn", checkpoint, True), ("control", None, False)):
                    folder = bdir / kind
                    result.parity[f"{sp.name}/{kind}"] = _export(folder, key, model_cfg, weights, ckpt, sp, int8)

        # 5. evaluate with clipn-eval's own code
        with timer.stage("eval", "scoring held-out ID/OOD images"):
            for sp in splits:
                _evaluate_split(out, sp, result, threads, progress)
        result.stage_seconds["total"] = round(time.perf_counter() - t_start, 1)
        write_summary(result)
        return result
    finally:
        torch.set_num_threads(previous)


def _claim(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; -o/--output needs a folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"{out} is not empty and was not made by clipn-demo; pick another -o/--output")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"made_by": "clipn-demo"}) + "\n", encoding="utf-8")


def _shard_url(data_dir: Path) -> str:
    shards = sorted(data_dir.glob("toy-*.tar"))
    if len(shards) == 1:
        return str(shards[0])
    return str(data_dir / f"toy-{{00000..{len(shards) - 1:05d}}}.tar")


def _write_eval_split(folder: Path, sp: Split, seed: int, n: int, progress: bool) -> None:
    from clipn_train.toyworld import write_image_folder

    key = {"seed": seed, "per_concept": n, "id": sorted(sp.id_concepts), "ood": list(sp.ood_concepts)}
    if _stage_done(folder, key):
        return
    _fresh(folder)
    # A different seed from the training shards is not needed (splits use their own seed stream), but ID and
    # OOD folders draw the same concepts' images identically whichever split they belong to.
    write_image_folder(folder / "id", seed, n, list(sp.id_concepts), progress=progress)
    write_image_folder(folder / "ood", seed, n, list(sp.ood_concepts), progress=progress)
    (folder / "id" / "labels.jsonl").unlink()  # not an image folder entry for clipn-eval
    (folder / "ood" / "labels.jsonl").unlink()
    lines = [f"{concept}\t{cls}" for concept, cls in sp.id_concepts.items()]
    (folder / "class_map.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _stamp(folder, key)


def _clip_zero_shot(clip_dir: Path, seed: int) -> dict[str, float]:
    from clipn_train.contrastive import ToyEvalSet, load_clip, toy_zero_shot

    model, tokenizer = load_clip(clip_dir)
    evalset = ToyEvalSet.generate(seed=10_000 + seed, n_per_class=8)
    return toy_zero_shot(model, tokenizer, evalset)


def _train_clipn(cache: Path, logs: Path, model_cfg: str, weights: str, s: DemoSettings, seed: int) -> None:
    from clipn_train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        train_data=str(cache),
        model=model_cfg,
        pretrained=weights,
        variant="learnable",
        prompts="clean",
        batch_size=s.clipn_batch,
        epochs=s.clipn_epochs,
        lr=s.clipn_lr,
        precision="fp32",
        workers=0,
        seed=seed,
        augment=False,
        logs=str(logs),
        name="run",
        device="cpu",
        tensorboard=False,
        log_every_n_steps=50,
    )
    res = Trainer(cfg).run()
    if res.interrupted:  # the trainer turns Ctrl-C / SIGTERM into a clean stop; the demo stops with it
        raise KeyboardInterrupt
    if res.last_checkpoint is None:
        raise RuntimeError("CLIPN training stopped without a checkpoint")


def _last_checkpoint(train_dir: Path) -> Path:
    found = list((train_dir / "run" / "checkpoints").glob("epoch_*.safetensors"))
    if not found:
        raise RuntimeError(f"no CLIPN checkpoint under {train_dir}")
    return max(found, key=lambda p: int(p.stem.split("_")[-1]))


def _export(
    folder: Path, key: dict[str, Any], model_cfg: str, weights: str, checkpoint: Path | None, sp: Split, int8: bool
) -> str:
    from clipn_export.exporter import ParityGateError, export_bundle
    from clipn_runtime.prompts import PromptSet
    from clipn_train.model import create_clipn

    key = {**key, "kind": folder.name, "int8": int8}
    if _stage_done(folder, key):
        return json.loads((folder / STAMP).read_text(encoding="utf-8")).get("parity", "ok")
    loaded = create_clipn(model_cfg, weights, checkpoint=checkpoint)
    prompts = PromptSet(f"toy-{sp.name}", sp.templates)
    try:
        export_bundle(loaded, list(sp.classes), folder, prompts=prompts, int8=int8, overwrite=True, progress=False)
        parity = "ok"
    except ParityGateError as e:  # the bundle is written; the gate's verdict is reported in the summary
        parity = f"parity gate failed: {e}"
        log.warning("%s: %s", folder, parity)
    _stamp(folder, {**key})
    return parity


def _evaluate_split(out: Path, sp: Split, result: DemoResult, threads: int, progress: bool) -> None:
    from clipn_eval.cli import evaluate
    from clipn_eval.evaluate import EngineScorer

    eval_dir = out / "data" / "eval" / sp.name
    runs = (("clipn", "clipn", "fp32"), ("clipn-int8", "clipn", "int8"), ("control", "control", "fp32"))
    for model_name, bundle, precision in runs:
        scorer = EngineScorer(
            out / "bundles" / sp.name / bundle, device="cpu", threads=threads, precision=precision, batch_size=64
        )
        report = out / "report" / sp.name / model_name
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # the per-run table goes to report/…/metrics.md instead
            code = evaluate(
                scorer,
                eval_dir / "id",
                [("ood", eval_dir / "ood")],
                list(METHODS),
                report,
                class_map=eval_dir / "class_map.tsv",
                plots=model_name == "clipn",
                progress=progress,
                meta={"demo": {"split": sp.name, "model": model_name, "seed": result.seed}},
            )
        result.eval_errors += int(code != 0)
        metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
        for r in metrics["rows"]:
            if r["ood_set"] == "ood":
                result.rows.append(
                    {
                        "split": sp.name,
                        "model": model_name,
                        "method": r["method"],
                        "auroc": r["auroc"],
                        "fpr95": r["fpr95_interp"],
                    }
                )
        if model_name == "control":
            result.control_atd_spread[sp.name] = _score_spread(report / "scores", "atd")
        if model_name == "clipn" and metrics.get("id_accuracy") is not None:
            result.id_accuracy[sp.name] = float(metrics["id_accuracy"])


def _score_spread(score_dir: Path, method: str) -> float:
    """max − min of one method's score over every image clipn-eval scored (its per-image JSONL cache)."""
    values = []
    for f in score_dir.rglob("*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("scores"):
                values.append(float(rec["scores"][method]))
    if not values:
        raise RuntimeError(f"no scores under {score_dir}")
    return max(values) - min(values)


# --------------------------------------------------------------------------------------------------------------
# the combined table
# --------------------------------------------------------------------------------------------------------------


def summary_table(result: DemoResult) -> str:
    """Methods (plus the int8 bundle's ATD and the step-0 control) × splits: AUROC / FPR95 in percent."""
    from clipn_eval.report import METHOD_TITLES

    splits = list(dict.fromkeys(r["split"] for r in result.rows))
    by = {(r["split"], r["model"], r["method"]): r for r in result.rows}
    head = "| method | " + " | ".join(f"{s} AUROC↑ / FPR95↓" for s in splits) + " |"
    lines = [head, "|---|" + "---:|" * len(splits)]
    rows = [(METHOD_TITLES.get(m, m), "clipn", m) for m in METHODS]
    rows += [("CLIPN-ATD, int8 bundle", "clipn-int8", "atd"), ("control: step-0 no tower, ATD", "control", "atd")]
    for title, model, method in rows:
        cells = []
        for s in splits:
            r = by.get((s, model, method))
            cells.append("–" if r is None else f"{100 * r['auroc']:.1f} / {100 * r['fpr95']:.1f}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    acc = [f"{100 * result.id_accuracy[s]:.1f} %" if s in result.id_accuracy else "–" for s in splits]
    lines.append("| ID accuracy (CLIPN bundle, fp32) | " + " | ".join(acc) + " |")
    return "\n".join(lines)


def write_summary(result: DemoResult) -> Path:
    out = result.out_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": asdict(result.settings),
        "seed": result.seed,
        "rows": result.rows,
        "id_accuracy": result.id_accuracy,
        "clip_zero_shot": result.clip_zero_shot,
        "stage_seconds": result.stage_seconds,
        "parity": result.parity,
        "control_atd_spread": result.control_atd_spread,
        "eval_errors": result.eval_errors,
    }
    (out / "summary.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    spread = {k: float(f"{v:.2g}") for k, v in result.control_atd_spread.items()}
    splits = "\n".join(f"- **{s}**: {make_split(s).title}" for s in result.settings.splits)
    text = (
        f"# clipn-demo ({result.settings.mode}, seed {result.seed})\n\n{summary_table(result)}\n\n"
        "AUROC and FPR at 95 % TPR in percent, ID = positive, held-out images. Splits:\n"
        f"{splits}\n\nControl ATD score spread (max − min over all images): {json.dumps(spread)}\n\n"
        f"Stage times (s): {json.dumps(result.stage_seconds)}\n"
    )
    (out / "summary.md").write_text(text, encoding="utf-8")
    return out / "summary.md"


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------

HELP = """Run the whole CLIPN chain on a CPU in minutes, on a toy world of coloured shapes.

\b
Stages (each logs its time; reruns with the same settings skip what is done):
  1. draw the toy world: training shards + held-out ID/OOD image folders
  2. pretrain a tiny open_clip CLIP contrastively (no pretrained CLIP is needed)
  3. train CLIPN's no tower with the real trainer from cached frozen features
  4. export bundles with the real exporter (fp32 + int8) and a step-0 control
  5. score the splits with clipn-eval's code; print one table, write OUTPUT/report/

\b
Examples:
  clipn-demo                      # full run into demo/ (6 min 39 s measured on 2 quiet cores)
  clipn-demo --quick              # fewer images and steps, colour splits only (47 s measured)
  clipn-demo --seed 1 -o demo-s1 --threads 4

\b
Exit codes: 0 done; 1 done but some eval images could not be scored; 2 bad usage;
130 interrupted (Ctrl-C): rerun the same command and the finished stages are skipped.
"""


@click.command(help=HELP)
@click.option("--quick", is_flag=True, help="The ~1-minute version (fewer images/steps, colour splits only).")
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of data and training."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("demo"),
    show_default=True,
    help="Folder for everything the demo makes.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="torch / onnxruntime threads, and processes drawing the toy world.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
def main(quick: bool, seed: int, output: Path, threads: int, progress: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = QUICK if quick else FULL
    try:
        result = run_demo(
            output, settings, seed=seed, threads=threads, progress=progress, echo=lambda m: click.echo(m, err=True)
        )
    except UserError as e:
        click.echo(f"clipn-demo: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo(
            "clipn-demo: interrupted; run the same command again to continue (finished stages are kept)", err=True
        )
        sys.exit(EXIT_INTERRUPTED)
    click.echo(summary_table(result))
    click.echo(
        f"\nreport: {output / 'report' / 'summary.md'}; total {result.stage_seconds['total']:.0f} s", err=True
    )
    for name, verdict in result.parity.items():
        if verdict != "ok":
            click.echo(f"clipn-demo: {name}: {verdict}", err=True)
    sys.exit(EXIT_EVAL_ERRORS if result.eval_errors else EXIT_OK)


if __name__ == "__main__":
    main()
