"""The `visaudio` command. Subcommands import their packages lazily so `--help` stays fast."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

DEMO_SCENE = Path(__file__).resolve().parent.parent / "training" / "scenes" / "demo.json"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_scene(args) -> int:
    from training.render import render_scene
    from training.sampler import random_scene
    from training.scene_spec import SceneSpecError, load_scene, parse_scene

    if (args.spec is None) == (args.seed is None):
        return _fail("give either a scene file SPEC.json or --seed N")
    try:
        spec = load_scene(args.spec) if args.spec else parse_scene(
            random_scene(args.seed, duration=args.duration, num_sources=args.sources))
        rendered = render_scene(spec)
    except (SceneSpecError, ValueError) as exc:  # nothing has been written yet
        return _fail(str(exc))
    out = rendered.write(args.out)
    print(f"wrote {out}/ (clip.mp4, binaural.wav, pose.jsonl, meta.json): "
          f"{spec.duration:g} s, {len(spec.sources)} source(s)")
    return 0


def cmd_dataset(args) -> int:
    from training.data import build_dataset

    index = build_dataset(args.out, args.count, jobs=args.jobs, seed=args.seed, duration=args.duration)
    print(f"wrote {index}")
    return 0


def _read_wav(path: str):
    import soundfile as sf

    try:
        data, rate = sf.read(path, dtype="float64", always_2d=True)
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    if data.shape[1] != 2:
        raise ValueError(f"{path}: has {data.shape[1]} channel(s), expected 2 (binaural, channel 0 = left)")
    return data.T, rate


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k != "series"}
    return value


def cmd_metrics(args) -> int:
    from training import metrics

    try:
        ref, sr = _read_wav(args.ref)
        est, sr_est = _read_wav(args.est)
        if sr != sr_est:
            raise ValueError(f"{args.est}: sample rate {sr_est} Hz differs from {args.ref} ({sr} Hz)")
        if ref.shape != est.shape:
            raise ValueError(f"{args.est}: {est.shape[1]} samples, {args.ref} has {ref.shape[1]}")
        result = {"reference": metrics.compare(ref, est, sr)}
        if args.meta:
            meta = json.loads(Path(args.meta).read_text())
            for name, audio in (("ref", ref), ("est", est)):
                result[f"direction_{name}"] = metrics.direction_error(audio, sr, meta)
                result[f"onset_sync_{name}"] = metrics.onset_sync(audio, sr, meta)
    except (ValueError, KeyError, OSError) as exc:
        return _fail(str(exc))
    result = _jsonable(result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for group, values in result.items():
            print(group)
            for key, value in values.items():
                print(f"  {key:24s} {value if not isinstance(value, float) else f'{value:.4g}'}")
    return 0


def cmd_show(args) -> int:
    from training.clips import ClipError
    from training.show import show_clip

    try:
        png = show_clip(args.dir, args.out)
    except ClipError as exc:
        return _fail(str(exc))
    print(f"wrote {png}")
    return 0


def cmd_demo(args) -> int:
    from engine.model import DEFAULT_CHECKPOINT
    from export.steps import export_engine
    from realtime.demo import run_live
    from training.render import RenderedScene, render_scene
    from training.scene_spec import load_scene
    from training.show import show_clip

    _threads(args)
    spec = load_scene(DEMO_SCENE)
    rendered = render_scene(spec)
    out = rendered.write(Path(args.out) / "scene")
    png = show_clip(out, Path(args.out) / "demo.png")
    print(f"demo scene rendered to {out}/ (clip.mp4 has the binaural track: listen on headphones)")
    print(f"picture: {png}")
    if not DEFAULT_CHECKPOINT.exists():
        return _fail(f"{DEFAULT_CHECKPOINT}: the shipped model is missing")
    engine = export_engine(Path(args.out) / "engine", hop=2).parent  # live: 40 ms hops (README: latency)
    print(f"live: a game-engine publisher plays the scene's frames and head pose over ZeroMQ into the runtime "
          f"({spec.duration:g} s, real time)...")
    audio, stats = run_live(engine, rendered.frames, rendered.pose, spec.fps, headphones=not args.no_headphones)
    generated = RenderedScene(spec, audio.astype("float32"), rendered.frames, rendered.pose, rendered.meta)
    gen_dir = generated.write(Path(args.out) / "generated")
    gen_png = show_clip(gen_dir, Path(args.out) / "generated.png")
    print(f"{'played on the headphones and ' if stats['headphones'] else ''}recorded: the shipped model's binaural "
          f"audio from the video and head pose alone: {gen_dir}/clip.mp4 (picture: {gen_png})")
    print("runtime: " + _live_line(stats))
    return 0


def cmd_bench(args) -> int:
    import os

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    from engine.bench import cpu_name, pin_to_one_core
    from training.benchmarks import bench_render

    core = pin_to_one_core() if args.threads == 1 else None
    result = bench_render(args.count, seed=args.seed, sources=args.sources or None, duration=args.duration)
    result.update(threads=args.threads, pinned_core=core, cpu=cpu_name())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r, d = result["render_seconds"], result["direction_error_deg"]
        print(f"{result['scenes']} scenes of {result['duration_s']:g} s, {args.threads} thread(s), {result['cpu']}")
        print(f"render + write seconds: p50 {r['p50']:.2f}  p95 {r['p95']:.2f}  max {r['max']:.2f}")
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"direction error (deg): median over frames {fmt(d['median_over_frames'])}, median of scene "
              f"medians {fmt(d['median_of_scene_medians'])} (front sources {fmt(d['front_median_of_scene_medians'])}, "
              f"back {fmt(d['back_median_of_scene_medians'])})")
    return 0


def cmd_export(args) -> int:
    from engine.backends import EngineError
    from export.compare import compare_backends, format_comparison
    from export.steps import ExportError, export_engine

    _threads(args)
    out = Path(args.out)
    try:
        for batch in args.batch:
            folder = out if len(args.batch) == 1 else out / f"batch{batch}"
            manifest = export_engine(folder, args.checkpoint, args.hop, batch, args.context, args.steps, args.precision)
            info = json.loads(manifest.read_text())
            print(f"{folder}/: {', '.join(g['file'] for g in info['graphs'].values())} + manifest.json "
                  f"(batch {batch}, hop {info['hop']['latents']} latents = {info['hop']['seconds'] * 1e3:g} ms, "
                  f"context {info['hop']['context']}, {info['evaluations']} network evaluations per hop)")
            if args.check:
                report = compare_backends(folder, threads=args.threads)
                print(format_comparison(report))
    except (ExportError, EngineError, ValueError) as exc:
        return _fail(str(exc))
    return 0


def cmd_bench_engine(args) -> int:
    import tempfile

    from engine.backends import EngineError
    from engine.bench import bench_engine, format_bench
    from export.steps import export_engine

    _threads(args)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = args.engine
            if path is None:  # the shipped checkpoint at the default options
                path = tmp
                for batch in args.batch:
                    export_engine(Path(tmp) / f"batch{batch}", batch=batch)
            report = bench_engine(path, args.backend or None, args.hops, threads=args.threads)
    except (EngineError, ValueError) as exc:
        return _fail(str(exc))
    print(json.dumps(report, indent=2) if args.json else format_bench(report))
    return 0


def cmd_stream(args) -> int:
    import signal
    import threading
    import time

    from engine.backends import EngineError
    from realtime.io import WavSink, open_camera, play_camera, play_pose, play_video
    from realtime.runtime import Runtime, RuntimeConfig

    _threads(args)
    try:
        runner = _open_engine(args)
    except (EngineError, ValueError) as exc:
        return _fail(str(exc))
    kind, _, device = (args.video or "zmq").partition(":")
    camera = None
    if kind == "camera":
        try:
            camera = open_camera(device or "/dev/video0", args.camera_format)
        except OSError as exc:
            return _fail(str(exc))
    sample_rate = runner.manifest["rates"]["sample_rate"]
    cfg = RuntimeConfig.loopback(args.port)
    sinks = []
    if args.out.startswith(("tcp://", "ipc://")):
        cfg = replace(cfg, audio=args.out)
    elif args.out == "headphones":
        from realtime.audio import HeadphoneSink

        try:
            # playback starts a margin after the first hop; later hops are scheduled on this device's clock
            sinks.append(HeadphoneSink(sample_rate, args.stream))
        except (OSError, ValueError) as exc:  # no PortAudio or no output device
            return _fail(f"headphones: {exc}")
    else:
        sinks.append(WavSink(args.out, sample_rate))
    runtime = Runtime(runner, sample_rate, cfg, sinks)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    origin = time.monotonic_ns()
    threads = []
    if camera is not None:
        threads.append(threading.Thread(target=play_camera, args=(camera, runtime.endpoints(), args.stream, stop),
                                        daemon=True))
    elif args.video not in ("zmq", None):
        threads.append(threading.Thread(target=play_video, args=(args.video, runtime.endpoints(), args.stream, stop, origin),
                                        daemon=True))
    if args.pose not in ("zmq", None):
        threads.append(threading.Thread(target=play_pose, args=(args.pose, runtime.endpoints(), args.stream, stop, origin),
                                        daemon=True))
    for t in threads:
        t.start()
    ends = time.monotonic() + args.seconds if args.seconds else float("inf")
    next_report = time.monotonic() + 1.0
    bound = runtime.endpoints()
    print(f"streaming on {runner.backend}: frames {bound.frames}, pose {bound.pose}, control {bound.control}, "
          f"audio {bound.audio}"
          f"{'' if not sinks else ' + ' + args.out}  (Ctrl-C stops)")

    def should_stop() -> bool:  # also prints the live stats once a second
        nonlocal next_report
        now = time.monotonic()
        if now >= next_report and not args.quiet:
            next_report = now + 1.0
            print("\r" + _live_line(runtime.stats()), end="", flush=True)
        return stop.is_set() or now >= ends

    try:
        runtime.run(should_stop)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=2)
        stats = runtime.stats()
        for sink in sinks:
            if hasattr(sink, "stats"):
                stats["output"] = sink.stats()
            sink.close()
        runtime.close()
    print("\nstopped: " + _live_line(stats))
    return 0


def _live_line(stats: dict) -> str:
    hop, lat = stats["hop_ms"], stats["frame_to_audio_ms"]
    concealed = sum(s["held_frames"] + s["null_frames"] for s in stats["streams"].values())
    return (f"{stats['counts'].get('hops', 0)} hops, {len(stats['streams'])} stream(s)"
            + (f", hop p50 {hop['p50']:.1f} p99 {hop['p99']:.1f} ms" if hop else "")
            + (f", frame-to-audio p50 {lat['p50']:.1f} p95 {lat['p95']:.1f} ms" if lat else "")
            + f", concealed frames {concealed}, rejected messages {stats['rejected_total']}"
            + (f", late hops concealed {stats['output']['concealments']}, underflows {stats['output']['underflows']}"
               f" + {stats['output']['device_underflows']} at the device" if "output" in stats else ""))


def cmd_bench_latency(args) -> int:
    import tempfile

    from engine.backends import EngineError
    from engine.bench import cpu_name
    from export.steps import export_engine
    from realtime.bench import bench_latency

    _threads(args)
    seconds = args.minutes * 60 if args.minutes else args.seconds
    reports = []
    try:
        for streams in args.streams:
            with tempfile.TemporaryDirectory() as tmp:
                engine = args.engine
                if engine is None:
                    engine = tmp
                    export_engine(tmp, hop=args.hop, batch=streams)
                plot = args.plot and (args.plot if len(args.streams) == 1 else
                                      str(Path(args.plot).with_suffix(f".streams{streams}.png")))
                report = bench_latency(engine, seconds, args.backend, args.threads, streams=streams,
                                       progress=not args.json, device_ms=args.device_ms, blocksize=args.blocksize,
                                       plot=plot)
            report["cpu"] = cpu_name()
            reports.append(report)
    except (EngineError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        return 0
    fmt = lambda p: "n/a" if p is None else f"p50 {p['p50']:.1f}  p95 {p['p95']:.1f}  p99 {p['p99']:.1f} ms"  # noqa: E731
    for report in reports:
        print(f"{report['cpu']}, {report['backend']}, {report['threads']} thread(s), hop {report['hop_ms']:g} ms, "
              f"{report['streams']} stream(s), {report['seconds']:g} s")
        print(f"  motion-to-sound ({report['yaw_steps']} yaw steps): {fmt(report['motion_to_sound_ms'])}")
        print(f"  video-to-sound: {fmt(report['video_to_sound_ms'])}")
        if report["first_audio_ms"] is not None:
            print(f"  first audio at the device {report['first_audio_ms']:.0f} ms after the first frame")
        print(f"  hop compute: {fmt(report['hop_compute_ms'])}; {report['hops']} hops, {report['deadline_misses']} "
              f"deadline misses, {report['output_concealments']} late hops concealed "
              f"({report['output_concealed_ms']:.0f} ms), {report['underflows']} underflows + {report['device_underflows']} at the device "
              f"({report['device_stalls']} stalls), "
              f"{report['concealed_frames']} concealed frames, {report['dropped_samples']} samples dropped; RSS "
              f"{report['rss_mb']['start']:.0f} -> {report['rss_mb']['end']:.0f} MB "
              f"({report['rss_mb']['growth_percent']:+.1f}%); page faults {report['page_faults']['minor']} minor, "
              f"{report['page_faults']['major']} major")
        if "plot" in report:
            print(f"  plot: {report['plot']}")
    return 0


def cmd_keys(args) -> int:
    import zmq.auth

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(out, args.name)
    print(f"wrote {public} (share it) and {secret} (keep it private)")
    return 0


def _open_engine(args):
    """The engine of --engine with --backend (auto: the fastest, and it says which)."""
    from engine.backends import open_engine

    runner = open_engine(args.engine, args.backend, args.threads)
    if args.backend == "auto":
        print("backend auto: " + ", ".join(f"{b} {t * 1e3:.1f} ms/hop" for b, t in runner.timings.items())
              + f" -> {runner.backend}")
    return runner


def _threads(args) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def cmd_cache(args) -> int:
    from training.scene_cache import build_cache, cache_from_dataset

    try:
        if args.from_dataset:
            out = cache_from_dataset(args.out, args.from_dataset, seconds=args.duration)
        else:
            out = build_cache(args.out, args.count, seed=args.seed, seconds=args.duration, jobs=args.jobs)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(f"wrote {out}/")
    return 0


def cmd_train_vae(args) -> int:
    from engine.checkpoint import CheckpointError
    from engine.config import load_config
    from training.train_vae import TrainVAEConfig, train_vae

    _threads(args)
    try:
        ckpt = train_vae(load_config(TrainVAEConfig, args.config, {"cache": args.cache}), args.out)
    except (ValueError, CheckpointError, OSError) as exc:
        return _fail(str(exc))
    report = json.loads((Path(args.out) / "vae_report.json").read_text())
    print(f"wrote {ckpt}: explained variance {report['explained_variance']:.3f}; held-out reconstruction "
          + ", ".join(f"{k} {v:.3g}" for k, v in report["eval"].items()))
    return 0


def cmd_train_flow(args) -> int:
    from engine.checkpoint import CheckpointError
    from engine.config import load_config
    from training.train_flow import TrainFlowConfig, train_flow

    _threads(args)
    try:
        cfg = load_config(TrainFlowConfig, args.config, {"steps": args.steps, "cache": args.cache, "vae": args.vae})
        ckpt = train_flow(cfg, args.out, resume=args.resume, device=args.device)
    except (ValueError, CheckpointError, OSError) as exc:
        return _fail(str(exc))
    print(f"wrote {ckpt}")
    return 0


def cmd_train_frame_head(args) -> int:
    from engine.checkpoint import CheckpointError
    from training.frame_heads import write_frame_head

    _threads(args)
    try:
        fit = {k: v for k, v in (("frames", args.frames), ("epochs", args.epochs)) if v is not None}
        if getattr(args, "ild_bands", None):
            from engine.interaural import ILD_BAND_SETS

            fit["ild_bands_hz"] = ILD_BAND_SETS[args.ild_bands]
        if getattr(args, "ild_only", False):
            fit["ild_only"] = True
        report = write_frame_head(args.head, args.checkpoint, args.cache, args.out, **fit)
    except (ValueError, CheckpointError, OSError) as exc:
        return _fail(str(exc))
    print(f"{args.head} head, held-out frames ({report['labels']}; {report['seconds']:.0f} s):")
    if args.head == "transfer":
        before = report["held_out_loss_before"]
        own = "other bands" if before is None else f"{before:.3f}"
        if "held_out_loss_start" in report:
            own += f"; the refit at its start: {report['held_out_loss_start']:.3f}"
        print(f"  loss {report['held_out_loss']:.3f} (epoch {report['best_epoch']}; the model's own head: {own}) "
              f"on {report['held_out_frames']} frames")
    for held in report.get("held_out", []):
        print(f"  accuracy {held['accuracy']:.3f} (always 'no': {1 - held['base_rate']:.3f}), precision "
              f"{held['precision']:.3f}, recall {held['recall']:.3f}")
    print(f"wrote {args.out}")
    return 0


def cmd_distill(args) -> int:
    from engine.checkpoint import CheckpointError
    from engine.config import load_config
    from training.distill import DistillConfig, distill

    _threads(args)
    try:
        cfg = load_config(DistillConfig, args.config, {"teacher": args.teacher, "steps": args.steps})
        ckpt = distill(cfg, args.out, args.device)
    except (ValueError, CheckpointError, OSError) as exc:
        return _fail(str(exc))
    print(f"wrote {ckpt}")
    return 0


def _load(path):
    from engine.model import load_model

    return load_model(path)[0]


def cmd_eval(args) -> int:
    from engine.model import DEFAULT_CHECKPOINT
    from training.evaluate import cue_floor, eval_scenes, format_report, new_report, save_report

    _threads(args)
    if args.tail_draws < 0:
        return _fail(f"--tail-draws: {args.tail_draws} other draws of the tail; give 0 (none) or more")
    if args.jobs < 1:
        return _fail(f"--jobs: {args.jobs} processes; give 1 or more")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.floor_only:
        scenes = eval_scenes(args.scenes, args.seed, head_turns=0)
        report = new_report(scenes, args.hop)
        report["systems"].update(cue_floor(scenes, args.tail_draws or 1, args.redraw_sound, args.jobs))
    else:
        report = _evaluate_models(args, out)
        if isinstance(report, int):
            return report
        report.update(checkpoint=str(args.checkpoint or DEFAULT_CHECKPOINT))
    report.update(seed=args.seed)
    save_report(report, out / "eval.json")
    plot = "" if args.floor_only else f"\nplot: {report.get('plot')}"
    print(json.dumps(report, indent=2) if args.json else format_report(report) + plot)
    return 0


def _evaluate_models(args, out: Path) -> dict | int:
    """`visaudio eval` with models: the checkpoint, its teacher and baselines, engines (an exit code on bad input)."""
    from engine.backends import EngineError, open_engine
    from engine.checkpoint import CheckpointError
    from engine.model import DEFAULT_CHECKPOINT
    from training.evaluate import eval_scenes, evaluate

    shipped = DEFAULT_CHECKPOINT.parent
    teacher = args.teacher or (shipped / "teacher.safetensors" if args.checkpoint is None else None)
    mono = args.mono or (shipped / "mono.safetensors" if args.checkpoint is None else None)
    try:
        model = _load(args.checkpoint)
        teacher = _load(teacher) if teacher and not args.no_teacher else None
        mono = _load(mono) if mono and not args.no_baselines else None
        engines = {}
        for folder in args.engine or []:
            runner = open_engine(folder, "onnxruntime", args.threads)
            name = f"engine {Path(folder).name} ({runner.manifest['precision']})"
            if name in engines:
                return _fail(f"--engine: two engine folders named {Path(folder).name!r}; rename one")
            engines[name] = runner
    except (CheckpointError, EngineError, ValueError) as exc:
        return _fail(str(exc))
    scenes = eval_scenes(args.scenes, args.seed, args.head_turns)
    return evaluate(model, scenes, teacher, mono, args.teacher_scenes, args.hop, out / "head_turn.png",
                    args.seam_seconds, args.baseline_steps, engines=engines, tail_draws=args.tail_draws,
                    redraw_sound=args.redraw_sound, jobs=args.jobs)


def cmd_pack(args) -> int:
    import torch

    from engine.checkpoint import CheckpointError
    from engine.model import load_model, provenance, save_model

    try:
        model, info = load_model(args.checkpoint)
    except (CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    if args.interaural_side is not None:
        if not model.flow.cfg.interaural:
            return _fail(f"{args.checkpoint}: --interaural-side needs a model with the interaural transfer head")
        if not 0.0 <= args.interaural_side <= 1.0:
            return _fail(f"--interaural-side must be within [0, 1], got {args.interaural_side}")
        model.sampler = replace(model.sampler, interaural_side=args.interaural_side)
    if args.context is not None:
        window, frame = model.flow.cfg.window, model.flow.cfg.latents_per_frame
        if not 0 < args.context < window or args.context % frame:
            return _fail(f"--context must be a multiple of {frame} latents within (0, {window}), got {args.context}")
        model.sampler = replace(model.sampler, context=args.context)
    if args.guidance_rescale is not None:
        if model.sampler.guidance == 1.0:
            return _fail(f"{args.checkpoint}: --guidance-rescale needs a model that samples with guidance "
                         f"(this one has guidance 1: a distilled student carries its guidance in its weights)")
        if not 0.0 <= args.guidance_rescale <= 1.0:
            return _fail(f"--guidance-rescale must be within [0, 1], got {args.guidance_rescale}")
        model.sampler = replace(model.sampler, guidance_rescale=args.guidance_rescale)
    packed_from = info.get("packed_from", Path(args.checkpoint).name)  # repacking keeps the training output's name
    out = save_model(args.out, model, {**provenance(info), "packed_from": packed_from}, flow_dtype=torch.float16)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, flow weights float16, "
          f"interaural side {model.sampler.interaural_side:g}, context {model.sampler.context or 'the whole window'}, "
          f"guidance {model.sampler.guidance:g} rescaled {model.sampler.guidance_rescale:g})")
    return 0


def cmd_render(args) -> int:
    import numpy as np
    import soundfile as sf

    from engine.backends import EngineError
    from engine.checkpoint import CheckpointError
    from engine.generate import generate, run_streams
    from training.clips import ClipError, read_pose, read_video

    _threads(args)
    try:
        frames, fps = read_video(args.video)
        pose_file = Path(args.pose) if args.pose else Path(args.video) / "pose.jsonl"
        pose = read_pose(pose_file) if args.pose or pose_file.is_file() else None
        if args.engine:
            runner = _open_engine(args)
            sample_rate = runner.manifest["rates"]["sample_rate"]
            audio = run_streams(runner, frames[None], fps, [pose], [args.seed], sample_rate, progress=True)[0]
        else:
            model = _load(args.checkpoint)
            sample_rate = model.vae.cfg.sample_rate
            audio = generate(model, frames, fps, pose, seed=args.seed, hop_latents=args.hop, progress=True)
    except (CheckpointError, ClipError, EngineError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".mp4":  # the video with the generated binaural track (AAC)
        from training.clips import write_mp4

        write_mp4(out, frames, fps, audio.astype(np.float32), sample_rate)
    else:
        sf.write(out, audio.T.astype(np.float32), sample_rate, subtype="FLOAT")
    print(f"wrote {out}: {audio.shape[1] / sample_rate:.2f} s, 2 channels (0 = left ear)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visaudio",
        description="ViSAudio-RT: video + head rotation -> binaural audio. Channel 0 is the left ear; "
                    "angles in degrees, azimuth positive to the left.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scene", help="render one scene (a JSON spec or a random seed) into a clip folder",
                       description="Render a scene into DIR: clip.mp4 (H.264 + binaural AAC), binaural.wav, "
                                   "pose.jsonl, meta.json (docs/FORMATS.md). A bad spec is rejected with the "
                                   "field it concerns, and nothing is written.")
    p.add_argument("spec", nargs="?", help="scene JSON file (docs/FORMATS.md)")
    p.add_argument("--seed", type=int, help="render the random BiAudio-style scene of this seed instead")
    p.add_argument("--duration", type=float, default=8.0, help="seconds, for --seed (default 8)")
    p.add_argument("--sources", type=int, help="number of sources, for --seed (default random 1-4)")
    p.add_argument("--out", required=True, help="clip folder to write")
    p.set_defaults(func=cmd_scene)

    p = sub.add_parser("dataset", help="render N random clips into a dataset folder (parallel, resumable)",
                       description="Render clip_000000.. from seeds SEED..SEED+N-1 and write index.json. "
                                   "Clips already complete are kept, so an interrupted run resumes.")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first clip (default 0)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per clip (default 8)")
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("metrics", help="binaural metrics of EST.wav against REF.wav (and scene metadata)",
                       description="STFT and envelope distances, ITD error (GCC-PHAT), per-band ILD error, "
                                   "coherence error; with --meta also the direction error against the scene "
                                   "and the onset-sync score of visible events (DESIGN.md section 5).")
    p.add_argument("ref")
    p.add_argument("est")
    p.add_argument("--meta", help="meta.json of the clip, for direction and sync metrics")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("show", help="a PNG of a clip: frames, both ears, ITD/ILD and lateral angle vs metadata")
    p.add_argument("dir", help="clip folder")
    p.add_argument("--out", help="PNG path (default DIR/summary.png)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("bench", help="benchmarks: `bench render` times the scene engine and checks its directions")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    p = bench.add_parser("render", help="render random scenes on one core: seconds per scene, direction error",
                         description="Renders COUNT random scenes (render + clip writing timed on one pinned core "
                                     "by default) and compares the lateral angle estimated from each rendered "
                                     "audio with its metadata.")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--seed", type=int, default=10_000, help="first seed (default 10000: not a training seed)")
    p.add_argument("--sources", type=int, default=1, help="sources per scene (0 = random 1-4; default 1)")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 pins the process to one core)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    p = bench.add_parser("engine", help="per-hop latency p50/p95/p99, real-time factor and streams per device, "
                                        "every available backend side by side",
                         description="Times hops of an exported engine (or, without --engine, of the shipped "
                                     "model exported at the default options) on every available backend, "
                                     "hops interleaved round-robin.")
    p.add_argument("--engine", help="engine folder (or a folder of them, one per batch) from `visaudio export`")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batches to export without --engine")
    p.add_argument("--backend", nargs="+", help="torch, torch-eager, onnxruntime, tensorrt (default: every available one)")
    p.add_argument("--hops", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and onnxruntime (default 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_engine)

    p = bench.add_parser("latency", help="motion-to-sound and video-to-sound latency at the sound card, and soaks",
                         description="Plays a rendered scene into the runtime in real time while the head yaw "
                                     "steps, through the default PortAudio output device (a JACK dummy server "
                                     "works), recording what the device played (realtime/bench.py).")
    p.add_argument("--engine", help="engine folder (default: the shipped model exported at --hop)")
    p.add_argument("--hop", type=int, default=2, help="latents per hop when exporting (default 2 = 40 ms, the live "
                                                        "default: video-to-sound is about a hop + 60 ms)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--minutes", type=float, help="soak for this long instead")
    p.add_argument("--streams", type=int, nargs="+", default=[1],
                   help="live streams at once (the engine's batch); several values sweep")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device-ms", type=float, default=25.0,
                   help="audio kept in the device ring ahead of the callback: the head-turn latency's main term "
                        "(25 ms holds on a 2-core CPU; a GPU engine leaves the feeder thread free to run with less)")
    p.add_argument("--blocksize", type=int, default=256,
                   help="device frames per callback (match the JACK period, -p)")
    p.add_argument("--plot", help="PNG: the played lateral angle around the yaw steps and both latency histograms")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_latency)

    p = sub.add_parser("stream", help="the live runtime: video and head pose in (ZeroMQ, a file or a camera), "
                                      "binaural audio out (a WAV file or a ZeroMQ PUB endpoint)",
                       description="Runs the streaming runtime on an exported engine (docs/PROTOCOL.md). Producers "
                                   "connect to the frames/pose endpoints; audio is published on the audio endpoint "
                                   "(or --out tcp://...). SIGINT/SIGTERM stop it cleanly.")
    p.add_argument("--engine", required=True, help="engine folder from `visaudio export`")
    p.add_argument("--backend", default="auto", help="auto, torch, torch-eager, onnxruntime or tensorrt")
    p.add_argument("--video", default="zmq", help="zmq (producers publish), a video file, or camera[:DEVICE] "
                                                  "(default /dev/video0)")
    p.add_argument("--camera-format", help="PyAV capture format (default: v4l2 on Linux, avfoundation on macOS, dshow "
                                           "on Windows; lavfi for an FFmpeg test source, e.g. --video "
                                           "camera:testsrc2=size=320x240:rate=25,realtime)")
    p.add_argument("--pose", default="zmq", help="zmq, or a pose.jsonl file played at its timestamps")
    p.add_argument("--out", default="tcp://127.0.0.1:5563",
                   help="headphones (the default PortAudio output), FILE.wav, or a tcp:// PUB endpoint")
    p.add_argument("--port", type=int, default=5560, help="loopback ports: frames PORT, pose PORT+1, control "
                                                          "PORT+2, audio PORT+3; 0: free ports (printed)")
    p.add_argument("--stream", type=int, default=0, help="stream id for file and camera sources")
    p.add_argument("--seconds", type=float, help="stop after this long")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no live stats line")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("keys", help="create a CURVE certificate pair (runtime or client) for remote peers",
                       description="Writes DIR/NAME.key (public: give it to the peer) and DIR/NAME.key_secret. "
                                   "The runtime takes its secret certificate and a folder of allowed clients' public "
                                   "certificates (RuntimeConfig.curve_secret / curve_clients).")
    p.add_argument("dir")
    p.add_argument("name")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("export", help="export a checkpoint as a few-step streaming engine: static ONNX graphs "
                                      "+ manifest (TensorRT plans are built from them on first use on a GPU)",
                       description="Writes OUT/conditions.onnx, denoise.onnx (sampler steps unrolled, noise an "
                                   "input), decode.onnx (decoder state in and out) and manifest.json; with several "
                                   "--batch values, one folder per batch (OUT/batchN). docs/FORMATS.md#engines.")
    p.add_argument("--checkpoint", help="model checkpoint (default: checkpoints/default.safetensors)")
    p.add_argument("--out", required=True)
    p.add_argument("--hop", type=int, default=4, help="latents per hop (default 4 = 80 ms)")
    p.add_argument("--context", type=int, help="latents of context (default: the model's sampler context, else the trained window minus the hop)")
    p.add_argument("--steps", type=int, help="uniform Euler steps (default: the model's own sampler times)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="independent streams per graph call")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="fp16: the TensorRT plan is built in FP16 (the ONNX stays fp32); int8: int8 MatMul "
                        "weights in the ONNX graphs, for onnxruntime only (a calibration keeps fp32 the MatMuls "
                        "whose activations uint8 quantization would mostly zero)")
    p.add_argument("--check", action="store_true", help="run the cross-backend comparator on the export")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("cache", help="render N random scenes (or a dataset folder) into a training cache",
                       description="Writes memory-mappable .npy arrays (frames at 64 px, pose, binaural audio) + "
                                   "index.json, which `train vae`, `train flow` and `distill` read.")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=1200)
    p.add_argument("--seed", type=int, default=1_000_000, help="first scene seed (default 1000000)")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--from-dataset", help="cache the clips of this dataset folder instead of rendering")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="train a model: `train vae` (per-ear audio autoencoder), `train flow`, "
                                     "`train presence` (the off-screen hold), `train silence`, `train transfer`")
    train = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    p = train.add_parser("vae", help="fit the per-ear spectral VAE (closed-form PPCA) and evaluate it",
                         description="Config: JSON/YAML with the fields of training.train_vae.TrainVAEConfig "
                                     "(nested 'vae' for the model). Writes OUT/vae.safetensors, OUT/vae_report.json.")
    p.add_argument("--config", help="JSON/YAML config (default: built-in defaults)")
    p.add_argument("--out", default="out/vae")
    p.add_argument("--cache", help="training cache folder (overrides the config)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_train_vae)
    p = train.add_parser("flow", help="train the flow network (teacher, or the mono baseline with flow.ears = 1)",
                         description="Config: JSON/YAML with the fields of training.train_flow.TrainFlowConfig "
                                     "(nested 'flow'). Writes OUT/model.safetensors (EMA weights + VAE), "
                                     "OUT/state.safetensors (resume), OUT/log.jsonl. Multi-GPU or multi-process: "
                                     "torchrun --nproc_per_node N -m visaudio.cli train flow ...")
    p.add_argument("--config")
    p.add_argument("--out", default="out/teacher")
    p.add_argument("--steps", type=int)
    p.add_argument("--cache")
    p.add_argument("--vae", help="VAE checkpoint (overrides the config)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_train_flow)
    heads = {"presence": ("turn on the off-screen hold of a binaural model (presence head + direction table)",
                          "Fits, on a frozen model, the presence head (is a sounding source on screen? labelled from "
                          "the scene engine for its caches) and the measured head's direction table."),
             "silence": ("turn on the silence gate of a binaural model (engine/gate.py)",
                         "Fits, on a frozen model, the silence head (a small CNN on the frames: is a source on "
                         "screen? is a sounding one? labelled from the scene engine for its caches, else from the "
                         "audio level): the decoder attenuates where the view shows only silent sources."),
             "transfer": ("refit the interaural transfer head of a binaural model on a frozen frame encoder",
                          "Refits, on a frozen model, the interaural transfer head (ITD and band ILDs per frame, "
                          "engine/interaural.py) on every frame of the cache where one visible source dominates; "
                          "the last 200 clips are held out and pick the epoch.")}
    for head, (summary, description) in heads.items():
        p = train.add_parser(head, help=summary,
                             description=f"{description} (training/frame_heads.py). Writes a model checkpoint "
                                         "(float32; `visaudio pack` it to ship).")
        p.add_argument("--checkpoint", required=True, help="binaural model with the interaural head")
        p.add_argument("--cache", default="cache/train")
        p.add_argument("--out", required=True)
        p.add_argument("--frames", type=int, help="training frames sampled from the cache (default: presence "
                                                  "24000, silence 48000, transfer all)")
        p.add_argument("--epochs", type=int, help="default: presence 60, silence 6, transfer 40")
        if head == "transfer":
            p.add_argument("--ild-bands", choices=("octave", "third-octave"),
                           help="ILD bands of the refitted head (default: the model's own; engine/interaural.py)")
            p.add_argument("--ild-only", action="store_true",
                           help="keep the head's ITD output and hidden layer; fit only its band ILD outputs")
        p.add_argument("--threads", type=int)
        p.set_defaults(func=cmd_train_frame_head, head=head)

    p = sub.add_parser("distill", help="distil a teacher into a few-step student (guidance folded in)",
                       description="Trajectory distillation (training/distill.py). Config: JSON/YAML with the "
                                   "fields of training.distill.DistillConfig. Writes OUT/model.safetensors.")
    p.add_argument("--config")
    p.add_argument("--teacher")
    p.add_argument("--out", default="out/student")
    p.add_argument("--steps", type=int)
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="score a model, its teacher and the baselines on held-out scenes",
                       description="Renders N held-out single-source scenes and N/10 head-turn scenes, generates "
                                   "through the streaming hop loop and reports the metrics (training/evaluate.py); "
                                   "writes OUT/eval.json and OUT/head_turn.png. Without --checkpoint: the shipped "
                                   "student, teacher and mono baseline from checkpoints/.")
    p.add_argument("--checkpoint", help="model checkpoint (default: checkpoints/default.safetensors)")
    p.add_argument("--teacher", help="teacher checkpoint to compare with")
    p.add_argument("--mono", help="mono-baseline checkpoint (gives both baselines)")
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--teacher-scenes", type=int, default=40, help="single scenes the (slow) teacher runs (default 40)")
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--head-turns", type=int, help="head-turn scenes (default max(4, N / 10))")
    p.add_argument("--seed", type=int, default=20_000)
    p.add_argument("--hop", type=int, default=4, help="latent frames per hop (default 4 = 80 ms)")
    p.add_argument("--seam-seconds", type=float, default=60.0, help="length of the seam check (0 = skip)")
    p.add_argument("--baseline-steps", type=int, default=10, help="Euler steps (with CFG) for the mono model (default 10)")
    p.add_argument("--engine", nargs="+", help="also score these exported engines (visaudio export; onnxruntime, "
                                               "each at its own hop) on the same scenes")
    p.add_argument("--tail-draws", type=int, default=0,
                   help="also score the cue floor: per frame, the median cues of 1, 2, 4, ... this many other draws of "
                        "each room's late tail, alone (an over-estimate) and with the reference (a lower bound) of the "
                        "least cue error a renderer can expect without the tail's noise")
    p.add_argument("--redraw-sound", action="store_true",
                   help="the floor's draws also draw the sources' waveforms again (same kinds and events, every scene): "
                        "the floor of a renderer that knows neither the tail's noise nor the exact sound")
    p.add_argument("--floor-only", action="store_true", help="score only that floor (no model; head turns skipped)")
    p.add_argument("--jobs", type=int, default=1, help="processes that render the floor's draws (default 1)")
    p.add_argument("--out", default="out/eval")
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("pack", help="store a model checkpoint with float16 flow weights (for shipping)")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--interaural-side", type=float,
                   help="set the sampler's share of the centred ears' difference that is decoded (0-1; "
                        "0 = both ears from their mean; see engine.interaural.mix_ears)")
    p.add_argument("--context", type=int,
                   help="set the latents of clean context each streaming hop reads (engine.model.SamplerConfig)")
    p.add_argument("--guidance-rescale", type=float,
                   help="set the share of the guided velocity rescaled to the conditional one's spread (0-1; "
                        "Lin et al. 2024; engine.model.SamplerConfig)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("render", help="generate binaural audio for a video (its audio track is ignored), offline",
                       description="Runs the streaming hop loop over the video's frames and head pose. VIDEO is an "
                                   "mp4 or a clip folder. Video must be 25 fps with square frames whose side is a "
                                   "multiple of 64.")
    p.add_argument("video")
    p.add_argument("--pose", help="pose.jsonl (docs/FORMATS.md); default: the clip folder's, else unknown")
    p.add_argument("--out", required=True, help="OUT.wav (float32, 2 channels, 0 = left) or OUT.mp4 (the video "
                                                "with the binaural track)")
    p.add_argument("--checkpoint", help="model checkpoint (default: the shipped one)")
    p.add_argument("--engine", help="run an exported engine (visaudio export) instead of the checkpoint")
    p.add_argument("--backend", default="auto",
                   help="with --engine: auto (time each available backend, take the fastest), torch, torch-eager, "
                        "onnxruntime or tensorrt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hop", type=int, default=4, help="latents per hop (the engine's own with --engine)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("demo", help="the main job: render the demo scene, play its video and head pose live "
                                    "through the runtime (headphones when present), record and show both")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--no-headphones", action="store_true", help="record only, even with a sound card")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
