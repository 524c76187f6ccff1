"""`python -m trainer.preview.worker --out DIR`: the preview process the UI talks to.

One JSON request per stdin line, one JSON reply per stdout line. The pipeline and loaded LoRAs stay
in memory between requests. Images are written under DIR and replied as paths.

Requests: {"op": "generate" | "drift" | "ping", "request": {...Request fields...},
"lora": path}. Replies: {"ok": true, ...} or {"ok": false, "error": "one line"}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


def handle(previewer, out: Path, msg: dict) -> dict:
    from trainer.preview.previewer import Request

    op = msg.get("op")
    if op == "ping":
        return {"ok": True}
    req = Request.from_dict(msg.get("request", {}))
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{hashlib.sha1(json.dumps(msg, sort_keys=True).encode()).hexdigest()[:8]}"
    if op == "generate":
        image, settings = previewer.generate(req)
        path = out / f"{stamp}.png"
        image.save(path)
        return {"ok": True, "image": str(path), "settings": settings}
    if op == "drift":
        return {"ok": True, "drift": drift(previewer, req.base, msg["lora"])}
    raise ValueError(f"unknown preview op {op!r}")


def drift(previewer, base: str, lora: str, n: int = 6) -> float:
    """Mean pixel change (0..1) a LoRA causes on trigger-free shape-world prompts (embedded model only)."""
    from trainer.models.info import is_embedded
    from trainer.preview.previewer import Request, Slot
    from trainer.training.validation import drift as drift_score, embedded_drift

    if not is_embedded(base):
        raise ValueError("the drift figure is defined for the embedded tiny model only")
    scenes = embedded_drift()
    how = scenes["eval"]
    base_imgs, lora_imgs = [], []
    for i, prompt in enumerate(scenes["prompts"][:n]):
        req = dict(base=base, prompt=prompt, seed=how["seed"] + i, steps=how["steps"], guidance=how["guidance"])
        base_imgs.append(previewer.generate(Request(**req))[0])
        lora_imgs.append(previewer.generate(Request(**req, loras=[Slot(lora)]))[0])
    return round(drift_score(base_imgs, lora_imgs), 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from trainer.preview.previewer import Previewer

    reply_to = sys.stdout
    sys.stdout = sys.stderr  # library prints must never corrupt the reply channel

    def say(text: str) -> None:  # a progress line before the reply: the page shows what the worker is doing
        reply_to.write(json.dumps({"progress": text}) + "\n")
        reply_to.flush()

    previewer = Previewer(say)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = handle(previewer, args.out, json.loads(line))
        except Exception as e:  # one bad request must not end the worker
            text = str(e).strip().splitlines()
            reply = {"ok": False, "error": text[0] if text else type(e).__name__}
        reply_to.write(json.dumps(reply) + "\n")
        reply_to.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
