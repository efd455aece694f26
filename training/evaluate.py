"""`visaudio eval`: held-out scenes through the streaming hop loop, scored with the foundation metrics.

Scenes (never seen in training: seeds from EVAL_SEED, training caches start at 1,000,000):
  * single: random BiAudio-style scenes with one visible source (training.sampler.random_scene);
  * head_turn: a fixed source, the head sweeping yaw +-60 degrees (training.sampler.head_turn_scene).
Systems: the model (a distilled student or a teacher), optionally its teacher, and the two baselines on
the mono model: mono copied to both ears, and two-stage (mono + HRTF at the visually localised
direction). All generate through engine.generate, the runtime's hop loop, from the rendered frames and
head pose; the audio of the scene is only the reference. Two ceilings that generate nothing: the
reference through the VAE, and the reference with its room's late tail drawn again (`another_tail`:
a renderer that knew everything in the scene but the tail's noise would differ from the reference
as much), and with `tail_draws` the cue floor (`cue_floor`: per frame, the median cues of several
other tails, and optionally other waveforms of the sources, bracketing the least expected cue error
of a renderer that knows all else).

Reported per system:
  stft_distance, envelope_distance, itd_error_us, ild_error_db, ic_error: mean over single scenes
      (every frame where the reference sounds, the source on screen or not);
  itd_error_us_in_view, ild_error_db_in_view: the same, on the frames the acceptance scopes them to:
      the source visible and within +-60 degrees of straight ahead;
  itd_error_us_direct, ild_error_db_direct: of those, the frames where the reference's ears are
      coherent (>= DIRECTION_MIN_COHERENCE: the direct sound dominates, so the reference has an ITD;
      in rooms the late reverb leaves GCC-PHAT a random lag in both signals);
  itd_error_us_onset, ild_error_db_onset: of the in-view frames, the one that opens on each visible
      event (training.metrics.onset_frames: the first wavefront, before a room's late tail builds up;
      the frames a listener localises a source by in a room, and the ones whose cues the tail's noise
      does not decide);
  frames_in_view, scenes_in_view (and _direct, _onset): how many frames each subset scored, in how
      many scenes (a scene without such a frame is left out of that subset's mean);
  by_acoustics: the in-view, direct and onset ITD/ILD errors again, over the anechoic scenes and the
      room scenes apart (with the scene counts);
  lateral_error_deg: median over frames where the dominant source is visible and within +-60 degrees
      of straight ahead (coherence-gated as in training.metrics.direction_error);
  onset_within_40ms: fraction of visible events with an audio onset within 40 ms (pooled);
  head_turn_correlation: Pearson r of the output's lateral angle (ITD, Woodworth) against the truth over
      the active frames of each head-turn scene, mean over scenes.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.generate import generate_batch
from engine.geometry import lateral_angle
from engine.hop import DecodeStep, HopGeometry
from engine.model import BinauralModel
from training.train_vae import EVAL_SEED

MAX_AZIMUTH = 60.0
HEAD_TURN_SEED = EVAL_SEED + 50_000


@dataclass(eq=False)  # scenes are compared by identity (their arrays have no single truth value)
class EvalScene:
    kind: str  # "single" or "head_turn"
    frames: np.ndarray
    pose: np.ndarray  # (F, 4) t, yaw, pitch, roll
    audio: np.ndarray  # (2, N) reference
    meta: dict
    fps: float
    sample_rate: int
    seed: int


def eval_scenes(count: int, seed: int = EVAL_SEED, head_turns: int | None = None, progress: bool = True) -> list[EvalScene]:
    from tqdm import tqdm

    from training.render import render_scene
    from training.sampler import head_turn_scene, random_scene
    from training.scene_spec import parse_scene

    head_turns = max(4, count // 10) if head_turns is None else head_turns
    specs = [("single", seed + i, random_scene(seed + i, num_sources=1)) for i in range(count)]
    specs += [("head_turn", HEAD_TURN_SEED + seed + i, head_turn_scene(HEAD_TURN_SEED + seed + i)) for i in range(head_turns)]
    out = []
    for kind, s, spec in tqdm(specs, desc="scenes", disable=not progress):
        r = render_scene(parse_scene(spec))
        out.append(EvalScene(kind, r.frames, r.pose, r.audio, r.meta, r.spec.fps, r.spec.sample_rate, s))
    return out


# ------------------------------------------------------------------------------------------ systems


def run_engine(runner, scenes: list[EvalScene], progress: bool = True) -> list[np.ndarray]:
    """Generate every scene through an exported engine (engine/backends.py), one stream at a time,
    fed as the runtime feeds it (engine.generate.run_streams); the engine's own hop and context."""
    from tqdm import tqdm

    from engine.generate import run_streams

    return [run_streams(runner, s.frames[None], s.fps, [s.pose], [s.seed], s.sample_rate)[0]
            for s in tqdm(scenes, desc=f"engine {runner.manifest['precision']}", disable=not progress)]


def run_model(model: BinauralModel, scenes: list[EvalScene], hop_latents: int = 4, batch: int = 16,
              progress: bool = True, steps: int | None = None) -> list[np.ndarray]:
    """Generate every scene through the hop loop, `batch` scenes as parallel streams (with `steps`
    uniform Euler steps instead of the model's own grid, if given)."""
    from tqdm import tqdm

    outs = []
    for i in tqdm(range(0, len(scenes), batch), desc=f"{model.role}", disable=not progress):
        group = scenes[i:i + batch]
        frames = np.stack([s.frames for s in group])
        times = torch.linspace(0.0, 1.0, steps + 1) if steps else None
        outs += list(generate_batch(model, frames, group[0].fps, [s.pose for s in group], [s.seed for s in group],
                                    hop_latents, times))
    return outs


def with_draw(scene: EvalScene, tail_draw: int, sound_draw: int = 0) -> np.ndarray:
    """The scene's reference rendered with other draws of what its picture cannot show: its room's late
    tail (render_audio's tail_draw) and its sources' waveforms (sound_draw: other instances of the same
    kinds and events); draw 0 is the reference's own. The same room, paths, head and reflections."""
    from training.render import render_audio
    from training.scene_spec import parse_scene

    audio = render_audio(parse_scene(scene.meta["scene"]), tail_draw=tail_draw, sound_draw=sound_draw)
    return (audio * scene.meta["mix_gain"]).astype(np.float32)


def another_tail(scenes: list[EvalScene]) -> list[np.ndarray]:
    """Each reference with its room's late tail drawn again (with_draw 1): a diffuse tail of other noise.
    A renderer that knew everything in the scene would still differ from the reference this much.
    Anechoic and head-turn scenes: the reference."""
    return [with_draw(s, 1) if s.kind == "single" and s.meta["scene"].get("room") else s.audio for s in scenes]


def mono_copy(mono_outputs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.repeat(m[:1], 2, axis=0) for m in mono_outputs]


def two_stage(mono_outputs: list[np.ndarray], scenes: list[EvalScene]) -> list[np.ndarray]:
    from training.baselines import localise, spatialise

    out = []
    for m, s in zip(mono_outputs, scenes):
        az, el, _ = localise(s.frames, s.meta["scene"].get("fov", 90.0))
        out.append(spatialise(m[0].astype(np.float64), az, el, s.fps, s.sample_rate))
    return out


# ------------------------------------------------------------------------------------------ metrics


def _cue_subsets(ref_cues, cues, scene: EvalScene) -> tuple[np.ndarray, dict[str, tuple[str, dict]]]:
    """(the in-view frame mask, {subset: (the scene's acoustics, errors_from_cues on the subset's frames)})
    of one single-source scene; a subset without frames in this scene is left out."""
    from training.metrics import DIRECTION_MIN_COHERENCE, errors_from_cues, meta_tracks, onset_frames

    _, az, _, _, visible = meta_tracks(scene.meta)
    f = np.clip(np.rint(ref_cues.times * scene.fps).astype(int), 0, len(az) - 1)
    in_view = visible[f, 0] & (np.abs(az[f, 0]) <= MAX_AZIMUTH)
    acoustics = "room" if scene.meta["scene"].get("room") else "anechoic"
    at_onset = in_view & onset_frames(ref_cues.times, scene.meta)
    subsets = {"in_view": (in_view, 0.0), "direct": (in_view, DIRECTION_MIN_COHERENCE), "onset": (at_onset, 0.0)}
    found = {}
    for name, (frames, coherence) in subsets.items():
        try:
            found[name] = (acoustics, errors_from_cues(ref_cues, cues, frames, coherence))
        except ValueError:  # no such frame in this scene
            pass
    return in_view, found


def _subset_report(found: dict[str, list[tuple[str, dict]]]) -> dict:
    """The in-view, direct and onset ITD/ILD means over scenes, and again split by acoustics."""

    def subset_means(keep) -> dict:
        out = {}
        for name, rows in found.items():
            for key in ("itd_error_us", "ild_error_db"):
                values = [r[key] for acoustics, r in rows if keep(acoustics) and np.isfinite(r[key])]
                out[f"{key}_{name}"] = float(np.mean(values)) if values else None
            kept = [r["frames"] for acoustics, r in rows if keep(acoustics)]
            out[f"frames_{name}"], out[f"scenes_{name}"] = sum(kept), len(kept)
        return out

    result = subset_means(lambda acoustics: True)
    # the same split by the scene's acoustics: a room's reflections and reverb are not in the video
    result["by_acoustics"] = {a: {"scenes": sum(1 for s, _ in found["in_view"] if s == a), **subset_means(a.__eq__)}
                              for a in ("anechoic", "room")}
    return result


def score(outputs: list[np.ndarray], scenes: list[EvalScene]) -> dict:
    """The metrics of one system over the scene set (see the module docstring)."""
    from training.metrics import (binaural_cues, direction_error, envelope_distance, errors_from_cues, meta_tracks,
                                  onset_sync, stft_distance)

    ref_keys = ("stft_distance", "envelope_distance", "itd_error_us", "ild_error_db", "ic_error")
    refs, lateral_errors, hits, events, correlations = [], [], 0, 0, []
    found = {name: [] for name in ("in_view", "direct", "onset")}  # (acoustics, errors on the subset's frames)
    for audio, scene in zip(outputs, scenes):
        audio = np.asarray(audio, np.float64)
        if scene.kind == "single":
            ref_cues, cues = binaural_cues(scene.audio, scene.sample_rate), binaural_cues(audio, scene.sample_rate)
            refs.append({"stft_distance": stft_distance(scene.audio, audio),
                         "envelope_distance": envelope_distance(scene.audio, audio), **errors_from_cues(ref_cues, cues)})
            in_view, subsets = _cue_subsets(ref_cues, cues, scene)
            for name, row in subsets.items():
                found[name].append(row)
            series = direction_error(audio, scene.sample_rate, scene.meta)["series"]
            lateral_errors.append(np.abs(series["estimate"] - series["truth"])[series["scored"] & in_view])
            sync = onset_sync(audio, scene.sample_rate, scene.meta)
            events += sync["events"]
            hits += round((sync["within_40ms"] or 0.0) * sync["events"])
        else:
            times, est, use = lateral_track(audio, scene.sample_rate)
            _, az, el, _, _ = meta_tracks(scene.meta)
            f = np.clip(np.rint(times * scene.fps).astype(int), 0, len(az) - 1)
            truth = lateral_angle(az[f, 0], el[f, 0])
            ok = use.sum() > 2 and np.std(est[use]) > 0
            correlations.append(float(np.corrcoef(est[use], truth[use])[0, 1]) if ok else 0.0)
    result = {k: float(np.mean([r[k] for r in refs])) for k in ref_keys} if refs else {}
    result.update(_subset_report(found))
    pooled = np.concatenate(lateral_errors) if lateral_errors else np.zeros(0)
    result.update(lateral_error_deg=float(np.median(pooled)) if len(pooled) else None,
                  lateral_frames=int(len(pooled)),
                  onset_within_40ms=hits / events if events else None, visible_events=events,
                  head_turn_correlation=float(np.mean(correlations)) if correlations else None)
    return result


def draw_counts(draws: int) -> list[int]:
    """1, 2, 4, ... up to `draws` (and `draws` itself)."""
    return sorted({min(2 ** i, draws) for i in range(int(np.ceil(np.log2(draws))) + 1)})


def cue_floor(scenes: list[EvalScene], draws: int, sound: bool = False, jobs: int = 1, progress: bool = True) -> dict:
    """The least cue error a renderer that knows everything in a scene but its late tail's noise (and,
    with `sound`, its sources' waveforms: what no picture shows) can expect, bracketed per frame and
    band by medians over other draws of those (with_draw), scored on the same subsets as a system:
      * over-estimate: the median cues of k other draws, k = 1, 2, 4, ... draws. Against an unknown
        draw the median is the estimate of least expected absolute error, and the metrics average
        absolute errors; at finite k, E|X - median of k| >= E|X - median|, so it falls as k grows
        (k = 1 is `another_tail`);
      * lower bound: the median of the reference and those k draws. Of k + 1 exchangeable draws the
        sample median has the least summed absolute deviation, so E|X_0 - median of k + 1| <=
        E|X - median|.
    The metrics score the frames (and bands) where the reference sounds, so both medians are taken
    over the draws that sound there as well: the distribution given that the frame sounds, of which
    the reference is one draw.
    A scene with nothing redrawn (anechoic, without `sound`) scores the reference's own cues (0).
    Head-turn scenes are skipped. `jobs` processes share the scenes. Returns {name: cue report}."""
    from tqdm import tqdm

    from training.scene_cache import process_pool

    counts = draw_counts(draws)
    estimates = {"over-estimate": "median of the draws", "lower bound": "median of the draws and the reference"}
    found = {(k, e): {name: [] for name in ("in_view", "direct", "onset")} for k in counts for e in estimates}
    singles = [replace(s, frames=np.zeros(0, np.uint8)) for s in scenes if s.kind == "single"]
    with process_pool(jobs) as pool:
        rows = pool.map(functools.partial(_scene_floor, draws=draws, sound=sound), singles)
        for per_scene in tqdm(rows, total=len(singles), desc="cue floor", disable=not progress):
            for key, subsets in per_scene.items():
                for name, row in subsets.items():
                    found[key][name].append(row)
    what = "tail and sound draws" if sound else "tail draws"
    return {f"truth, {estimates[e]} ({what}: {k}; {e})": {"draws": k, "sound_redrawn": sound, "estimate": e,
                                                          **_subset_report(found[k, e])}
            for k in counts for e in estimates}


def _scene_floor(scene: EvalScene, draws: int, sound: bool) -> dict:
    """cue_floor's rows of one scene: {(k, estimate): {subset: (acoustics, errors)}}."""
    from training.metrics import SILENCE_DB, BinauralCues, binaural_cues

    ref = binaural_cues(scene.audio, scene.sample_rate)
    redrawn = sound or bool(scene.meta["scene"].get("room"))
    drawn = ([binaural_cues(with_draw(scene, d, d if sound else 0), scene.sample_rate) for d in range(1, draws + 1)]
             if redrawn else [ref])

    def median(use: list) -> BinauralCues:
        # the metrics score the frames (and bands) where the reference sounds, so the median is taken over
        # the draws that sound there too: another waveform may be silent where the reference is not, and a
        # silent frame's GCC-PHAT lag is rounding noise
        active = np.array([c.active for c in use])
        loud = np.array([c.band_power > c.band_power.max() * 10 ** (-SILENCE_DB / 10) for c in use])
        return BinauralCues(ref.times, _median_where([c.itd for c in use], active),
                            _median_where([c.ild for c in use], loud), ref.band_power,
                            _median_where([c.coherence for c in use], active), ref.energy_db, ref.active)

    return {(k, e): _cue_subsets(ref, median(use), scene)[1]
            for k in draw_counts(draws)
            for e, use in (("over-estimate", drawn[:k]), ("lower bound", [ref] + drawn[:k]))}


def _median_where(values: list[np.ndarray], where: np.ndarray) -> np.ndarray:
    """Median over the first axis of the entries `where` is True; over all of them where none is."""
    values = np.asarray(values, dtype=np.float64)
    where = where | ~where.any(axis=0, keepdims=True)
    return np.nanmedian(np.where(where, values, np.nan), axis=0)


def lateral_track(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from engine.geometry import woodworth_lateral
    from training.metrics import HEAD_RADIUS, binaural_cues

    cues = binaural_cues(np.asarray(audio, np.float64), sample_rate)
    return cues.times, woodworth_lateral(cues.itd, HEAD_RADIUS), cues.active


def plot_head_turn(outputs: dict[str, np.ndarray], scene: EvalScene, path: Path) -> Path:
    """Lateral angle over time of each system against the metadata for one head-turn scene."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.metrics import meta_tracks

    times, az, el, _, visible = meta_tracks(scene.meta)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(times, lateral_angle(az[:, 0], el[:, 0]), "k-", lw=2.5, label="truth (metadata)")
    ax.fill_between(times, -90, 90, where=~visible[:, 0], color="0.9", label="source off screen")
    for name, audio in outputs.items():
        t, lat, active = lateral_track(audio, scene.sample_rate)
        ax.plot(t, np.where(active, lat, np.nan), ".", ms=3, label=name)
    ax.set(xlabel="time (s)", ylabel="lateral angle (deg, + = left)", ylim=(-90, 90),
           title=f"head-turn scene {scene.seed}: yaw sweeps +-60 deg, fixed source")
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def new_report(scenes: list[EvalScene], hop_latents: int) -> dict:
    return {"scenes": {"single": sum(s.kind == "single" for s in scenes),
                       "head_turn": sum(s.kind == "head_turn" for s in scenes)},
            "hop_latents": hop_latents, "systems": {}}


def evaluate(model: BinauralModel, scenes: list[EvalScene], teacher: BinauralModel | None = None,
             mono: BinauralModel | None = None, teacher_scenes: int | None = None, hop_latents: int = 4,
             plot: Path | None = None, seam_seconds: float = 60.0, baseline_steps: int | None = 10,
             progress: bool = True, engines: dict | None = None, tail_draws: int = 0, redraw_sound: bool = False,
             jobs: int = 1) -> dict:
    """Score the model, its teacher (on the first `teacher_scenes` single scenes + all head turns), the
    baselines (the mono model sampled with `baseline_steps` Euler steps and its CFG) and `engines`
    ({name: opened engine}, e.g. an fp32 and an int8 export), and with `tail_draws` the cue floor
    (cue_floor over that many draws, the sources' waveforms too with `redraw_sound`, in `jobs`
    processes); optionally plot the first head-turn scene."""
    report = new_report(scenes, hop_latents)
    outputs = {}
    with torch.no_grad():  # the ceiling: the ground truth through the VAE (encode -> streaming decode)
        recon = [model.vae.reconstruct(torch.from_numpy(s.audio.astype(np.float32))).numpy() for s in scenes]
    report["systems"]["VAE re-encoded truth"] = score(recon, scenes)
    report["systems"]["truth, another late tail"] = score(another_tail(scenes), scenes)
    if tail_draws:
        report["systems"].update(cue_floor(scenes, tail_draws, redraw_sound, jobs, progress))
    out = run_model(model, scenes, hop_latents, progress=progress)
    report["systems"][model.role] = {"evaluations_per_hop": model.sampler.evaluations, **score(out, scenes)}
    outputs[model.role] = out
    if teacher is not None:
        subset = [s for s in scenes if s.kind == "single"][:teacher_scenes] + [s for s in scenes if s.kind == "head_turn"]
        tout = run_model(teacher, subset, hop_latents, progress=progress)
        report["systems"]["teacher"] = {"evaluations_per_hop": teacher.sampler.evaluations, "scenes": len(subset),
                                        **score(tout, subset)}
        index = {id(s): i for i, s in enumerate(subset)}
        outputs["teacher"] = [tout[index[id(s)]] if id(s) in index else None for s in scenes]
        position = {id(s): i for i, s in enumerate(scenes)}
        report["systems"][f"{model.role} (same scenes as teacher)"] = score([out[position[id(s)]] for s in subset], subset)
    if mono is not None:
        mout = run_model(mono, scenes, hop_latents, progress=progress, steps=baseline_steps)
        report["baseline_sampler"] = {"steps": baseline_steps or len(mono.sampler.times) - 1,
                                      "guidance": mono.sampler.guidance}
        outputs["mono copied"], outputs["two-stage"] = mono_copy(mout), two_stage(mout, scenes)
        report["systems"]["mono copied"] = score(outputs["mono copied"], scenes)
        report["systems"]["two-stage"] = score(outputs["two-stage"], scenes)
    for name, runner in (engines or {}).items():
        report["systems"][name] = {"evaluations_per_hop": runner.manifest["evaluations"],
                                   "hop_latents": runner.g.hop, **score(run_engine(runner, scenes, progress), scenes)}
    if seam_seconds:
        report["seams"] = seams(model, seam_seconds, hop_latents=hop_latents)
    turns = [i for i, s in enumerate(scenes) if s.kind == "head_turn"]
    if plot is not None and turns:
        i = turns[0]
        report["plot"] = str(plot_head_turn({k: v[i] for k, v in outputs.items() if v[i] is not None}, scenes[i], plot))
    return report


def seams(model: BinauralModel, seconds: float = 60.0, seed: int = HEAD_TURN_SEED - 1, hop_latents: int = 4) -> dict:
    """Generate a long head-turn scene through the sliding window and look for seams.

    hop_jump: mean over hop boundaries of the largest sample-to-sample change within the VAE hop
    where the last latent of one hop crossfades into the first of the next; latent_jump: the same
    statistic at the latent boundaries inside hops. No seams: hop_jump / latent_jump <= 1. A hop
    boundary is also a video-frame boundary, where per-frame conditions (the silence gate's gain)
    change: frame_ratio compares it with the in-hop latent boundaries that are frame boundaries too,
    which isolates the sliding window. Also the largest difference between the chunked (streamed)
    decode and one whole decode of all latents."""
    from training.render import render_scene
    from training.sampler import head_turn_scene
    from training.scene_spec import parse_scene

    scene = render_scene(parse_scene(head_turn_scene(seed, duration=seconds)))
    record: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    audio = generate_batch(model, scene.frames[None], scene.spec.fps, [scene.pose], [seed], hop_latents,
                           record=record)[0]
    vhop = model.vae.cfg.hop
    jumps = np.abs(np.diff(audio, axis=-1)).max(axis=0)  # (N - 1,) over ears
    count = audio.shape[-1] // vhop - 1
    # the crossfade between latents l - 1 and l covers aligned samples [(l - 1) hop, l hop)
    peak = np.array([jumps[(l - 1) * vhop:l * vhop].max() for l in range(1, count)])
    boundary = np.arange(1, count)
    at_hop = boundary % hop_latents == 0
    in_hop_frame = ~at_hop & (boundary % model.flow.cfg.latents_per_frame == 0)
    decode = DecodeStep(model, HopGeometry.of(model, hop_latents))
    latents, transfers, gains = zip(*record)  # per hop, batch of one
    gated = gains[0] is not None
    with torch.no_grad():
        # the decode step itself, hop by hop, its state carried as the runtime carries it
        tail, gate_state, streamed = torch.zeros(1, decode.g.ears, vhop), torch.zeros(1, 2), []
        for z, transfer, gain in record:
            step_inputs = [x for x in (transfer, gain) if x is not None] + [tail] + ([gate_state] if gated else [])
            audio_hop, tail, *rest = decode(z, *step_inputs)
            gate_state = rest[0] if gated else gate_state
            streamed.append(audio_hop)
        streamed = torch.cat(streamed, dim=-1)
        # one whole decode of all latents, gated over the whole gain sequence
        factors = None if transfers[0] is None else torch.cat([decode.factors(t) for t in transfers], 2)[0]
        whole = model.vae.decode(torch.cat(latents, 2)[0].transpose(-1, -2), factors=factors)[None]
        if gated:
            whole = decode.gated(whole, torch.nn.functional.pad(torch.cat(gains, 1), (2, 0)))
    hop_jump, latent_jump = peak[at_hop], peak[~at_hop]
    ratio, ratio_se = _mean_ratio(hop_jump, latent_jump)
    frame_ratio, frame_ratio_se = _mean_ratio(hop_jump, peak[in_hop_frame]) if in_hop_frame.any() else (None, None)
    return {"seconds": seconds, "hop_latents": hop_latents, "hop_jump": float(hop_jump.mean()),
            "latent_jump": float(latent_jump.mean()), "ratio": ratio, "ratio_standard_error": ratio_se,
            "frame_ratio": frame_ratio, "frame_ratio_standard_error": frame_ratio_se,
            "hop_jump_max": float(hop_jump.max()), "latent_jump_max": float(latent_jump.max()),
            "chunked_vs_whole_decode_max_abs": float((streamed - whole).abs().max())}


def _mean_ratio(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a) / mean(b) and its standard error (delta method, independent samples): is a ratio
    above 1 noise?"""
    ratio = a.mean() / b.mean()
    relative_se = np.hypot(a.std(ddof=1) / np.sqrt(len(a)) / a.mean(), b.std(ddof=1) / np.sqrt(len(b)) / b.mean())
    return float(ratio), float(ratio * relative_se)


def format_report(report: dict) -> str:
    cols = [("evaluations_per_hop", "NFE/hop", "{:.0f}"), ("lateral_error_deg", "lat.err deg", "{:.1f}"),
            ("itd_error_us", "ITD err us", "{:.0f}"), ("ild_error_db", "ILD err dB", "{:.2f}"),
            ("itd_error_us_in_view", "ITD in view", "{:.0f}"), ("ild_error_db_in_view", "ILD in view", "{:.2f}"),
            ("itd_error_us_direct", "ITD direct", "{:.0f}"), ("ild_error_db_direct", "ILD direct", "{:.2f}"),
            ("itd_error_us_onset", "ITD onset", "{:.0f}"), ("ild_error_db_onset", "ILD onset", "{:.2f}"),
            ("onset_within_40ms", "onset<=40ms", "{:.2f}"), ("head_turn_correlation", "turn r", "{:.2f}"),
            ("stft_distance", "STFT", "{:.4f}"), ("envelope_distance", "ENV", "{:.4f}")]
    lines = [f"{'system':<32}" + "".join(f"{h:>13}" for _, h, _ in cols)]
    for name, m in report["systems"].items():
        cells = [fmt.format(m[k]) if m.get(k) is not None else "-" for k, _, fmt in cols]
        lines.append(f"{name:<32}" + "".join(f"{c:>13}" for c in cells))
        for acoustics, a in m.get("by_acoustics", {}).items():
            cells = [fmt.format(a[k]) if a.get(k) is not None else "-" if k in a else "" for k, _, fmt in cols]
            lines.append(f"{'  ' + acoustics + ' (' + str(a['scenes']) + ' scenes)':<32}" + "".join(f"{c:>13}" for c in cells))
    s = report["scenes"]
    lines.append(f"{s['single']} single-source scenes, {s['head_turn']} head-turn scenes, hop {report['hop_latents']} latents")
    if "seams" in report:
        m = report["seams"]
        lines.append(f"seams over {m['seconds']:g} s: hop-boundary jump / in-hop jump = {m['ratio']:.3f} "
                     f"(+-{m['ratio_standard_error']:.3f} s.e.)"
                     + (f", / in-hop frame-boundary jump = {m['frame_ratio']:.3f} (+-{m['frame_ratio_standard_error']:.3f})"
                        if m.get("frame_ratio") is not None else "") +
                     f" (max {m['hop_jump_max']:.4f} vs {m['latent_jump_max']:.4f}); chunked vs whole decode "
                     f"max |diff| {m['chunked_vs_whole_decode_max_abs']:.2e}")
    return "\n".join(lines)


def save_report(report: dict, path: Path) -> Path:
    path.write_text(json.dumps(report, indent=1))
    return path
