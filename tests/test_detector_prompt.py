"""Prompt building: captions, char spans, token positive maps, chunking to 256 tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizerFast

from detector.prompt import build_caption, positive_map, split_prompts
from gligen.errors import UserError
from tests.tiny_detector import tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizerFast.from_pretrained(tokenizer_dir())


def test_caption_and_spans():
    caption, spans = build_caption(["A Cat", "  a  small dog ", "sofa"])
    assert caption == "a cat . a small dog . sofa ."
    assert [caption[s:e] for s, e in spans] == ["a cat", "a small dog", "sofa"]


def test_positive_map_marks_each_phrase_tokens_only(tokenizer):
    phrases = ["a cat", "hot-dog stand", "sofa"]
    caption, spans = build_caption(phrases)
    enc = tokenizer(caption, return_offsets_mapping=True, return_tensors="pt")
    masks = positive_map(enc["offset_mapping"][0], spans)
    ids = enc["input_ids"][0]
    assert masks.shape == (3, len(ids))
    assert [tokenizer.decode(ids[m]) for m in masks] == ["a cat", "hot - dog stand", "sofa"]
    assert masks.sum(0).max() == 1  # no token in two phrases
    separators = torch.isin(ids, torch.tensor(tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "."])))
    assert not masks[:, separators].any()


def lvis_like_names(count: int) -> list[str]:
    """Distinct names of 1-5 words, LVIS-like in number and length."""
    words = ["red", "wooden", "table", "lamp", "bicycle", "helmet", "pepper", "mill", "teddy", "bear", "cup"]
    return [" ".join(words[(i + k * 7) % len(words)] for k in range(1 + i % 5)) + f" {i}" for i in range(count)]


def test_split_prompts_packs_1203_names_under_256_tokens(tokenizer):
    names = lvis_like_names(1203)
    prompts = split_prompts(names, tokenizer)
    assert len(prompts) > 1
    assert [i for p in prompts for i in p.phrase_ids] == list(range(1203))
    lengths = [len(tokenizer(p.caption)["input_ids"]) for p in prompts]
    assert max(lengths) <= 256
    for prompt, nxt in zip(prompts, prompts[1:]):  # greedy: the next name would not have fitted
        longer, _ = build_caption([names[i] for i in prompt.phrase_ids + nxt.phrase_ids[:1]])
        assert len(tokenizer(longer)["input_ids"]) > 256
        assert [prompt.caption[s:e] for s, e in prompt.spans] == [names[i] for i in prompt.phrase_ids]


def test_split_prompts_errors(tokenizer):
    with pytest.raises(UserError, match="empty"):
        split_prompts([], tokenizer)
    with pytest.raises(UserError, match="phrase 1 "):
        split_prompts(["a cat", "word " * 254], tokenizer)
    assert len(split_prompts(["word " * 253], tokenizer)) == 1  # 253 + "." + [CLS] + [SEP] = 256
