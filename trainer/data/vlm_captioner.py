"""Natural-language captions from vision-language models in transformers: Florence-2 (its detailed-caption task)
and any chat-template image-text-to-text model (LLaVA-style such as JoyCaption, Qwen-VL) with an editable
instruction. Weights come from a local folder or a Hub id (downloaded once into the Hugging Face cache); remote
code is never run, so a repo that needs it is refused with the reason."""
from __future__ import annotations

import json
from pathlib import Path

FLORENCE_TASK = "<MORE_DETAILED_CAPTION>"
DEFAULT_INSTRUCTION = ("Write one descriptive caption for this image, as a comma-free sentence for training an image "
                       "model: the subject, what it wears or looks like, the setting, the style. No preamble.")


def _device_and_dtype(device: str | None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, (torch.float16 if device.startswith("cuda") else torch.float32)


def model_type(model: str) -> str | None:
    """The config's model_type from a local folder or the Hub (config only), or None when unreadable."""
    folder = Path(model).expanduser()
    try:
        if folder.is_dir():
            return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).model_type
    except Exception:
        return None


class _Generating:
    max_new_tokens = 96
    generate_kwargs: dict = {}

    def _load(self, model: str, device: str | None, model_cls):
        from transformers import AutoProcessor

        self.name = model
        self.device, dtype = _device_and_dtype(device)
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = model_cls.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise ValueError(f"{model} needs its own Python code to load, which LoRA Studio never runs; use a "
                                 "transformers-native copy of the model (for Florence-2: florence-community/"
                                 "Florence-2-large)") from None
            raise

    def _generate(self, inputs) -> "list[list[int]]":
        import torch

        inputs = {k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            return self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       **self.generate_kwargs)


class Florence2Captioner(_Generating):
    def __init__(self, model: str, device: str | None = None, task: str = FLORENCE_TASK):
        from transformers import Florence2ForConditionalGeneration

        self._load(model, device, Florence2ForConditionalGeneration)
        self.task = task
        self.generate_kwargs = {"num_beams": 3}

    def caption(self, images: list) -> list[str]:
        inputs = self.processor(text=[self.task] * len(images), images=images, return_tensors="pt")
        out = self._generate({k: inputs[k] for k in ("input_ids", "pixel_values")})
        # The pure-text tasks' post-processing is: drop the special tokens, trim.
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class ChatCaptioner(_Generating):
    """Any image-text-to-text model whose processor has a chat template, asked `instruction` per image."""

    def __init__(self, model: str, device: str | None = None, instruction: str = DEFAULT_INSTRUCTION):
        from transformers import AutoModelForImageTextToText

        self._load(model, device, AutoModelForImageTextToText)
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"{model} has no chat template; use it as an image-to-text captioner instead")
        self.instruction = instruction.strip() or DEFAULT_INSTRUCTION
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # generation continues every row from its own end

    def caption(self, images: list) -> list[str]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.instruction}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
        out = self._generate(dict(inputs))
        new = out[:, inputs["input_ids"].shape[1]:]  # the answer only, not the prompt
        return [" ".join(t.split()) for t in self.processor.batch_decode(new, skip_special_tokens=True)]
