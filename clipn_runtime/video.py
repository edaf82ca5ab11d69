"""Video input with PyAV (the ``video`` extra, imported only when a video is opened).

:func:`iter_frames` decodes a file or stream URL and yields every ``every``-th frame as RGB with its
timestamp. Every frame is decoded (inter-frame codecs need them) but only the kept ones are converted to RGB.
:func:`prefetch` runs such an iterator in a background thread with a bounded queue, so that decoding (FFmpeg
releases the GIL) overlaps with inference without ever holding more than a few frames.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from clipn_runtime.errors import UserError

T = TypeVar("T")


class VideoError(UserError):
    """A video that cannot be opened or decoded; the message names it and says why."""


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame: its index in the stream (0-based, counting every frame), time in seconds, RGB pixels."""

    index: int
    time: float | None
    image: npt.NDArray[np.uint8]  # H×W×3 RGB


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError("video input needs PyAV: pip install 'clipn-ood[video]'") from None
    return av


def _reason(av: Any, source: str, e: Exception) -> str:
    """Why FFmpeg failed, in words: PyAV's message quotes the raw AVERROR code ("[Errno 1094995529] Invalid
    data found…"), which names neither the problem nor a fix."""
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a video file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, (av.error.InvalidDataError, av.error.EOFError)):
        try:
            if os.path.getsize(source) == 0:
                return "empty file (0 bytes)"
        except OSError:
            pass
        return "truncated or corrupt video (FFmpeg found invalid data)"
    if isinstance(e, av.error.DecoderNotFoundError):
        return "truncated or corrupt video, or a codec this FFmpeg cannot decode (no decoder for its stream)"
    if isinstance(e, av.error.DemuxerNotFoundError):
        return "not a video container FFmpeg knows"
    return str(getattr(e, "strerror", None) or e)


def iter_frames(source: str, *, every: int = 1, options: dict[str, str] | None = None) -> Iterator[VideoFrame]:
    """Frames ``0, every, 2·every, …`` of the first video stream of ``source`` (a path or a URL)."""
    if every < 1:
        raise ValueError(f"every must be ≥ 1, got {every}")
    av = _av()
    try:
        container = av.open(source, options=options or {})
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{source}: cannot open video: {_reason(av, source, e)}") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{source}: no video stream in this file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # let FFmpeg decode with frame/slice threads
        rate = float(stream.average_rate) if stream.average_rate else None
        index = 0
        try:
            for frame in container.decode(stream):
                if index % every == 0:
                    t = frame.time if frame.time is not None else (index / rate if rate else None)
                    yield VideoFrame(index, None if t is None else float(t), frame.to_ndarray(format="rgb24"))
                index += 1
        except (av.FFmpegError, OSError) as e:
            raise VideoError(f"{source}: decoding failed after {index} frames: {_reason(av, source, e)}") from None
    finally:
        container.close()


_DONE = object()


def prefetch(it: Iterator[T], maxsize: int) -> Generator[T, None, None]:
    """Run ``it`` in a background thread, at most ``maxsize`` items ahead; exceptions re-raise here.

    Closing the returned generator (or breaking out of the loop) stops the producer promptly.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, maxsize))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="clipn-video-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
