"""`bench speed` on the embedded model (the full-size run is the benchmark itself, not a test):
real processes, real figures read back from run folders, the second run on the same data encodes
nothing, and the table can be rebuilt from the saved measurements. The full-size architectures are
checked against the published parameter counts on the meta device (no memory, no download)."""
import json

import pytest
import torch

from trainer.bench import fullsize, speed
from trainer.models.info import EMBEDDED_DIR


@pytest.mark.parametrize("config, params_m", [(fullsize.SD15_UNET, 859.52), (fullsize.SDXL_UNET, 2567.46)])
def test_full_size_unets_have_the_published_parameter_counts(config, params_m):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


def test_text_encoders_have_the_published_parameter_counts():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(**fullsize.CLIP_L))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**fullsize.OPENCLIP_BIGG))
    assert sum(p.numel() for p in clip_l.parameters()) / 1e6 == pytest.approx(123.06, abs=0.01)
    assert sum(p.numel() for p in big_g.parameters()) / 1e6 == pytest.approx(694.66, abs=0.01)


@pytest.mark.skipif(not (EMBEDDED_DIR / "model_index.json").exists(), reason="the embedded model is not built")
def test_bench_measures_real_runs_and_the_second_run_encodes_nothing(tmp_path):
    first = speed.Setting("tiny", 64, False, True, False, steps=4, warmup=1)
    second = speed.Setting("tiny", 64, True, True, False, steps=4, warmup=1)
    out = speed.run(settings=[first, second], work=tmp_path / "work", ablations=False)
    a, b = out["results"]
    assert not a.error and not b.error
    assert a.vae_encodes == 4 and b.vae_encodes == 0  # 4 generated images, then all from the cache
    assert out["summary"]["second_run_vae_encodes"] == 0
    for m in (a, b):
        assert len(m.step_times) == 4 and m.step_s > 0 and m.floor_s > 0
        assert 0.2 < m.peak_gb < 4  # a real process's RSS: torch alone is a few hundred MB
        assert 0 < m.first_step_s < 120
        assert m.estimate_gb > 0
    assert out["summary"]["tiny_first_step_s"] == pytest.approx(a.first_step_s, abs=0.01)

    md, saved = tmp_path / "results.md", tmp_path / "m.json"
    speed.write_markdown(out, md, "test")
    speed.save_measurements(out, saved)
    table = [line for line in md.read_text().splitlines() if line.startswith("| tiny")]
    assert len(table) == 2 and f"| {a.step_s:.2f} |" in table[0]
    replay = speed.load_measurements(saved)
    assert [m.peak_gb for m in replay["results"]] == [a.peak_gb, b.peak_gb]
    assert replay["summary"]["second_run_vae_encodes"] == 0
    assert json.loads(saved.read_text())["results"][0]["setting"]["model"] == "tiny"


def test_each_benchmark_replaces_only_its_own_section_of_the_results(tmp_path):
    from trainer.bench.sections import kept_sections, replace_section

    path = tmp_path / "results.md"
    path.write_text("# Benchmark results\n\nintro\n\n## Summary\n\nspeed rows\n\n## Data path\n\nold data\n")
    replace_section(path, "Modern families", "## Modern families\n\nblocks\n")
    replace_section(path, "Data path", "## Data path\n\nnew data\n")
    text = path.read_text()
    assert "intro" in text and "speed rows" in text and "new data" in text and "old data" not in text
    assert text.index("## Summary") < text.index("## Data path") < text.index("## Modern families")
    kept = kept_sections(path)
    assert "new data" in kept and "blocks" in kept and "speed rows" not in kept  # what bench speed carries over
