"""`lora-studio dataset`: import, check, caption (by hand, in bulk, from templates or captioning models), stats."""
from __future__ import annotations

import sys
from pathlib import Path

from trainer.config import ConfigError
from trainer.cli.common import _Said, _emit


def add_parser(sub) -> None:
    from trainer.data.captioner import KINDS as captioner_kinds  # torch-free

    d = sub.add_parser("dataset", help="import, check, caption and summarise datasets")
    dsub = d.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    di = dsub.add_parser("import", help="copy images, folders or zips into a dataset folder (originals untouched)")
    di.add_argument("sources", nargs="+", help="image files, folders or .zip archives")
    di.add_argument("--to", required=True, help="the dataset folder to import into (created if missing)")
    di.add_argument("--background", default="white", help="colour that transparent pixels are composited on")
    di.add_argument("--max-files", type=int, default=50_000,
                    help="a dataset holds at most this many images (those there already count)")
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


def cmd_dataset(args) -> int:
    from PIL import ImageColor

    from trainer.data import caption_ops as ops
    from trainer.data.validate import report

    if args.dataset_command == "import":
        from trainer.data.importer import Limits, import_files

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
        from trainer.data import caption_lint

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
        from trainer.data.captioner import restore_captions

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
    from trainer.data.captioner import Combined, caption_dataset, load_captioner
    from trainer.data.scan import scan
    from trainer.data.wd_tagger import TaggerOptions

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

    from trainer.config import DataConfig

    bounds = next(f.metadata for f in dataclasses.fields(DataConfig) if f.name == "resolution")  # as data.resolution
    if not bounds["min"] <= resolution <= bounds["max"]:
        raise ConfigError(f"--resolution {resolution} must be between {bounds['min']} and {bounds['max']} pixels "
                          "(the training resolution, e.g. 512 for SD 1.5, 1024 for SDXL)")
