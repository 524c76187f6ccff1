"""`lora-studio` commands: thin wrappers over the library. Errors print one line and exit non-zero."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from .config import ConfigError, RunConfig, describe


def _settings_help() -> str:
    lines = ["settings for --set section.key=value (and for config files):"]
    for key, help_text, default in describe():
        lines.append(f"  {key} = {default!r}")
        lines.append(textwrap.indent(textwrap.fill(help_text, 90), "      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .data.captioner import KINDS as captioner_kinds  # torch-free
    p = argparse.ArgumentParser(prog="lora-studio", description="Train and manage Stable Diffusion LoRAs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a LoRA", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a LoRA. Settings layer as: defaults <- --preset <- --config <- --set.",
                       epilog=_settings_help())
    t.add_argument("--config", help="a config.toml (for example runs/x/config.toml to re-run a run)")
    t.add_argument("--model", help="base model: 'tiny', a diffusers folder, a .safetensors file or a Hub id "
                                   "(sets model.source)")
    t.add_argument("--dataset", help="folder of images with .txt captions (sets data.dataset)")
    t.add_argument("--preset", help="preset name (character, style, concept) or a preset .toml file")
    t.add_argument("--vram", type=int, metavar="GB", help="GPU memory tier (6, 8, 12, 16 or 24): batch, "
                   "checkpointing, caching, 8-bit optimizer and text-encoder training that fit it")
    t.add_argument("--output", help="run folder for config.toml, events.jsonl, samples and the LoRA "
                                    "(sets save.output_dir)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting; repeatable (see the list below)")
    t.add_argument("--force", action="store_true", help="start over in a run folder that already holds a run")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or crashed run from its latest saved state "
                   "(its config.toml unless --config is given); the result equals an uninterrupted run")

    d = sub.add_parser("dataset", help="import, check, caption and summarise datasets")
    dsub = d.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    di = dsub.add_parser("import", help="copy images, folders or zips into a dataset folder (originals untouched)")
    di.add_argument("sources", nargs="+", help="image files, folders or .zip archives")
    di.add_argument("--to", required=True, help="the dataset folder to import into (created if missing)")
    di.add_argument("--background", default="white", help="colour that transparent pixels are composited on")
    di.add_argument("--max-files", type=int, default=50_000, help="import at most this many files")
    di.add_argument("--max-file-mb", type=int, default=200, help="skip any file larger than this")
    di.add_argument("--max-total-mb", type=int, default=65_536, help="stop importing past this many MB in all")
    di.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    dc = dsub.add_parser("check", help="validate every file and show the bucket table")
    dc.add_argument("dataset")
    dc.add_argument("--resolution", type=int, default=512, help="training resolution for the bucket table")
    dc.add_argument("--model", help="the base model whose tokenizer counts caption tokens (default: the embedded "
                                    "model; a single file or Hub id uses CLIP's from the Hugging Face cache)")
    dc.add_argument("--trigger", help="the trigger captions should hold (default: the dataset's own)")
    dc.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    dp = dsub.add_parser("caption", help="edit captions in bulk (atomic writes; images untouched)")
    dp.add_argument("dataset")
    g = dp.add_mutually_exclusive_group(required=True)
    g.add_argument("--add", metavar="TAG", help="add TAG to every caption that lacks it")
    g.add_argument("--remove", metavar="TAG", help="remove TAG from every caption")
    g.add_argument("--replace", nargs=2, metavar=("OLD", "NEW"), help="replace tag OLD with NEW")
    g.add_argument("--find", metavar="TAG", help="list the images whose caption has TAG")
    g.add_argument("--template", choices=["character", "style", "concept"],
                   help="caption uncaptioned images from a template")
    g.add_argument("--auto", metavar="MODEL", help="caption uncaptioned images with a captioning model, a local "
                   "folder or Hub id: a WD tagger (SmilingWolf/wd-eva02-large-tagger-v3), Florence-2 "
                   "(florence-community/Florence-2-large), a chat vision-language model (JoyCaption, Qwen-VL) or "
                   "an image-to-text model (BLIP)")
    g.add_argument("--restore", metavar="BACKUP", help="put back the captions an earlier --auto --overwrite replaced "
                                                       "(the folder it printed)")
    dp.add_argument("--first", action="store_true", help="with --add: put the tag first")
    dp.add_argument("--trigger", default="", help="trigger word for --template and --auto (put first)")
    dp.add_argument("--kind", choices=captioner_kinds, default="auto",
                    help="with --auto: what MODEL is (default: guessed from its files or name)")
    dp.add_argument("--tags", metavar="TAGGER", help="with --auto: also tag with this WD tagger; captions are "
                                                     "'tags, sentence'")
    dp.add_argument("--instruction", default="", help="with --auto and a chat model: what to ask for each image")
    dp.add_argument("--general-threshold", type=float, default=0.35, help="WD tagger: general tags from this score")
    dp.add_argument("--character-threshold", type=float, default=0.85,
                    help="WD tagger: character tags from this score")
    dp.add_argument("--blacklist", default="", help="WD tagger: comma-separated tags never written")
    dp.add_argument("--keep-underscores", action="store_true", help="WD tagger: keep tags' underscores")
    dp.add_argument("--overwrite", action="store_true", help="with --auto: caption every image; the captions it "
                                                             "replaces are copied to a backup folder first")
    dp.add_argument("--preview", type=int, metavar="N", help="with --auto: caption the first N images and print the "
                                                            "captions without writing anything")
    dp.add_argument("--backup", metavar="DIR", help="where replaced captions are copied (default: a new folder "
                                                    "under the cache's caption-backups)")
    dp.add_argument("--batch-size", type=int, default=8, help="with --auto: images per batch")
    dp.add_argument("--device", help="with --auto: cuda or cpu (default: cuda when present)")
    dp.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ds = dsub.add_parser("stats", help="image count, tag frequency and buckets")
    ds.add_argument("dataset")
    ds.add_argument("--resolution", type=int, default=512)
    ds.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    lo = sub.add_parser("lora", help="inspect, merge, bake, resize, analyze LoRA files and write model cards")
    lsub = lo.add_subparsers(dest="lora_command", metavar="TOOL", required=True)
    li = lsub.add_parser("inspect", help="family, ranks, alpha, trigger words, hash and metadata")
    li.add_argument("file")
    li.add_argument("--json", action="store_true", help="print one JSON object")
    lm = lsub.add_parser("merge", help="merge LoRAs at weights: exact (rank concatenation) or SVD to --rank")
    lm.add_argument("files", nargs="+", help="FILE[:WEIGHT] ..., weight 1 when omitted")
    lm.add_argument("--out", required=True, help="output .safetensors")
    lm.add_argument("--rank", type=int, help="compress to this rank by SVD (reports the energy lost)")
    lr = lsub.add_parser("resize", help="change a LoRA's rank by SVD")
    lr.add_argument("file")
    lr.add_argument("--out", required=True, help="output .safetensors")
    how = lr.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="fixed new rank")
    how.add_argument("--sv-ratio", type=float, help="per module, keep singular values >= largest / RATIO")
    how.add_argument("--sv-fro", type=float, help="per module, keep this fraction of the energy (e.g. 0.95)")
    la = lsub.add_parser("analyze", help="singular-value spectrum and the rank this LoRA needs")
    la.add_argument("file")
    la.add_argument("--json", action="store_true", help="print one JSON object")
    lb = lsub.add_parser("bake", help="fuse LoRAs at weights into a copy of a base model")
    lb.add_argument("files", nargs="+", help="FILE[:WEIGHT] ...")
    lb.add_argument("--model", required=True, help="base model: folder, .safetensors or Hub id")
    lb.add_argument("--out", required=True, help="output folder (diffusers layout, .safetensors weights)")
    lc = lsub.add_parser("card", help="write <name>.README.md beside the LoRA")
    lc.add_argument("file")
    for tool in (lm, lr, lb, lc):
        tool.add_argument("--force", action="store_true", help="overwrite an existing output")
    for tool in (lm, lr):
        tool.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="saved tensor dtype")

    b = sub.add_parser("bench", help="benchmarks that print figures; the last line is one JSON object")
    bsub = b.add_subparsers(dest="bench_command", metavar="NAME", required=True)
    bl = bsub.add_parser("learn", help="train each preset on its sample dataset with the embedded model; "
                                       "print base score, LoRA score, drift, steps and seconds")
    bl.add_argument("--kind", action="append", choices=["character", "style", "concept"],
                    help="only these presets (repeatable); default all three")
    bl.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a training setting for every preset")
    bl.add_argument("--fp8", action="store_true", help="the fp8 quality guard: each preset in bf16 at two seeds "
                                                      "and with fp8 frozen weights; prints both and the seed noise")
    bs = bsub.add_parser("speed", help="time and measure the training step on full-size SD1.5 / SDXL / SD3.5 "
                                       "Medium architectures "
                                       "(random weights) against a bare UNet floor; writes bench/results.md")
    bs.add_argument("--quick", action="store_true", help="only the target settings (a few minutes on a CPU)")
    bs.add_argument("--out", type=Path, default=Path("bench/results.md"), help="the results table to write")
    bs.add_argument("--measurements", type=Path, default=Path("bench/speed-measurements.json"),
                    help="where the raw measurements are saved")
    bs.add_argument("--from", dest="replay", type=Path, metavar="JSON",
                    help="measure nothing: rebuild the table from saved measurements with the current estimator")
    bs.add_argument("--only", choices=["tiny", "sd15", "sdxl", "sd35m"],
                    help="measure only this model's rows and keep every other row of the saved measurements")
    bc = bsub.add_parser("checkpoints", help="overfit the character preset on the embedded model, score every "
                                             "checkpoint, and check the recommended one against the best")
    bc.add_argument("--steps", type=int, default=1500, help="training steps (long enough to overfit)")
    bc.add_argument("--every", type=int, default=150, help="a checkpoint every this many steps")
    bc.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a training setting")
    bd = bsub.add_parser("data", help="import, check, scan and first step on generated datasets of 100, 1,000 and "
                                      "10,000 images; growth per operation; writes bench/results.md's Data path")
    bd.add_argument("--sizes", default="100,1000,10000", help="dataset sizes, comma-separated")
    bd.add_argument("--no-results", action="store_true", help="print only; leave bench/results.md alone")

    dr = sub.add_parser("doctor", help="versions, device, free disk and known-bad combinations, each with a fix; "
                                       "exits 1 when something would stop a run")
    dr.add_argument("--json", action="store_true", help="print one JSON object")
    dr.add_argument("--vram", type=float, metavar="GB", help="plan for a GPU of this much memory (or at most this "
                                                             "much of this machine's GPU)")
    return p


def cmd_doctor(args) -> int:
    from .doctor import check

    report = check(vram=args.vram)
    print(json.dumps(report.to_dict()) if args.json else report.text())
    return 1 if report.blocking else 0


def _weighted(items: list[str]) -> tuple[list[str], list[float]]:
    """FILE[:WEIGHT] items. A colon is a weight separator only after a file name (so C:\\x.safetensors is a path)."""
    import math

    files, weights = [], []
    for item in items:
        path, sep, w = item.rpartition(":")
        if not sep or not (path.lower().endswith(".safetensors") or Path(path).is_file()):
            path, w = item, "1"
        try:
            weight = float(w)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ConfigError(f"bad weight {w!r} in {item!r}; use FILE:WEIGHT with a number, such as "
                              "style.safetensors:0.6") from None
        files.append(path)
        weights.append(weight)
    return files, weights


def cmd_lora(args) -> int:
    from trainer.lora import tools

    c = args.lora_command
    if c == "inspect":
        from .file_hashes import describe as describe_hashes

        info = tools.inspect(args.file)
        lines = [f"{info['file']}: {info['family'] or 'unknown family'} ({info['family_source']}), {info['kind']}, "
                 f"{info['layout']} layout", f"  rank {info['rank']} (all: {info['ranks']}), alpha {info['alpha']:g}, "
                 f"{info['modules']} modules", f"  trigger words: {', '.join(info['trigger_words']) or '(none)'}",
                 *[f"  {line}" for line in describe_hashes(info)]]
        lines += [f"  {k} = {v}" for k, v in sorted(info["metadata"].items()) if k != "lora_studio.config"]
        _emit(args, info, lines)
        for problem in info["defects"] + info["warnings"]:  # on stderr, so --json output stays one object
            print(f"lora-studio: warning: {Path(args.file).name}: {problem}", file=sys.stderr)
    elif c == "merge":
        files, weights = _weighted(args.files)
        r = tools.merge(files, weights, args.out, rank=args.rank, dtype=args.dtype, force=args.force)
        print(f"wrote {r['file']}: {r['modules']} modules, rank {r['rank']}, "
              + ("exact" if r["exact"] else f"{r['energy_lost']:.2%} of the energy lost (mean per module)"))
    elif c == "resize":
        r = tools.resize(args.file, args.out, rank=args.rank, sv_ratio=args.sv_ratio, sv_fro=args.sv_fro,
                         dtype=args.dtype, force=args.force)
        print(f"wrote {r['file']}: ranks {r['ranks']}, energy lost mean {r['energy_lost_mean']:.2%}, "
              f"max {r['energy_lost_max']:.2%}")
    elif c == "analyze":
        a = tools.analyze(args.file)
        lines = [f"rank for 90/95/99% of the energy: {a['rank_for_90']}/{a['rank_for_95']}/{a['rank_for_99']}",
                 a["suggestion"]]
        _emit(args, a, lines)
    elif c == "bake":
        files, weights = _weighted(args.files)
        with _Said("baking") as said:
            r = tools.bake(args.model, files, weights, args.out, force=args.force, progress=said)
        print(f"wrote {r['folder']}: {r['modules_changed']} layers changed")
    elif c == "card":
        print(f"wrote {tools.card(args.file, force=args.force)}")
    return 0


def cmd_bench(args) -> int:
    if args.bench_command == "data":
        from .bench.data import main as bench_data

        try:
            sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--sizes {args.sizes!r} must be whole numbers separated by commas") from None
        bench_data(sizes, None if args.no_results else Path("bench/results.md"))
    elif args.bench_command == "checkpoints":
        from .bench.checkpoints import main as bench_checkpoints

        bench_checkpoints(args.steps, args.every, args.overrides)
    elif args.bench_command == "learn":
        from .bench.learn import main as bench_learn

        bench_learn(tuple(args.kind or ("character", "style", "concept")), args.overrides, fp8=args.fp8)
    elif args.bench_command == "speed":
        from .bench.speed import main as bench_speed

        bench_speed(args.quick, args.out, args.measurements, args.replay, args.only)
    return 0


def resolve_train_config(args) -> RunConfig:
    """defaults <- preset (for this model family, VRAM tier and dataset size) <- --config <- --set."""
    from . import presets

    overrides = list(args.overrides)
    for flag, key in ((args.model, "model.source"), (args.dataset, "data.dataset"), (args.output, "save.output_dir")):
        if flag is not None:
            overrides.append(f"{key}={_quote(flag)}")
    preset = None
    if args.preset:
        # The preset depends on what the rest of the layers chose: model, family and dataset.
        probe = RunConfig.load(args.config, overrides=overrides)
        preset = presets.resolve(args.preset, family=_peek_family(probe), vram=args.vram,
                                 n_images=_count_images(probe.data.dataset))
    elif args.vram:
        preset = presets.vram_layer(args.vram, _peek_family(RunConfig.load(args.config, overrides=overrides)))
    return RunConfig.load(preset, args.config, overrides=overrides)


def _peek_family(cfg: RunConfig) -> str | None:
    from trainer.models.info import peek_family

    return peek_family(cfg.model.source, cfg.model.family)


def _count_images(folder: str) -> int | None:
    from .data.scan import DatasetError, scan

    try:
        return len(scan(folder).items) if folder else None
    except DatasetError:
        return None  # reported properly once training starts


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plan_memory(cfg: RunConfig, vram: int | None):
    """The memory plan against where this run will train: the CUDA GPU torch sees (--vram caps it), else the
    CPU and its available RAM (a --vram tier then shapes the preset only: nothing here has that GPU)."""
    import torch

    from trainer.memory.plan import budget_for, make_plan

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = (props.name, props.total_memory / 2**30)
    return make_plan(cfg, budget_for(vram if gpu else None, gpu))


def _check_writable(run_dir: Path) -> None:
    """Fail before any model loads when the run folder cannot be written (a file in the path, read-only)."""
    import tempfile

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to the output folder {run_dir}: {e.strerror or e}; "
                          "pick another --output (save.output_dir)") from None


def cmd_train(args) -> int:
    import shutil

    from trainer.training.events import EVENTS_FILE
    from trainer.training.loop import train
    from trainer.training.state import STATE_DIR

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").exists() and not args.config:
            raise ConfigError(f"nothing to resume: {run_dir} has no config.toml; pass the run folder of an earlier run")
        args.config = args.config or str(run_dir / "config.toml")
        args.output = str(run_dir)
    cfg = resolve_train_config(args)
    if not cfg.data.dataset:
        raise ConfigError("no dataset: pass --dataset FOLDER or set data.dataset")
    run_dir = Path(cfg.save.output_dir)
    _check_writable(run_dir)
    plan = plan_memory(cfg, args.vram)  # before anything loads: a run that cannot fit is refused here
    if plan.refused:
        raise ConfigError(plan.text())
    if plan.overrides:
        cfg = RunConfig.load(cfg.to_dict(), overrides=plan.overrides)
    if os.environ.get("RANK", "0") == "0":
        print(plan.text(), flush=True)
    if not args.resume and (run_dir / EVENTS_FILE).exists():
        if not args.force:
            raise ConfigError(f"run folder {run_dir} already holds a run; pass --output NEW_FOLDER, "
                              "or --force to start over in it")
        (run_dir / EVENTS_FILE).unlink()
        shutil.rmtree(run_dir / STATE_DIR, ignore_errors=True)  # the old run's states must not be resumed
    try:
        result = train(cfg, resume=bool(args.resume), plan=plan.to_dict())
    except Exception as e:
        # The app reads the run folder, not our stderr: leave the reason where it looks.
        from trainer.training.events import Events

        Events(run_dir).emit("error", message=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    if result.is_main:
        print(f"{'stopped' if result.stopped_early else 'done'} after {result.steps} steps: {result.lora_path}")
    return 0


class _Said:
    """A long command's progress on stderr ("lora-studio: importing: 340 / 1000"), at most every 2 s and at its end;
    stdout keeps only the result (one JSON object with --json)."""

    def __init__(self, phase: str):
        from .progress import Progress, printer

        self.phase, self.started = phase, False
        self.progress = Progress(printer("lora-studio: "), every_s=2.0, heartbeat_s=float("inf"))

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.started:
            self.progress.start(self.phase, total)
            self.started = True
        self.progress.update(done, total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.progress.finish()


def _emit(args, data: dict, text_lines: list[str]) -> None:
    print(json.dumps(data, ensure_ascii=False) if args.json else "\n".join(text_lines))


def cmd_dataset(args) -> int:
    from PIL import ImageColor

    from .data import caption_ops as ops
    from .data.validate import report

    if args.dataset_command == "import":
        from .data.importer import Limits, import_files

        try:
            background = ImageColor.getrgb(args.background)
        except ValueError:
            raise ConfigError(f"--background {args.background!r} is not a colour; use a name or #rrggbb") from None
        limits = Limits(max_files=args.max_files, max_file_bytes=args.max_file_mb * 2**20,
                        max_total_bytes=args.max_total_mb * 2**20)
        with _Said("importing") as said:
            res = import_files(args.sources, args.to, background=background, limits=limits, progress=said)
        lines = [f"imported {len(res.imported)} file(s) into {args.to}, skipped {len(res.skipped)}"]
        lines += [f"  skipped {s['source']}: {s['reason']}" for s in res.skipped]
        _emit(args, {"imported": res.imported, "skipped": res.skipped}, lines)
        missing = [s["source"] for s in res.skipped if s["reason"] == "does not exist"]
        if missing:  # a mistyped folder is an error, not a quiet "imported 0"
            print(f"lora-studio: error: {len(missing)} source(s) do not exist, e.g. {missing[0]}; check the path",
                  file=sys.stderr)
            return 2
        return 0
    if args.dataset_command in ("check", "stats"):
        _check_resolution(args.resolution)
    if args.dataset_command == "check":
        from .data import caption_lint

        with _Said("checking") as said:
            rep = report(args.dataset, resolution=args.resolution, progress=said)
        found = caption_lint.add_to_report(rep, args.dataset, trigger=args.trigger, model=args.model)
        s = rep["summary"]
        lines = [f"{rep['root']}: {s['ok']} ok, {s['warning']} with warnings, {s['excluded']} excluded"]
        lines += [f"  {f['status']:8} {f['path']}: {'; '.join(f['reasons'])}" for f in rep["files"] if f["reasons"]]
        lines += caption_lint.summary_lines(found)
        lines += ["buckets:"] + [f"  {b}: {n}" for b, n in rep["buckets"].items()]
        _emit(args, rep, lines)
        return 0
    if args.dataset_command == "stats":
        rep = report(args.dataset, resolution=args.resolution)
        freq = ops.tag_frequency(args.dataset)
        data = {"images": rep["summary"]["ok"] + rep["summary"]["warning"], "excluded": rep["summary"]["excluded"],
                "tags": freq, "buckets": rep["buckets"]}
        lines = [f"{data['images']} usable image(s), {data['excluded']} excluded", "tags:"]
        lines += [f"  {n:5d}  {t}" for t, n in freq.items()]
        lines += ["buckets:"] + [f"  {b}: {n}" for b, n in rep["buckets"].items()]
        _emit(args, data, lines)
        return 0
    # caption: exactly one action was given (argparse); an empty value is an error, never another action
    for flag, values in (("--add", [args.add]), ("--remove", [args.remove]), ("--find", [args.find]),
                         ("--replace", args.replace or [None]), ("--auto", [args.auto]),
                         ("--restore", [args.restore])):
        if any(v is not None and not v.strip() for v in values):
            raise ConfigError(f"{flag} needs a non-empty {dict(auto='model', restore='folder').get(flag[2:], 'tag')}; "
                              "an empty one would change nothing")
    if args.find is not None:
        found = [str(p) for p in ops.find_by_tag(args.dataset, args.find)]
        _emit(args, {"images": found}, found)
        return 0
    if args.add is not None:
        n = ops.add_tag(args.dataset, args.add, first=args.first)
    elif args.remove is not None:
        n = ops.remove_tag(args.dataset, args.remove)
    elif args.replace is not None:
        n = ops.replace_tag(args.dataset, *args.replace)
    elif args.template:
        n = ops.caption_uncaptioned(args.dataset, args.template, args.trigger)
    elif args.restore is not None:
        from .data.captioner import restore_captions

        done = restore_captions(args.dataset, args.restore, args.backup)
        lines = [f"{len(done.written)} caption(s) restored and {len(done.removed)} removed (they did not exist "
                 f"before) from {args.restore}"]
        lines += [f"the captions this replaced or removed are in {done.backup}"] if done.backup else []
        _emit(args, {"changed": len(done.written) + len(done.removed), "restored": len(done.written),
                     "removed": len(done.removed), "backup": done.backup}, lines)
        return 0
    else:
        return _auto_caption(args)
    _emit(args, {"changed": n}, [f"{n} caption file(s) written"])
    return 0


def _auto_caption(args) -> int:
    from .data.captioner import Combined, caption_dataset, load_captioner
    from .data.scan import scan
    from .data.wd_tagger import TaggerOptions

    scan(args.dataset)  # a missing dataset is said before any model loads
    if args.batch_size < 1 or (args.preview is not None and args.preview < 1):
        raise ConfigError("--batch-size and --preview need a number of 1 or more")
    options = TaggerOptions(args.general_threshold, args.character_threshold,
                            [t for t in args.blacklist.split(",") if t.strip()], not args.keep_underscores)
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    captioner = _load_captioner(load_captioner, args.auto, args.kind, args, options, say)
    if args.tags:
        captioner = Combined(_load_captioner(load_captioner, args.tags, "wd", args, options, say), captioner)
    with _Said("captioning") as said:
        done = caption_dataset(args.dataset, captioner, trigger=args.trigger, overwrite=args.overwrite,
                               batch_size=args.batch_size, limit=args.preview, preview=args.preview is not None,
                               backup_dir=args.backup, progress=said)
    verb = "previewed" if args.preview is not None else "written"
    lines = [f"{len(done.written)} caption(s) {verb} with {captioner.name}"]
    lines += [f"  {Path(p).name}: {c}" for p, c in done.written.items()] if args.preview is not None else []
    lines += [f"  nothing for {Path(p).name} (left as it was)" for p in done.empty]
    lines += [f"the captions it replaced are in {done.backup}; undo with: lora-studio dataset caption "
              f"{args.dataset} --restore {done.backup}"] if done.backup else []
    _emit(args, {"changed": 0 if args.preview is not None else len(done.written), "captions": done.written,
                 "empty": done.empty, "backup": done.backup, "captioner": captioner.name}, lines)
    return 0


def _load_captioner(load, model: str, kind: str, args, options, say):
    try:
        return load(model, kind, instruction=args.instruction, device=args.device, tagger_options=options,
                    progress=say)
    except Exception as e:  # transformers, onnxruntime and the Hub raise many kinds; the user needs one line
        raise ConfigError(f"could not load captioning model {model}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def _check_resolution(resolution: int) -> None:
    import dataclasses

    from .config import DataConfig

    bounds = next(f.metadata for f in dataclasses.fields(DataConfig) if f.name == "resolution")  # as data.resolution
    if not bounds["min"] <= resolution <= bounds["max"]:
        raise ConfigError(f"--resolution {resolution} must be between {bounds['min']} and {bounds['max']} pixels "
                          "(the training resolution, e.g. 512 for SD 1.5, 1024 for SDXL)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import ModelError, TrainingError

    try:
        return {"train": cmd_train, "dataset": cmd_dataset, "lora": cmd_lora, "bench": cmd_bench,
                "doctor": cmd_doctor}[args.command](args)
    except (ModelError, TrainingError, ValueError) as e:  # ConfigError, DatasetError, LoraError are ValueErrors
        print(f"lora-studio: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is a file, read-only or gone: name it instead of a traceback
        where = f" {e.filename}" if e.filename else ""
        print(f"lora-studio: error: {e.strerror or e}:{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
