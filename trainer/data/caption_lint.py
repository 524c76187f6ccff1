"""Caption lint, torch-free: what each caption will really teach, found before training.

- Tags past the text encoder's window are cut off silently at training time (77 tokens for CLIP, the start and
  end tokens included); each file says which tags are lost.
- A caption without the trigger gets it put first at training time; said, because a trigger spelled another way
  in the caption ("Glorp", "glorp_girl") then appears twice.
- A tag that is in every caption besides the trigger is learned as part of the trigger: whatever it describes
  comes back whenever the trigger is used.
- Duplicate tags in one caption, and a frequency table to prune with.

Counting uses the training model's own tokenizer (its `tokenizer/` folder; the embedded model's is tiny with a
24-token window), else CLIP's from the Hugging Face cache, else an approximation that says it is one.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .captions import phrase_count, split_tags, with_trigger

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
CLIP_WINDOW = 77
MIN_FILES_FOR_ALWAYS = 3  # "in every caption" means little for one or two captions


@dataclass
class TokenCounter:
    name: str  # which tokenizer, said in the report
    window: int  # tokens the text encoder sees, start and end tokens included
    _tok: object = None

    def counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text without the start and end tokens."""
        if self._tok is None:  # roughly one token per word piece and per punctuation mark
            return [len(re.findall(r"\w+|[^\w\s]", t)) for t in texts]
        ids = self._tok(texts, add_special_tokens=False, truncation=False)["input_ids"]
        return [len(i) for i in ids]

    @property
    def room(self) -> int:
        return self.window - 2


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer  # tokenizers only: no torch import

    tok = CLIPTokenizer.from_pretrained(str(folder))
    tok.model_max_length = int(1e9)  # no truncation warnings while counting
    return tok


def token_counter(model_source: str | None = None) -> TokenCounter:
    """The tokenizer a run on `model_source` trains with ('tiny' or empty: the embedded model)."""
    from trainer.models.info import EMBEDDED_DIR

    folder = EMBEDDED_DIR if model_source in (None, "", "tiny") else Path(model_source).expanduser()
    tok_dir = folder / "tokenizer"
    if tok_dir.is_dir():
        config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8")) \
            if (tok_dir / "tokenizer_config.json").exists() else {}
        window = int(config.get("model_max_length") or CLIP_WINDOW)
        try:
            tok = _load_tokenizer(tok_dir)
            label = "the embedded model's tokenizer" if folder == EMBEDDED_DIR else f"{folder.name}'s tokenizer"
            if (folder / "text_encoder_3").is_dir():  # SD3: the window is the CLIPs'; T5 reads on to 256 tokens
                label = f"{folder.name}'s CLIP tokenizer; its T5 encoder reads up to 256 tokens"
            return TokenCounter(label, min(window, CLIP_WINDOW), tok)
        except (OSError, ValueError):
            pass
    try:  # a single-file checkpoint or a Hub id: CLIP's tokenizer, if the user's cache has it
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(CLIP_HUB_ID, local_files_only=True)
        tok.model_max_length = int(1e9)
        return TokenCounter("CLIP's tokenizer", CLIP_WINDOW, tok)
    except Exception:  # not cached, offline: an estimate beats no check
        return TokenCounter("an approximate count (no tokenizer found)", CLIP_WINDOW)


def cut_tags(caption: str, counter: TokenCounter) -> tuple[int, list[str]]:
    """(tokens of the caption, the tags that do not fit the window wholly)."""
    tags = split_tags(caption)
    if not tags:
        return 0, []
    prefixes = [", ".join(tags[:i + 1]) for i in range(len(tags))]
    counts = counter.counts(prefixes)
    return counts[-1], [t for t, n in zip(tags, counts) if n > counter.room]


@dataclass
class Lint:
    tokenizer: str
    window: int
    files: dict[str, list[str]] = field(default_factory=dict)  # path -> findings
    always: list[str] = field(default_factory=list)  # tags in every caption, the trigger aside
    notes: list[str] = field(default_factory=list)  # about the whole set, not a problem with any one file
    frequency: list[tuple[str, int]] = field(default_factory=list)  # tag, captions it is in; most first

    def to_dict(self) -> dict:
        return {"tokenizer": self.tokenizer, "window": self.window, "files": self.files, "always": self.always,
                "frequency": [list(x) for x in self.frequency], "notes": self.notes}


def lint(captions: dict[str, str], trigger: str, counter: TokenCounter) -> Lint:
    """Findings per captioned file (path -> caption as written; empty ones are reported by the scan) and over
    the whole set."""
    out = Lint(counter.name, counter.window)
    written = {p: c for p, c in captions.items() if c.strip()}
    seen = Counter()
    without_trigger = 0
    for path, caption in written.items():
        found = []
        trained = with_trigger(caption, trigger)  # what training feeds the text encoder
        tags = split_tags(caption)
        n, cut = cut_tags(trained, counter)
        if cut:
            found.append(f"caption is {n} tokens, over the text encoder's {counter.room} ({counter.name}): cut off at "
                         f"training: {', '.join(cut)}")
        if trigger and trained != caption:
            without_trigger += 1  # normal (training puts it first): one note for the set, not a warning per file
            near = [t for t in tags if t.lower().replace("_", " ").startswith(trigger.lower())]
            if near:  # but a near miss is likely a typo, and then the caption holds two different words
                found.append(f"no trigger {trigger!r} but {', '.join(near)}: a typo? training puts {trigger!r} "
                             "first and keeps the other word too")
        dupes = sorted(t for t, k in Counter(t.lower() for t in tags).items() if k > 1)
        if dupes:
            found.append(f"duplicate tag(s): {', '.join(dupes)}")
        if trigger and phrase_count(caption, trigger) > 1:  # 'vomble, photo of vomble': two bulk tools stacked it
            found.append(f"the trigger {trigger!r} is in the caption {phrase_count(caption, trigger)} times; keep "
                         "one (the Tags tool's remove, then add first)")
        if found:
            out.files[path] = found
        seen.update({t.lower() for t in tags})
    out.frequency = sorted(seen.items(), key=lambda x: (-x[1], x[0]))
    if without_trigger:
        out.notes.append(f"{without_trigger} of {len(written)} captions do not start with the trigger {trigger!r}; "
                         "training puts it first, so nothing needs changing")
    if len(written) >= MIN_FILES_FOR_ALWAYS:
        out.always = [t for t, k in out.frequency if k == len(written) and t != trigger.lower()]
    return out


def add_to_report(rep: dict, dataset: str | Path, trigger: str | None = None, model: str | None = None) -> Lint:
    """Lint the captions of a `validate.report` in place: findings join each file's reasons (an ok file becomes
    a warning; excluded files are left alone), the whole-set findings go under rep["captions"]."""
    from .manifest import read_manifest

    trigger = read_manifest(dataset).trigger if trigger is None else trigger
    files = [f for f in rep["files"] if f["status"] != "excluded"]
    found = lint({f["path"]: f.get("caption", "") for f in files}, trigger, token_counter(model))
    for f in files:
        for finding in found.files.get(f["path"], []):
            f["reasons"].append(finding)
            f["status"] = "warning" if f["status"] == "ok" else f["status"]
    rep["summary"] = {s: sum(f["status"] == s for f in rep["files"]) for s in ("ok", "warning", "excluded")}
    rep["captions"] = {**found.to_dict(), "trigger": trigger}
    return found


def summary_lines(found: Lint, top: int = 12) -> list[str]:
    lines = [f"captions ({found.tokenizer}, {found.window - 2} tokens fit):"]
    lines += [f"  note: {n}" for n in found.notes]
    for tag in found.always:
        lines.append(f"  {tag!r} is in every caption besides the trigger: it will be learned as part of the trigger "
                     "(remove it where it is not what the trigger means)")
    if found.frequency:
        lines.append("  most used: " + ", ".join(f"{t} ({n})" for t, n in found.frequency[:top]))
    return lines
