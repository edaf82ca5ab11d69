"""``clipn-demo``: the whole chain on a CPU in minutes, on the toy world.

No pretrained CLIP can be downloaded on the machines this project is built on, so the demo makes one: it draws
the toy world (coloured shapes with captions, :mod:`clipn_demo.world`), pretrains a tiny open_clip CLIP on it
contrastively, trains CLIPN's "no" tower with the real trainer from a feature cache, exports bundles with the
real exporter (fp32 + int8) and scores held-out ID/OOD splits with the real evaluator. A step-0 CLIPN (the no
tower still equal to the yes tower, its prompts zero) is exported and scored as the control: its "no"
probability is 0.5 for every class, so its ATD score is constant and its AUROC 0.5.

Everything lands under the output folder; each expensive stage writes a ``stage.json`` stamp with its settings
and is skipped on a rerun with the same settings.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipn_demo.world import (
    COLOUR_TEMPLATES,
    COLOURS,
    CONCEPT_TEMPLATES,
    SHAPE_TEMPLATES,
    SHAPES,
    all_concepts,
    write_image_folder,
    write_shards,
)
from clipn_runtime.errors import UserError
from clipn_runtime.fileio import atomic_write
from clipn_runtime.scoring import METHODS as SCORING_METHODS

log = logging.getLogger(__name__)

#: Every method, MCM with one prompt (the bundles carry its bank) included.
METHODS: tuple[str, ...] = tuple(SCORING_METHODS)
#: ID training images the int8 bundle is calibrated on (static int8; clipn-export --calibration): NNCF's default.
CALIBRATION_IMAGES = 300
#: The share of ID images the calibrated thresholds keep (clipn-calibrate --tpr).
TARGET_TPR = "0.95"
#: The held-out ID images the thresholds are calibrated on are drawn from this seed stream (+ the run's seed):
#: the same world, other images than the eval ones.
HOLDOUT_SEED = 20_000
#: Marks a folder as a demo output, so a rerun may replace its stages but a stranger's folder is never touched.
MARKER = "demo.json"
STAMP = "stage.json"


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


# The CLIP recipe follows the toy-world feasibility runs (clipn_demo/world.py): batch 128, lr 2e-3, shape
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
    #: per split, the held-out ID images the fp32 bundle's thresholds were calibrated on (clipn-calibrate)
    calibration_images: dict[str, int] = field(default_factory=dict)
    #: per split, the eval ID images the calibrated decisions were checked on
    eval_id_images: dict[str, int] = field(default_factory=dict)
    eval_errors: int = 0
    #: per split, the numeric path the int8 bundle ran on (clipn-detect's choice here, e.g. int8:openvino:bf16)
    #: and the parity gate's ATD rank correlation for it on the held-out ID images
    int8_engine: dict[str, str] = field(default_factory=dict)
    int8_gate_rank_corr: dict[str, float | None] = field(default_factory=dict)

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
    atomic_write(folder / STAMP, json.dumps(key, indent=1) + "\n")


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
    from clipn_train.cli import torch_threads

    out = Path(out_dir)
    _claim(out)
    chain = _Chain(out, settings, seed, threads, progress, echo, DemoResult(out, settings, seed))
    t_start = time.perf_counter()
    with torch_threads(threads):
        for name, what, stage in chain.stages():
            echo(f"[{name}] {what} …")
            t0 = time.perf_counter()
            stage()
            dt = time.perf_counter() - t0
            chain.result.stage_seconds[name] = round(dt, 1)
            echo(f"[{name}] done in {dt:.1f} s")
    chain.result.stage_seconds["total"] = round(time.perf_counter() - t_start, 1)
    write_summary(chain.result)
    return chain.result


@dataclass
class _Chain:
    """One run's settings, folders and stage keys; a method per stage. A stage whose folder holds the stamp of
    the same key is skipped, so the keys below decide what a rerun with other settings redoes."""

    out: Path
    settings: DemoSettings
    seed: int
    threads: int
    progress: bool
    echo: Callable[[str], None]
    result: DemoResult
    splits: list[Split] = field(init=False)

    def __post_init__(self) -> None:
        self.splits = [make_split(s) for s in self.settings.splits]
        self.data_dir, self.clip_dir = self.out / "data" / "train", self.out / "clip"
        self.cache_dir, self.train_dir = self.out / "cache", self.out / "clipn"
        self.model_cfg = str(self.clip_dir / "open_clip_config.json")
        self.weights = str(self.clip_dir / "open_clip_model.safetensors")
        recipe = asdict(self.settings)
        self.base_key: dict[str, Any] = {"seed": self.seed, "images": self.settings.train_images}
        self.clip_key = {**self.base_key, **{k: v for k, v in recipe.items() if k.startswith("clip_")}}
        self.clipn_key = {**self.clip_key, **{k: v for k, v in recipe.items() if k.startswith("clipn_")}}

    def stages(self) -> list[tuple[str, str, Callable[[], None]]]:
        """(name, what it does, the stage) in the order they run."""
        s = self.settings
        return [
            ("data", f"drawing {s.train_images} training images and the eval splits", self.data),
            ("clip", f"pretraining the tiny CLIP ({s.clip_steps} steps)", self.clip),
            ("clipn", "caching frozen features and training the no tower", self.clipn),
            ("export", f"exporting {2 * len(self.splits)} bundles", self.export),
            (
                "calibrate",
                f"calibrating each split's thresholds at TPR {TARGET_TPR} on held-out ID images",
                self.calibrate,
            ),
            ("eval", "scoring held-out ID/OOD images", self.evaluate),
        ]

    def data(self) -> None:
        """1. The world: training shards and held-out ID/OOD folders per split."""
        if not _stage_done(self.data_dir, self.base_key):
            write_shards(
                _fresh(self.data_dir),
                self.settings.train_images,
                seed=self.seed,
                progress=self.progress,
                workers=self.threads,
            )
            _stamp(self.data_dir, self.base_key)
        for sp in self.splits:
            folder = self.out / "data" / "eval" / sp.name
            _write_eval_split(folder, sp, self.seed, self.settings.eval_per_concept, self.progress)

    def clip(self) -> None:
        """2. Pretrain the tiny CLIP, then measure its zero-shot accuracy on held-out images."""
        if not _stage_done(self.clip_dir, self.clip_key):
            from clipn_demo.pretrain import pretrain_clip

            pretrain_clip(
                _shard_url(self.data_dir),
                steps=self.settings.clip_steps,
                batch_size=self.settings.clip_batch,
                lr=self.settings.clip_lr,
                seed=self.seed,
                out_dir=_fresh(self.clip_dir),
                threads=self.threads,
                progress=self.progress,
            )
            _stamp(self.clip_dir, self.clip_key)
        self.result.clip_zero_shot = _clip_zero_shot(self.clip_dir, self.seed)
        self.echo(
            "[clip] zero-shot accuracy on held-out images: "
            + ", ".join(f"{k} {100 * v:.1f} %" for k, v in self.result.clip_zero_shot.items())
        )

    def clipn(self) -> None:
        """3. CLIPN's no tower with the real trainer, from cached frozen features."""
        if not _stage_done(self.cache_dir, self.clip_key):
            _cache_features(_shard_url(self.data_dir), self.cache_dir, self.model_cfg, self.weights, self.seed)
            _stamp(self.cache_dir, self.clip_key)
        if not _stage_done(self.train_dir, self.clipn_key):
            _train_clipn(
                self.cache_dir, _fresh(self.train_dir), self.model_cfg, self.weights, self.settings, self.seed
            )
            _stamp(self.train_dir, self.clipn_key)

    def export(self) -> None:
        """4. Bundles: the trained CLIPN (fp32 + static int8, calibrated on the split's ID training images) and
        the step-0 control, one pair per split."""
        checkpoint = _last_checkpoint(self.train_dir)
        for sp in self.splits:
            key = {**self.clipn_key, "split": sp.name, "classes": list(sp.classes)}
            calibration = _write_calibration(self.out / "data" / "calibration" / sp.name, self.data_dir, sp, key)
            for kind, ckpt, int8 in (("clipn", checkpoint, True), ("control", None, False)):
                folder = self.out / "bundles" / sp.name / kind
                parity = _export(
                    folder, key, self.model_cfg, self.weights, ckpt, sp, int8, calibration if int8 else None
                )
                self.result.parity[f"{sp.name}/{kind}"] = parity

    def calibrate(self) -> None:
        """5. Thresholds for every method (clipn-calibrate's code) in each split's fp32 CLIPN bundle, from ID
        images drawn apart from the eval images. Cheap (the tiny model scores them in seconds), so always redone:
        the bundle may have been exported again."""
        for sp in self.splits:
            folder = self.out / "data" / "holdout" / sp.name
            _write_holdout(folder, sp, self.seed, self.settings.eval_per_concept, self.progress)
            n = _calibrate_bundle(self.out / "bundles" / sp.name / "clipn", folder, self.threads)
            self.result.calibration_images[sp.name] = n

    def evaluate(self) -> None:
        """6. Score every split with clipn-eval's library."""
        for sp in self.splits:
            _evaluate_split(self.out, sp, self.result, self.threads, self.progress, self.echo)


def _claim(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; -o/--output needs a folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"{out} is not empty and was not made by clipn-demo; pick another -o/--output")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MARKER, json.dumps({"made_by": "clipn-demo"}) + "\n")


def _shard_url(data_dir: Path) -> str:
    shards = sorted(data_dir.glob("toy-*.tar"))
    if len(shards) == 1:
        return str(shards[0])
    return str(data_dir / f"toy-{{00000..{len(shards) - 1:05d}}}.tar")


def _write_eval_split(folder: Path, sp: Split, seed: int, n: int, progress: bool) -> None:
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


def _write_holdout(folder: Path, sp: Split, seed: int, n: int, progress: bool) -> None:
    """``n`` ID images per ID concept, from another seed stream than the eval images: the user's held-out ID
    images, exchangeable with (drawn like) the ID images the decisions are later checked on."""
    key = {"seed": HOLDOUT_SEED + seed, "per_concept": n, "id": sorted(sp.id_concepts)}
    if _stage_done(folder, key):
        return
    _fresh(folder)
    write_image_folder(folder, HOLDOUT_SEED + seed, n, list(sp.id_concepts), progress=progress)
    (folder / "labels.jsonl").unlink()
    _stamp(folder, key)


def _calibrate_bundle(bundle: Path, holdout: Path, threads: int) -> int:
    """clipn-calibrate's library path on the fp32 engine; returns the number of images calibrated on."""
    from clipn_runtime.calibration import calibrate_detector, parse_tpr, write_to_bundle
    from clipn_runtime.detector import Detector

    images = sorted(str(p) for p in holdout.rglob("*.png"))
    with Detector(
        bundle, device="cpu", precision="fp32", threads=threads, batch_size=64, use_calibration=False
    ) as d:
        calibration, errors = calibrate_detector(d, images, parse_tpr(TARGET_TPR))
    if errors:
        raise RuntimeError(f"{errors} held-out images of {holdout} could not be scored")
    write_to_bundle(bundle, calibration)
    return calibration.n


def _write_calibration(folder: Path, data_dir: Path, sp: Split, key: dict[str, Any]) -> Path:
    """The split's ID images from the last training shard (not the eval images): what a user calibrates the
    int8 engine on — their own in-distribution images."""
    import tarfile

    key = {**key, "calibration_images": CALIBRATION_IMAGES}
    if _stage_done(folder, key):
        return folder
    _fresh(folder)
    shard = sorted(data_dir.glob("toy-*.tar"))[-1]
    taken = 0
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            labels = tar.extractfile(members[name])
            image = tar.extractfile(members[name[: -len("json")] + "png"])
            assert labels is not None and image is not None
            if json.load(labels)["class_name"] in sp.id_concepts:
                (folder / (name[: -len("json")] + "png")).write_bytes(image.read())
                taken += 1
                if taken == CALIBRATION_IMAGES:
                    break
    _stamp(folder, key)
    return folder


def _clip_zero_shot(clip_dir: Path, seed: int) -> dict[str, float]:
    from clipn_demo.pretrain import ToyEvalSet, load_clip, toy_zero_shot

    model, tokenizer = load_clip(clip_dir)
    evalset = ToyEvalSet.generate(seed=10_000 + seed, n_per_class=8)
    return toy_zero_shot(model, tokenizer, evalset)


def _cache_features(shard_url: str, cache_dir: Path, model_cfg: str, weights: str, seed: int) -> None:
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
    folder: Path,
    key: dict[str, Any],
    model_cfg: str,
    weights: str,
    checkpoint: Path | None,
    sp: Split,
    int8: bool,
    calibration: Path | None = None,
) -> str:
    from clipn_export.exporter import ParityGateError, export_bundle
    from clipn_runtime.prompts import PromptSet
    from clipn_train.factory import create_clipn

    key = {**key, "kind": folder.name, "int8": int8, "mcm_bank": True}  # bundles before the bank: made again
    if calibration is not None:  # static int8; a bundle made before calibration existed is made again
        from clipn_export.int8_calibration import default_hold_out

        key["calibration"] = CALIBRATION_IMAGES
        key["parity_held_out"] = default_hold_out(CALIBRATION_IMAGES)
    if _stage_done(folder, key):  # the gate's verdict of that earlier export is in its manifest
        parity = json.loads((folder / "clipn.json").read_text(encoding="utf-8")).get("parity") or {}
        return "ok" if parity.get("passed", True) else "parity gate failed (see its clipn.json)"
    loaded = create_clipn(model_cfg, weights, checkpoint=checkpoint)
    prompts = PromptSet(f"toy-{sp.name}", sp.templates)
    try:
        export_bundle(
            loaded,
            list(sp.classes),
            folder,
            prompts=prompts,
            int8=int8,
            calibration=(str(calibration),) if calibration is not None else (),
            overwrite=True,
            progress=False,
        )
        parity = "ok"
    except ParityGateError as e:  # the bundle is written; the gate's verdict is reported in the summary
        parity = f"parity gate failed: {e}"
        log.warning("%s: %s", folder, parity)
    _stamp(folder, key)
    return parity


def _evaluate_split(
    out: Path, sp: Split, result: DemoResult, threads: int, progress: bool, echo: Callable[[str], None]
) -> None:
    """Score the split's ID/OOD folders with the fp32 and int8 CLIPN bundles and the control (clipn-eval's
    library: each run's table goes to report/<split>/<model>/metrics.md, the rows into ``result``)."""
    import numpy as np

    from clipn_eval.evaluate import EngineScorer, evaluate
    from clipn_runtime.engine_choice import gate_records

    eval_dir = out / "data" / "eval" / sp.name
    from clipn_runtime.engine import CUDA_EP, available_providers

    # The int8 bundle runs where clipn-detect --precision int8 runs it on this machine's CPU (OpenVINO on a CPU
    # with VNNI/AMX, else onnxruntime): the accuracy reported is that of the engine a user gets. The demo is a
    # CPU demo: with a CUDA onnxruntime, `auto` would take the GPU order, so onnxruntime's CPU runs it there.
    int8_device = "cpu" if CUDA_EP in available_providers() else "auto"
    runs = (
        ("clipn", "clipn", "cpu", "fp32"),
        ("clipn-int8", "clipn", int8_device, "int8"),
        ("control", "control", "cpu", "fp32"),
    )
    for model_name, bundle, device, precision in runs:
        scorer = EngineScorer(
            out / "bundles" / sp.name / bundle,
            device=device,
            threads=threads,
            precision=precision,
            batch_size=64,
            use_calibration=model_name == "clipn",  # the thresholds belong to the fp32 engine they were set on
        )
        report = evaluate(
            scorer,
            eval_dir / "id",
            [("ood", eval_dir / "ood")],
            list(METHODS),
            out / "report" / sp.name / model_name,
            class_map=eval_dir / "class_map.tsv",
            plots=model_name == "clipn",
            progress=progress,
            meta={"demo": {"split": sp.name, "model": model_name, "seed": result.seed}},
        )
        for e in report.errors:  # a warning, so that -q still shows which images were not scored
            log.warning("skipped %s: %s", e["path"], e["error"])
        echo(f"report written to {report.out_dir}/")
        result.eval_errors += int(bool(report.errors))
        result.rows += [
            {
                "split": sp.name,
                "model": model_name,
                "method": r.method,
                "auroc": r.auroc,
                "fpr95": r.fpr95_interp,
                "calibrated_tpr": r.calibrated_tpr,
                "calibrated_fpr": r.calibrated_fpr,
            }
            for r in report.rows
            if r.ood_set == "ood"
        ]
        if model_name == "clipn-int8":
            path = scorer.detector.numeric_path
            key = path.key if path is not None else scorer.detector.engine_file
            result.int8_engine[sp.name] = key
            gate = gate_records(scorer.detector.manifest).get(key) or {}
            result.int8_gate_rank_corr[sp.name] = gate.get("atd_rank_corr")
        if model_name == "control":
            atd = np.concatenate([report.id_scores["atd"], *(s["atd"] for s in report.ood_scores.values())])
            result.control_atd_spread[sp.name] = float(atd.max() - atd.min())
        if model_name == "clipn":
            result.eval_id_images[sp.name] = len(report.id_scores["atd"])
            if report.id_accuracy is not None:
                result.id_accuracy[sp.name] = report.id_accuracy


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


def calibrated_table(result: DemoResult) -> str:
    """Methods × splits at the calibrated thresholds (target TPR 0.95): the share of eval ID images kept and the
    share of OOD images let through, in percent, with the floor the kept share may fall to by chance."""
    from clipn_eval.report import METHOD_TITLES
    from clipn_runtime.calibration import acceptance_floor, parse_tpr

    splits = list(dict.fromkeys(r["split"] for r in result.rows))
    by = {(r["split"], r["method"]): r for r in result.rows if r["model"] == "clipn"}
    head = "| method | " + " | ".join(f"{s} ID kept / FPR↓" for s in splits) + " |"
    lines = [head, "|---|" + "---:|" * len(splits)]
    for m in METHODS:
        cells = []
        for s in splits:
            r = by.get((s, m), {})
            tpr, fpr = r.get("calibrated_tpr"), r.get("calibrated_fpr")
            cells.append("–" if tpr is None or fpr is None else f"{100 * tpr:.1f} / {100 * fpr:.1f}")
        lines.append(f"| {METHOD_TITLES.get(m, m)} | " + " | ".join(cells) + " |")
    floors = []
    for s in splits:
        n, n_eval = result.calibration_images.get(s), result.eval_id_images.get(s)
        floors.append(
            f"{100 * acceptance_floor(n, n_eval, parse_tpr(TARGET_TPR)):.1f} (n {n}, m {n_eval})"
            if n and n_eval
            else "–"
        )
    lines.append("| ID kept ≥ (p 0.001) | " + " | ".join(floors) + " |")
    return "\n".join(lines)


def int8_line(result: DemoResult) -> str:
    """Which engine the int8 row ran on per split, and its parity-gate ATD rank correlation."""
    cells = [
        f"{s}: {engine}, gate ATD ρ "
        + ("n/a" if (rho := result.int8_gate_rank_corr.get(s)) is None else f"{rho:.4f}")
        for s, engine in result.int8_engine.items()
    ]
    return "int8 bundle ran on (clipn-detect --precision int8's choice here): " + "; ".join(cells)


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
        "calibration_images": result.calibration_images,
        "eval_id_images": result.eval_id_images,
        "target_tpr": TARGET_TPR,
        "eval_errors": result.eval_errors,
        "int8_engine": result.int8_engine,
        "int8_gate_rank_corr": result.int8_gate_rank_corr,
    }
    atomic_write(out / "summary.json", json.dumps(record, indent=1) + "\n")
    spread = {k: float(f"{v:.2g}") for k, v in result.control_atd_spread.items()}
    splits = "\n".join(f"- **{s}**: {make_split(s).title}" for s in result.settings.splits)
    text = (
        f"# clipn-demo ({result.settings.mode}, seed {result.seed})\n\n{summary_table(result)}\n\n"
        "AUROC and FPR at 95 % TPR in percent, ID = positive, held-out images. Splits:\n"
        f"{splits}\n\nAt the thresholds calibrated (clipn-calibrate, TPR {TARGET_TPR}) on n held-out ID "
        "images, on the same eval images (m ID), in percent:\n\n"
        f"{calibrated_table(result)}\n\n{int8_line(result)}\n\nControl ATD score spread (max − min over all images): {json.dumps(spread)}\n\n"
        f"Stage times (s): {json.dumps(result.stage_seconds)}\n"
    )
    atomic_write(out / "summary.md", text)
    return out / "summary.md"
