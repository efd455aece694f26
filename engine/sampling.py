"""Samplers for one window: one signature for all (k-diffusion style), noise injected by the caller.

A sampler integrates the flow ODE dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) over the given
time grid and calls `callback(i, t, x)` after each step. `WindowFlow` turns the network into such a
velocity function for one window: context positions are held at their clean latents, only the horizon
moves, and classifier-free guidance (Ho & Salimans 2022) mixes the conditional and null-condition
velocities in one batched call, optionally rescaled to the conditional velocity's spread (Lin et al.
2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed", section 3.4).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Callable

import torch

from engine.flow import ROLE_HORIZON, Conditions, FlowNet

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def couple_ears(noise: torch.Tensor, correlation: float) -> torch.Tensor:
    """Turn i.i.d. normal noise (B, E, ...) into the flow's prior: for two ears, the right ear's noise
    is correlation * left + sqrt(1 - correlation^2) * its own (each ear stays standard normal)."""
    if noise.shape[1] != 2 or correlation == 0.0:
        return noise
    left, right = noise[:, 0], noise[:, 1]
    return torch.stack([left, correlation * left + (1 - correlation ** 2) ** 0.5 * right], dim=1)


def uniform_times(steps: int, device=None) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


def sample_euler(velocity: Velocity, noise: torch.Tensor, times: torch.Tensor,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Euler integration of the flow from times[0] to times[-1]; len(times) - 1 network evaluations."""
    x = noise
    for i in range(len(times) - 1):
        t = times[i].expand(x.shape[0])
        x = x + (times[i + 1] - times[i]) * velocity(x, t)
        if callback is not None:
            callback(i, times[i + 1], x)
    return x


class WindowFlow:
    """The velocity of one window's horizon given its context and conditions, with optional CFG."""

    def __init__(self, net: FlowNet, context: torch.Tensor, roles: torch.Tensor, cond: Conditions,
                 null_cond: Conditions | None = None, guidance: float = 1.0, rescale: float = 0.0):
        """context (B, E, W, D): clean latents at context positions (anything elsewhere); roles (B, W);
        rescale: the share of the guided velocity brought to the conditional one's standard deviation
        over each window's horizon (0 = plain CFG)."""
        self.net, self.guidance, self.rescale = net, guidance, rescale
        self.horizon = (roles == ROLE_HORIZON)[:, None, :, None]
        self.context = torch.where(self.horizon, torch.zeros_like(context), context)
        if guidance != 1.0:
            if null_cond is None:
                raise ValueError("guidance needs the null conditions")
            self.cond = Conditions(**{f.name: torch.cat([getattr(cond, f.name), getattr(null_cond, f.name)])
                                      for f in fields(Conditions)})
        else:
            self.cond = cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        window = torch.where(self.horizon, x, self.context)
        if self.guidance == 1.0:
            v = self.net.velocity(window, t, self.cond)
        else:
            cond_v, null_v = self.net.velocity(torch.cat([window, window]), torch.cat([t, t]), self.cond).chunk(2)
            v = null_v + self.guidance * (cond_v - null_v)
            if self.rescale:
                v = v * (1 - self.rescale + self.rescale * self._spread(cond_v) / self._spread(v).clamp_min(1e-12))
        return torch.where(self.horizon, v, torch.zeros_like(v))

    def _spread(self, v: torch.Tensor) -> torch.Tensor:
        """Standard deviation over each window's horizon positions, (B, 1, 1, 1)."""
        mask = self.horizon.expand_as(v)
        count = mask.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)
        mean = torch.where(mask, v, 0).sum(dim=(1, 2, 3), keepdim=True) / count
        return (torch.where(mask, v - mean, 0) ** 2).sum(dim=(1, 2, 3), keepdim=True).div(count).sqrt()
