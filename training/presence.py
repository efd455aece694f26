"""`visaudio train presence`: turn on the off-screen hold (engine/interaural.py) for a trained model.

Two parts, both fitted on top of a frozen binaural model:

* the direction table: the measured head's interaural transfer for every azimuth (1 degree apart,
  elevation 0), measured the way the transfer head's labels are (`interaural.labels` on white noise
  rendered through the HRTF set the scene engine uses), so a held direction decodes like a seen one;
* the presence head: a logistic regression on the frame encoder's spatial grid that tells whether a
  sounding source is on screen (a sounding source is drawn larger and brighter). For caches of the
  scene engine's random scenes the label is re-derived from the scene (`sounding_on_screen`; frames
  only, ~25 ms a scene); otherwise the cache's `visible_dominant` mask stands in (which also asks
  that the source dominate the mix, which one frame cannot show: held-out accuracy 0.75 against 0.68
  for always saying no, measured). Plain cross-entropy, no class reweighting: a false "seen"
  overwrites the held direction with the head's guess, so precision matters more than recall.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def direction_table(vae, hrtf_name: str = "axd1", seconds: float = 2.0, seed: int = 0) -> torch.Tensor:
    """(TABLE_AZIMUTHS, PARAMS) transfer in network units for azimuth -180..180, elevation 0."""
    from engine.interaural import TABLE_AZIMUTHS, band_matrix, labels
    from training.hrtf import load_hrtf

    rate = vae.cfg.sample_rate
    hrtf = load_hrtf(hrtf_name, rate)
    hop = vae.cfg.hop
    n = int(seconds * rate) // (4 * hop) * 4 * hop  # the steady-state 3/4 of it in whole VAE hops
    noise = np.fft.rfft(np.random.default_rng(seed).standard_normal(n), 2 * n)
    omega = 2 * np.pi * np.fft.rfftfreq(2 * n, 1 / rate)
    azimuths = np.linspace(-180.0, 180.0, TABLE_AZIMUTHS)
    filters, onsets = hrtf.lookup(azimuths, np.zeros_like(azimuths))  # (A, 2, L), (A, 2) seconds
    bands = band_matrix(vae.cfg)
    rows = []
    for f, onset in zip(filters, onsets):
        spectrum = noise * np.fft.rfft(f, 2 * n) * np.exp(-1j * omega * onset[:, None])  # (2, bins)
        ears = torch.from_numpy(np.fft.irfft(spectrum, 2 * n)[:, n // 4:n]).float()  # steady state
        params, weights = labels(vae.spectra(ears), vae.cfg, bands)
        rows.append(params[weights[:, 1] > 0].mean(0))
    return torch.stack(rows)


def sounding_on_screen(cache_dir: str) -> np.ndarray | None:
    """(N, F) bool per cached clip and frame: some sounding source is on screen, from the scene engine
    (for clips named "seed:S", rendered by build_cache); None when any clip is not one of those."""
    import json

    from training.render import render_frames
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    index = json.loads((Path(cache_dir) / "index.json").read_text())
    if not all(str(c).startswith("seed:") for c in index["clips"]):
        return None
    out = []
    for clip in index["clips"]:
        spec = random_scene(int(clip[5:]), duration=index["seconds"])
        spec["frame_size"] = [16, 16]  # visibility is a projection test: independent of the image size
        _, _, frames = render_frames(parse_scene(spec))
        out.append([any(s["visible"] and s["active"] for s in f["sources"]) for f in frames])
    return np.asarray(out, bool)


def grid_features(flow, frames: np.ndarray, batch: int = 512) -> torch.Tensor:
    """(N, S, S, 3) uint8 frames -> (N, grid^2 * width) flattened frame-encoder grids."""
    with torch.no_grad():
        return torch.cat([flow.encode_frames(torch.from_numpy(np.ascontiguousarray(frames[i:i + batch]))).flatten(1)
                          for i in range(0, len(frames), batch)])


def sample_frames(cache, labels: np.ndarray, clips: range, count: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` random (frame, label) pairs from the given clips."""
    clip = rng.choice(np.asarray(clips), count)
    frame = rng.integers(0, cache.frames.shape[1], count)
    order = np.lexsort((frame, clip))  # memory-mapped reads in file order
    clip, frame = clip[order], frame[order]
    return np.stack([cache.frames[c, f] for c, f in zip(clip, frame)]), labels[clip, frame]


def scores(logits: torch.Tensor, truth: torch.Tensor) -> dict:
    said = logits > 0
    truth = truth.bool()
    true_pos = float((said & truth).sum())
    return {"accuracy": float((said == truth).float().mean()), "base_rate": float(truth.float().mean()),
            "precision": true_pos / max(float(said.sum()), 1.0), "recall": true_pos / max(float(truth.sum()), 1.0)}


def train_presence(model, cache_dir: str, frames: int = 24000, holdout_clips: int = 32, epochs: int = 60,
                   lr: float = 3e-3, seed: int = 0, progress: bool = True) -> tuple[object, dict]:
    """A copy of `model` with offscreen_hold on: its direction table and a trained presence head."""
    from tqdm import tqdm

    from engine.flow import FlowNet
    from engine.model import BinauralModel
    from training.scene_cache import load_cache

    if not model.flow.cfg.interaural:
        raise ValueError("the off-screen hold needs a model with the interaural transfer head")
    started = time.monotonic()
    flow = FlowNet(replace(model.flow.cfg, offscreen_hold=True), pretrained_vision=False)
    missing = flow.load_state_dict(model.flow.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["direction_table", "presence_head.bias", "presence_head.weight"], missing
    flow.eval()
    flow.direction_table.copy_(direction_table(model.vae))
    cache = load_cache(cache_dir)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    labels = sounding_on_screen(cache_dir)
    label_name = "visible_dominant" if labels is None else "sounding_on_screen"
    labels = np.asarray(cache.visible_dominant) if labels is None else labels
    train = sample_frames(cache, labels, range(len(cache) - holdout_clips), frames, rng)
    held = sample_frames(cache, labels, range(len(cache) - holdout_clips, len(cache)), max(frames // 8, 1), rng)
    x, y = grid_features(flow, train[0]), torch.from_numpy(train[1]).float()
    xh, yh = grid_features(flow, held[0]), torch.from_numpy(held[1]).float()
    mean, std = x.mean(0), x.std(0) + 1e-6  # standardised inputs, folded into the layer afterwards
    head = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xs = (x - mean) / std
    for _ in tqdm(range(epochs), desc="presence head", disable=not progress):
        for idx in torch.randperm(len(xs)).split(1024):
            optimizer.zero_grad()
            loss_fn(head(xs[idx])[:, 0], y[idx]).backward()
            optimizer.step()
    with torch.no_grad():
        flow.presence_head.weight.copy_(head.weight / std)
        flow.presence_head.bias.copy_(head.bias - (head.weight / std) @ mean)
        report = {"train": scores(flow.presence_head(x)[:, 0], y), "held_out": scores(flow.presence_head(xh)[:, 0], yh),
                  "labels": label_name, "frames": frames, "held_out_frames": len(yh), "epochs": epochs,
                  "seconds": round(time.monotonic() - started, 1)}
    out = BinauralModel(model.vae, flow, model.sampler, model.role).eval()
    return out, report


def write_presence(checkpoint: str, cache_dir: str, out: Path | str, **kwargs) -> dict:
    """Load a model checkpoint, turn the hold on, write it to `out` (float32: `visaudio pack` to ship)."""
    from engine.model import load_model, provenance, save_model

    model, info = load_model(checkpoint)
    held, report = train_presence(model, cache_dir, **kwargs)
    save_model(out, held, {**provenance(info), "presence": report, "presence_from": Path(checkpoint).name})
    return report
