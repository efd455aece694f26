"""`visaudio train vae`: fit the per-ear spectral VAE (closed-form probabilistic PCA) and evaluate it.

Every ear of every training clip contributes its compressed complex STFT frames; one pass accumulates
their mean and covariance in float64, one eigendecomposition gives the basis (Tipping & Bishop 1999:
W = U (Lambda - sigma^2)^1/2, sigma^2 = mean discarded eigenvalue). Evaluation reconstructs held-out
scenes through the streaming decoder and reports the binaural metrics against the ground truth.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from engine.config import JsonConfig
from engine.vae import SpectralVAE, VAEConfig

EVAL_SEED = 20_000  # held-out scenes: training seeds start at 1,000,000


@dataclass(frozen=True)
class TrainVAEConfig(JsonConfig):
    vae: VAEConfig = field(default_factory=VAEConfig)
    clips: int = 300  # training clips whose frames enter the covariance (8 s each: 240k ear-frames)
    cache: str | None = None  # a training cache (training/scene_cache.py); None = render scenes
    eval_scenes: int = 8
    seed: int = 1_000_000



def render_eval_audio(index: int, seconds: float = 8.0, sample_rate: int = 16000) -> np.ndarray:
    """Binaural audio of held-out scene `index` (seed EVAL_SEED + index)."""
    from training.render import headroom_gain, render_audio
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    spec = parse_scene(random_scene(EVAL_SEED + index, duration=seconds, sample_rate=sample_rate))
    audio = render_audio(spec)
    return (audio * headroom_gain(audio)).astype(np.float32)


def _training_audio(cfg: TrainVAEConfig):
    if cfg.cache:
        from training.scene_cache import load_cache

        cache = load_cache(cfg.cache)
        if cache.sample_rate != cfg.vae.sample_rate:
            raise ValueError(f"{cfg.cache}: {cache.sample_rate} Hz, the VAE wants {cfg.vae.sample_rate} Hz")
        for i in range(min(cfg.clips, len(cache))):
            yield np.asarray(cache.audio[i])
        return
    from training.render import headroom_gain, render_audio
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    for i in range(cfg.clips):
        audio = render_audio(parse_scene(random_scene(cfg.seed + i, sample_rate=cfg.vae.sample_rate)))
        yield (audio * headroom_gain(audio)).astype(np.float32)


def fit_vae(cfg: TrainVAEConfig, progress: bool = True) -> SpectralVAE:
    """Closed-form PPCA fit of the spectral VAE on the training clips."""
    from tqdm import tqdm

    vae = SpectralVAE(cfg.vae)
    feat = 2 * cfg.vae.bins
    total, outer, count = np.zeros(feat), np.zeros((feat, feat)), 0
    with torch.no_grad():
        for audio in tqdm(_training_audio(cfg), total=cfg.clips, desc="clips", disable=not progress):
            usable = audio.shape[-1] // cfg.vae.hop * cfg.vae.hop
            x = torch.from_numpy(np.array(audio[:, :usable]))
            f = vae.features(x).reshape(-1, feat).double()
            total += f.sum(0).numpy()
            outer += (f.T @ f).numpy()
            count += f.shape[0]
    if count == 0:
        raise ValueError("no training audio")
    mean = total / count
    weight = vae.band_weight.double().numpy()
    cov = (outer / count - np.outer(mean, mean)) * np.outer(weight, weight)  # covariance of w (C - mean)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.maximum(eigval[order], 1e-12), eigvec[:, order]
    d = cfg.vae.latent_dim
    noise = float(eigval[d:].mean())  # PPCA's sigma^2
    vae.mean.copy_(torch.from_numpy(mean).float())
    vae.basis.copy_(torch.from_numpy(eigvec[:, :d]).float())
    vae.scale.copy_(torch.from_numpy(np.sqrt(eigval[:d])).float())
    vae.posterior_logvar.copy_(torch.from_numpy(np.log(noise / eigval[:d])).float())
    vae.explained_variance = float(eigval[:d].sum() / eigval.sum())
    return vae


def evaluate_vae(vae: SpectralVAE, scenes: int = 8, seconds: float = 8.0) -> dict:
    """Reconstruct held-out scenes (encode -> streaming decode) and average the reference metrics."""
    from training.metrics import compare

    results = []
    with torch.no_grad():
        for i in range(scenes):
            audio = render_eval_audio(i, seconds, vae.cfg.sample_rate)
            recon = vae.reconstruct(torch.from_numpy(audio)[None])[0].numpy()
            results.append(compare(audio, recon, vae.cfg.sample_rate))
    keys = [k for k in results[0] if k != "frames"]
    return {k: float(np.mean([r[k] for r in results])) for k in keys}


def save_vae(path: Path | str, vae: SpectralVAE, extra: dict | None = None) -> Path:
    return save_checkpoint(path, vae.state_dict(), "vae", {"config": vae.cfg.to_json(), **(extra or {})})


def load_vae(path: Path | str, device="cpu") -> tuple[SpectralVAE, dict]:
    from engine.checkpoint import CheckpointError

    tensors, info = load_checkpoint(path, "vae")
    try:
        cfg = VAEConfig.from_json(info["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad VAE config ({exc})") from exc
    vae = SpectralVAE(cfg)
    load_weights(vae, tensors, path)
    return vae.to(device).eval(), info


def train_vae(cfg: TrainVAEConfig, out_dir: Path | str, progress: bool = True) -> Path:
    """Fit, evaluate, write out_dir/vae.safetensors and out_dir/vae_report.json."""
    out_dir = Path(out_dir)
    start = time.time()
    vae = fit_vae(cfg, progress)
    report = {"explained_variance": vae.explained_variance, "fit_seconds": time.time() - start,
              "eval": evaluate_vae(vae, cfg.eval_scenes), "train_config": cfg.to_json()}
    (out_dir).mkdir(parents=True, exist_ok=True)
    (out_dir / "vae_report.json").write_text(json.dumps(report, indent=1))
    return save_vae(out_dir / "vae.safetensors", vae, {"train": report})
