"""Preview mixing on tiny models: weight 0 is the base, two LoRAs at (a, b) equal both fused at those
scales, UNet/text-encoder weights act on their own parts, weight changes never reload files, and the
library reads, renames and refuses files without torch."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from app import library, prompt_tags
from app.workspace import Workspace, WorkspaceError
from tests.conftest import make_dataset, tiny_config
from trainer.lora import adapters
from trainer.lora.read import LoraError, module_index, read_lora
from trainer.training.loop import train
from trainer.preview.previewer import Previewer, Request, Slot


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    data = make_dataset(root / "data", n=4)
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        cfg = tiny_config(tiny_models["sd1"], data, root / name, **{
            "train.seed": seed, "train.max_steps": 6, "optim.lr": 2e-2, "lora.train_text_encoder": True,
            "sample.at_end": False})
        out[name] = str(train(cfg).lora_path)
    cfg = tiny_config(tiny_models["sdxl"], data, root / "xl", **{"train.max_steps": 1, "sample.at_end": False})
    out["xl"] = str(train(cfg).lora_path)
    return out


def image(previewer, model, slots, prompt="a red circle"):
    req = Request(base=str(model), loras=slots, prompt=prompt, seed=3, steps=4, guidance=3.0)
    return np.asarray(previewer.generate(req)[0], dtype=np.int16)


def fused(previewer, model, weights: dict[str, float]) -> None:
    """Add w·ΔW (up·down·alpha/rank, straight from each file) into the base weights: the reference that a
    peft adapter at weight w must equal, computed without peft."""
    previewer.pipeline(str(model))
    index = module_index(previewer.models)
    with torch.no_grad():
        for path, w in weights.items():
            for name, m in read_lora(path).modules.items():
                weight = index[name].weight
                weight += (m.delta() * w).to(weight.dtype).reshape(weight.shape)


def test_weights_mix_like_fused_weights(tiny_models, loras):
    model = tiny_models["sd1"]
    p = Previewer()
    base = image(p, model, [])
    assert np.array_equal(image(p, model, [Slot(loras["a"], 0.0)]), base)  # weight 0 is the base, exactly
    mixed = image(p, model, [Slot(loras["a"], 0.8), Slot(loras["b"], -0.6)])
    assert np.abs(mixed - base).max() > 10
    held = adapters.adapters_on(p.models)  # both files, each with its UNet and text-encoder half
    assert held.keys() == {"lora_unet", "lora_te"} and len(held["lora_unet"]) == 2 and held["lora_te"] == held["lora_unet"]

    ref = Previewer()  # a fresh pipeline with both LoRAs added into its weights at (0.8, -0.6)
    fused(ref, model, {loras["a"]: 0.8, loras["b"]: -0.6})
    assert np.abs(mixed - image(ref, model, [])).max() <= 3  # fusing rounds differently; a few levels of 255
    assert p.loads == 2
    image(p, model, [Slot(loras["a"], 0.3), Slot(loras["b"], 1.2)])
    assert p.loads == 2  # changing weights reuses the loaded adapters


@pytest.mark.smoke
def test_text_encoder_half_is_applied(tiny_models, loras):
    """The text-encoder half of a file changes the prompt embedding by exactly its ΔW, and weight 0 is the base."""
    model = tiny_models["sd1"]
    p = Previewer()
    pipe = p.pipeline(str(model))

    def embedding(slots):
        p.apply(slots)
        return pipe.encode_prompt("a red circle", "cpu", 1, False)[0]

    base = embedding([])
    te_on = embedding([Slot(loras["a"], 1.0, unet=0.0, text_encoder=1.0)])
    assert torch.equal(embedding([Slot(loras["a"], 1.0, unet=0.0, text_encoder=0.0)]), base)
    assert (te_on - base).abs().max() > 1e-3
    ref = Previewer()
    fused(ref, model, {loras["a"]: 1.0})
    ref_pipe = ref.pipeline(str(model))
    # UNet deltas do not touch the embedding, so the fused reference must match the text-encoder half alone.
    assert torch.allclose(ref_pipe.encode_prompt("a red circle", "cpu", 1, False)[0], te_on, atol=1e-5)


def test_unet_and_text_encoder_weights_act_on_their_parts(tiny_models, loras, tmp_path):
    model = tiny_models["sd1"]
    p = Previewer()
    base = image(p, model, [])
    te_only = image(p, model, [Slot(loras["a"], 1.0, unet=0.0, text_encoder=1.0)])
    unet_only = image(p, model, [Slot(loras["a"], 1.0, unet=1.0, text_encoder=0.0)])
    assert np.abs(te_only - base).max() > 0 and np.abs(unet_only - base).max() > 0
    assert np.array_equal(image(p, model, [Slot(loras["a"], 1.0, unet=0.0, text_encoder=0.0)]), base)
    # The text-encoder weight alone equals a file that only holds the text-encoder part.
    tensors = load_file(loras["a"])
    part = tmp_path / "te_part.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_te")}, str(part))
    q = Previewer()
    assert np.abs(image(q, model, [Slot(str(part), 1.0)]) - te_only).max() <= 1


def test_other_family_and_broken_files_are_refused(tiny_models, loras, tmp_path):
    p = Previewer()
    with pytest.raises(LoraError, match="SDXL"):
        image(p, tiny_models["sd1"], [Slot(loras["xl"], 1.0)])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(open(loras["a"], "rb").read()[:500])
    with pytest.raises(LoraError):
        image(p, tiny_models["sd1"], [Slot(str(broken), 1.0)])


def test_a1111_tags():
    clean, tags = prompt_tags.split("zorb, <lora:char:0.8> on blue <lora:style:0.6:0.3>, <lora:x>")
    assert clean == "zorb, on blue"
    assert tags == [("char", 0.8, None), ("style", 0.6, 0.3), ("x", 1.0, None)]


def test_library_lists_renames_and_refuses(loras, tmp_path):
    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    imported = library.import_file(ws, loras["a"])
    (e,) = library.entries(ws)
    assert e.family == "sd1" and e.rank == "4" and e.sha256 and e.path == imported
    renamed = library.rename(ws, e, "my char")
    (e2,) = library.entries(ws)
    assert e2.name == renamed.stem and e2.metadata["ss_output_name"] == renamed.stem
    # Only the header changed: the tensors are byte-identical.
    a, b = load_file(loras["a"]), load_file(str(renamed))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert list((ws.trash / "loras").rglob("*.safetensors"))  # the old name went to the trash
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(open(loras["a"], "rb").read()[:-100])
    with pytest.raises(WorkspaceError):
        library.import_file(ws, str(truncated))
    with pytest.raises(WorkspaceError, match="pickle"):
        library.import_file(ws, str(tmp_path / "model.ckpt"))


def test_library_trash_never_overwrites_and_refuses_broken_loras(loras, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    monkeypatch.setattr(library.time, "strftime", lambda fmt: "20261130-120000")  # both trashed "in one second"
    first = library.import_file(ws, loras["a"])
    library.trash(ws, next(e for e in library.entries(ws) if e.path == first))
    second = library.import_file(ws, loras["b"])
    second = second.rename(first)  # the same name again, other bytes
    library.trash(ws, next(e for e in library.entries(ws) if e.path == second))
    kept = sorted((ws.trash / "loras").rglob("*.safetensors"))
    assert len(kept) == 2 and {p.read_bytes() for p in kept} == {open(loras[k], "rb").read() for k in ("a", "b")}

    tensors = load_file(loras["a"])
    down = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[down] = tensors[down].clone().fill_(float("nan"))
    nan = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan))
    with pytest.raises(WorkspaceError, match="NaN"):
        library.import_file(ws, str(nan))
    assert not list(ws.loras.glob("nan*"))


def test_grid_cells_and_a_sheet_that_fills_in():
    from PIL import Image

    from trainer.preview import grids

    loras = [{"path": "a/char.safetensors", "weight": 0.8}, {"path": "b/style.safetensors", "weight": 0.6},
             {"path": "c/off.safetensors", "weight": 1.0, "enabled": False}]
    assert [label for label, _ in grids.compare_cells(loras)] == ["base", "char @ 0.8", "style @ 0.6", "mix"]
    xy = grids.xy_cells(loras, [0, 1], [0.5, 1])
    assert [label for label, _ in xy] == ["X 0 · Y 0.5", "X 1 · Y 0.5", "X 0 · Y 1", "X 1 · Y 1"]  # row by row
    assert grids.xy_title(loras) == "X: char weight (columns)  ·  Y: style weight (rows)"  # the axes, named
    assert xy[1][1] == [{"path": "a/char.safetensors", "weight": 1}, {"path": "b/style.safetensors", "weight": 0.5}]
    with pytest.raises(ValueError, match="two enabled"):
        grids.xy_cells(loras[:1], [0], [0])
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    partial = grids.grid([red], ["X 0 · Y 0.5"], columns=2, cells=4)
    final = grids.grid([red, blue, red, blue], ["a", "b", "c", "d"], columns=2)
    band = final.size[1] // 2 - 192
    assert partial.size == final.size == (2 * 192, 2 * (192 + band))  # enlarged 3x, crisp
    assert band >= 24  # a label strip for ~16 px text (the 6 px bitmap font was unreadable)
    ink = [y for y in range(band) if any(partial.getpixel((x, y))[0] < 128 for x in range(0, 120))]
    assert ink and max(ink) - min(ink) >= 10, ink  # the label's letters are ~10+ px tall
    assert partial.getpixel((96, band + 96)) == final.getpixel((96, band + 96)) == (255, 0, 0)
    assert partial.getpixel((192 + 96, band + 96)) != (0, 0, 255)  # not rendered yet: a placeholder


def test_a_runs_checkpoints_by_weight(tmp_path):
    from trainer.preview import grids

    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    run = ws.runs / "glorp"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("glorp-step000200", "glorp-step000100"):
        (run / "checkpoints" / f"{name}.safetensors").write_bytes(b"x")
    (run / "glorp.safetensors").write_bytes(b"x")
    found = library.run_checkpoints(ws, run / "glorp.safetensors")
    assert [p.name for p in found] == ["glorp-step000100.safetensors", "glorp-step000200.safetensors",
                                       "glorp.safetensors"]  # training order, the final one last
    cells = grids.checkpoint_cells([str(p) for p in found], [0.5, 1])
    assert [label for label, _ in cells] == ["step 100 @ 0.5", "step 100 @ 1", "step 200 @ 0.5", "step 200 @ 1",
                                             "final @ 0.5", "final @ 1"]
    assert cells[1][1] == [{"path": str(found[0]), "weight": 1}]
    with pytest.raises(WorkspaceError, match="not a run's LoRA"):
        library.run_checkpoints(ws, ws.loras / "x.safetensors")


def test_the_drift_button_renders_the_embedded_models_scenes_with_and_without_the_lora():
    """The worker's drift op: the shipped trigger-free scenes at bench learn's seed, steps and guidance, each
    rendered by the base and with the LoRA, scored by the training room's drift (no synthetic world involved)."""
    from PIL import Image

    from trainer.preview import worker
    from trainer.resources import EMBEDDED_MODEL
    from trainer.training.validation import drift, embedded_drift

    seen = []

    class Rendering:  # stands in for the Previewer: a grey level per request, brighter with the LoRA
        def generate(self, req):
            seen.append(req)
            level = 40 * len(seen) % 200 + (30 if req.loras else 0)
            return [Image.new("RGB", (8, 8), (level,) * 3)]

    value = worker.drift(Rendering(), str(EMBEDDED_MODEL), "x.safetensors", n=3)
    shipped = embedded_drift()
    assert [r.prompt for r in seen[::2]] == shipped["prompts"][:3] and [r.loras for r in seen[::2]] == [[]] * 3
    assert [r.loras[0].path for r in seen[1::2]] == ["x.safetensors"] * 3
    assert [(r.seed, r.steps, r.guidance) for r in seen[::2]] == [
        (shipped["eval"]["seed"] + i, shipped["eval"]["steps"], shipped["eval"]["guidance"]) for i in range(3)]
    levels = [(40 * (k + 1) % 200 + (30 if k % 2 else 0)) for k in range(6)]
    expect = drift([Image.new("RGB", (8, 8), (v,) * 3) for v in levels[::2]],
                   [Image.new("RGB", (8, 8), (v,) * 3) for v in levels[1::2]])
    assert value == round(expect, 4) and value > 0
    with pytest.raises(ValueError, match="embedded tiny model only"):
        worker.drift(Rendering(), "/somewhere/else", "x.safetensors")
