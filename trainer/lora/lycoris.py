"""LyCORIS LoHa and LoKr: peft's layers written in the LyCORIS key layout, and LyCORIS files read back.

peft's parameter names are LyCORIS's already (`hada_w1_a`…, `lokr_w1`…), but peft keeps alpha in its adapter config
and scales every layer by alpha/r, while the loaders (ComfyUI comfy/weight_adapter/{loha,lokr}.py, A1111's
network_hada/network_lokr, kohya's LyCORIS) scale by alpha over the rank of a decomposed factor, and by 1 — alpha
ignored — for a LoKr module whose two Kronecker factors are both full matrices (peft makes `lokr_w2` full whenever
r >= max(its dims)/2, and `lokr_w1` full unless decompose_both). So a module whose factors are both full carries
alpha/r folded into `lokr_w1` (and alpha = r, which any reading takes as 1); every other module keeps alpha as
trained: each loader then applies exactly the ΔW peft trained (tests/test_lycoris.py recomputes it with each
loader's formula).

Module names: kohya's (`lora_unet_…`, `lora_te…`) for SD 1/2/SDXL, as the LoRA export writes them; the transformer of
SD3, Flux.1 and Z-Image as `lycoris_<diffusers path>`, the name ComfyUI's key maps give those families' LyCORIS
files (model_lora_keys_unet), with their CLIP encoders under kohya's names, which ComfyUI maps for them too."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.lora.inject import ADAPTER

HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
DIFFUSERS_PREFIX = "lycoris_"  # SD3/Flux/Z-Image transformer modules, as ComfyUI names them


def algo_of(mod) -> str | None:
    """'loha', 'lokr' or None for a peft layer carrying our adapter."""
    if ADAPTER in getattr(mod, "hada_w1_a", {}):
        return "loha"
    if ADAPTER in getattr(mod, "lokr_w1", {}) or ADAPTER in getattr(mod, "lokr_w1_a", {}):
        return "lokr"
    return None


def layers(model: torch.nn.Module):
    """(module path, peft LoHa/LoKr layer, algo) for every layer carrying our adapter."""
    for name, mod in model.named_modules():
        algo = algo_of(mod)
        if algo:
            for wrapper in ("module.", "_orig_mod."):
                name = name.removeprefix(wrapper)
            yield name, mod, algo


def layer_tensors(mod, algo: str) -> tuple[dict[str, torch.Tensor], float]:
    """The layer's factors as a loader should read them, and the alpha to write beside them."""
    names = HADA if algo == "loha" else LOKR
    out = {n: getattr(mod, n)[ADAPTER].detach().float() for n in names if ADAPTER in getattr(mod, n, {})}
    r, alpha = int(mod.r[ADAPTER]), float(mod.alpha[ADAPTER])
    if algo == "lokr" and "lokr_w1" in out and "lokr_w2" in out:  # both factors full: loaders ignore alpha
        out["lokr_w1"] = out["lokr_w1"] * float(mod.scaling[ADAPTER])
        alpha = float(r)
    return out, alpha


def state_dict(models: dict[str, torch.nn.Module], dtype: torch.dtype, name_of) -> dict[str, torch.Tensor]:
    """`name_of(prefix, path)`: the module name a loader looks the layer up by."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model in models.items():
        for path, mod, algo in layers(model):
            name = name_of(prefix, path)
            tensors, alpha = layer_tensors(mod, algo)
            for k, v in tensors.items():
                out[f"{name}.{k}"] = v.to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def network_args(cfg) -> dict[str, str]:
    """kohya GUI's ss_network_args for a LyCORIS network (networks are `lycoris.kohya`)."""
    lora = cfg.lora
    args = {"algo": lora.network, "preset": "attn-only" if not lora.unet_extra else "full",
            "dropout": str(lora.dropout), "rank_dropout": str(lora.rank_dropout), "module_dropout": "0.0",
            "use_tucker": "False", "use_scalar": "False", "rank_dropout_scale": "False", "train_norm": "False"}
    if "conv" in lora.unet_extra:
        args.update(conv_dim=str(lora.rank), conv_alpha=str(lora.alpha))
    if lora.network == "lokr":
        args.update(factor=str(lora.lokr_factor), decompose_both=str(lora.decompose_both), full_matrix="False")
    return args


# ---- reading ---------------------------------------------------------------------------------------------------
def is_lycoris(keys) -> bool:
    return any(k.endswith(tuple("." + n for n in ("hada_w1_a", "lokr_w1", "lokr_w1_a"))) for k in keys)


def read_modules(tensors: dict[str, torch.Tensor]) -> dict[str, "LycorisModule"]:
    """module name -> LycorisModule; `lycoris_<path>` (SD3/Flux/Z-Image) is named `lora_transformer_<path>`, as a
    diffusers-layout LoRA file's transformer modules are."""
    out: dict[str, LycorisModule] = {}
    raw: dict[str, str] = {}  # normalised name -> the name the file uses (where its .alpha is)
    for key, value in tensors.items():
        name, _, part = key.rpartition(".")
        if part in HADA or part in LOKR:
            module = out.setdefault(_normal(name), LycorisModule("loha" if part in HADA else "lokr", {}))
            module.factors[part] = value
            raw[_normal(name)] = name
    for name, m in out.items():
        alpha = tensors.get(f"{raw[name]}.alpha")
        if alpha is not None and alpha.numel() != 1:
            from trainer.errors import LoraError

            raise LoraError(f"{raw[name]}.alpha holds {alpha.numel()} values ({tuple(alpha.shape)}), not one number: "
                            "the file is damaged; export it again")
        m.file_alpha = float(alpha) if alpha is not None else None
        m.check(name)
    return out


def _normal(name: str) -> str:
    return "lora_transformer_" + name[len(DIFFUSERS_PREFIX):] if name.startswith(DIFFUSERS_PREFIX) else name


@dataclass
class LycorisModule:
    """A LoHa or LoKr module as a file holds it. `delta()` is ΔW by the loaders' formula; `down`/`up` are the same
    ΔW as a plain LoRA of its structural rank (SVD, alpha = rank), exact to float32 rounding: that is how Preview
    mixes it, and how merge and resize turn it into a LoRA."""
    algo: str
    factors: dict[str, torch.Tensor]
    file_alpha: float | None = None
    dora_scale: None = None
    path: str | None = None
    dora_norm: str = "merged"
    _svd: tuple | None = field(default=None, repr=False)

    def check(self, name: str) -> None:
        """Refuse a module a loader could not rebuild: a factor missing, or factors whose shapes do not multiply
        (checked on shapes alone, with meta tensors)."""
        from trainer.errors import LoraError

        if self.algo == "loha":
            options = [[("hada_w1_a", "hada_w1_b")], [("hada_w2_a", "hada_w2_b")]]
        else:
            options = [[("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")], [("lokr_w2",), ("lokr_w2_a", "lokr_w2_b")]]
        for choices in options:
            if not any(all(n in self.factors for n in choice) for choice in choices):
                wanted = " or ".join("+".join(choice) for choice in choices)
                raise LoraError(f"{name} is a {'LoHa' if self.algo == 'loha' else 'LoKr'} module without {wanted}: "
                                "the file is incomplete")
        shapes = LycorisModule(self.algo, {k: torch.empty(v.shape, device="meta") for k, v in self.factors.items()})
        try:
            shapes.delta()
        except (RuntimeError, ValueError, IndexError) as e:
            kinds = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(self.factors.items()))
            raise LoraError(f"{name}: its {'LoHa' if self.algo == 'loha' else 'LoKr'} factors do not fit together "
                            f"({kinds}): the file is damaged; export it again") from None

    @property
    def dim(self) -> int | None:
        """The rank a loader divides alpha by: a decomposed factor's (LoKr: None when both are full)."""
        f = self.factors
        if self.algo == "loha":
            return f["hada_w1_b"].shape[0]
        if "lokr_w2_b" in f:
            return f["lokr_w2_b"].shape[0]
        if "lokr_w1_b" in f:
            return f["lokr_w1_b"].shape[0]
        return None

    @property
    def loader_scale(self) -> float:
        return self.file_alpha / self.dim if self.file_alpha is not None and self.dim else 1.0

    @property
    def is_conv(self) -> bool:
        return any(t.ndim == 4 for t in self.factors.values())

    def delta(self) -> torch.Tensor:
        """ΔW as ComfyUI's weight adapters compute it (A1111's and LyCORIS's agree), 2-D for a flattened conv."""
        f = {k: v.float() for k, v in self.factors.items()}
        if self.algo == "loha":
            m1 = _cp(f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"]) if "hada_t1" in f else f["hada_w1_a"] @ f["hada_w1_b"]
            m2 = _cp(f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"]) if "hada_t2" in f else f["hada_w2_a"] @ f["hada_w2_b"]
            return m1 * m2 * self.loader_scale
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = _cp(f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()) * self.loader_scale

    @property
    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.factors.values())

    def _factorised(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._svd is None:
            if not self.finite:  # no SVD of NaN/Inf: a stand-in of the factors' own rank, which defects() reports
                d = self.delta().nan_to_num(0.0, 0.0, 0.0)
                rank = self.dim or 1
                self._svd = (torch.zeros(rank, *d.shape[1:]), torch.zeros(d.shape[0], rank))
                return self._svd
            d = self.delta()
            flat = d.flatten(1)
            u, s, vh = torch.linalg.svd(flat, full_matrices=False)
            keep = max(1, int((s > s[0] * 1e-6).sum())) if s.numel() and s[0] > 0 else 1
            up = u[:, :keep] * s[:keep]
            down = vh[:keep]
            self._svd = (down.reshape(keep, *d.shape[1:]) if d.ndim == 4 else down, up)
        return self._svd

    @property
    def down(self) -> torch.Tensor:
        return self._factorised()[0]

    @property
    def up(self) -> torch.Tensor:
        down, up = self._factorised()
        return up.reshape(up.shape[0], up.shape[1], 1, 1) if down.ndim == 4 else up

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def alpha(self) -> float:
        return float(self.rank)  # the SVD factors carry ΔW at scale 1

    @property
    def scale(self) -> float:
        return 1.0

    def fused(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        return w + self.delta().reshape(w.shape)

    def describe(self) -> str:
        """'LoKr 16x16 ⊗ 20x(8)x40', 'LoHa rank 8': what the factors are."""
        f = self.factors
        if self.algo == "loha":
            return f"LoHa rank {f['hada_w1_b'].shape[0]}"
        w1 = "x".join(map(str, f["lokr_w1"].shape)) if "lokr_w1" in f else \
            f"{f['lokr_w1_a'].shape[0]}x({f['lokr_w1_a'].shape[1]})x{f['lokr_w1_b'].shape[1]}"
        w2 = "x".join(map(str, f["lokr_w2"].shape)) if "lokr_w2" in f else \
            f"{f['lokr_w2_a'].shape[0]}x({f['lokr_w2_a'].shape[1]})x{f['lokr_w2_b'].shape[1]}"
        return f"LoKr {w1} ⊗ {w2}"


def _cp(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker (CP) rebuild of a conv factor, as ComfyUI writes it: einsum('i j k l, j r, i p -> p r k l')."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)
