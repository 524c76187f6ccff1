"""`lora-studio bench checkpoints`: does the recommendation pick a checkpoint worth keeping? Trains the
character preset on its sample set with the embedded model, long enough to overfit, holding 4 of its 16 images
out for validation and saving a checkpoint every so often; then scores every checkpoint with
trainer/world/score.py (trigger score and drift, as `bench learn` does) and prints, per checkpoint, the
validation loss, the trainer's drift, the trigger score and the bench drift, and then three checks:
- the validation loss turns upward (overfitting shows in it);
- the recommended checkpoint's trigger score is within 10% of the best checkpoint's;
- its drift is no worse than the last checkpoint's. Drift is measured here on DRIFT_PROMPTS trigger-free prompts
  (three times `bench learn`'s 8, because checkpoints of one run differ by about 1% in drift and 8 prompts do not
  resolve that); the paired standard error of the difference is printed beside it, and "within noise" means
  the recommended checkpoint's drift is at most two standard errors above the last's.
The last line is one JSON object."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

KIND = "character"
DRIFT_PROMPTS = 24


def _drifts(pipe, lora_path: Path, base_plain: list, prompts: list[str]) -> list[float]:
    """Per prompt, the mean pixel change of the LoRA's render against the base's (score.drift of one pair)."""
    from trainer.lora import adapters
    from trainer.lora.read import read_lora
    from ..world import score
    from ..world.learn import EVAL, generate

    models = {"lora_unet": pipe.unet, "lora_te": pipe.text_encoder}
    adapters.load(models, read_lora(lora_path), KIND)
    adapters.mix(models, {KIND: {prefix: 1.0 for prefix in models}})
    try:
        renders = generate(pipe, prompts, EVAL["seed"], EVAL["steps"], EVAL["guidance"])
    finally:
        adapters.remove(models, KIND)
    return [score.drift([a], [b]) for a, b in zip(base_plain, renders)]


def main(steps: int = 1500, every: int = 150, overrides: list[str] = ()) -> dict:
    from ..config import RunConfig
    from trainer.training.events import read_events
    from trainer.training.loop import train
    from ..presets import resolve
    from ..resources import SAMPLE_DATASETS
    from ..world.learn import EVAL, evaluate, generate, load_pipeline, plain_prompts

    dataset = SAMPLE_DATASETS / KIND
    with tempfile.TemporaryDirectory(prefix="lora-studio-checkpoints-") as tmp:
        run = Path(tmp) / KIND
        cfg = RunConfig.load(resolve(KIND, family="tiny", n_images=len(list(dataset.glob("*.png")))), overrides=[
            f'data.dataset="{dataset.as_posix()}"', f'save.output_dir="{run.as_posix()}"',
            f"train.max_steps={steps}", f"save.every_n_steps={every}", "data.validation_split=4",
            "sample.every_n_steps=0", *overrides])
        train(cfg)
        events = read_events(run)
        checkpoints = [e for e in events if e["type"] == "checkpoint"]
        rec = next(e for e in events if e["type"] == "recommendation")
        pipe = load_pipeline()
        plain = plain_prompts(DRIFT_PROMPTS)
        base_plain = generate(pipe, plain, EVAL["seed"], EVAL["steps"], EVAL["guidance"])
        rows, per_prompt = [], {}
        for c in checkpoints:
            _, score, _ = evaluate(pipe, KIND, Path(c["path"]), dataset)
            per_prompt[c["step"]] = _drifts(pipe, Path(c["path"]), base_plain, plain)
            rows.append({"step": c["step"], "validation_loss": round(c["validation_loss"], 5),
                         "drift": round(c["drift"], 4), "trigger_score": round(score, 4),
                         "bench_drift": round(sum(per_prompt[c["step"]]) / DRIFT_PROMPTS, 4)})
    best = max(rows, key=lambda r: r["trigger_score"])
    picked = next(r for r in rows if r["step"] == rec["step"])
    lowest = min(rows, key=lambda r: r["validation_loss"])
    last = rows[-1]
    print(f"{'step':>6} {'val loss':>9} {'drift':>7} {'score':>7} {'bench drift':>11}")
    for r in rows:
        mark = " <- recommended" if r is picked else ""
        mark += " (best score)" if r is best else ""
        print(f"{r['step']:>6} {r['validation_loss']:>9.5f} {r['drift']:>7.4f} {r['trigger_score']:>7.4f} "
              f"{r['bench_drift']:>11.4f}{mark}")
    print(f"recommendation: {rec['message']}")
    rise = last["validation_loss"] / lowest["validation_loss"] - 1
    diffs = [a - b for a, b in zip(per_prompt[picked["step"]], per_prompt[last["step"]])]
    mean_diff = sum(diffs) / len(diffs)
    se = (sum((d - mean_diff) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    checks = {
        "validation_loss_turns_upward": lowest is not last and rise > 0,
        "validation_rise_after_minimum": round(rise, 4),
        "recommended_score_over_best": round(picked["trigger_score"] / best["trigger_score"], 4),
        "recommended_within_10pct_of_best": picked["trigger_score"] >= 0.9 * best["trigger_score"],
        "recommended_drift_not_worse_than_last": picked["bench_drift"] <= last["bench_drift"],
        # Not worse beyond what the measurement resolves: at most two paired standard errors above the last.
        "recommended_drift_not_worse_within_noise": mean_diff <= 2 * se,
        "drift_difference_vs_last": round(mean_diff, 5),
        "drift_difference_standard_error": round(se, 5),
    }
    print(f"validation loss lowest at step {lowest['step']}, {rise:+.1%} by step {last['step']}; recommended "
          f"step {picked['step']} scores {checks['recommended_score_over_best']:.0%} of the best (step {best['step']}); "
          f"its bench drift {picked['bench_drift']:.4f} vs the last checkpoint's {last['bench_drift']:.4f} "
          f"(difference {mean_diff:+.4f}, paired standard error {se:.4f} over {DRIFT_PROMPTS} prompts)")
    out = {"steps": steps, "every": every, "recommended_step": picked["step"], "best_score_step": best["step"],
           **checks, "checkpoints": rows}
    print(json.dumps(out))
    return out
