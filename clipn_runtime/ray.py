"""Scoring on a Ray cluster: :class:`ClipnScorer`, a callable class for ``ray.data.Dataset.map_batches``.

::

    import ray
    from clipn_runtime.ray import ClipnScorer

    ds = ray.data.read_webdataset("s3://bucket/shards/{00000..00999}.tar", decoder=None)
    scores = ds.map_batches(
        ClipnScorer,
        fn_constructor_kwargs={"bundle_dir": "/models/bundle", "threads": 2},
        concurrency=8,  # actors: each opens the bundle once
        num_cpus=2,  # = threads, so that Ray places cores/threads actors per node
        batch_size=256,
    )
    scores.write_parquet("s3://bucket/scores/")

Each actor holds one :class:`~clipn_runtime.detector.Detector`. A batch's images may be a file's bytes
(``read_binary_files``' ``bytes`` column, ``read_webdataset``'s per-extension columns), H×W×3 uint8 arrays
(``read_images``' ``image`` column) or file paths; bytes are decoded exactly as ``clipn-detect`` decodes the same
file. The output has the columns of ``clipn-detect``'s records (:data:`~clipn_runtime.detector.RECORD_FIELDS`);
an input that cannot be scored is a row with ``error`` set and null scores, never an exception. Needs the
``[ray]`` extra (``pip install "clipn-ood[ray]"``); importing this module imports neither Ray nor torch.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from clipn_runtime.detector import RECORD_FIELDS, Detection, Detector, ImageInput
from clipn_runtime.inputs import image_extensions

#: The record fields and their Arrow types, so that every batch (even one of errors only) has one schema.
_ARROW_TYPES = {
    "path": "string",
    "pred": "string",
    "pred_index": "int64",
    "prob": "float64",
    "p_no": "float64",
    "ctw": "float64",
    "atd": "float64",
    "p_ood": "float64",
    "ood": "bool",
    "method": "string",
    "rule": "string",
    "error": "string",
}
#: Columns looked at, in order, when ``image_column`` is not given: Ray's ``read_images`` and
#: ``read_binary_files`` names, then webdataset members by image extension, then file paths.
_IMAGE_COLUMNS = ("image", "bytes")
_PATH_COLUMN = "path"
#: webdataset's sample key and shard columns: a sample is named ``shard#key``, as clipn-detect names it.
_KEY, _URL = "__key__", "__url__"


class ClipnScorer:
    """Scores the images of a Ray Data batch with a CLIPN bundle; Ray builds one per actor.

    ``bundle_dir`` and ``detector_options`` (``device``, ``method``, ``batch_size``, ``threads``, ``precision``,
    ``decode_workers``, ``max_pixels``, …) are :class:`~clipn_runtime.detector.Detector`'s. ``image_column``
    names the column holding the images (default: ``image``, else ``bytes``, else the webdataset members whose
    name is an image extension, else ``path``); ``name_column`` the column that names each record in ``path``
    (default: ``shard#key`` for webdataset samples, else the ``path`` column when there is one).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        *,
        image_column: str | None = None,
        name_column: str | None = None,
        **detector_options: Any,
    ) -> None:
        self.detector = Detector(bundle_dir, **detector_options)
        self.image_column = image_column
        self.name_column = name_column

    def __call__(self, batch: Mapping[str, Any]) -> Any:
        """One Ray batch (a dict of columns, Ray's default batch format) → a ``pyarrow.Table`` of records, one
        row per input row, in order."""
        import pyarrow as pa

        columns = {k: list(v) for k, v in batch.items()}
        n = len(next(iter(columns.values()), []))
        names = self._names(columns, n)
        image_columns = self._image_columns(columns)
        records = self.score([_image_of(columns, image_columns, i) for i in range(n)], names)
        schema = pa.schema([(k, _ARROW_TYPES[k]) for k in RECORD_FIELDS])
        return pa.Table.from_pylist([_record(d) for d in records], schema=schema)

    def score(self, images: Sequence[object], names: Sequence[str | None]) -> list[Detection]:
        """Score ``images`` (bytes, arrays, paths, or ``None`` for a sample without an image) named ``names``."""
        prepared = [self._input(image) for image in images]
        scored = iter(self.detector.detect([item for item, _ in prepared if item is not None]))
        method = self.detector.method
        out = [
            next(scored) if item is not None else Detection.failed(None, method, error) for item, error in prepared
        ]
        return [d if name is None else replace(d, path=name) for d, name in zip(out, names, strict=True)]

    def _input(self, image: object) -> tuple[ImageInput | None, str]:
        """What the detector takes for one cell, or ``None`` and the reason there is nothing to score."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            return io.BytesIO(bytes(image)), ""
        if isinstance(image, (str, os.PathLike)):
            return image, ""
        if isinstance(image, np.ndarray) and image.dtype != object:
            try:
                return self.detector.preprocessor.from_array(image), ""
            except ValueError as e:
                return None, str(e)
        if _missing(image):
            return None, "the sample has no image"
        return None, f"cannot score a {type(image).__name__}: expected image bytes, an H×W×3 uint8 array or a path"

    def _image_columns(self, columns: Mapping[str, list[Any]]) -> list[str]:
        if self.image_column is not None:
            return [self._require(columns, self.image_column, "image_column")]
        for name in _IMAGE_COLUMNS:
            if name in columns:
                return [name]
        members = sorted(k for k in columns if f".{k.lower()}" in image_extensions())
        if members:
            return members
        if _PATH_COLUMN in columns:
            return [_PATH_COLUMN]
        raise ValueError(
            f"ClipnScorer: no image column in the batch (columns: {', '.join(columns)}); pass "
            "image_column= in fn_constructor_kwargs"
        )

    def _names(self, columns: Mapping[str, list[Any]], n: int) -> list[str | None]:
        if self.name_column is not None:
            return [str(v) for v in columns[self._require(columns, self.name_column, "name_column")]]
        if _KEY in columns:
            shards = columns.get(_URL, [None] * n)
            return [str(k) if _missing(u) else f"{u}#{k}" for u, k in zip(shards, columns[_KEY], strict=True)]
        if _PATH_COLUMN in columns:
            return [None if _missing(p) else str(p) for p in columns[_PATH_COLUMN]]
        return [None] * n

    @staticmethod
    def _require(columns: Mapping[str, list[Any]], name: str, option: str) -> str:
        if name not in columns:
            raise ValueError(f"ClipnScorer: {option}={name!r} is not a column of the batch ({', '.join(columns)})")
        return name


def _missing(value: object) -> bool:
    """A cell with no value: webdataset samples lacking a member hold ``None`` or NaN there."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _image_of(columns: Mapping[str, list[Any]], names: list[str], row: int) -> object:
    """The row's first non-missing cell among the image ``names`` (a webdataset sample has one of its members)."""
    return next((columns[k][row] for k in names if not _missing(columns[k][row])), None)


def _record(d: Detection) -> dict[str, Any]:
    record = d.to_dict()
    return {k: record[k] for k in RECORD_FIELDS}
