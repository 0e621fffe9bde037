"""The one host<->device copy routine: every byte that crosses PCIe in infinity goes through
``copy``, on a stream of the caller's choosing, and is done when the returned event is."""

from __future__ import annotations

import threading

import torch


def copy(dst: torch.Tensor, src: torch.Tensor, stream=None, after=None):
    """Copy ``src`` into ``dst`` (same number of bytes; either may be on the CPU or a CUDA
    device). With a CUDA side, the copy runs on ``stream`` (default: that device's h2d or d2h
    copy stream, ``copy_stream``) once ``after`` (an event, if given) has happened, and is
    asynchronous when the host side is pinned; returns the event recorded after it, or None for
    a CPU-only copy (done on return). The caller keeps both tensors alive until the event."""
    device = dst.device if dst.is_cuda else src.device if src.is_cuda else None
    if device is None:
        dst.copy_(src)
        return None
    stream = stream or copy_stream(device, "h2d" if dst.is_cuda else "d2h")
    if after is not None:
        stream.wait_event(after)
    host = src if dst.is_cuda else dst
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=host.is_cuda or host.is_pinned())
        event = torch.cuda.Event()
        event.record(stream)
    return event


_streams: dict[tuple[int, str], torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def copy_stream(device: torch.device, direction: str = "h2d") -> torch.cuda.Stream:
    """The process's copy stream of ``device`` for one direction ("h2d" or "d2h"): one each, so
    that uploads and write-backs overlap each other and compute."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _streams_lock:
        if (index, direction) not in _streams:
            _streams[(index, direction)] = torch.cuda.Stream(torch.device("cuda", index))
        return _streams[(index, direction)]
