"""Activation memory of a ResNet training forward: bytes saved for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (any device), attributed to the stage that saved them, and the
CUDA caching allocator's allocation history where it exists.

Saved-tensor bytes count distinct storages (a tensor saved twice, or views of one storage, count once) and
exclude parameters and their autocast copies: the convolutions save their weights, which is not activation
memory.

Timelines record where each stage starts (the index of its first point), so that a chart can put eager and
fused side by side by layer: the saved-bytes timeline knows the stage of each point; in the allocator's
history, a stage's start is found by a marker allocation of a size no tensor of the model has (a few hundred
KiB, allocated and freed at once by a hook as the stage starts; it shows as such in PyTorch's memory viewer).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")
STEP_STAGES = (*STAGES, "backward")  # a whole training step: the forward's stages, then backward + update
_STEM_CHILDREN = {"conv1", "bn1", "relu", "maxpool"}


def stage_of(child_name: str) -> str:
    """The stage of a top-level child of a torchvision-style ResNet."""
    if child_name in _STEM_CHILDREN:
        return "stem"
    if child_name in STAGES:
        return child_name
    return "head"


class SavedTensorCounter:
    """Counts activation bytes saved for backward while active, per stage of ``model``, plus a timeline of
    the running total (one point per newly saved storage, in forward order)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._param_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() > 1}
        self._seen: set[int] = set()
        self.by_stage = {s: 0 for s in STAGES}
        self.timeline: list[tuple[str, int]] = []
        self.stage = "stem"

    @property
    def total(self) -> int:
        return sum(self.by_stage.values())

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and tuple(t.shape) not in self._param_shapes and ptr not in self._seen:
            self._seen.add(ptr)
            self.by_stage[self.stage] += storage.nbytes()
            self.timeline.append((self.stage, self.total))
        return t

    def stage_starts(self) -> dict[str, int]:
        """The index in ``timeline`` of each stage's first point (stages that saved nothing are absent)."""
        starts: dict[str, int] = {}
        for i, (stage, _) in enumerate(self.timeline):
            starts.setdefault(stage, i)
        return starts

    def run(self, forward: Callable[[], object]) -> object:
        """Run ``forward`` (a training forward of the model) while counting."""
        handles = [child.register_forward_pre_hook(lambda *_, s=stage: setattr(self, "stage", s))
                   for child, stage in _stage_markers(self.model)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                return forward()
        finally:
            for h in handles:
                h.remove()


def _stage_markers(model: nn.Module) -> list:
    """(child, stage) for the children whose forward pre-hook marks the start of a stage after the stem. The
    stem's own modules (conv1, bn1, relu, maxpool) get no hook: the fused ResNet reads them directly and runs
    its original forward while any of them has a hook, which is exactly what is not to be measured."""
    return [(child, stage_of(name)) for name, child in model.named_children() if stage_of(name) != "stem"]


def saved_activation_bytes(model: nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of distinct non-parameter storages saved for backward by ``forward``."""
    counter = SavedTensorCounter(model)
    counter.run(forward)
    return counter.total


def stage_peaks_cuda(model: nn.Module, step: Callable[[], object], device: torch.device) -> dict:
    """Peak bytes allocated on the device during each stage's forward, and during the backward + update
    (everything after the last stage's forward), for one call of ``step`` (a whole training step)."""
    peaks: dict[str, int] = {}
    current = {"stage": None}

    def enter(stage):
        if current["stage"] is not None:
            peaks[current["stage"]] = max(peaks.get(current["stage"], 0), torch.cuda.max_memory_allocated(device))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        current["stage"] = stage

    handles = [child.register_forward_pre_hook(lambda *_, s=stage: enter(s)) for child, stage in _stage_markers(model)]
    # The backward starts after the head's forward: a forward hook on the model marks it.
    handles.append(model.register_forward_hook(lambda *_: enter("backward")))
    try:
        torch.cuda.synchronize(device)
        enter("stem")
        step()
        torch.cuda.synchronize(device)
        enter(None)
    finally:
        for h in handles:
            h.remove()
    return peaks


# Marker allocation sizes: 512-byte multiples (the caching allocator's granularity, so the trace shows them
# unrounded) by primes, about 0.5 MiB: no activation, weight or workspace of a ResNet has these sizes.
_MARKER_PRIMES = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049)
MARKER_SIZES = {stage: 512 * p for stage, p in zip(STEP_STAGES[1:], _MARKER_PRIMES)}


def timeline_from_trace(events: list[dict], base: int, markers: dict[str, int]) -> tuple[list[int], dict[str, int]]:
    """Bytes allocated after each alloc / free_completed event of an allocator trace, starting from ``base``,
    without the marker allocations (``markers``: {stage: size}); and the index in that timeline at which
    each marker was first allocated (the start of its stage; the first stage starts at 0)."""
    by_size = {size: stage for stage, size in markers.items()}
    allocated, timeline, starts = base, [], {STEP_STAGES[0]: 0}
    for event in events:
        action, size = event.get("action"), event.get("size", 0)
        if size in by_size:
            if action == "alloc":
                starts.setdefault(by_size[size], len(timeline))
            continue
        if action == "alloc":
            allocated += size
        elif action == "free_completed":
            allocated -= size
        else:
            continue
        timeline.append(allocated)
    return timeline, starts


def _marker_hooks(model: nn.Module, device: torch.device) -> list:
    """Hooks that allocate and free a marker as each stage after the stem starts (and as backward starts)."""
    def mark(stage):
        torch.empty(MARKER_SIZES[stage], dtype=torch.uint8, device=device)  # freed at once

    seen, handles = set(), []
    for child, stage in _stage_markers(model):
        if stage not in seen:
            seen.add(stage)
            handles.append(child.register_forward_pre_hook(lambda *_, s=stage: mark(s)))
    handles.append(model.register_forward_hook(lambda *_: mark("backward")))
    return handles


def allocation_timeline_cuda(model: nn.Module, step: Callable[[], object], device: torch.device,
                             snapshot_path: str | None = None) -> tuple[list[int], dict[str, int]] | None:
    """Bytes allocated after each allocation/free event of one ``step`` (a training step of ``model``), from
    the caching allocator's history (``torch.cuda.memory._record_memory_history``), and where each of
    STEP_STAGES starts in it; None where this torch does not have the history. With ``snapshot_path``, also
    writes the allocator snapshot there (``torch.cuda.memory._dump_snapshot``: open it in PyTorch's memory
    viewer, https://pytorch.org/memory_viz)."""
    memory = torch.cuda.memory
    if not hasattr(memory, "_record_memory_history") or not hasattr(memory, "_snapshot"):
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    handles = _marker_hooks(model, device)
    try:
        memory._record_memory_history(max_entries=1_000_000)
        step()
        torch.cuda.synchronize(device)
        snapshot = memory._snapshot()
        if snapshot_path is not None:
            memory._dump_snapshot(snapshot_path)
    except Exception:  # noqa: BLE001 - a private API: a missing feature must not fail the run
        return None
    finally:
        for h in handles:
            h.remove()
        try:
            memory._record_memory_history(enabled=None)
        except Exception:  # noqa: BLE001
            pass
    traces = snapshot.get("device_traces", [])
    index = device.index if device.index is not None else torch.cuda.current_device()
    events = traces[index] if index < len(traces) else []
    return timeline_from_trace(events, base, MARKER_SIZES)


def downsample(series: list[float], starts: dict[str, int], n: int = 2000) -> tuple[list[float], dict[str, int]]:
    """At most ``n`` points (the maximum of each bucket, so peaks survive), with the stage starts moved to
    the buckets they fall in."""
    if len(series) <= n:
        return list(series), dict(starts)
    step = len(series) / n
    points = [max(series[int(i * step): int((i + 1) * step)] or [series[-1]]) for i in range(n)]
    return points, {stage: min(int(i / step), n - 1) for stage, i in starts.items()}
