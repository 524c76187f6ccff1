"""LoRA Studio's trainer: a headless library and the lora-studio command line (never imports gradio)."""
import logging

# bitsandbytes' CPU backend warns on import, on CPUs with AVX512-BF16, that optional Hub kernels for 4-bit matmuls are
# absent; diffusers, transformers and peft import it whenever it is installed, so every run would print it. The
# frozen stand-ins dequantize and never call those kernels (memory/codecs.py).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
