"""The shipped tiny model follows prompts, and each preset teaches it its sample dataset: the score
on trigger prompts rises clearly above the base model's, while trigger-free prompts barely move.
Full figures: `lora-studio bench learn` (thresholds here keep a margin below what it measures)."""
import pytest

from trainer.models.info import EMBEDDED_DIR
from trainer.world.learn import learn, load_pipeline, prompt_following

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "model_index.json").exists(),
                                reason="the embedded model is not built")
# kind: (minimum gain of the score over the base model, maximum drift). Measured with bench learn on
# a 2-core CPU (2026-11-23, the model after phases 2b-3): character 0.334 -> 0.456, drift 0.065;
# style (16 px hatching, diagonal stripe score) 0.006 -> 0.023, drift 0.076; concept 0.484 -> 0.556,
# drift 0.056. The gains asserted are about 60% of those.
THRESHOLDS = {"character": (0.07, 0.10), "style": (0.010, 0.09), "concept": (0.043, 0.09)}


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def test_shipped_model_fits_the_package_budget():
    files = [f for f in EMBEDDED_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20, sorted((f.stat().st_size, f.name) for f in files)


def test_shipped_model_follows_prompts(pipe):
    result = prompt_following(pipe, 30, seed=11)
    assert result["accuracy"] >= 0.7, result  # 81.5% on 400 prompts: see pretrain_report.json


@pytest.mark.parametrize("kind", sorted(THRESHOLDS))
def test_preset_learns_its_sample_dataset(kind, pipe, tmp_path):
    gain, max_drift = THRESHOLDS[kind]
    r = learn(kind, tmp_path, pipe=pipe)
    assert r.score_lora >= r.score_base + gain, r
    assert r.drift <= max_drift, r
    assert (tmp_path / kind / "config.toml").exists()
