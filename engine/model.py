"""A complete generator: the per-ear VAE, the flow network and how to sample it, in one checkpoint.

The checkpoint is one safetensors file (tensors `vae.*` and `flow.*`) whose JSON metadata holds both
configs, the sampler settings and how the model was made. Teachers sample with Euler + CFG; distilled
students carry their own time grid and guidance 1 (guidance is folded into their weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.config import JsonConfig
from engine.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from engine.flow import FlowConfig, FlowNet
from engine.vae import SpectralVAE, VAEConfig

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default.safetensors"


@dataclass(frozen=True)
class SamplerConfig(JsonConfig):
    times: tuple[float, ...] = tuple(i / 25 for i in range(26))  # Euler grid from noise (0) to data (1)
    guidance: float = 4.5  # classifier-free guidance scale (MMAudio's default); 1 = none
    # Share of the guided velocity rescaled to the conditional velocity's spread (engine.sampling.
    # WindowFlow; Lin et al. 2024). 0 = plain CFG. A flow whose conditional and null predictions differ
    # in level has that difference multiplied by the guidance: the first retrain on the cache with drawn
    # rooms came out 9-24x too loud at 4.5. The shipped teacher samples, and its student was distilled,
    # fully rescaled (1; checkpoints/README.md).
    guidance_rescale: float = 0.0
    # Interaural models: how much of the difference between the two generated centred ears reaches the
    # decoder (engine.interaural.mix_ears). 1 = each ear as generated; 0 = both ears decoded from
    # their mean, so the ears differ only by the predicted transfer. Measured on validation scenes
    # (seed 30000, 40 scenes): ILD error on direct frames 2.55 dB at 1, 1.89 at 0.5, 1.45 at 0; IC
    # error 0.202 / 0.183 / 0.190; ITD unchanged. The shipped checkpoints use 0.
    interaural_side: float = 1.0
    # Latents of clean context each streaming hop reads (None: the trained window minus the hop; capped
    # there). The flow's cost grows with the window, its cues hardly at all: the shipped student at hop
    # 2 on 40 eval scenes (seed 20000) scored ITD 139.04 / 139.05 / 139.06 / 139.05 us in view, ILD
    # 2.217 / 2.218 / 2.218 / 2.218 dB, STFT 0.0640 / 0.0640 / 0.0641 / 0.0646 with 30 / 14 / 6 / 2
    # latents of context, while a 40 ms hop took p50 21.0 / 14.0 / 10.7 / 8.9 ms (onnxruntime, one Xeon
    # thread, interleaved). The shipped checkpoints use 14 (0.28 s).
    context: int | None = None

    @property
    def evaluations(self) -> int:
        """Network evaluations per hop (CFG doubles the batch, which we count as two)."""
        return (len(self.times) - 1) * (1 if self.guidance == 1.0 else 2)


class BinauralModel(nn.Module):
    def __init__(self, vae: SpectralVAE, flow: FlowNet, sampler: SamplerConfig, role: str = "teacher"):
        super().__init__()
        if flow.cfg.latent_dim != vae.cfg.latent_dim:
            raise ValueError(f"flow latent_dim {flow.cfg.latent_dim} != VAE latent_dim {vae.cfg.latent_dim}")
        self.vae, self.flow, self.sampler, self.role = vae, flow, sampler, role

    @property
    def ears(self) -> int:
        return self.flow.cfg.ears


def save_model(path: Path | str, model: BinauralModel, info: dict | None = None,
               flow_state: dict | None = None, flow_dtype: torch.dtype = torch.float32) -> Path:
    """Write the model (flow_state overrides the flow weights, e.g. with an EMA copy). The shipped
    checkpoints store the flow weights as float16 (half the size); they load as float32."""
    tensors = {f"vae.{k}": v for k, v in model.vae.state_dict().items()}
    tensors.update({f"flow.{k}": v.to(flow_dtype) if v.is_floating_point() else v
                    for k, v in (flow_state or model.flow.state_dict()).items()})
    meta = {"vae_config": model.vae.cfg.to_json(), "flow_config": model.flow.cfg.to_json(),
            "sampler": model.sampler.to_json(), "role": model.role, **(info or {})}
    return save_checkpoint(path, tensors, "model", meta)


def provenance(info: dict) -> dict:
    """A loaded checkpoint's info less what save_model and save_checkpoint write themselves: what to
    carry over when a model is written again (pack, presence)."""
    return {k: v for k, v in info.items() if k not in ("format", "kind", "vae_config", "flow_config", "sampler", "role")}


def load_model(path: Path | str | None = None, device="cpu") -> tuple[BinauralModel, dict]:
    """Load a model checkpoint (default: the shipped one)."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    tensors, info = load_checkpoint(path, "model")
    try:
        vae = SpectralVAE(VAEConfig.from_json(info["vae_config"]))
        flow = FlowNet(FlowConfig.from_json(info["flow_config"]), pretrained_vision=False)  # weights follow
        sampler = SamplerConfig.from_json(info["sampler"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad model description ({exc})") from exc
    split = {"vae": {}, "flow": {}}
    for name, value in tensors.items():
        part, _, rest = name.partition(".")
        if part not in split:
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
        split[part][rest] = value.float()
    load_weights(vae, split["vae"], path)
    load_weights(flow, split["flow"], path)
    model = BinauralModel(vae, flow, sampler, info.get("role", "teacher"))
    return model.to(device).eval(), info
