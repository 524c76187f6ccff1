"""`lora-studio bench checkpoints`: does the recommendation pick a checkpoint worth keeping? Trains the
character preset on its sample set with the embedded model, long enough to overfit, holding 4 of its 16 images
out for validation and saving a checkpoint every so often; then scores every checkpoint with
trainer/world/score.py (trigger score and drift, as `bench learn` does) and prints, per checkpoint, the
validation loss, the trainer's drift, the trigger score and the bench drift, and then three checks:
- the validation loss turns upward (overfitting shows in it);
- the recommended checkpoint's trigger score is within 10% of the best checkpoint's;
- its drift is no worse than the last checkpoint's.
The last line is one JSON object."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

KIND = "character"


def main(steps: int = 1500, every: int = 150, overrides: list[str] = ()) -> dict:
    from ..config import RunConfig
    from ..events import read_events
    from ..loop import train
    from ..presets import resolve
    from ..resources import SAMPLE_DATASETS
    from ..world.learn import evaluate, load_pipeline

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
        rows = []
        for c in checkpoints:
            _, score, bench_drift = evaluate(pipe, KIND, Path(c["path"]), dataset)
            rows.append({"step": c["step"], "validation_loss": round(c["validation_loss"], 5),
                         "drift": round(c["drift"], 4), "trigger_score": round(score, 4),
                         "bench_drift": round(bench_drift, 4)})
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
    checks = {
        "validation_loss_turns_upward": lowest is not last and rise > 0,
        "validation_rise_after_minimum": round(rise, 4),
        "recommended_score_over_best": round(picked["trigger_score"] / best["trigger_score"], 4),
        "recommended_within_10pct_of_best": picked["trigger_score"] >= 0.9 * best["trigger_score"],
        "recommended_drift_not_worse_than_last": picked["bench_drift"] <= last["bench_drift"],
    }
    print(f"validation loss lowest at step {lowest['step']}, {rise:+.1%} by step {last['step']}; recommended "
          f"step {picked['step']} scores {checks['recommended_score_over_best']:.0%} of the best (step {best['step']}); "
          f"its bench drift {picked['bench_drift']:.4f} vs the last checkpoint's {last['bench_drift']:.4f}")
    out = {"steps": steps, "every": every, "recommended_step": picked["step"], "best_score_step": best["step"],
           **checks, "checkpoints": rows}
    print(json.dumps(out))
    return out
