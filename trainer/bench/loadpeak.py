"""Peak memory of loading a base model for training, two ways, each in its own process:
`direct` loads the weights straight into the training precision (what the loop does);
`fp32-then-cast` loads fp32 first and casts, which briefly holds an fp32 copy of everything.
The bench reads the process's peak RSS."""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--precision", default="bf16", choices=["fp16", "bf16"])
    p.add_argument("--how", default="direct", choices=["direct", "fp32-then-cast"])
    a = p.parse_args(argv)
    from trainer.models import load_base
    from trainer.memory.precision import DTYPES

    dtype = DTYPES[a.precision]
    base = load_base(a.model, dtype=dtype if a.how == "direct" else None)
    import torch

    total = 0.0
    with torch.no_grad():
        for m in (base.unet, base.vae, *base.text_encoders):
            m.to(dtype)
            # Read every weight once: a file-backed tensor counts in RSS only when touched, as in training.
            total += sum(float(p.float().sum()) for p in m.parameters())
    print(f"loaded; checksum {total:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
