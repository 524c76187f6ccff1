"""Tiny random-weight captioners with the real architectures' inputs and outputs, built from configs (no
downloads): a WD tagger ONNX model with its tag CSV, Florence-2, and a LLaVA-style chat model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

# A tagger whose scores follow the image's mean colour, so tests know what it must say:
# (name, category, weights on mean B, G, R in 0..1, bias) -> sigmoid(w . mean + bias)
TAGS = [
    ("general", 9, (0, 0, 0), 8.0),  # a rating: always scored high, never written
    ("zorb_(character)", 4, (0, 0, 0), 1.4),  # 0.80: under the default character threshold 0.85
    ("red_background", 0, (-4, -4, 8), -1.0),  # red even with the white padding of a wide image
    ("blue_background", 0, (8, -4, -4), -1.0),
    ("^_^", 0, (0, 0, 0), 6.0),  # a kaomoji, always there: keeps its underscore
    ("simple_background", 0, (0, 0, 0), 6.0),  # always there; blacklisted in a test
]


def build_wd_tagger(folder: Path, size: int = 64) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = np.array([t[2] for t in TAGS], dtype=np.float32).T / 255.0  # [3, T]: pixels arrive as 0..255
    b = np.array([t[3] for t in TAGS], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
         helper.make_node("Add", ["logits0", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny-wd-tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _, _) in enumerate(TAGS):
            out.writerow([i, name, category, 100])
    return folder


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table: a byte-level BPE vocabulary with no merges covers any text."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_florence2(folder: Path) -> Path:
    import torch
    from transformers import (BartConfig, BartTokenizer, CLIPImageProcessor, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor, Florence2VisionConfig)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + _byte_chars())}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        extra_special_tokens={"image_token": "<image>"})
    tok.add_tokens(["<image>"], special_tokens=True)
    images = CLIPImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64},
                                do_center_crop=False, image_seq_length=5)
    vision = Florence2VisionConfig(depths=[1, 1, 1, 1], embed_dim=[16, 32, 32, 32], num_heads=[2, 2, 2, 2],
                                   num_groups=[2, 2, 2, 2], window_size=2, projection_dim=32, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text,
                                                              image_token_id=tok.image_token_id))
    model.save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def build_llava(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(_byte_chars())}
    for t in ("<s>", "</s>", "<pad>", "<image>"):
        vocab[t] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                                      image_token_id=tok.convert_tokens_to_ids("<image>")))
    model.save_pretrained(folder)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder
