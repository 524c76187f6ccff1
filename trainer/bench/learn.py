"""`lora-studio bench learn`: train each preset on its sample dataset with the embedded tiny model
and print base score, LoRA score, drift, steps and seconds. The last line is one JSON object."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path


def main(kinds=("character", "style", "concept"), overrides: list[str] = ()) -> dict:
    from ..world.learn import as_dict, generation_seconds, learn, load_pipeline, prompt_following

    pipe = load_pipeline()
    follow = prompt_following(pipe, 48, seed=7)
    print(f"base model: shape+colour right in {follow['hits']}/{follow['prompts']} prompts "
          f"({follow['accuracy']:.0%}); one 64 px generation {generation_seconds(pipe):.2f} s", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="lora-studio-learn-") as tmp:
        for kind in kinds:
            r = learn(kind, Path(tmp), pipe=pipe, overrides=overrides)
            results[kind] = r
            print(f"{kind:10s} score base {r.score_base:.3f} -> lora {r.score_lora:.3f}   drift {r.drift:.3f}   "
                  f"{r.steps} steps in {r.seconds:.0f} s", flush=True)
    out = as_dict(results)
    print(json.dumps(out))
    return out
