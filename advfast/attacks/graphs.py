"""CUDA-graph capture of whole attacks: random start and every PGD step replayed as one graph.

An attack is many small launches per step (forward, input-gradient backward, one fused pgd_step_),
repeated ``steps`` times; on a fast GPU with a small model or batch the host cannot issue them as
fast as the GPU runs them. ``AttackGraphs`` captures an attack once per call site and input
signature and replays it afterwards: one launch per attack.

What a graph may read. A captured graph reads and writes fixed addresses, so everything a call
site's loss depends on must be either
  * a *context* tensor, passed explicitly (``run(site, attack_fn, make_loss, x_nat, context)``):
    copied into a static buffer before every replay (the other view, fixed clean features, targets);
  * or state that is updated in place and never re-allocated: the model's parameters and buffers
    (optimiser steps, EMA updates, ``load_state_dict`` and BN running statistics all write in place),
    memory-bank queues (ring buffers written with ``index_copy_``).
The loss closure is therefore built by ``make_loss(*context)`` from the static buffers; a closure
that reached a per-batch tensor any other way would read that batch forever, which the tests check
for every method.

What a graph bakes in: Python-level choices made while capturing (train/eval mode, BN branch,
eps/alpha/steps/norm, autocast on/off and dtype). The site name and the signature (shapes, dtypes,
strides, devices of the inputs; autocast state) key the cache, so a different shape or precision
gets its own graph; mode and attack settings are fixed per call site in every method.

Random starts draw from torch's default CUDA generator inside the graph (graph-safe Philox offsets
advance on every replay), so replays draw fresh noise: the same distribution as eager, not the same
numbers. Autocast's weight-cast cache is disabled while capturing so the casts are recorded (with it
on, a graph would keep reading the casts of the weights at capture time).

Each graph keeps its own memory pool (the attack's activations at peak) for as long as it lives.
The first ``warmup_calls`` calls of a signature run eagerly on a side stream (cuDNN autotuning,
Triton compilation and lazy allocations happen there, as capture requires); every call, warm-up,
capture or replay, runs the attack exactly once, so BN statistics and RNG advance as in eager mode.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Sequence

import torch

AttackFn = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


class CUDAGraphCapture:
    """The real capture backend: torch.cuda.CUDAGraph, side-stream warm-up, one pool per graph."""

    def warmup(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[object, torch.Tensor, bool]:
        """(graph, static output, whether fn already ran for this call): capturing records, it does not run."""
        graph = torch.cuda.CUDAGraph()
        # thread_local (as torch's own cudagraph trees): only this thread may not make capture-unsafe calls,
        # so other threads' CUDA work (a data pipeline's, a watchdog's) cannot invalidate the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), _autocast_without_cache("cuda"):
            out = fn()
        return graph, out, False

    def replay(self, graph) -> None:
        graph.replay()


def _autocast_without_cache(device_type: str):
    """The current autocast state with the weight-cast cache off (a no-op context when autocast is off)."""
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


@dataclasses.dataclass
class _Entry:
    calls: int = 0
    graph: object | None = None
    x_nat: torch.Tensor | None = None
    context: tuple[torch.Tensor | None, ...] = ()
    out: torch.Tensor | None = None


def _signature(t: torch.Tensor | None):
    if t is None:
        return None
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def _static_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone(memory_format=torch.preserve_format)


class AttackGraphs:
    """Captured attacks, one per (call site, input signature), least recently used dropped past ``max_graphs``.

    ``run(site, attack_fn, make_loss, x_nat, context)`` returns what
    ``attack_fn(make_loss(*context), x_nat)`` returns (a fresh tensor, not the graph's static output).
    ``capture`` is the backend (CUDAGraphCapture by default); tests substitute an eager one on CPU.
    """

    def __init__(self, warmup_calls: int = 2, max_graphs: int = 8, capture=None):
        if isinstance(warmup_calls, bool) or not isinstance(warmup_calls, int) or warmup_calls < 1:
            raise ValueError(f"warmup_calls must be an int >= 1 (capture needs at least one eager run), "
                             f"got {warmup_calls!r}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.warmup_calls = warmup_calls
        self.max_graphs = max_graphs
        self.backend = CUDAGraphCapture() if capture is None else capture
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0  # graphs captured so far (re-captures after eviction included)
        self.replays = 0

    def __len__(self) -> int:
        return sum(e.graph is not None for e in self._entries.values())

    def clear(self) -> None:
        """Drop every graph and its memory pool (the next calls warm up and capture again)."""
        self._entries.clear()

    def run(self, site: str, attack_fn: AttackFn, make_loss: Callable[..., Callable[[torch.Tensor], torch.Tensor]],
            x_nat: torch.Tensor, context: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        context = tuple(context)
        for i, c in enumerate((x_nat,) + context):
            if c is not None and not isinstance(c, torch.Tensor):
                what = "x_nat" if i == 0 else f"context[{i - 1}]"
                raise TypeError(f"{what} must be a tensor (or None for context), got {type(c).__name__}; "
                                "pass everything per batch that the loss reads as a context tensor")
        device_type = x_nat.device.type
        key = (site, _signature(x_nat), tuple(_signature(c) for c in context),
               torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type), torch.is_grad_enabled())
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        self._entries.move_to_end(key)
        entry.calls += 1

        if entry.graph is None and entry.calls <= self.warmup_calls:
            return self.backend.warmup(lambda: attack_fn(make_loss(*context), x_nat)).detach()

        ran = False
        if entry.graph is None:
            self._evict_for_one_more()
            entry.x_nat = _static_copy(x_nat)
            entry.context = tuple(_static_copy(c) for c in context)
            static_x, static_ctx = entry.x_nat, entry.context
            try:
                entry.graph, entry.out, ran = self.backend.capture(lambda: attack_fn(make_loss(*static_ctx), static_x))
            except RuntimeError as e:  # an op that cannot be captured (a host sync, an unsupported call)
                self._entries.pop(key, None)
                raise RuntimeError(f"capturing the attack at {site!r} as a CUDA graph failed ({e}); train without "
                                   "cuda_graph_attack, or remove the host synchronisation from the attack's loss") from e
            self.captures += 1
        if not ran:
            entry.x_nat.copy_(x_nat)
            for static, c in zip(entry.context, context):
                if static is not None:
                    static.copy_(c)
            self.backend.replay(entry.graph)
            self.replays += 1
        # the static output is overwritten by the next replay; the caller keeps its own copy
        return entry.out.detach().clone(memory_format=torch.preserve_format)

    def _evict_for_one_more(self) -> None:
        captured = [k for k, e in self._entries.items() if e.graph is not None]
        while len(captured) >= self.max_graphs:
            self._entries.pop(captured.pop(0))
