"""`visaudio show`: one picture of a clip: frames, both ears, and the interaural cues against the metadata."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.geometry import lateral_angle
from training.clips import read_clip
from training.metrics import DIRECTION_MIN_COHERENCE, binaural_cues, lateral_from_cues, meta_tracks


def show_clip(clip_dir: Path | str, out_png: Path | str | None = None, frames_shown: int = 5) -> Path:
    """Write a PNG summary of a clip (default: DIR/summary.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clip = read_clip(clip_dir)
    out_png = Path(out_png) if out_png else Path(clip_dir) / "summary.png"
    cues = binaural_cues(clip.audio, clip.sample_rate)
    lateral, _ = lateral_from_cues(cues)
    t_audio = np.arange(clip.audio.shape[1]) / clip.sample_rate

    fig = plt.figure(figsize=(12, 10), constrained_layout=True)
    grid = fig.add_gridspec(4, frames_shown, height_ratios=[1.1, 1, 1, 1])
    picks = np.linspace(0, len(clip.frames) - 1, frames_shown).astype(int)
    for k, f in enumerate(picks):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(clip.frames[f])
        ax.set_title(f"t = {f / clip.fps:.2f} s", fontsize=9)
        ax.axis("off")

    ax = fig.add_subplot(grid[1, :])
    ax.plot(t_audio, clip.audio[0], lw=0.4, label="left (ch 0)", color="tab:blue")
    ax.plot(t_audio, -clip.audio[1], lw=0.4, label="right (ch 1, inverted)", color="tab:red")
    ax.set_ylabel("amplitude")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(0, t_audio[-1])

    ax_itd = fig.add_subplot(grid[2, :], sharex=ax)
    active = cues.active
    ax_itd.plot(cues.times[active], cues.itd[active] * 1e6, ".", ms=3, color="k", label="ITD (GCC-PHAT)")
    ax_ild = ax_itd.twinx()
    ax_ild.plot(cues.times[active], cues.broadband_ild[active], ".", ms=3, color="tab:orange", label="ILD")
    ax_itd.set_ylabel("ITD (us, + = left leads)")
    ax_ild.set_ylabel("ILD (dB, + = left louder)", color="tab:orange")
    ax_itd.legend(loc="upper left", fontsize=8)

    ax_lat = fig.add_subplot(grid[3, :], sharex=ax)
    coherent = active & (cues.coherence >= DIRECTION_MIN_COHERENCE)
    ax_lat.plot(cues.times[active & ~coherent], lateral[active & ~coherent], ".", ms=3, color="0.7",
                label="estimated, ears incoherent (not scored)")
    ax_lat.plot(cues.times[coherent], lateral[coherent], ".", ms=3, color="k", label="estimated from audio")
    if clip.meta is not None:
        times, az, el, act, vis = meta_tracks(clip.meta)
        truth = lateral_angle(az, el)
        for s, src in enumerate(clip.meta["scene"]["sources"]):
            line = ax_lat.plot(times, np.where(act[:, s], truth[:, s], np.nan), lw=2, alpha=0.7,
                               label=f"{s}: {src['kind']}{'' if src.get('visible', True) else ' (off-screen)'}")
            ax_lat.plot(times, truth[:, s], lw=0.7, ls=":", color=line[0].get_color())
    ax_lat.set_ylim(-95, 95)
    ax_lat.set_ylabel("lateral angle (deg, + = left)")
    ax_lat.set_xlabel("time (s)")
    ax_lat.legend(loc="upper right", fontsize=8, ncol=2)
    fig.suptitle(f"{Path(clip_dir).name}: metadata (lines, solid while sounding) vs audio cues (dots)")
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
