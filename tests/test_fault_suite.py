"""The counted bad-input and fault suite: every case goes through the real CLI, must end with one clear
line (or a per-file report), and must leave every file the user had byte-identical. Prints the summary
table (inputs tried, faults injected, files lost, files corrupted); the last two must be 0.
Kill-anywhere and mid-save cases live in test_resume.py (bit-identical resume)."""
from __future__ import annotations

import errno
import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import torch
from PIL import Image

from trainer.cli import main as cli_main

from .bad_inputs import make_bad_dataset
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


# name, how to build the argv from (user folder, models, workspace), expected exit code, phrase in the
# one error line (exit 2) or in the output (exit 0)
CASES = [
    ("bad images, captions and names (check)", lambda u, m, w: ["dataset", "check", str(_bad_dataset(u)), "--resolution", "64"], 0, "excluded"),
    ("bad images, captions and names (import)", lambda u, m, w: ["dataset", "import", str(u / "bad"), "--to", str(w / "ds1")], 0, "skipped"),
    ("path-traversal and absurd file names", lambda u, m, w: ["dataset", "import", str(_absurd_names(u)), "--to", str(w / "ds2")], 0, "imported"),
    ("zip bomb", lambda u, m, w: ["dataset", "import", str(_zip_bomb(u)), "--to", str(w / "ds3")], 0, "zip"),
    ("empty dataset", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(_mkdir(u / "empty")), "--output", str(w / "r1"), *FAST], 2, "no usable"),
    ("every file bad", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(_all_bad(u)), "--output", str(w / "r2"), *FAST], 2, "no usable"),
    ("missing model", lambda u, m, w: ["train", "--model", str(u / "nope.safetensors"), "--dataset", str(u / "good"), "--output", str(w / "r3"), *FAST], 2, "does not exist"),
    ("pickle checkpoint", lambda u, m, w: ["train", "--model", str(_pickle_model(u)), "--dataset", str(u / "good"), "--output", str(w / "r4"), *FAST], 2, "weights_only"),
    ("truncated .safetensors", lambda u, m, w: ["lora", "inspect", str(_truncated(u))], 2, "safetensors"),
    ("SD1.5 LoRA on SDXL", lambda u, m, w: ["lora", "bake", f"{u / 'sd1.safetensors'}:1.0", "--model", m["sdxl"], "--out", str(w / "baked")], 2, "SD 1.x LoRA but the base model is SDXL"),
    ("unknown config key", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(u / "good"), "--output", str(w / "r5"), "--set", "train.nope=1"], 2, "train.nope"),
    ("value out of range", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(u / "good"), "--output", str(w / "r6"), "--set", "optim.lr=-1"], 2, "optim.lr"),
    ("rank larger than a layer", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(u / "good"), "--output", str(w / "r7"), *FAST, "--set", "lora.rank=512"], 2, "rank"),
    ("output folder is a file", lambda u, m, w: ["train", "--model", m["sd1"], "--dataset", str(u / "good"), "--output", str(u / "good" / "img0.png" / "run"), *FAST], 2, "img0.png"),
    ("resume with no state", lambda u, m, w: ["train", "--resume", str(_mkdir(w / "r8"))], 2, "nothing to resume"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _truncated(user: Path) -> Path:
    src = (user / "sd1.safetensors").read_bytes()
    path = user / "truncated.safetensors"
    path.write_bytes(src[: len(src) // 3])
    return path


FAULTS = ["disk full while saving the LoRA", "NaN loss from step 2", "CUDA out of memory at step 1"]


def _inject(name: str, monkeypatch):
    real_write, real_mse = Path.write_bytes, torch.nn.functional.mse_loss
    calls = {"n": 0}

    def disk_full(self, data):
        if self.name.startswith(".run.safetensors."):
            with open(self, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    def nan_or_oom(*a, **k):
        calls["n"] += 1
        if name.startswith("CUDA") and calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = real_mse(*a, **k)
        return out * float("nan") if name.startswith("NaN") and calls["n"] >= 2 else out

    if name.startswith("disk"):
        monkeypatch.setattr(Path, "write_bytes", disk_full)
    else:
        monkeypatch.setattr("trainer.loop.F.mse_loss", nan_or_oom)


FAULT_PHRASES = {FAULTS[0]: "No space left on device", FAULTS[1]: "NaN/inf", FAULTS[2]: "VRAM tier"}


def test_bad_inputs_and_faults_lose_nothing(tiny_models, tmp_path, capsys, monkeypatch):
    user, ws = tmp_path / "user", tmp_path / "workspace"
    make_dataset(user / "good", n=2)
    models = {k: str(v) for k, v in tiny_models.items()}
    assert cli_main(["train", "--model", models["sd1"], "--dataset", str(user / "good"),
                     "--output", str(ws / "sd1"), *FAST]) == 0
    (user / "sd1.safetensors").write_bytes((ws / "sd1" / "sd1.safetensors").read_bytes())
    capsys.readouterr()

    rows, before_all = [], {}
    for name, argv, code, phrase in CASES:
        args = argv(user, models, ws)
        before = hashes(user)
        before_all.update(before)
        rc = cli_main(args)
        out = capsys.readouterr()
        after = hashes(user)
        lost = [f for f in before if f not in after]
        corrupted = [f for f in before if f in after and after[f] != before[f]]
        errors = [line for line in out.err.splitlines() if line.startswith("lora-studio: error:")]
        clear = rc == code and (len(errors) == 1 and phrase in errors[0] if code == 2 else phrase in out.out + out.err)
        rows.append((name, rc, clear, len(lost), len(corrupted), errors[0] if errors else ""))
    # Imports land only in their dataset folders, under sanitised names.
    stray = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("user", "workspace", "cache"))
    imported = [p.name for p in (ws / "ds2").glob("*.png")]
    sane = all(len(n) <= 200 and not n.startswith((".", "-")) and "\t" not in n for n in imported)

    # Faults during a run whose previous LoRA must survive untouched.
    run = ws / "faults"
    assert cli_main(["train", "--model", models["sd1"], "--dataset", str(user / "good"), "--output", str(run),
                     *FAST, "--set", "save.name=run"]) == 0
    good = (run / "run.safetensors").read_bytes()
    capsys.readouterr()
    for fault in FAULTS:
        with monkeypatch.context() as mp:
            _inject(fault, mp)
            rc = cli_main(["train", "--model", models["sd1"], "--dataset", str(user / "good"), "--output", str(run),
                           "--force", *FAST, "--set", "save.name=run", "--set", "train.max_steps=6"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("lora-studio: error:")]
        intact = (run / "run.safetensors").read_bytes() == good
        clear = rc == 2 and len(errors) == 1 and FAULT_PHRASES[fault] in errors[0]
        rows.append((f"fault: {fault}", rc, clear, 0, 0 if intact else 1, errors[0] if errors else ""))

    lost, corrupted = sum(r[3] for r in rows), sum(r[4] for r in rows)
    print("\ncase | exit | clear message | files lost | files corrupted | message")
    for r in rows:
        print(" | ".join(str(c) for c in r[:5]), "|", r[5][:140])
    print(f"inputs tried: {len(CASES)} cases over {len(before_all)} user files; faults injected: {len(FAULTS)}; "
          f"files lost: {lost}; files corrupted: {corrupted}")
    assert lost == 0 and corrupted == 0, rows
    assert not stray and sane and len(imported) == 5, (stray, imported)
    unclear = [r for r in rows if not r[2]]
    assert not unclear, unclear
