"""Per-frame heads fitted on a frozen binaural model: `visaudio train presence` turns on the
off-screen hold (engine/interaural.py), `visaudio train silence` the silence gate (engine/gate.py),
`visaudio train transfer` refits the interaural transfer head (`train_transfer`).

The presence head is a logistic regression on the frame encoder's spatial grid: the grid already
says where things are, so a few thousand labelled frames fit it in a minute. The silence head is a
small CNN on the pixels (engine/gate.py says why). One fitting loop serves both (`fit_frame_head`).
The off-screen hold has two parts:

* the direction table: the measured head's interaural transfer for every azimuth (1 degree apart,
  elevation 0), measured the way the transfer head's labels are (`interaural.labels` on white noise
  rendered through the HRTF set the scene engine uses), so a held direction decodes like a seen one;
* the presence head: a logistic regression on the frame encoder's spatial grid that tells whether a
  sounding source is on screen (a sounding source is drawn larger and brighter). For caches of the
  scene engine's random scenes the label is re-derived from the scene (`on_screen_states`; frames
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


def direction_table(vae, bands_hz: tuple[float, ...], hrtf_name: str = "axd1", seconds: float = 2.0,
                    seed: int = 0) -> torch.Tensor:
    """(TABLE_AZIMUTHS, 1 + len(bands_hz)) transfer in network units for azimuth -180..180, elevation 0."""
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
    bands = band_matrix(vae.cfg, bands_hz)
    rows = []
    for f, onset in zip(filters, onsets):
        spectrum = noise * np.fft.rfft(f, 2 * n) * np.exp(-1j * omega * onset[:, None])  # (2, bins)
        ears = torch.from_numpy(np.fft.irfft(spectrum, 2 * n)[:, n // 4:n]).float()  # steady state
        params, weights = labels(vae.spectra(ears), vae.cfg, bands)
        rows.append(params[weights[:, 1] > 0].mean(0))
    return torch.stack(rows)


def on_screen_states(cache_dir: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per cached clip and frame (N, F) bools, from the scene engine (for clips named "seed:S",
    rendered by build_cache): (some source is on screen, some sounding source is on screen); None
    when any clip is not one of those."""
    import json

    from training.render import render_frames
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    index = json.loads((Path(cache_dir) / "index.json").read_text())
    if not all(str(c).startswith("seed:") for c in index["clips"]):
        return None
    shown, sounding = [], []
    for clip in index["clips"]:
        spec = random_scene(int(clip[5:]), duration=index["seconds"])
        spec["frame_size"] = [16, 16]  # visibility is a projection test: independent of the image size
        _, _, frames = render_frames(parse_scene(spec))
        shown.append([any(s["visible"] for s in f["sources"]) for f in frames])
        sounding.append([any(s["visible"] and s["active"] for s in f["sources"]) for f in frames])
    return np.asarray(shown, bool), np.asarray(sounding, bool)


def grid_features(flow, frames: np.ndarray, batch: int = 512) -> torch.Tensor:
    """(N, S, S, 3) uint8 frames -> (N, grid^2 * width) flattened frame-encoder grids."""
    with torch.no_grad():
        return torch.cat([flow.encode_frames(torch.from_numpy(np.ascontiguousarray(frames[i:i + batch]))).flatten(1)
                          for i in range(0, len(frames), batch)])


def sample_frames(cache, labels: np.ndarray, clips: range, count: int, rng: np.random.Generator,
                  always: np.ndarray | None = None, pairs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`count` random (frame, label) pairs from the given clips, plus every frame of those clips that
    `always` (N, F) marks. With `pairs`, each frame comes after the one before it, (N, 2, S, S, 3)
    (a clip's first frame after itself), as engine.gate.frame_pairs gives the silence head."""
    clip = rng.choice(np.asarray(clips), count)
    frame = rng.integers(0, cache.frames.shape[1], count)
    if always is not None:
        extra_clip, extra_frame = np.nonzero(always[clips.start:clips.stop])
        clip, frame = np.concatenate([clip, extra_clip + clips.start]), np.concatenate([frame, extra_frame])
    order = np.lexsort((frame, clip))  # memory-mapped reads in file order
    clip, frame = clip[order], frame[order]
    pick = (lambda f: [max(f - 1, 0), f]) if pairs else (lambda f: f)
    return np.stack([cache.frames[c, pick(f)] for c, f in zip(clip, frame)]), labels[clip, frame]


def scores(logits: torch.Tensor, truth: torch.Tensor) -> dict:
    said = logits > 0
    truth = truth.bool()
    true_pos = float((said & truth).sum())
    return {"accuracy": float((said == truth).float().mean()), "base_rate": float(truth.float().mean()),
            "precision": true_pos / max(float(said.sum()), 1.0), "recall": true_pos / max(float(truth.sum()), 1.0)}


def silence_labels(cache, cache_dir: str) -> tuple[np.ndarray, str]:
    """(N, F, 2) bool per cached clip and frame: the silence head's two factors (engine/gate.py),
    (a source is on screen, a sounding source is on screen), and the labels' name. For the scene
    engine's caches both come from the scene ("on_screen_states"); for other clips every frame counts
    as showing its sources and "sounding" is measured on the audio ("audio_level": not silent by
    engine.gate.silence_labels), which off-screen sounds blur."""
    from engine.gate import silence_labels as clip_labels

    states = on_screen_states(cache_dir)
    if states is not None:
        return np.stack(states, axis=-1), "on_screen_states"
    count = cache.frames.shape[1]
    silent = np.stack([clip_labels(cache.audio[i], cache.sample_rate, cache.fps, count) for i in range(len(cache))])
    return np.stack([np.ones_like(silent), ~silent], axis=-1), "audio_level"


def with_head(model, **flags):
    """A copy of `model` whose FlowConfig has `flags` set, with every existing weight whose shape the
    flags leave alone carried over; returns (model, names of the new parameters and buffers)."""
    from engine.flow import FlowNet
    from engine.model import BinauralModel

    if not model.flow.cfg.interaural:
        raise ValueError("frame heads need a binaural model with the interaural transfer head")
    flow = FlowNet(replace(model.flow.cfg, **flags), pretrained_vision=False)
    shapes = {k: v.shape for k, v in flow.state_dict().items()}
    kept = {k: v for k, v in model.flow.state_dict().items() if shapes.get(k) == v.shape}
    missing = flow.load_state_dict(kept, strict=False).missing_keys
    return BinauralModel(model.vae, flow.eval(), model.sampler, model.role).eval(), sorted(missing)


def _logits(head: torch.nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return torch.cat([head(x[i:i + batch]) for i in range(0, len(x), batch)])


def _fold_standardisation(linear: torch.nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make a Linear layer fitted on (x - mean) / std read x itself."""
    with torch.no_grad():
        linear.bias.sub_(linear.weight @ (mean / std))
        linear.weight.div_(std)


def fit_frame_head(head: torch.nn.Module, flow, cache, labels: np.ndarray, name: str, frames: int = 24000,
                   holdout_clips: int = 32, epochs: int = 60, lr: float = 3e-3, batch: int = 1024, seed: int = 0,
                   progress: bool = True, always: np.ndarray | None = None) -> dict:
    """Fit `head` in place, from a fresh initialisation, on `frames` random cache frames with their
    `labels` (N, F, K), plus every frame that `always` (N, F) marks; the last `holdout_clips` clips
    are held out. A Linear head reads the flow's frame grid (standardised for the fit, the scaling
    folded into it afterwards); any other module reads the pixels of each frame and the one before
    it (engine.gate.frame_pairs). Plain cross-entropy per logit, no class reweighting. Returns the
    report (scores of each logit on the training and held-out frames, and on the held-out clips'
    `always` frames)."""
    from tqdm import tqdm

    started = time.monotonic()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    on_grid = isinstance(head, torch.nn.Linear)
    train = sample_frames(cache, labels, range(len(cache) - holdout_clips), frames, rng, always, pairs=not on_grid)
    held_clips = range(len(cache) - holdout_clips, len(cache))
    held = sample_frames(cache, labels, held_clips, max(frames // 8, 1), rng, pairs=not on_grid)
    y, yh = torch.from_numpy(train[1]).float(), torch.from_numpy(held[1]).float()

    def head_inputs(raw: np.ndarray) -> torch.Tensor:
        return grid_features(flow, raw) if on_grid else torch.from_numpy(raw)

    x, xh = head_inputs(train[0]), head_inputs(held[0])
    if on_grid:
        mean, std = x.mean(0), x.std(0) + 1e-6
        inputs = (x - mean) / std
    else:
        inputs = x
    for layer in head.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in tqdm(range(epochs), desc=f"{name} head", disable=not progress):
        for idx in torch.randperm(len(inputs)).split(batch):
            optimizer.zero_grad()
            loss_fn(head(inputs[idx]), y[idx]).backward()
            optimizer.step()
    with torch.no_grad():
        if on_grid:
            _fold_standardisation(head, mean, std)
        fitted, held_logits = _logits(head, x), _logits(head, xh)
        report = {"train": [scores(fitted[:, k], y[:, k]) for k in range(y.shape[1])],
                  "held_out": [scores(held_logits[:, k], yh[:, k]) for k in range(y.shape[1])], "frames": len(y),
                  "held_out_frames": len(yh), "epochs": epochs}
        if always is not None and always[held_clips.start:].any():
            marked_x, marked_y = sample_frames(cache, labels, held_clips, 0, rng, always, pairs=not on_grid)
            marked = _logits(head, head_inputs(marked_x))
            marked_y = torch.from_numpy(marked_y).float()
            report["held_out_always"] = [scores(marked[:, k], marked_y[:, k]) for k in range(y.shape[1])]
        return {**report, "seconds": round(time.monotonic() - started, 1)}


def train_presence(model, cache_dir: str, progress: bool = True, **fit) -> tuple[object, dict]:
    """A copy of `model` with offscreen_hold on: its direction table and a trained presence head."""
    from training.scene_cache import load_cache

    out, missing = with_head(model, offscreen_hold=True)
    assert missing == ["direction_table", "presence_head.bias", "presence_head.weight"], missing
    out.flow.direction_table.copy_(direction_table(model.vae, out.flow.cfg.ild_bands_hz))
    cache = load_cache(cache_dir)
    states = on_screen_states(cache_dir)
    label_name = "visible_dominant" if states is None else "sounding_on_screen"
    labels = (np.asarray(cache.visible_dominant) if states is None else states[1])[..., None]
    report = fit_frame_head(out.flow.presence_head, out.flow, cache, labels, "presence", progress=progress, **fit)
    return out, {**report, "labels": label_name}


def switching_frames(labels: np.ndarray) -> np.ndarray:
    """(N, F) bool: the frames where any of the labels (N, F, K) differs from the frame before."""
    out = np.zeros(labels.shape[:2], bool)
    out[:, 1:] = (labels[:, 1:] != labels[:, :-1]).any(axis=-1)
    return out


def train_silence(model, cache_dir: str, progress: bool = True, frames: int = 48000, epochs: int = 6,
                  lr: float = 2e-3, batch: int = 256, **fit) -> tuple[object, dict]:
    """A copy of `model` with silence_gate on and a trained silence head (engine/gate.py): the CNN
    learns from pixels, so more frames and fewer, smaller-batch epochs than a grid head. Every frame
    where the labels switch (an event's first frame, with its flash; a source entering the view) is
    added to the random ones: those frames time the onsets, and a uniform draw holds few of them."""
    from training.scene_cache import load_cache

    out, missing = with_head(model, silence_gate=True)
    assert all(k.startswith("silence_head.") for k in missing), missing  # none: a refit
    cache = load_cache(cache_dir)
    labels, label_name = silence_labels(cache, cache_dir)
    report = fit_frame_head(out.flow.silence_head, out.flow, cache, labels, "silence", frames=frames, epochs=epochs,
                            lr=lr, batch=batch, progress=progress, always=switching_frames(labels), **fit)
    return out, {**report, "labels": label_name}


def transfer_examples(model, cache, clips: range, progress: bool = True) -> tuple[torch.Tensor, ...]:
    """The frames of `clips` in which one visible source dominates (the only frames the transfer head
    is supervised in; train_flow.seen_transfer_labels): their grid features (N, grid^2 * width), the
    labels of their latents (N, latents_per_frame, transfer params) and the labels' weights (N, lpf, 2)."""
    from tqdm import tqdm

    from engine.interaural import band_matrix
    from training.train_flow import seen_transfer_labels

    vae, lpf = model.vae, model.flow.cfg.latents_per_frame
    bands = band_matrix(vae.cfg, model.flow.cfg.ild_bands_hz)
    features, targets, weights = [], [], []
    with torch.no_grad():
        for i in tqdm(clips, desc="transfer labels", disable=not progress):
            audio = torch.from_numpy(np.array(cache.audio[i]))
            audio = audio[:, :audio.shape[-1] // vae.cfg.hop * vae.cfg.hop]
            seen = np.asarray(cache.visible_dominant[i])
            params, weight = seen_transfer_labels(vae, audio, seen, lpf, bands)
            count = min(len(seen), len(params) // lpf)
            params = params[:count * lpf].reshape(count, lpf, -1)
            weight = weight[:count * lpf].reshape(count, lpf, -1)
            keep = np.flatnonzero(weight.sum((1, 2)).numpy() > 0)
            if len(keep):
                features.append(grid_features(model.flow, np.asarray(cache.frames[i][keep])))
                targets.append(params[keep])
                weights.append(weight[keep])
    if not features:
        raise ValueError("no frame of these clips has a dominant visible source (visible_dominant): nothing to fit")
    return torch.cat(features), torch.cat(targets), torch.cat(weights)


def train_transfer(model, cache_dir: str, progress: bool = True, frames: int | None = None, epochs: int = 40,
                   lr: float = 1e-3, batch: int = 1024, holdout_clips: int = 200, seed: int = 0,
                   ild_bands_hz: tuple[float, ...] | None = None, ild_only: bool = False) -> tuple[object, dict]:
    """A copy of `model` with its interaural transfer head refitted, from a fresh initialisation, on
    the frozen frame encoder: the head is a function of one frame's grid, so its features are
    computed once and a cache larger than the flow's training set fits it in minutes (jointly with
    the flow it was seen only in training windows, and its held-out loss rose after step 3500 of
    4000). Loss: train_flow.transfer_loss; inputs standardised for the fit (folded in afterwards);
    the epoch with the lowest loss on the last `holdout_clips` clips is kept. `frames` caps the
    training frames (a random subset). `ild_bands_hz` gives the head other ILD bands (FlowConfig.
    ild_bands_hz; the off-screen hold's direction table is measured again for them). The report gives
    that held-out loss for the refit and, on the same frames, for the model's own head (None when
    the bands changed: its outputs are other quantities). `ild_only` keeps the head's hidden layer
    and ITD output, and with them where it places sources, and fits only the band ILD outputs, a
    linear map of the hidden features, starting from the head's own ILD curve read at the new
    bands' centres (a whole refit with new bands re-learnt the ITD from fewer frames than the joint
    training had, and placed sources worse: in-view ITD 129 against 123 us on the 200 eval scenes)."""
    from training.scene_cache import load_cache

    started = time.monotonic()
    bands = None if ild_bands_hz is None else tuple(float(f) for f in ild_bands_hz)
    bands_changed = bands is not None and bands != model.flow.cfg.ild_bands_hz
    out, missing = with_head(model, **({"ild_bands_hz": bands} if bands_changed else {}))
    assert set(missing) <= {"transfer_head.2.weight", "transfer_head.2.bias", "direction_table"}, missing
    if "direction_table" in missing:
        out.flow.direction_table.copy_(direction_table(model.vae, out.flow.cfg.ild_bands_hz))
    cache = load_cache(cache_dir)
    if len(cache) <= holdout_clips:
        raise ValueError(f"{cache_dir}: {len(cache)} clips, need more than the {holdout_clips} held out")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x, y, w = transfer_examples(out, cache, range(len(cache) - holdout_clips), progress)
    if frames is not None and frames < len(x):
        pick = torch.from_numpy(np.sort(rng.choice(len(x), frames, replace=False)))
        x, y, w = x[pick], y[pick], w[pick]
    xh, yh, wh = transfer_examples(out, cache, range(len(cache) - holdout_clips, len(cache)), progress)
    head = out.flow.transfer_head
    before = None if bands_changed else round(_transfer_loss_of(head, xh, yh, wh, batch), 4)
    if ild_only:
        start, best, best_epoch, history = _fit_ild_outputs(
            head, model.flow.transfer_head, model.flow.cfg.ild_bands_hz, out.flow.cfg.ild_bands_hz, (x, y, w),
            (xh, yh, wh), epochs, lr, batch, progress)
        fitted = {"fitted": "ild outputs", "held_out_loss_start": round(start, 4)}
    else:
        best, best_epoch, history = _fit_whole_head(head, (x, y, w), (xh, yh, wh), epochs, lr, batch, progress)
        fitted = {"fitted": "whole head"}
    report = {"held_out_loss_before": before, **fitted, "held_out_loss": round(best, 4), "best_epoch": best_epoch,
              "held_out_history": history, "frames": len(x), "held_out_frames": len(xh),
              "held_out_clips": holdout_clips, "epochs": epochs, "labels": "visible_dominant",
              "seconds": round(time.monotonic() - started, 1)}
    return out, report


def _transfer_loss_of(head, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, batch: int) -> float:
    from training.train_flow import transfer_loss

    with torch.no_grad():
        predicted = _logits(head, x, batch)
        return float(transfer_loss(predicted[:, None].expand_as(target), target, weight))


def _keep_best_epoch(module, optimizer, batch_loss, held_loss, count: int, epochs: int, batch: int, start: float,
                     desc: str, progress: bool) -> tuple[float, int, list]:
    """Epochs of shuffled batches (batch_loss(indices) -> loss), the held-out loss after each; `module`
    ends with the state of the best epoch, or as it began where none beat `start`. Returns (best loss,
    its epoch (0: the start), the held-out history)."""
    from tqdm import tqdm

    best, best_epoch, history = start, 0, []
    best_state = {k: v.clone() for k, v in module.state_dict().items()}
    for epoch in tqdm(range(1, epochs + 1), desc=desc, disable=not progress):
        for idx in torch.randperm(count).split(batch):
            optimizer.zero_grad()
            batch_loss(idx).backward()
            optimizer.step()
        with torch.no_grad():
            held = held_loss()
        history.append(round(held, 4))
        if held < best:
            best, best_epoch = held, epoch
            best_state = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(best_state)
    return best, best_epoch, history


def _fit_whole_head(head, train, held, epochs: int, lr: float, batch: int, progress: bool) -> tuple[float, int, list]:
    """train_transfer's whole refit: `head` from a fresh initialisation on standardised grid features
    (folded back in afterwards); returns (best held-out loss, its epoch, the held-out history)."""
    from training.train_flow import transfer_loss

    (x, y, w), (xh, yh, wh) = train, held
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xh = (x - mean) / std, (xh - mean) / std
    for layer in head.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    best, best_epoch, history = _keep_best_epoch(
        head, optimizer, lambda idx: transfer_loss(head(x[idx])[:, None].expand_as(y[idx]), y[idx], w[idx]),
        lambda: _transfer_loss_of(head, xh, yh, wh, batch), len(x), epochs, batch, float("inf"), "transfer head",
        progress)
    _fold_standardisation(head[0], mean, std)
    return best, best_epoch, history


def _fit_ild_outputs(head, own, own_hz, new_hz, train, held, epochs: int, lr: float, batch: int,
                     progress: bool) -> tuple[float, float, int, list]:
    """train_transfer's `ild_only`: `head` (the copy, hidden layer carried over) gets `own`'s ITD output
    and band ILD outputs fitted on its frozen hidden features; returns the held-out loss at the start
    (`own`'s ILD curve carried over), the best one, its epoch (0: the start) and the history."""
    from engine.interaural import triangles
    from training.train_flow import transfer_loss

    carry = triangles(torch.tensor(new_hz), own_hz)  # (K own, K new): own band values -> the new centres
    last, hidden = head[-1], head[:-1]
    ild = torch.nn.Linear(last.in_features, last.out_features - 1)
    with torch.no_grad():
        ild.weight.copy_(carry.T @ own[-1].weight[1:])
        ild.bias.copy_(carry.T @ own[-1].bias[1:])
        last.weight[:1], last.bias[:1] = own[-1].weight[:1], own[-1].bias[:1]
        (h, y, w), (hh, yh, wh) = [(_logits(hidden, x, batch), y, w) for x, y, w in (train, held)]
        itd, itd_held = _logits(last, h, batch)[:, :1], _logits(last, hh, batch)[:, :1]

    def loss_of(features, itd_part, target, weight) -> torch.Tensor:
        predicted = torch.cat([itd_part, ild(features)], -1)
        return transfer_loss(predicted[:, None].expand_as(target), target, weight)

    optimizer = torch.optim.Adam(ild.parameters(), lr=lr)
    with torch.no_grad():
        start = float(loss_of(hh, itd_held, yh, wh))
    best, best_epoch, history = _keep_best_epoch(
        ild, optimizer, lambda idx: loss_of(h[idx], itd[idx], y[idx], w[idx]),
        lambda: float(loss_of(hh, itd_held, yh, wh)), len(h), epochs, batch, start, "transfer head ILDs", progress)
    with torch.no_grad():
        last.weight[1:], last.bias[1:] = ild.weight, ild.bias
    return start, best, best_epoch, history


def write_frame_head(kind: str, checkpoint: str, cache_dir: str, out: Path | str, **kwargs) -> dict:
    """Load a model checkpoint, fit its `kind` head ("presence", "silence" or "transfer"), write it to `out`
    (float32: `visaudio pack` to ship). Returns the fit report."""
    from engine.model import load_model, provenance, save_model

    model, info = load_model(checkpoint)
    fit = {"presence": train_presence, "silence": train_silence, "transfer": train_transfer}[kind]
    trained, report = fit(model, cache_dir, **kwargs)
    save_model(out, trained, {**provenance(info), kind: report, f"{kind}_from": Path(checkpoint).name})
    return report
