"""A run's start, in the order the loop asks for it: the datasets scanned (cheap, and a typo should not cost a model
load), the base loaded with LoRA injected and every 'auto' setting filled, the data prepared (latents and captions
cached, or cache-ahead), the optimizer and its schedule, the models wrapped for several processes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import RunConfig
from trainer.data.cache import LatentCache, LatentFeeder, default_cache_dir, fill_latent_cache, vae_identity
from trainer.data.captions import sample_prompts
from trainer.data.dataset import TrainingSet
from trainer.data.manifest import read_manifest
from trainer.data.text_cache import TextCache
from trainer.data.scan import DatasetError, scan
from trainer.errors import TrainingError
from trainer.lora import inject as lora_mod
from trainer.memory import codecs, frozen
from trainer.memory.precision import Precision
from trainer.models import load_base
from trainer.models import info
from trainer.models.info import sampling_defaults, text_encoder_trained_by_default
from trainer.training import validation
from trainer.training.distributed import stop_point
from trainer.training.events import Events
from trainer.training.residency import borrowed, encode_captions, place


def scan_datasets(cfg: RunConfig):
    """(training, regularisation or None, held-out or None) scans; the held-out images come from
    data.validation_dataset or are split off the training set by data.validation_split."""
    try:
        found = scan(cfg.data.dataset, cfg.data.caption_extension)
        reg = scan(cfg.data.reg_dataset, cfg.data.caption_extension) if cfg.data.reg_dataset else None
        held_out = scan(cfg.data.validation_dataset, cfg.data.caption_extension) if cfg.data.validation_dataset else None
    except DatasetError as e:
        raise TrainingError(str(e)) from None
    if held_out is None:
        try:
            found, held_out = validation.split(found, cfg.data.validation_split, cfg.train.seed)
        except validation.SplitError as e:
            raise TrainingError(str(e)) from None
    return found, reg, held_out

def prepare_models(cfg: RunConfig, precision: Precision, events: Events):
    """The base loaded in the run's precision, its 'auto' settings filled in, LoRA injected (the denoiser's as soon
    as it loads), frozen weights in their dtype, LoRA weights in fp32, checkpointing on where asked. Returns
    (base, the family's noise schedule, the text encoders being trained)."""
    from diffusers.training_utils import cast_training_params

    store = stored_as(cfg)
    try:
        codecs.check(store, precision.device)  # a backend that cannot run it: one line, before anything loads
    except codecs.CodecError as e:
        raise TrainingError(str(e)) from None
    with events.progress.phase("loading"):  # no count to give: its heartbeat says it is still loading
        base = load_base(cfg.model.source, cfg.model.family, dtype=loading_dtype(cfg.model.source, store, precision),
                         on_unet=lambda unet: ready_unet(unet, cfg, precision, store), t5=cfg.model.t5)
    fam = base.family
    auto_size = cfg.data.resolution is None
    cfg.save.layout, layout_note = fam.layout_for(cfg.save.layout)  # written down as the layout the files use
    resolve_auto(cfg, fam, base.prediction_type, native_resolution(base, precision.device.type == "cpu"),
                 base.zero_terminal_snr, dict(base.unet.config))
    if layout_note:
        events.emit("warning", message=layout_note)
    if store in ("int8", "nf4"):
        events.emit("warning", message=f"samples and validation render on the {store} copy of the base this LoRA "
                    "trains on; the saved LoRA is for the full-precision base, where ComfyUI, Forge and diffusers "
                    "apply it, and can show more of what it learned there than these samples do (bench qlora: a style "
                    "trained on nf4 showed none of its stripes on the nf4 copy, more than the fp32 LoRA's on the "
                    "full base)")
    if auto_size and cfg.data.resolution < native_resolution(base):
        events.emit("warning", message=f"data.resolution = auto trains this {fam.name} model at "
                    f"{cfg.data.resolution} px on the CPU, not its native {native_resolution(base)} px (a step "
                    f"there takes about {(native_resolution(base) / cfg.data.resolution) ** 2:.0f}x as long); set "
                    f"data.resolution = {native_resolution(base)} to train at it")
    if cfg.model.zero_terminal_snr and cfg.model.prediction_type == "epsilon":
        raise TrainingError("model.zero_terminal_snr needs model.prediction_type = v_prediction: at the last "
                            "timestep there is no signal left, so the noise cannot be predicted from it")
    fam.check(cfg)  # settings this family cannot honour (a ModelError: one line)
    if cfg.train.offload and precision.device.type != "cuda":
        events.emit("warning", message="train.offload streams frozen weights to a CUDA GPU; on this "
                    f"{precision.device.type} they are in RAM already, so it changes nothing")
    schedule = fam.schedule(base.scheduler_config, cfg.model.prediction_type, cfg.model.zero_terminal_snr,
                            cfg.train.min_snr_gamma)
    if cfg.train.min_snr_gamma and not schedule.weights_by_snr:
        events.emit("warning", message=f"train.min_snr_gamma does not apply to {fam.name}'s flow matching; ignored")
    unet, vae, tes = base.unet, base.vae, base.text_encoders
    te_trained = list(tes[:len(fam.te_prefixes)]) if cfg.lora.train_text_encoder else []  # SD3's T5 is never trained
    for m in (vae, *tes):
        m.requires_grad_(False)
    for te in tes:
        quantized_as_stored = _quantizes_as_stored(te, store, precision)
        if not quantized_as_stored:  # a no-op when the loader honoured dtype; before LoRA, so only base weights cast
            place(te, torch.device("cpu"), precision.weight_dtype)
        if any(te is t for t in te_trained):
            lora_mod.inject(te, cfg.lora, lora_mod.text_encoder_targets(cfg.lora), "text-encoder")
        if store:
            frozen.freeze(te, precision.weight_dtype, store=store)
        if quantized_as_stored:  # what int8/nf4 left (embeddings, norms, LoRA) computes in the run's precision
            te.to(dtype=precision.weight_dtype)
    trained = ([unet] if cfg.lora.train_unet else []) + te_trained
    if not trained:
        raise TrainingError("nothing to train: set lora.train_unet or lora.train_text_encoder to true")
    cast_training_params(trained, dtype=torch.float32)  # LoRA weights stay fp32 under half-precision bases
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in te_trained:
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    if fam.attention_processor() is not None:
        unet.set_attn_processor(fam.attention_processor())
    return base, schedule, te_trained

def prepare_data(cfg: RunConfig, base, found, reg, train_te: bool, precision: Precision, device, events: Events,
                  accelerator):
    """The training set with its latent cache filled (then the VAE leaves the device) and, for frozen encoders
    and fixed captions, every caption encoded once (then the encoders leave too); the denoiser goes to the
    device last. Returns (data, latent cache or None, VAE identity, text cache or None)."""
    fam, unet, vae, tes, main = base.family, base.unet, base.vae, base.text_encoders, accelerator.is_main_process
    n_images = len(found.items) + (len(reg.items) if reg is not None else 0)
    with events.progress.phase("scanning", n_images) as tick:  # every image decoded and checked (cached per file)
        data = TrainingSet(found, cfg.data, cfg.data.resolution, reg, progress=lambda done, total: tick(done))
    for path, reason in data.problems.items():
        events.emit("warning", message=f"skipped {path}: {reason}")
    if not len(data):
        raise TrainingError(f"dataset {cfg.data.dataset} has no usable images; run `lora-studio dataset check` on it")
    events.emit("dataset", images=len(data), samples=data.num_samples, buckets=data.bucket_table())
    if not cfg.sample.prompts:  # written into config.toml, so a resume or a re-run samples the same prompts
        cfg.sample.prompts = sample_prompts([e.caption for e in data.entries if not e.is_reg], cfg.data.trigger)
    use_cache = cfg.data.cache_latents and not (cfg.data.random_crop or cfg.data.flip)
    cache = LatentCache(Path(cfg.data.cache_dir or default_cache_dir()) / "latents") if use_cache else None
    vae_id = vae_identity(vae) if use_cache else ""
    place(vae, device, precision.vae_dtype(fam.name))
    feeder = None
    if use_cache and cfg.data.cache_ahead and accelerator.num_processes == 1:
        feeder = cache_ahead(data, cache, vae, vae_id, events)  # None when every latent is cached already
    elif use_cache:
        fill_cache(data, cache, vae, vae_id, main, accelerator, events)
        vae.to("cpu")  # every latent is cached now: the VAE comes back only to decode samples
    text_cache = None
    if cfg.data.caches_text(train_te):  # the encoders visit the device one at a time
        captions = sorted({e.caption for e in data.entries} | ({""} if cfg.data.caption_dropout else set()))
        text_cache = caption_cache(cfg, base, precision)
        with borrowed([], device, visiting=tes), events.progress.phase("caching text", len(captions)) as tick:
            cached, encoded = encode_captions(fam, tes, base.tokenizers, captions, cfg.model.clip_skip, precision,
                                              text_cache, stop=events.stop_requested, progress=tick)
        events.emit("text_cache", captions=len(captions), cached=cached, encoded=encoded,
                    folder=str(text_cache.folder))
    else:  # encoded at every step
        for te in tes:
            te.to(device)  # loaded in the weight dtype already; .to(dtype) would also cast fp8 and LoRA tensors
    unet.to(device)
    return data, cache, vae_id, text_cache, feeder

def caption_cache(cfg: RunConfig, base, precision: Precision) -> TextCache:
    """The on-disk caption cache for this run's frozen encoders, beside the latent cache."""
    fam = base.family
    extra = {"clip_skip": cfg.model.clip_skip, "dtype": str(precision.weight_dtype), "frozen": cfg.train.frozen_dtype,
             "encoding": [type(fam).__name__, getattr(fam, "T5_TOKENS", None), getattr(fam, "TOKENS", None),
                          fam.TEXT_ENTRY_VERSION]}
    identity = TextCache.identity(fam.name, base.text_encoders, base.tokenizers, extra)
    return TextCache(Path(cfg.data.cache_dir or default_cache_dir()) / "text", identity)

def cache_ahead(data, cache, vae, vae_id, events: Events):
    """Cache-ahead (data.cache_ahead): training starts now and each image is encoded just before the step that takes
    it; the VAE leaves the device when the last latent is cached. None when nothing is left to encode."""
    from trainer.progress import Progress

    progress = Progress(lambda e: events.emit("progress", **e), heartbeat_s=float("inf"))

    def done():
        vae.to("cpu")  # every latent is cached now: the VAE comes back only to decode samples
        progress.finish()
        events.emit("cache_filled", encoded=feeder.encoded)

    feeder = LatentFeeder(data, cache, vae, vae_id, progress=lambda n, total: progress.update(n, total),
                          on_complete=done)
    events.emit("cache", cached=len(data) - feeder.total, to_encode=feeder.total, ahead=True)
    if feeder.complete:
        feeder.close()
        return None
    progress.start("caching latents", feeder.total)
    return feeder

def fill_cache(data, cache, vae, vae_id, main, accelerator, events) -> None:
    """Encode every image once on the main process; the other ranks then read the cache."""
    if main:
        with events.progress.phase("caching latents", len(data)) as tick:
            cached, encoded = fill_latent_cache(data, cache, vae, vae_id, stop=events.stop_requested,
                                                progress=lambda n, todo: tick(len(data) - todo + n))
        events.emit("cache", cached=cached, to_encode=encoded)
    accelerator.wait_for_everyone()

def optimization(cfg: RunConfig, unet, te_trained, data, device, world: int):
    """(parameter groups, optimizer, learning-rate schedule, batches per epoch on each process, steps per epoch,
    total steps)."""
    from diffusers.optimization import get_scheduler

    groups = [{"params": lora_mod.lora_parameters(unet), "lr": cfg.optim.lr}] if cfg.lora.train_unet else []
    if te_trained:
        groups.append({"params": [p for te in te_trained for p in lora_mod.lora_parameters(te)],
                       "lr": cfg.optim.text_encoder_lr})
    optimizer = make_optimizer(cfg, groups, device)
    batches_per_epoch = len(data.epoch_batches(0, cfg.train.seed, cfg.train.batch_size)) // world
    if batches_per_epoch == 0:
        raise TrainingError(f"{data.num_samples} samples make fewer batches than {world} processes; "
                            "lower train.batch_size or add images or repeats")
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.gradient_accumulation)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    lr_scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                 num_training_steps=total)
    return groups, optimizer, lr_scheduler, batches_per_epoch, steps_per_epoch, total

def wrapped(cfg: RunConfig, accelerator, trained, unet, tes, device):
    """(the trained models as accelerate prepared them, the denoiser and the text encoders as the forward pass calls
    them): DDP-wrapped on several processes, the denoiser compiled when asked on CUDA. Data order and AMP stay ours."""
    prepared = accelerator.prepare(*trained)
    prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
    model_of = dict(zip(map(id, trained), prepared))
    unet_fwd = model_of.get(id(unet), unet)
    if cfg.train.compile and device.type == "cuda":
        unet_fwd = torch.compile(unet_fwd)
    return prepared, unet_fwd, [model_of.get(id(te), te) for te in tes]

def native_resolution(base, on_cpu: bool = False) -> int:
    """What data.resolution = auto trains at (trainer.models.info: the config's own size, else the family's; 512 px
    for a big family on a machine without a GPU)."""
    native = info.native_resolution(base.family.name, dict(base.unet.config), dict(base.vae.config))
    return info.auto_resolution(native or base.family.default_resolution, on_cpu)

def stored_as(cfg: RunConfig) -> str | None:
    """The frozen weights' storage: fp8, int8, nf4, or None for the run's precision."""
    return cfg.train.frozen_dtype if cfg.train.frozen_dtype in codecs.KINDS else None


def ready_unet(unet, cfg: RunConfig, precision: Precision, store: str | None) -> None:
    """The UNet's LoRA and frozen stand-ins, built on the host as soon as it loads (before the text encoders):
    neither full-precision weights nor all the models at once reach the GPU, each model goes there for its
    own phase (VAE: latent cache; text encoders: caption cache; UNet: training), and with fp8, int8 or nf4 the
    half-precision UNet is gone before the encoders arrive, so neither phase's peak is the sum of all the models."""
    from trainer.models import FAMILIES, family_name

    unet.requires_grad_(False)
    quantized_as_stored = _quantizes_as_stored(unet, store, precision)
    if not quantized_as_stored:
        place(unet, torch.device("cpu"), precision.weight_dtype)  # a no-op when the loader honoured dtype
    if cfg.lora.train_unet:
        fam = FAMILIES[family_name(dict(unet.config)) if cfg.model.family == "auto" else cfg.model.family]
        lora_mod.inject(unet, cfg.lora, lora_mod.unet_targets(cfg.lora, fam, unet.config), "UNet")
    # After injection: peft wraps the original layers. Streamed weights stay on the host when the UNet moves.
    frozen.freeze(unet, precision.weight_dtype, store=store, stream=cfg.train.offload)
    if quantized_as_stored:  # what int8/nf4 left (norms, embeddings, the first and last layers) to the run's dtype
        unet.to(dtype=precision.weight_dtype)


def loading_dtype(source: str, store: str | None, precision: Precision) -> torch.dtype:
    """The dtype the base loads in. int8 and nf4 quantize from the file's own half precision, layer by layer, while
    the file stays mapped (each layer's pages let go once quantized: frozen.page_out), so a run in fp32 (a CPU's)
    never holds the model in fp32: a full-size SD1.5 stored in bf16 peaked at 5.22 GB loaded as fp32 then
    quantized, as fp32 frozen weights did. Everything else loads in the run's precision."""
    if store in ("int8", "nf4"):
        found = {"F16": torch.float16, "BF16": torch.bfloat16}.get(info.stored_dtype(source))
        if found is not None and found != precision.weight_dtype:
            return found
    return precision.weight_dtype


def _quantizes_as_stored(model, store: str | None, precision: Precision) -> bool:
    return store in ("int8", "nf4") and next(model.parameters()).dtype != precision.weight_dtype

def resolve_auto(cfg: RunConfig, fam, model_prediction_type: str, resolution: int, zero_terminal_snr: bool = False,
                 denoiser_config: dict | None = None) -> None:
    """Fill every 'auto' value from the model, so the written config.toml is explicit."""
    cfg.model.family = fam.name
    if cfg.model.prediction_type is None:
        cfg.model.prediction_type = model_prediction_type
    if cfg.model.zero_terminal_snr is None:
        cfg.model.zero_terminal_snr = zero_terminal_snr
    if cfg.data.resolution is None:
        cfg.data.resolution = resolution
    steps, guidance = sampling_defaults(fam.name, cfg.model.source, denoiser_config)
    if cfg.sample.steps is None:
        cfg.sample.steps = steps
    if cfg.sample.guidance_scale is None:
        cfg.sample.guidance_scale = guidance
    if cfg.lora.train_text_encoder is None:
        cfg.lora.train_text_encoder = text_encoder_trained_by_default(fam.name)
    if cfg.optim.text_encoder_lr is None:
        cfg.optim.text_encoder_lr = cfg.optim.lr / 2
    if cfg.data.cache_dir is None:
        cfg.data.cache_dir = str(default_cache_dir())
    manifest = read_manifest(cfg.data.dataset)  # the dataset's own defaults, below any explicit setting
    if not cfg.data.trigger:
        cfg.data.trigger = manifest.trigger
    if cfg.data.repeats == 1:
        cfg.data.repeats = max(1, manifest.repeats)

def write_config(cfg: RunConfig, run_dir: Path) -> None:
    from trainer.atomic import write_text

    write_text(run_dir / "config.toml", cfg.to_toml())

def make_optimizer(cfg: RunConfig, groups, device):
    o = cfg.optim
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("optim.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes, "
                                "or use optim.optimizer=adamw") from None
        if device.type != "cuda":
            raise TrainingError("optim.optimizer=adamw8bit needs a CUDA GPU; use optim.optimizer=adamw on CPU")
        return bnb.optim.AdamW8bit(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TrainingError("optim.optimizer=prodigy needs prodigyopt: pip install prodigyopt") from None
        return Prodigy(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

def trackers():
    import importlib.util

    return "tensorboard" if importlib.util.find_spec("tensorboard") else None


def start(cfg: RunConfig, events, plan: dict | None):
    """(accelerator, events, precision): one process of the run set up, its seed set, a stale STOP cleared, the memory
    plan recorded. Without a GPU, accelerate forms a multi-process (gloo) group only when told it is on a CPU."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run_dir = Path(cfg.save.output_dir)
    no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(cpu=no_gpu, log_with=trackers(), project_dir=str(run_dir / "logs"))
    events = events or Events(run_dir, enabled=accelerator.is_main_process)
    events.clear_stale_stop()
    if plan:
        events.emit("plan", **plan)
    set_seed(cfg.train.seed)
    if cfg.train.frozen_dtype == "fp8" and cfg.train.mixed_precision == "no":
        raise TrainingError("train.frozen_dtype=fp8 computes in half precision, but train.mixed_precision is 'no'; "
                            "set train.mixed_precision=bf16 (or fp16 on CUDA)")
    return accelerator, events, Precision(cfg.train.mixed_precision, accelerator.device)


@dataclass
class Prepared:
    """Everything the loop works with, made in the order `prepare` makes it."""
    base: object
    schedule: object
    te_trained: list  # the text encoders being trained
    data: TrainingSet
    cache: LatentCache | None
    vae_id: str
    text_cache: TextCache | None
    feeder: LatentFeeder | None  # cache-ahead: the latents still to encode, just before their steps
    groups: list
    optimizer: object
    lr_scheduler: object
    batches_per_epoch: int
    steps_per_epoch: int
    total: int
    prepared: list  # the trained models as accelerate wrapped them
    unet_fwd: object  # the denoiser as the forward pass calls it
    tes_fwd: list
    val: object  # the held-out validation set, or None
    encoded: dict | None  # sample and drift prompts encoded before frozen encoders were let go


def prepare(cfg: RunConfig, events: Events, accelerator, precision: Precision, found, reg, held_out) -> Prepared:
    """The base with LoRA, the data with its caches, the optimizer, the validation set: a Stop between any two of
    them ends the run there (StopRequested), before anything trains."""
    from trainer.training.judge import validation_set
    from trainer.training.residency import let_encoders_go

    device, main = accelerator.device, accelerator.is_main_process
    base, schedule, te_trained = prepare_models(cfg, precision, events)
    stop_point(accelerator, events, "loading the model")
    train_te = bool(cfg.lora.train_text_encoder)
    data, cache, vae_id, text_cache, feeder = prepare_data(cfg, base, found, reg, train_te, precision, device, events,
                                                           accelerator)
    stop_point(accelerator, events, "caching latents and captions")
    groups, optimizer, lr_scheduler, batches_per_epoch, steps_per_epoch, total = optimization(
        cfg, base.unet, te_trained, data, device, accelerator.num_processes)
    trained = ([base.unet] if cfg.lora.train_unet else []) + te_trained
    prepared, unet_fwd, tes_fwd = wrapped(cfg, accelerator, trained, base.unet, base.text_encoders, device)
    val = validation_set(cfg, base, held_out, schedule, train_te, precision, device, events) \
        if main and held_out is not None else None
    # Frozen encoders whose captions are all cached: only the samples would still run them.
    encoded = let_encoders_go(cfg, base, precision, device, main, events, drift=val is not None) \
        if text_cache is not None else None
    stop_point(accelerator, events, "preparing validation and samples")
    return Prepared(base, schedule, te_trained, data, cache, vae_id, text_cache, feeder, groups, optimizer,
                    lr_scheduler, batches_per_epoch, steps_per_epoch, total, prepared, unet_fwd, tes_fwd, val, encoded)
