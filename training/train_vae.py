"""`visaudio train vae`: train the per-ear waveform VAE on scene-engine audio (or a dataset folder).

Loss: multi-resolution STFT (spectral convergence + log magnitude), a low-band complex STFT term that
pins the phase below 1.5 kHz where the ITD lives, waveform L1 and a small KL. Both ears of each
binaural window go through the same mono VAE. Evaluation reconstructs held-out scenes through the
streaming decoder and reports the binaural metrics against the ground truth.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import (load_checkpoint, load_weights, optimizer_tensors, restore_optimizer,
                               save_checkpoint)
from engine.vae import VAEConfig, WaveVAE


@dataclass(frozen=True)
class TrainVAEConfig:
    vae: VAEConfig = field(default_factory=VAEConfig)
    steps: int = 20000
    batch: int = 16  # binaural windows per step (32 mono examples)
    segment_seconds: float = 1.0
    lr: float = 2e-4  # 5e-4 stalled with the output near silence on CPU runs
    betas: tuple[float, float] = (0.8, 0.99)  # audio-codec practice: a short first-moment memory
    kl_weight: float = 1e-4  # keeps latents near unit scale for the flow model without blurring
    phase_weight: float = 1.0
    wave_weight: float = 1.0
    eval_every: int = 1000
    eval_scenes: int = 8
    checkpoint_every: int = 1000
    seed: int = 0
    data_dir: str | None = None  # a dataset folder; None = render random scenes on the fly
    scene_pool: int = 64  # on-the-fly scenes kept in memory; one is replaced every `refresh_every` steps
    refresh_every: int = 4
    scene_seconds: float = 8.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "TrainVAEConfig":
        obj = dict(obj)
        unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown training config field(s): {', '.join(unknown)}")
        vae = VAEConfig.from_json(obj.pop("vae", {}))
        obj = {k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()}
        return cls(vae=vae, **obj)


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainVAEConfig:
    """Read a JSON or YAML config file (or the defaults) and apply overrides."""
    cfg = TrainVAEConfig()
    if path is not None:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            obj = yaml.safe_load(text) or {}
        else:
            obj = json.loads(text)
        cfg = TrainVAEConfig.from_json(obj)
    return replace(cfg, **{k: v for k, v in (overrides or {}).items() if v is not None})


# ------------------------------------------------------------------------------------------------ data


class ScenePool:
    """Binaural audio of random scenes rendered on the fly; serves random aligned windows."""

    def __init__(self, cfg: TrainVAEConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.next_seed = 1_000_000 + cfg.seed * 100_000  # training seeds, disjoint from eval seeds
        if cfg.data_dir:
            from training.clips import read_clip
            from training.data import dataset_clips

            self.clips = [read_clip(p, cfg.vae.sample_rate).audio for p in dataset_clips(cfg.data_dir)]
        else:
            self.clips = [self._render() for _ in range(cfg.scene_pool)]

    def _render(self) -> np.ndarray:
        from training.render import headroom_gain, render_audio
        from training.sampler import random_scene
        from training.scene_spec import parse_scene

        spec = parse_scene(random_scene(self.next_seed, duration=self.cfg.scene_seconds,
                                        sample_rate=self.cfg.vae.sample_rate))
        self.next_seed += 1
        audio = render_audio(spec)
        return (audio * headroom_gain(audio)).astype(np.float32)

    def refresh(self) -> None:
        if not self.cfg.data_dir:
            self.clips[self.rng.integers(len(self.clips))] = self._render()

    def batch(self) -> torch.Tensor:
        n = int(round(self.cfg.segment_seconds * self.cfg.vae.sample_rate / self.cfg.vae.hop)) * self.cfg.vae.hop
        out = np.empty((self.cfg.batch, 2, n), np.float32)
        for b in range(self.cfg.batch):
            clip = self.clips[self.rng.integers(len(self.clips))]
            start = self.rng.integers(0, clip.shape[1] - n + 1)
            gain = 10 ** (self.rng.uniform(-12, 6) / 20)  # level augmentation
            out[b] = np.clip(clip[:, start:start + n] * gain, -1, 1)
        return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------ loss


def _stft(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    return torch.stft(x.reshape(-1, x.shape[-1]), n_fft, n_fft // 4, window=window, pad_mode="constant",
                      return_complex=True)


LOG_FLOOR = 1e-2  # STFT magnitude floor of the log term: ~60 dB under loud bins, so silence does not dominate


def vae_loss(cfg: TrainVAEConfig, audio, recon, mean, logvar) -> dict[str, torch.Tensor]:
    """Multi-resolution STFT + low-band complex STFT (phase) + waveform L1 + KL."""
    audio, recon = audio.float(), recon.float()
    spectral = 0.0
    for n_fft in (256, 512, 1024, 2048):
        s, r = _stft(audio, n_fft).abs(), _stft(recon, n_fft).abs()
        spectral = spectral + torch.linalg.norm(s - r) / (torch.linalg.norm(s) + 1e-7)
        spectral = spectral + (torch.log(s + LOG_FLOOR) - torch.log(r + LOG_FLOOR)).abs().mean()
    n_fft = 1024
    low = int(1500 / cfg.vae.sample_rate * n_fft) + 1
    s, r = _stft(audio, n_fft)[:, :low], _stft(recon, n_fft)[:, :low]
    phase = (s - r).abs().mean() / (s.abs().mean() + 1e-7)
    wave = (audio - recon).abs().mean() / (audio.abs().mean() + 1e-3)
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
    total = spectral + cfg.phase_weight * phase + cfg.wave_weight * wave + cfg.kl_weight * kl
    return {"loss": total, "spectral": spectral, "phase": phase, "wave": wave, "kl": kl}


# ------------------------------------------------------------------------------------------- checkpoints


def save_vae(path: Path, model: WaveVAE, cfg: TrainVAEConfig, step: int, extra: dict | None = None) -> Path:
    return save_checkpoint(path, model.state_dict(), "vae",
                           {"config": cfg.vae.to_json(), "train": cfg.to_json(), "step": step, **(extra or {})})


def load_vae(path: Path | str, device="cpu") -> tuple[WaveVAE, dict]:
    """A trained VAE (eval mode) and its checkpoint info."""
    tensors, info = load_checkpoint(path, "vae")
    try:
        cfg = VAEConfig.from_json(info["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad VAE config ({exc})") from exc
    model = WaveVAE(cfg)
    load_weights(model, tensors, path)
    return model.to(device).eval(), info


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_vae(model: WaveVAE, scenes: int = 8, seconds: float = 4.0, seed: int = 20_000) -> dict:
    """Reconstruct held-out scenes through encode(mean) -> streaming decode; average the metrics."""
    from training.metrics import compare
    from training.render import headroom_gain, render_audio
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    cfg = model.cfg
    device = next(model.parameters()).device
    rows = []
    for i in range(scenes):
        spec = parse_scene(random_scene(seed + i, duration=seconds, sample_rate=cfg.sample_rate))
        ref = render_audio(spec)
        ref = ref * headroom_gain(ref)
        n = ref.shape[1] // cfg.hop * cfg.hop
        ref = ref[:, :n]
        with torch.no_grad():
            z = model.encode(torch.from_numpy(ref).float()[None].to(device))[0]  # (2, D, L)
            state = model.decoder.init_state(2, device)
            chunks = [model.decoder.step(z[..., k:k + 5], state) for k in range(0, z.shape[-1], 5)]
            est = torch.cat(chunks, -1)[:, 0].double().cpu().numpy()
        rows.append(compare(ref, est, cfg.sample_rate))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "frames"}


# ---------------------------------------------------------------------------------------------- training


def train_vae(cfg: TrainVAEConfig, out_dir: Path | str, resume: bool = False, device: str | None = None,
              progress: bool = True) -> Path:
    """Train, evaluate and checkpoint into out_dir (vae.safetensors, vae.optimizer.safetensors, log.jsonl)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = WaveVAE(cfg.vae).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
    ckpt, opt_ckpt = out_dir / "vae.safetensors", out_dir / "vae.optimizer.safetensors"
    step, wall = 0, 0.0
    if resume and ckpt.exists():
        tensors, info = load_checkpoint(ckpt, "vae")
        if VAEConfig.from_json(info["config"]) != cfg.vae:
            raise ValueError(f"{ckpt}: VAE config differs from the training config; cannot resume")
        load_weights(model, tensors, ckpt)
        o_tensors, o_info = load_checkpoint(opt_ckpt, "vae-optimizer")
        restore_optimizer(optimizer, {k: v.to(device) for k, v in o_tensors.items()}, o_info)
        step, wall = info["step"], info.get("wall_seconds", 0.0)
        rng = np.random.default_rng([cfg.seed, step])
    (out_dir / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    pool = ScenePool(cfg, rng)
    use_bf16 = device.startswith("cuda")
    log = open(out_dir / "log.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="train vae", unit="step", disable=not progress)

    def checkpoint(extra=None):
        info = {"wall_seconds": wall, "device": device, **(extra or {})}
        save_vae(ckpt, model, cfg, step, info)
        o_tensors, o_info = optimizer_tensors(optimizer)
        save_checkpoint(opt_ckpt, o_tensors, "vae-optimizer", {**o_info, "step": step})

    while step < cfg.steps:
        start = time.perf_counter()
        audio = pool.batch().to(device)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            recon, mean, logvar = model(audio)
        losses = vae_loss(cfg, audio, recon, mean, logvar)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        wall += time.perf_counter() - start
        if step % cfg.refresh_every == 0:
            pool.refresh()
        bar.update()
        bar.set_postfix(loss=f"{losses['loss'].item():.3f}")
        record = {"step": step, **{k: round(v.item(), 5) for k, v in losses.items()}}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            record["eval"] = evaluate_vae(model, cfg.eval_scenes)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record["eval"].items()))
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint({"eval": record.get("eval")})
    bar.close()
    log.close()
    return ckpt
