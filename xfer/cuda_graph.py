"""The whole training step captured once as a CUDA graph and replayed (`StepGraph`)."""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


class StepGraph:
    """The whole training step (gather, forward, backward, clipping, fused AdamW) captured once
    as a CUDA graph and replayed: one launch per step instead of hundreds, so a small model's
    step costs the GPU's time rather than Python's. Steps run eagerly (on a side stream, as
    PyTorch's whole-network capture recipe asks) until WARMUP steps have run, then the next
    step is captured. The step's inputs are static tensors (each member's cell indices, the
    members' warm-up and GRL weights as [P] device tensors; learning rates and the mask of
    members still training are read in place by the optimiser); the adaptation line's cells are drawn on
    the device inside the graph; dropout and the other random ops use the CUDA generator,
    which graph replays advance. If capture fails (an op that needs the host), the loop logs
    why and goes on eagerly."""

    WARMUP = 3

    def __init__(self, step: Callable, shape: tuple[int, ...], dev: torch.device, params: list[torch.Tensor]):
        self.step, self.dev, self.params = step, dev, params
        self.idx = torch.zeros(shape, dtype=torch.long, device=dev)   # [P, bs]: each member's batch
        self.graph: torch.cuda.CUDAGraph | None = None
        self.names: list[str] = []
        self.vec: torch.Tensor | None = None     # the captured step's loss parts, stacked
        self.acc: torch.Tensor | None = None     # their sum over this epoch's replays
        self.seen = 0
        self.failed = False
        self.replays = 0

    def run(self, idx: torch.Tensor, warm: torch.Tensor, grl: torch.Tensor) -> bool:
        """Do this step through the graph (capturing it first when due); False: run it eagerly."""
        if self.failed:
            return False
        if self.graph is None:
            self.seen += 1
            if self.seen <= self.WARMUP:
                side = torch.cuda.Stream(self.dev)
                side.wait_stream(torch.cuda.current_stream(self.dev))
                with torch.cuda.stream(side):
                    self._add(self.step(idx, warm, grl))
                torch.cuda.current_stream(self.dev).wait_stream(side)
                return True
            if not self._capture(warm, grl):
                return False
        self.idx.copy_(idx)
        self.graph.replay()
        self.replays += 1
        self._accumulate(self.vec)
        return True

    def _add(self, parts: dict[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = list(parts)
        self._accumulate(torch.stack([v.float() for v in parts.values()]))

    def _accumulate(self, vec: torch.Tensor) -> None:
        self.acc = vec.clone() if self.acc is None else self.acc.add_(vec)

    def _capture(self, warm: torch.Tensor, grl: torch.Tensor) -> bool:
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(self.dev)
            # thread_local: a thread beside this one (a Ray Tune worker's) may use CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                parts = self.step(self.idx, warm, grl, autocast_cache=False)
                vec = torch.stack([v.float() for v in parts.values()])
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager steps
            log.warning("CUDA graph capture of the training step failed (%s: %s); training on eagerly",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.failed = True
            for p in self.params:  # drop gradients that point into the abandoned capture
                p.grad = None
            return False
        if self.names and list(parts) != self.names:
            log.warning("CUDA graph: loss parts changed between steps (%s vs %s); training on eagerly",
                        list(parts), self.names)
            self.failed = True
            return False
        self.graph, self.vec, self.names = graph, vec, list(parts)
        return True

    def summary(self) -> dict:
        return {"captured": self.graph is not None, "failed": self.failed, "replays": self.replays}

    def take_sums(self) -> dict[str, torch.Tensor]:
        """This epoch's summed loss parts of the steps done here (graph or warm-up), then reset."""
        if self.acc is None:
            return {}
        out = dict(zip(self.names, self.acc.unbind(0)))
        self.acc = None
        return out
