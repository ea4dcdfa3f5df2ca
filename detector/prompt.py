"""Phrases to Grounding DINO prompts: caption, char spans, token positive maps, chunking.

Grounding DINO reads a list of phrases as one caption, `"a cat . a dog ."`: lowercased
phrases joined by `" . "` and closed by `" ."`. The model limits the text to 256 tokens
(`[CLS]` and `[SEP]` included), so a longer list is split over several prompts whose
detections are merged afterwards. A phrase's tokens are the tokens whose character
offsets fall inside the phrase's span in the caption (its "positive map").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from gligen.errors import UserError, require

SEPARATOR = " . "
END = " ."
MAX_TEXT_TOKENS = 256  # GroundingDinoConfig.max_text_len of every released checkpoint


def normalize_phrase(phrase: str) -> str:
    """The phrase as it appears in a caption: stripped and lowercased (BERT-uncased)."""
    return " ".join(phrase.split()).lower()


def build_caption(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """`["a cat", "A dog"]` -> `("a cat . a dog .", [(0, 5), (8, 13)])`: caption and char spans."""
    require(len(phrases) > 0, "the phrase list is empty: give at least one phrase to detect")
    caption, spans = "", []
    for i, phrase in enumerate(phrases):
        text = normalize_phrase(phrase)
        require(bool(text), f"phrase {i} is empty")
        if spans:
            caption += SEPARATOR
        spans.append((len(caption), len(caption) + len(text)))
        caption += text
    return caption + END, spans


@dataclass
class Prompt:
    """One caption sent to the model and the caller's phrases it holds."""

    caption: str
    phrase_ids: list[int]  # index into the caller's phrase list, one per span
    spans: list[tuple[int, int]]  # char span of each phrase in `caption`


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_prompts(phrases: Sequence[str], tokenizer, max_tokens: int = MAX_TEXT_TOKENS) -> list[Prompt]:
    """Pack `phrases` greedily, in order, into as few captions as fit in `max_tokens` tokens each.

    A caption costs 2 special tokens plus, per phrase, its own tokens and one for the `.`
    after it (BERT's tokenizer splits on whitespace and punctuation, so a caption's tokens are
    exactly its phrases' tokens in sequence). A phrase that does not fit alone is a `UserError`.
    """
    require(len(phrases) > 0, "the phrase list is empty: give at least one phrase to detect")
    texts = [normalize_phrase(p) for p in phrases]
    for i, text in enumerate(texts):
        require(bool(text), f"phrase {i} is empty")
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        cost = n + 1
        require(n > 0, f"phrase {i} ({_shorten(texts[i])!r}) has no tokens")
        if 2 + cost > max_tokens:
            raise UserError(
                f"phrase {i} ({_shorten(texts[i])!r}) is {n} tokens long; a phrase must fit in "
                f"{max_tokens - 3} tokens"
            )
        if not groups or used + cost > max_tokens:
            groups.append([])
            used = 2
        groups[-1].append(i)
        used += cost
    prompts = []
    for ids in groups:
        caption, spans = build_caption([texts[i] for i in ids])
        prompts.append(Prompt(caption=caption, phrase_ids=ids, spans=spans))
    return prompts


def positive_map(offsets: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Token masks of phrases.

    offsets: (T, 2) char offsets of a caption's tokens (the fast tokenizer's `offset_mapping`;
        special and padding tokens have (0, 0)). spans: P char spans in that caption.
    Returns (P, T) bool: token t belongs to phrase p when its characters overlap p's span.
    """
    offsets = offsets.to(torch.long)
    start, end = offsets[:, 0], offsets[:, 1]
    real = end > start  # special and padding tokens cover no characters
    span = torch.tensor(list(spans), dtype=torch.long).reshape(-1, 2)
    overlap = (start[None] < span[:, 1:2]) & (end[None] > span[:, 0:1])
    return overlap & real[None]
