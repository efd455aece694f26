"""Causal convolutions that stream: one state dataclass per module, preallocated, updated in place.

The pattern follows kyutai-labs/moshi (modules/streaming.py): `forward` processes a whole sequence
with zero left padding; `step` processes the next chunk given a state holding the inputs the kernel
still needs. Every streaming module has `init_state(batch) -> list[ConvState]` and `step(x, state)`.
Running `step` chunk by chunk gives exactly `forward` on the concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ConvState:
    """The last `context` input frames of a causal convolution, per stream: (B, C_in, context)."""

    buffer: torch.Tensor

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Zero the state of every stream, or of the streams where mask (B,) is True."""
        if mask is None:
            self.buffer.zero_()
        else:
            self.buffer[mask] = 0


class CausalConv1d(nn.Module):
    """Conv1d whose output at frame t depends on inputs at frames <= t only."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, dilation=dilation)
        self.context = (kernel - 1) * dilation
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # with a stride, pad so that output k sees inputs up to (k + 1) * stride - 1
        pad = self.context - (self.stride - 1) if self.stride > 1 else self.context
        return self.conv(nn.functional.pad(x, (max(pad, 0), 0)))

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> list[ConvState]:
        if self.stride != 1:
            raise ValueError("only stride-1 causal convolutions stream")
        return [ConvState(torch.zeros(batch, self.conv.in_channels, self.context, device=device, dtype=dtype))]

    def step(self, x: torch.Tensor, state: list[ConvState]) -> torch.Tensor:
        buffer = state[0].buffer
        joined = torch.cat([buffer, x], dim=-1)
        if self.context:
            buffer.copy_(joined[..., joined.shape[-1] - self.context:])
        return self.conv(joined)


class Pointwise(nn.Module):
    """A frame-wise module (an activation) in a streaming stack: no state."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> list[ConvState]:
        return []

    def step(self, x: torch.Tensor, state: list[ConvState]) -> torch.Tensor:
        return self.module(x)
