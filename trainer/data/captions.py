"""Caption handling at training time: trigger word, tag shuffling and dropout."""
from __future__ import annotations

import random
import re


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def phrase_count(text: str, phrase: str) -> int:
    """How often `phrase` stands in `text` as whole words, any case ('vomble' in 'photo of Vomble', not 'vombles')."""
    phrase = " ".join(phrase.split())
    if not phrase:
        return 0
    return len(re.findall(r"(?<![\w-])" + re.escape(phrase).replace(r"\ ", r"\s+") + r"(?![\w-])", text, re.I))


def with_trigger(caption: str, trigger: str) -> str:
    """The caption training feeds the text encoder: the trigger put first where the caption does not say it (as a
    whole word anywhere: 'photo of vomble' names it already; putting it first again made 'vomble, photo of
    vomble')."""
    if not trigger or phrase_count(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def fill_template(template: str, trigger: str) -> str:
    return " ".join(template.replace("[trigger]", trigger).split())


def augment(caption: str, rng: random.Random, shuffle: bool, keep_tokens: int,
            tag_dropout: float, caption_dropout: float) -> str:
    """Apply per-step caption augmentation. The first `keep_tokens` tags never move or drop."""
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    if not (shuffle or tag_dropout):
        return caption
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout:
        tail = [t for t in tail if rng.random() >= tag_dropout]
    if shuffle:
        rng.shuffle(tail)
    return ", ".join(head + tail)


def sample_prompts(captions: list[str], trigger: str, n: int = 2) -> list[str]:
    """Prompts that show what a run learns: the dataset's own first distinct captions, each with the run's
    trigger, so a run on trigger "glorp" samples glorp and not whatever a preset was written for."""
    prompts: list[str] = []
    for caption in captions:
        caption = with_trigger(" ".join(caption.split()), trigger)
        if caption and caption not in prompts:
            prompts.append(caption)
        if len(prompts) == n:
            break
    return prompts or ([trigger] if trigger else [])
