"""Activation memory of a ResNet training forward: bytes saved for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (any device), attributed to the stage that saved them, and the
CUDA caching allocator's allocation history where it exists.

Saved-tensor bytes count distinct storages (a tensor saved twice, or views of one storage, count once) and
exclude parameters and their autocast copies: the convolutions save their weights, which is not activation
memory.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")
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


def allocation_timeline_cuda(step: Callable[[], object], device: torch.device) -> list[int] | None:
    """Bytes allocated after each allocation/free event of one ``step``, from the caching allocator's history
    (``torch.cuda.memory._record_memory_history``); None where this torch does not have it."""
    memory = torch.cuda.memory
    if not hasattr(memory, "_record_memory_history") or not hasattr(memory, "_snapshot"):
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    try:
        memory._record_memory_history(max_entries=1_000_000)
        step()
        torch.cuda.synchronize(device)
        snapshot = memory._snapshot()
    except Exception:  # noqa: BLE001 - a private API: a missing feature must not fail the run
        return None
    finally:
        try:
            memory._record_memory_history(enabled=None)
        except Exception:  # noqa: BLE001
            pass
    traces = snapshot.get("device_traces", [])
    index = device.index if device.index is not None else torch.cuda.current_device()
    events = traces[index] if index < len(traces) else []
    allocated, timeline = base, []
    for event in events:
        if event.get("action") == "alloc":
            allocated += event.get("size", 0)
        elif event.get("action") == "free_completed":
            allocated -= event.get("size", 0)
        else:
            continue
        timeline.append(allocated)
    return timeline
