"""What training steps cost: time per phase, TFLOP/s per device, MFU and peak device memory, for the step
line and MLflow (read at log steps only).

Phase times on a GPU come from CUDA events recorded on the current stream around each phase: the host
runs ahead of the device, so host clocks would time the launches, not the work. The events are read at
the log step, after one synchronise. On CPU the phases are host wall-clock times.

TFLOP/s count model FLOPs (``wenlan.models.flops``: online forward and backward, momentum forward,
logits), not the recompute of activation checkpointing: MFU in PaLM's sense, not hardware FLOPs
utilisation. Per device: the global batch's FLOPs divided by every rank (a pipeline's stages share one
sample's FLOPs between them).
"""

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

PHASES = ("forward_backward", "optimizer", "ema", "enqueue", "eval")
"""Timed phases of a step, in the step line's order. A pipeline's ``train_batch`` runs the forward,
backward and optimizer step interleaved: there they are one ``forward_backward`` phase."""

SHORT = dict(data_wait="data", forward_backward="fwd+bwd", optimizer="opt", ema="ema", enqueue="enqueue",
             eval="eval")


class PhaseTimer:
    """Seconds spent per phase since the last ``take``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            began = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - began

    def take(self) -> dict[str, float]:
        if self.events:
            torch.cuda.synchronize()  # once per log window: every recorded event has completed
            for name, start, end in self.events:
                self.seconds[name] += start.elapsed_time(end) / 1000.0
        taken = {name: self.seconds.get(name, 0.0) for name in PHASES}
        self.seconds, self.events = defaultdict(float), []
        return taken


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_memory_bytes(device: torch.device) -> int | None:
    """The most this process has held on its device since it started (None off GPUs)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def throughput(flops_per_sample: float, samples: int, seconds: float, devices: int, peak_tflops: float | None
               ) -> dict[str, float]:
    """TFLOP/s per device and, with a known peak, MFU (a fraction)."""
    tflops = flops_per_sample * samples / seconds / devices / 1e12
    out = dict(tflops_per_device=tflops)
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    return out
