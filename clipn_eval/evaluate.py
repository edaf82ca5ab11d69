"""Score an ID folder and OOD folders once, every method from the same pass, with a resumable score cache.

Two scorers share one interface: :class:`EngineScorer` runs a bundle through the torch-free runtime;
:class:`TorchScorer` (``clipn-eval --torch``) runs the PyTorch CLIPN model and the numpy scoring core — the
reference a user compares an export against on their own data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

from clipn_runtime.errors import InputFileError, UserError
from clipn_runtime.inputs import expand_inputs, path_fields, path_from_fields, printable
from clipn_runtime.prompts import DEFAULT_PROMPTS, PromptSet
from clipn_runtime.scoring import MCM_PROMPT, METHODS

if TYPE_CHECKING:
    from clipn_eval.report import MetricRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredImage:
    """One image's outcome: the predicted class index and every method's ID-score, or an error."""

    path: str
    pred_index: int | None
    scores: dict[str, float] | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON, valid-UTF-8 form: a file name that is not valid UTF-8 is escaped in ``path`` and exact
        in ``path_b64`` (see :func:`clipn_runtime.inputs.path_fields`)."""
        error = None if self.error is None else printable(self.error)
        return {**path_fields(self.path), "pred_index": self.pred_index, "scores": self.scores, "error": error}

    def error_entry(self) -> dict[str, Any]:
        """This failed image for the report (``metrics.json``'s ``errors``)."""
        return {**path_fields(self.path), "error": printable(self.error or "")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScoredImage:
        """Inverse of :meth:`to_dict`; KeyError/ValueError/TypeError when ``d`` is not one."""
        return cls(path_from_fields(d), d["pred_index"], d["scores"], d["error"])


class Scorer(Protocol):
    classes: list[str]
    #: The methods whose ID-scores every ScoredImage carries (``mcm-single`` only with its bank).
    methods: tuple[str, ...]

    def key(self) -> str:
        """Identifies what produces the scores (weights, classes, prompts): the score cache is keyed by it."""
        ...

    def score(self, paths: Sequence[str]) -> Iterator[ScoredImage]: ...


def _method_scores(values: Mapping[str, Any]) -> dict[str, float]:
    """Every method's ID-score among ``values`` (the engine's scalar outputs: mcm-single only with its bank)."""
    return {m: float(values[field_name]) for m, (field_name, _) in METHODS.items() if field_name in values}


def _scored(path: str, pred_index: int, scores: dict[str, float]) -> ScoredImage:
    """The image's scores, or an error when one is not finite: a NaN would silently drop out of (or poison)
    the AUROC/FPR95 of every method."""
    bad = [f"{m}={v}" for m, v in scores.items() if not math.isfinite(v)]
    if bad:
        return ScoredImage(
            path, None, None, f"non-finite scores ({', '.join(bad)}): the model or bundle is broken"
        )
    return ScoredImage(path, pred_index, scores)


class EngineScorer:
    """A bundle through :class:`clipn_runtime.Detector` (onnxruntime or TensorRT)."""

    def __init__(self, bundle: str | os.PathLike[str], **detector_kw: Any) -> None:
        from clipn_runtime.detector import Detector

        self.detector = Detector(bundle, **detector_kw)
        self.classes = list(self.detector.classes)
        #: The bundle's (or a sidecar's) calibration, checked against this engine by the Detector.
        self.calibration = self.detector.calibration
        #: The methods this engine scores.
        self.methods = self.detector.methods

    def key(self) -> str:
        m, engine = self.detector.manifest, self.detector.engine
        # What changes the numbers: the bundle, the classes, the engine file and what runs it — not the threads.
        d = self.detector
        run = {
            "backend": engine.backend,
            "provider": engine.providers[0],
            "file": d.engine_file,
            "precision": d.numeric_precision,
        }
        ident = {"files": [f.sha256 for f in m.files], "classes": self.classes, "engine": run}
        return "engine-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def score(self, paths: Sequence[str]) -> Iterator[ScoredImage]:
        for d in self.detector.iter_detect(paths):
            if d.error is not None or d.pred_index is None:
                yield ScoredImage(str(d.path), None, None, d.error or "no prediction")
            else:
                yield _scored(str(d.path), d.pred_index, _method_scores(d.scores))


@dataclass
class ImageSet:
    """A named folder of images; ``labels`` are class indices (ID folder as an ImageFolder) or None."""

    name: str
    root: Path
    paths: list[str]
    labels: list[int] | None = None


def collect_images(root: str | os.PathLike[str]) -> list[str]:
    """Every image file under ``root`` (recursively, sorted), via the runtime's input expansion."""
    r = Path(root)
    if not r.is_dir():
        raise UserError(f"{r}: not a folder of images")
    paths = [it.path for it in expand_inputs([str(r)], recursive=True) if it.kind == "image"]
    if not paths:
        raise UserError(f"{r}: no images found (looked recursively for files Pillow can open)")
    return paths


def read_class_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """``folder<TAB>class name`` per line (e.g. ImageNet wnids: ``n01440764<TAB>tench``)."""
    p = Path(path)
    mapping: dict[str, str] = {}
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(p, None, f"cannot read the class map: {e}") from None
    for i, raw in enumerate(lines, 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = raw.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise InputFileError(p, i, "expected 'folder<TAB>class name'")
        mapping[parts[0].strip()] = parts[1].strip()
    return mapping


#: ``--class-map sorted``: the i-th folder in sorted order is class i (ImageNet's wnid folders: sorted wnids are
#: the label order, which is the order of the built-in ``imagenet`` class list).
SORTED_FOLDERS = "sorted"


def folder_labels(
    root: Path, paths: Sequence[str], classes: Sequence[str], class_map: Mapping[str, str] | str | None = None
) -> list[int] | None:
    """Class index per image from its top-level folder under ``root`` (ImageFolder layout).

    Folder names are class names, keys of a ``class_map`` dict, or (``class_map="sorted"``) ranks in sorted
    order. Returns None (no accuracy) unless every image sits in a folder that maps to a class.
    """
    folders = []
    for p in paths:
        rel = Path(p).relative_to(root)
        if len(rel.parts) < 2:
            return None
        folders.append(rel.parts[0])
    if class_map == SORTED_FOLDERS:
        names = sorted(set(folders))
        if len(names) > len(classes):
            log.warning("ID accuracy not computed: %d folders but %d classes", len(names), len(classes))
            return None
        rank = {f: i for i, f in enumerate(names)}
        return [rank[f] for f in folders]
    index = {c: i for i, c in reversed(list(enumerate(classes)))}  # duplicates: the first index wins
    mapping = class_map if isinstance(class_map, Mapping) else {}
    unmapped = sorted({f for f in folders if mapping.get(f, f) not in index})
    if unmapped:
        log.warning(
            "ID accuracy not computed: %d folder(s) do not name a class (e.g. %s); pass --class-map",
            len(unmapped),
            unmapped[0],
        )
        return None
    return [index[mapping.get(f, f)] for f in folders]


@dataclass
class ScoreCache:
    """Per-image scores on disk (JSONL, one file per image set, flushed per image) so a crashed run continues."""

    root: Path

    def file(self, set_name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in set_name)
        digest = hashlib.sha256(set_name.encode()).hexdigest()[:8]
        return self.root / f"{safe}-{digest}.jsonl"

    def load(self, set_name: str) -> dict[str, ScoredImage]:
        f = self.file(set_name)
        done: dict[str, ScoredImage] = {}
        if not f.exists():
            return done
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    r = ScoredImage.from_dict(json.loads(line))
                except (json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError):
                    continue  # a line cut by a crash (or not ours): that image is scored again
                done[r.path] = r
        return done

    def append(self, set_name: str, records: Iterable[ScoredImage]) -> None:
        f = self.file(set_name)
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "a", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r.to_dict(), ensure_ascii=False, allow_nan=False) + "\n")
                fh.flush()


@dataclass
class SetScores:
    """Scores of one image set: per-method arrays over the images that scored, preds, and the failures."""

    name: str
    scores: dict[str, np.ndarray]
    pred: np.ndarray
    ok_paths: list[str]
    errors: list[ScoredImage]
    from_cache: int


def score_set(
    scorer: Scorer, image_set: ImageSet, cache: ScoreCache | None, *, progress: bool = True
) -> SetScores:
    """Score every image of ``image_set`` not already in ``cache``; return all its scores in path order."""
    # Matched by the file a path resolves to, so a rerun from another folder (or through a link) resumes.
    done = {os.path.realpath(k): r for k, r in (cache.load(image_set.name) if cache else {}).items()}
    todo = [p for p in image_set.paths if os.path.realpath(p) not in done]
    cached = len(image_set.paths) - len(todo)
    bar = tqdm(total=len(image_set.paths), initial=cached, desc=f"scoring {image_set.name}", disable=not progress)
    try:
        for r in scorer.score(todo):
            real = os.path.realpath(r.path)
            done[real] = r
            if cache:  # the cache names files by their resolved path, valid from any working directory
                cache.append(image_set.name, [replace(r, path=real)])
            bar.update(1)
    finally:
        bar.close()
    results = [replace(done[os.path.realpath(p)], path=p) for p in image_set.paths]
    ok = [r for r in results if r.error is None and r.scores is not None]
    names = [m for m in METHODS if all(r.scores is not None and m in r.scores for r in ok)]
    scores = {m: np.array([r.scores[m] for r in ok], dtype=np.float64) for m in names}  # type: ignore[index]
    pred = np.array([r.pred_index for r in ok], dtype=np.int64)
    return SetScores(
        image_set.name, scores, pred, [r.path for r in ok], [r for r in results if r.error is not None], cached
    )


def id_accuracy(image_set: ImageSet, scored: SetScores) -> float | None:
    if image_set.labels is None or not scored.ok_paths:
        return None
    label = dict(zip(image_set.paths, image_set.labels, strict=True))
    truth = np.array([label[p] for p in scored.ok_paths])
    return float(np.mean(truth == scored.pred))


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured (and wrote to ``out_dir``)."""

    out_dir: Path
    rows: list[MetricRow]
    id_accuracy: float | None
    #: method → the ID-scores of the ID images that were scored
    id_scores: dict[str, np.ndarray]
    #: OOD set name → method → its images' ID-scores
    ood_scores: dict[str, dict[str, np.ndarray]]
    #: one entry per image that could not be scored (``path``, ``error``), as in ``metrics.json``
    errors: list[dict[str, Any]]


def evaluate(
    scorer: Scorer,
    id_dir: Path,
    oods: Sequence[tuple[str, Path]],
    methods: Sequence[str] | None,
    out: Path,
    *,
    class_map: str | Path | None = None,
    plots: bool = True,
    meta: Mapping[str, object] | None = None,
    progress: bool = True,
) -> Evaluation:
    """Score the ID folder and every ``(name, folder)`` OOD set (continuing from ``out``'s score cache),
    compute the metrics and write the report folder ``out``. Prints nothing (``progress``: tqdm bars on
    stderr). UserError when a folder has no images, or not one image of a set could be scored."""
    from clipn_eval.report import metric_rows, write_report

    available = tuple(scorer.methods)
    if methods is None:
        methods = list(available)
    missing = [m for m in methods if m not in available]
    if missing:
        raise UserError(
            f"--methods {','.join(missing)}: this bundle cannot score it (mcm-single needs MCM's one-prompt bank: "
            "export the bundle again with clipn-export); it scores " + ",".join(available)
        )
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
    calibration = getattr(scorer, "calibration", None)
    thresholds = {m: t.threshold for m, t in calibration.thresholds.items()} if calibration is not None else None
    rows = metric_rows(scored_id.scores, ood_scores, methods, thresholds)
    errors = [e.error_entry() for s in (scored_id, *scored_ood.values()) for e in s.errors]
    info = {
        **(meta or {}),
        "scorer": scorer.key(),
        # printable: a folder name that is not UTF-8 (its bytes as \xNN); the images keep exact paths in errors
        "id": printable(str(id_dir)),
        "ood": {n: printable(str(f)) for n, f in oods},
        "errors": errors,
        "calibration": None
        if calibration is None
        else {"target_tpr": calibration.rule.split("@")[1], "n": calibration.n, **calibration.calibration_set},
    }
    write_report(out, rows, scored_id.scores, ood_scores, methods, id_accuracy=acc, meta=info, plots=plots)
    return Evaluation(out, rows, acc, scored_id.scores, ood_scores, errors)


class TorchScorer:
    """The PyTorch CLIPN model (open_clip's own eval transform) + the numpy scoring core: the reference path."""

    def __init__(
        self,
        checkpoint: str | Path,
        classes: Sequence[str],
        *,
        model: str | None = None,
        pretrained: str | None = None,
        prompts: str | PromptSet = DEFAULT_PROMPTS,
        scale: float | None = None,
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        from clipn_export.textbank import build_single_bank, build_text_bank
        from clipn_train.factory import create_clipn

        if model is None:
            raise UserError(
                "--torch needs --model (an open_clip name or a model-config JSON), or an --engine to copy it from"
            )
        self.loaded = create_clipn(model, pretrained, checkpoint=checkpoint, device=device)
        self.loaded.model.eval()
        self.classes = list(classes)
        self.bank = build_text_bank(self.loaded, self.classes, prompts)
        self.bank_single = build_single_bank(self.loaded, self.classes)
        self.methods = tuple(METHODS)
        self.scale = float(scale) if scale is not None else self.loaded.model.scale
        self.batch_size = batch_size
        self.device = device

    def key(self) -> str:
        info = self.loaded.info
        ident = {"ckpt": info.checkpoint_sha256, "bank": self.bank.key, "scale": self.scale, "mcm": MCM_PROMPT}
        return "torch-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def _images(self, paths: Sequence[str]) -> Iterator[tuple[str, Any, str | None]]:
        from PIL import Image

        for p in paths:
            try:
                with Image.open(p) as im:
                    yield p, self.loaded.preprocess_val(im), None
            except Exception as e:
                yield p, None, f"{type(e).__name__}: {e}"

    def score(self, paths: Sequence[str]) -> Iterator[ScoredImage]:
        import torch

        from clipn_runtime.scoring import score_features

        batch: list[tuple[str, Any]] = []

        def flush() -> Iterator[ScoredImage]:
            with torch.inference_mode():
                x = torch.stack([t for _, t in batch]).to(self.device)
                feats = self.loaded.model.encode_image(x, normalize=False).float().cpu().numpy()
            s = score_features(feats, self.bank.yes, self.bank.no, self.scale, bank_single=self.bank_single)
            for i, (p, _) in enumerate(batch):
                yield _scored(p, int(s.pred[i]), _method_scores(s.row(i)))
            batch.clear()

        for p, tensor, err in self._images(paths):
            if err is not None:
                yield ScoredImage(p, None, None, err)
                continue
            batch.append((p, tensor))
            if len(batch) >= self.batch_size:
                yield from flush()
        if batch:
            yield from flush()
