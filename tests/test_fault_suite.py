"""The counted bad-input and fault suite: every case goes through the real CLI, must end with one clear
line (or a per-file report), and must leave every file the user had byte-identical. Prints the summary
table (inputs tried, faults injected, files lost, files corrupted); the last two must be 0.
Kill-anywhere and mid-save cases live in test_resume.py (bit-identical resume)."""
from __future__ import annotations

import errno
import hashlib
import io
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from PIL import Image

from trainer.cli import main as cli_main

from .bad_inputs import (dataset_with_hidden_image, duplicates_with_one_caption, folder_with_zip, lora_variants,
                         make_bad_dataset, zip_with_bad_crc)
from .conftest import make_dataset

FAST = ["--set", "train.max_steps=2", "--set", "data.resolution=32", "--set", "data.bucket_step=8",
        "--set", "sample.at_end=false", "--set", "lora.rank=4", "--set", "lora.alpha=4.0"]


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _pickle_model(user: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (print, ("this would run on load",))

    path = user / "model.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    return path


def _zip_bomb(user: Path) -> Path:
    path = user / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("huge.png", b"\0" * (300 << 20))  # 300 MB of zeros in ~300 KB
    return path


def _absurd_names(user: Path) -> Path:
    folder = user / "absurd"
    folder.mkdir()
    names = ("a" * 240 + ".png", "..png", "-rf .png", "sp ace\tand tab.png", "ünï cødé.png")
    for name, colour in zip(names, ("red", "green", "blue", "yellow", "purple")):  # distinct, so none is a duplicate
        Image.new("RGB", (48, 40), colour).save(folder / name, format="PNG")
    return folder


def _bad_dataset(user: Path) -> Path:
    make_bad_dataset(user / "bad")
    return user / "bad"


def _all_bad(user: Path) -> Path:
    folder = user / "allbad"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not a picture")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, format="JPEG")
    (folder / "half.jpg").write_bytes(buf.getvalue()[:200])
    return folder


def _loras(user: Path) -> dict[str, Path]:
    if not (user / "loras").is_dir():
        (user / "loras").mkdir()
        lora_variants(user / "sd1.safetensors", user / "loras")
    return {p.stem if p.suffix == ".safetensors" else "pickle": p for p in (user / "loras").iterdir()}


def _lora(user: Path, name: str) -> str:
    return str(_loras(user)[name])


def _file(user: Path, name: str, text: str = "x") -> Path:
    (user / name).write_text(text, encoding="utf-8")
    return user / name


def _train(u, m, w, out, *extra):
    return ["train", "--model", m["sd1"], "--dataset", str(u / "good"), "--output", str(w / out), *FAST, *extra]


# name, how to build the argv from (user folder, models, workspace), expected exit code, phrase (or phrases) in
# the one error line (exit 2) or in the output (exit 0)
CASES = [
    # datasets: check and import
    ("bad images, captions and names (check)", lambda u, m, w: ["dataset", "check", str(_bad_dataset(u)), "--resolution", "64"], 0, "excluded"),
    ("bad images, captions and names (import)", lambda u, m, w: ["dataset", "import", str(u / "bad"), "--to", str(w / "ds1")], 0, "skipped"),
    ("path-traversal and absurd file names", lambda u, m, w: ["dataset", "import", str(_absurd_names(u)), "--to", str(w / "ds2")], 0, "imported"),
    ("zip bomb", lambda u, m, w: ["dataset", "import", str(_zip_bomb(u)), "--to", str(w / "ds3")], 0, "zip"),
    ("zip with a bad-CRC member", lambda u, m, w: ["dataset", "import", str(zip_with_bad_crc(u / "crc.zip")), "--to", str(w / "ds4")], 0, ("imported 2 file", "crc.zip:b.png: unreadable zip member (bad CRC")),
    ("zip that is not a zip", lambda u, m, w: ["dataset", "import", str(_file(u, "fake.zip", "PK not a zip")), "--to", str(w / "ds5")], 0, "not a readable zip"),
    ("zip inside an imported folder", lambda u, m, w: ["dataset", "import", str(folder_with_zip(u / "withzip")), "--to", str(w / "ds6")], 0, ("imported 3 file", "notes.docx: not an image or zip")),
    ("duplicate: the bare copy sorts first (import)", lambda u, m, w: ["dataset", "import", str(duplicates_with_one_caption(u / "dups")), "--to", str(w / "ds7")], 0, "its caption was given to dup_of_good_01.png"),
    ("duplicate: the captioned copy is kept (check)", lambda u, m, w: ["dataset", "check", str(u / "dups"), "--resolution", "64"], 0, "exact duplicate of good_01.png (that copy has a caption)"),
    ("image hidden by a leading dot (check)", lambda u, m, w: ["dataset", "check", str(dataset_with_hidden_image(u / "hidden")), "--resolution", "64"], 0, ".hidden.png: hidden file"),
    ("import a source that does not exist", lambda u, m, w: ["dataset", "import", str(u / "gone.png"), "--to", str(w / "ds8")], 2, "source(s) do not exist"),
    ("import into a file", lambda u, m, w: ["dataset", "import", str(u / "good"), "--to", str(u / "good" / "img0.txt")], 2, "is a file, not a dataset folder"),
    ("import with a background that is no colour", lambda u, m, w: ["dataset", "import", str(u / "good"), "--to", str(w / "ds9"), "--background", "plaid"], 2, "--background"),
    ("check a folder that does not exist", lambda u, m, w: ["dataset", "check", str(u / "nowhere")], 2, "does not exist"),
    ("check --resolution 0", lambda u, m, w: ["dataset", "check", str(u / "good"), "--resolution", "0"], 2, "--resolution 0 must be"),
    ("check --resolution -5", lambda u, m, w: ["dataset", "check", str(u / "good"), "--resolution", "-5"], 2, "--resolution -5 must be"),
    ("stats --resolution 0", lambda u, m, w: ["dataset", "stats", str(u / "good"), "--resolution", "0"], 2, "--resolution 0 must be"),
    ("caption --add ''", lambda u, m, w: ["dataset", "caption", str(u / "good"), "--add", ""], 2, "--add needs a non-empty tag"),
    ("caption --remove ''", lambda u, m, w: ["dataset", "caption", str(u / "good"), "--remove", " "], 2, "--remove needs a non-empty tag"),
    ("caption --replace '' x", lambda u, m, w: ["dataset", "caption", str(u / "good"), "--replace", "", "x"], 2, "--replace needs a non-empty tag"),
    ("caption --find ''", lambda u, m, w: ["dataset", "caption", str(u / "good"), "--find", ""], 2, "--find needs a non-empty tag"),
    ("caption --auto ''", lambda u, m, w: ["dataset", "caption", str(u / "good"), "--auto", ""], 2, "--auto needs a non-empty model"),
    # training
    ("empty dataset", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(_mkdir(u / "empty")), "--output", str(w / "r1"), *FAST], 2, "no usable"),
    ("every file bad", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(_all_bad(u)), "--output", str(w / "r2"), *FAST], 2, "no usable"),
    ("dataset is a file", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(u / "good" / "img0.png"), "--output", str(w / "r9"), *FAST], 2, "is a file, not a dataset folder"),
    ("missing model", lambda u, m, w: ["train", "--model", str(u / "nope.safetensors"), "--dataset", str(u / "good"), "--output", str(w / "r3"), *FAST], 2, "does not exist"),
    ("model folder without model_index.json", lambda u, m, w: ["train", "--model", str(u / "good"), "--dataset", str(u / "good"), "--output", str(w / "r10"), *FAST], 2, "not a diffusers model"),
    ("pickle checkpoint", lambda u, m, w: ["train", "--model", str(_pickle_model(u)), "--dataset", str(u / "good"), "--output", str(w / "r4"), *FAST], 2, "weights_only"),
    ("unknown config key", lambda u, m, w: _train(u, m, w, "r5", "--set", "train.nope=1"), 2, "train.nope"),
    ("unknown config section", lambda u, m, w: _train(u, m, w, "r11", "--set", "trian.max_steps=1"), 2, "trian"),
    ("value out of range", lambda u, m, w: _train(u, m, w, "r6", "--set", "optim.lr=-1"), 2, "optim.lr"),
    ("value of the wrong type", lambda u, m, w: _train(u, m, w, "r12", "--set", "train.max_steps=many"), 2, "train.max_steps"),
    ("value not among the choices", lambda u, m, w: _train(u, m, w, "r13", "--set", "optim.optimizer=sgd"), 2, "optim.optimizer"),
    ("override without '='", lambda u, m, w: _train(u, m, w, "r14", "--set", "train.max_steps"), 2, "section.key=value"),
    ("resolution below the minimum", lambda u, m, w: _train(u, m, w, "r15", "--set", "data.resolution=16"), 2, "data.resolution"),
    ("config file that does not exist", lambda u, m, w: _train(u, m, w, "r16", "--config", str(u / "none.toml")), 2, "none.toml"),
    ("config file that is not TOML", lambda u, m, w: _train(u, m, w, "r17", "--config", str(_file(u, "bad.toml", "[train\nmax_steps = ="))), 2, "bad.toml"),
    ("unknown preset", lambda u, m, w: _train(u, m, w, "r18", "--preset", "portrait"), 2, "unknown preset"),
    ("VRAM tier that does not exist", lambda u, m, w: _train(u, m, w, "r19", "--vram", "3"), 2, "VRAM tier 3"),
    ("rank larger than a layer", lambda u, m, w: _train(u, m, w, "r7", "--set", "lora.rank=512"), 2, "rank"),
    ("a learning rate that is NaN", lambda u, m, w: _train(u, m, w, "r22", "--set", "optim.lr=nan"), 2, "a finite number"),
    ("an infinite noise offset", lambda u, m, w: _train(u, m, w, "r23", "--set", "train.noise_offset=inf"), 2, "train.noise_offset"),
    ("Adam betas that are not numbers", lambda u, m, w: _train(u, m, w, "r24", "--set", 'optim.betas=["a", 5, 7]'), 2, "a list of 2 numbers"),
    ("an Adam beta of 1", lambda u, m, w: _train(u, m, w, "r25", "--set", "optim.betas=[0.9, 1.0]"), 2, "< 1.0"),
    ("sample prompts that are numbers", lambda u, m, w: _train(u, m, w, "r26", "--set", "sample.prompts=[1, 2]"), 2, "a list of strings"),
    ("a validation split that leaves nothing to train on", lambda u, m, w: _train(u, m, w, "r27", "--set", "data.validation_split=100"), 2, ("holds out 2 of 2 images", "leaves 0 to train on")),
    ("fp8 frozen weights without mixed precision", lambda u, m, w: _train(u, m, w, "r20", "--set", 'train.frozen_dtype="fp8"'), 2, "frozen_dtype=fp8"),
    ("output folder is a file", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(u / "good"), "--output", str(u / "good" / "img0.png" / "run"), *FAST], 2, "img0.png"),
    ("resume with no state", lambda u, m, w: ["train", "--resume", str(_mkdir(w / "r8"))], 2, "nothing to resume"),
    ("an untrained LoRA is flagged at export", lambda u, m, w: _train(u, m, w, "r21", "--set", "train.max_steps=1", "--set", "optim.warmup_steps=10"), 0, "every lora_up weight is zero"),
    # LoRA files
    ("truncated .safetensors", lambda u, m, w: ["lora", "inspect", str(_truncated(u))], 2, "safetensors"),
    ("inspect a missing file", lambda u, m, w: ["lora", "inspect", str(u / "missing.safetensors")], 2, "does not exist"),
    ("inspect a pickle", lambda u, m, w: ["lora", "inspect", _lora(u, "pickle")], 2, ".safetensors only"),
    ("inspect a LoHa", lambda u, m, w: ["lora", "inspect", _lora(u, "loha")], 2, "LoHa"),
    ("inspect a file with no LoRA in it", lambda u, m, w: ["lora", "inspect", _lora(u, "plain")], 2, "no LoRA weights"),
    ("inspect NaN values", lambda u, m, w: ["lora", "inspect", _lora(u, "nan")], 0, "warning: nan.safetensors: 1 module(s) with NaN"),
    ("inspect infinite values", lambda u, m, w: ["lora", "inspect", _lora(u, "inf")], 0, "warning: inf.safetensors: 1 module(s) with NaN or infinite"),
    ("inspect mismatched ranks", lambda u, m, w: ["lora", "inspect", _lora(u, "mismatch")], 0, "ranks that do not match"),
    ("inspect all-zero up weights", lambda u, m, w: ["lora", "inspect", _lora(u, "zero")], 0, "every lora_up weight is zero"),
    ("merge a NaN LoRA", lambda u, m, w: ["lora", "merge", str(u / "sd1.safetensors"), _lora(u, "nan"), "--out", str(w / "m1.safetensors")], 2, "cannot merge nan.safetensors"),
    ("merge mismatched ranks", lambda u, m, w: ["lora", "merge", _lora(u, "mismatch"), "--out", str(w / "m2.safetensors")], 2, "do not match"),
    ("merge two families", lambda u, m, w: ["lora", "merge", str(u / "sd1.safetensors"), _lora(u, "sdxl"), "--out", str(w / "m3.safetensors")], 2, "different families"),
    ("merge with a bad weight", lambda u, m, w: ["lora", "merge", f"{u / 'sd1.safetensors'}:abc", "--out", str(w / "m4.safetensors")], 2, "bad weight 'abc'"),
    ("merge with a NaN weight", lambda u, m, w: ["lora", "merge", f"{u / 'sd1.safetensors'}:nan", "--out", str(w / "m5.safetensors")], 2, "bad weight 'nan'"),
    ("merge --rank 0", lambda u, m, w: ["lora", "merge", str(u / "sd1.safetensors"), "--out", str(w / "m6.safetensors"), "--rank", "0"], 2, "--rank 0 must be"),
    ("merge into a folder that does not exist", lambda u, m, w: ["lora", "merge", str(u / "sd1.safetensors"), "--out", str(u / "no" / "dir" / "x.safetensors")], 2, "does not exist; create it first"),
    ("merge over an existing file", lambda u, m, w: ["lora", "merge", str(u / "sd1.safetensors"), "--out", str(u / "sd1.safetensors")], 2, "already exists"),
    ("resize a NaN LoRA", lambda u, m, w: ["lora", "resize", _lora(u, "nan"), "--out", str(w / "s1.safetensors"), "--rank", "2"], 2, "cannot resize nan.safetensors"),
    ("resize mismatched ranks", lambda u, m, w: ["lora", "resize", _lora(u, "mismatch"), "--out", str(w / "s2.safetensors"), "--rank", "2"], 2, "do not match"),
    ("resize --rank 0", lambda u, m, w: ["lora", "resize", str(u / "sd1.safetensors"), "--out", str(w / "s3.safetensors"), "--rank", "0"], 2, "--rank 0 must be"),
    ("resize --rank -3", lambda u, m, w: ["lora", "resize", str(u / "sd1.safetensors"), "--out", str(w / "s4.safetensors"), "--rank", "-3"], 2, "--rank -3 must be"),
    ("resize --sv-ratio -1", lambda u, m, w: ["lora", "resize", str(u / "sd1.safetensors"), "--out", str(w / "s5.safetensors"), "--sv-ratio", "-1"], 2, "--sv-ratio -1 must be"),
    ("resize --sv-fro 1.5", lambda u, m, w: ["lora", "resize", str(u / "sd1.safetensors"), "--out", str(w / "s6.safetensors"), "--sv-fro", "1.5"], 2, "--sv-fro 1.5 must be"),
    ("analyze a NaN LoRA", lambda u, m, w: ["lora", "analyze", _lora(u, "nan")], 2, "cannot analyze nan.safetensors"),
    ("analyze mismatched ranks", lambda u, m, w: ["lora", "analyze", _lora(u, "mismatch")], 2, "do not match"),
    ("bake a NaN LoRA", lambda u, m, w: ["lora", "bake", _lora(u, "nan"), "--model", m["sd1"], "--out", str(w / "baked-nan")], 2, "cannot bake nan.safetensors"),
    ("SD1.5 LoRA on SDXL", lambda u, m, w: ["lora", "bake", f"{u / 'sd1.safetensors'}:1.0", "--model", m["sdxl"], "--out", str(w / "baked")], 2, "SD 1.x LoRA but the base model is SDXL"),
    ("card for a missing file", lambda u, m, w: ["lora", "card", str(u / "missing.safetensors")], 2, "does not exist"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _truncated(user: Path) -> Path:
    src = (user / "sd1.safetensors").read_bytes()
    path = user / "truncated.safetensors"
    path.write_bytes(src[: len(src) // 3])
    return path


FAULTS = ["disk full while saving the LoRA", "disk full while saving the training state", "NaN loss from step 2",
          "CUDA out of memory at step 1", "disk full in safetensors while saving the training state",
          "LoRA weights NaN after step 3"]


def _inject(name: str, monkeypatch):
    real_write, real_mse, real_save = Path.write_bytes, torch.nn.functional.mse_loss, torch.save
    calls = {"n": 0, "saves": 0}

    def disk_full(self, data):
        if self.name.startswith(".run.safetensors."):
            with open(self, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    def state_disk_full(obj, path, *a, **k):
        """The second state save runs out of disk the way torch.save reports it: half a file, then its zip
        writer's RuntimeError (not an OSError)."""
        calls["saves"] += 1
        if calls["saves"] < 2:
            return real_save(obj, path, *a, **k)
        Path(path).write_bytes(b"PK" + b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 63232 vs 63124")

    def nan_or_oom(*a, **k):
        calls["n"] += 1
        if name.startswith("CUDA") and calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = real_mse(*a, **k)
        return out * float("nan") if name.startswith("NaN") and calls["n"] >= 2 else out

    def safetensors_disk_full(tensors, filename, *a, **k):
        """safetensors reports a full disk with its own exception type, which is no OSError."""
        from safetensors import SafetensorError

        Path(filename).write_bytes(b"\0" * 16)
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    real_step = None

    def poison_after_3(*a, **k):
        out = real_step(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # the weights, not the loss: every later step sees NaN
            with torch.no_grad():
                for group in a[3]:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        return out

    if name == FAULTS[0]:
        monkeypatch.setattr(Path, "write_bytes", disk_full)
    elif name == FAULTS[4]:
        monkeypatch.setattr("trainer.training.state.save_file", safetensors_disk_full)
        monkeypatch.setattr("trainer.training.state.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 20, 4096))
    elif name == FAULTS[5]:
        import trainer.training.loop

        real_step = trainer.training.loop._optimizer_step
        monkeypatch.setattr("trainer.training.loop._optimizer_step", poison_after_3)
    elif name == FAULTS[1]:
        monkeypatch.setattr("trainer.training.state.torch.save", state_disk_full)
        monkeypatch.setattr("trainer.training.state.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
    else:
        monkeypatch.setattr("trainer.training.step.F.mse_loss", nan_or_oom)


FAULT_PHRASES = {FAULTS[0]: "No space left on device", FAULTS[1]: "disk full while saving the training state at step 4",
                 FAULTS[2]: "NaN/inf", FAULTS[3]: "VRAM tier", FAULTS[4]: "disk full while saving the training state",
                 FAULTS[5]: "NaN or infinite"}


def _run_cli(args: list[str], capsys) -> tuple[object, str, str, int]:
    """(exit code, stdout, stderr, tracebacks). An exception escaping the CLI is what a user sees as a traceback."""
    try:
        rc = cli_main(args)
        tracebacks = 0
    except Exception as e:  # counted, not raised: the table shows every case
        rc, tracebacks = f"{type(e).__name__}", 1
    out = capsys.readouterr()
    return rc, out.out, out.err, tracebacks + out.err.count("Traceback (most recent call last)")


def test_bad_inputs_and_faults_lose_nothing(tiny_models, tmp_path, capsys, monkeypatch):
    user, ws = tmp_path / "user", tmp_path / "workspace"
    make_dataset(user / "good", n=2)
    models = {k: str(v) for k, v in tiny_models.items()}
    assert cli_main(["train", "--model", models["sd1"], "--dataset", str(user / "good"),
                     "--output", str(ws / "sd1"), *FAST]) == 0
    (user / "sd1.safetensors").write_bytes((ws / "sd1" / "sd1.safetensors").read_bytes())
    capsys.readouterr()

    rows, before_all = [], {}
    for name, argv, code, phrases in CASES:
        args = argv(user, models, ws)
        before = hashes(user)
        before_all.update(before)
        rc, out, err, tracebacks = _run_cli(args, capsys)
        after = hashes(user)
        lost = [f for f in before if f not in after]
        modified = [f for f in before if f in after and after[f] != before[f]]
        errors = [line for line in err.splitlines() if line.startswith("lora-studio: error:")]
        phrases = (phrases,) if isinstance(phrases, str) else phrases
        said = errors[0] if code == 2 and len(errors) == 1 else ("" if code == 2 else out + err)
        clear = rc == code and all(p in said for p in phrases)
        rows.append((name, rc, clear, tracebacks, len(lost), len(modified), errors[0] if errors else ""))
    # Imports land only in their dataset folders, under sanitised names; refused outputs create no folders.
    stray = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("user", "workspace", "cache"))
    imported = [p.name for p in (ws / "ds2").glob("*.png")]
    sane = all(len(n) <= 200 and not n.startswith((".", "-")) and "\t" not in n for n in imported)
    assert not (user / "no").exists()
    # The bare duplicate that sorted first now carries the caption of the copy that was skipped.
    assert (ws / "ds7" / "dup_of_good_01.txt").read_text(encoding="utf-8") == "zorbo, red box"

    # Faults during a run whose previous LoRA must survive untouched.
    run = ws / "faults"
    assert cli_main(["train", "--model", models["sd1"], "--dataset", str(user / "good"), "--output", str(run),
                     *FAST, "--set", "save.name=run"]) == 0
    good = (run / "run.safetensors").read_bytes()
    capsys.readouterr()
    for fault in FAULTS:
        with monkeypatch.context() as mp:
            _inject(fault, mp)
            rc, _, err, tracebacks = _run_cli(["train", "--model", models["sd1"], "--dataset", str(user / "good"),
                                               "--output", str(run), "--force", *FAST, "--set", "save.name=run",
                                               "--set", "train.max_steps=6", "--set", "save.state_every_n_steps=2"],
                                              capsys)
        errors = [line for line in err.splitlines() if line.startswith("lora-studio: error:")]
        intact = (run / "run.safetensors").read_bytes() == good
        clear = rc == 2 and len(errors) == 1 and FAULT_PHRASES[fault] in errors[0]
        if fault == FAULTS[1]:  # the partial state is gone, the last good one is kept, and the log says why
            clear = clear and not list((run / "state").glob(".tmp-*")) and (run / "state" / "step-000002").is_dir()
            clear = clear and "disk full" in (run / "events.jsonl").read_text(encoding="utf-8")
        rows.append((f"fault: {fault}", rc, clear, tracebacks, 0, 0 if intact else 1, errors[0] if errors else ""))

    tracebacks, lost, modified = (sum(r[i] for r in rows) for i in (3, 4, 5))
    print("\ncase | exit | clear message | tracebacks | files lost | files modified | message")
    for r in rows:
        print(" | ".join(str(c) for c in r[:6]), "|", r[6][:140])
    print(f"cases: {len(rows)} ({len(CASES)} bad inputs over {len(before_all)} user files, {len(FAULTS)} faults "
          f"injected); tracebacks: {tracebacks}; files lost: {lost}; files modified: {modified}")
    assert len(rows) >= 60
    assert tracebacks == 0 and lost == 0 and modified == 0, rows
    assert not stray and sane and len(imported) == 5, (stray, imported)
    unclear = [r for r in rows if not r[2]]
    assert not unclear, unclear
