"""Official GroundingDINO checkpoint -> HF directory, on a checkpoint built here from a tiny model.

The official layout is made by renaming a tiny HF model's weights the other way, with rules
written from the official repository's module names (not from detector.model's table), then
fusing query/key/value as the official code stores them.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from detector import OpenSetDetector
from detector.cli import main
from tests.test_detector_detect import random_image
from tests.tiny_detector import save_tiny_detector, tokenizer_dir

SWIN = r"^model\.backbone\.conv_encoder\.model\."
BLOCK = SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
ENC = r"^model\.encoder\.layers\.(\d+)\."
DEC = r"^model\.decoder\.layers\.(\d+)\."

# hub name -> official name
TO_OFFICIAL = [
    (SWIN + r"embeddings\.patch_embeddings\.projection\.", "backbone.0.patch_embed.proj."),
    (SWIN + r"embeddings\.norm\.", "backbone.0.patch_embed.norm."),
    (BLOCK + r"layernorm_before\.", r"backbone.0.layers.\1.blocks.\2.norm1."),
    (BLOCK + r"layernorm_after\.", r"backbone.0.layers.\1.blocks.\2.norm2."),
    (BLOCK + r"attention\.self\.relative_position_bias_table", r"backbone.0.layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (BLOCK + r"attention\.self\.(query|key|value)\.", r"backbone.0.layers.\1.blocks.\2.attn.\3."),
    (BLOCK + r"attention\.output\.dense\.", r"backbone.0.layers.\1.blocks.\2.attn.proj."),
    (BLOCK + r"intermediate\.dense\.", r"backbone.0.layers.\1.blocks.\2.mlp.fc1."),
    (BLOCK + r"output\.dense\.", r"backbone.0.layers.\1.blocks.\2.mlp.fc2."),
    (SWIN + r"encoder\.layers\.(\d+)\.downsample\.", r"backbone.0.layers.\1.downsample."),
    (SWIN + r"hidden_states_norms\.stage2\.", "backbone.0.norm1."),
    (SWIN + r"hidden_states_norms\.stage3\.", "backbone.0.norm2."),
    (SWIN + r"hidden_states_norms\.stage4\.", "backbone.0.norm3."),
    (ENC + r"deformable_layer\.self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (ENC + r"deformable_layer\.self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (ENC + r"deformable_layer\.fc(\d)\.", r"transformer.encoder.layers.\1.linear\2."),
    (ENC + r"deformable_layer\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (ENC + r"text_enhancer_layer\.self_attn\.(query|key|value)\.", r"transformer.encoder.text_layers.\1.self_attn.\2."),
    (ENC + r"text_enhancer_layer\.self_attn\.out_proj\.", r"transformer.encoder.text_layers.\1.self_attn.out_proj."),
    (ENC + r"text_enhancer_layer\.fc(\d)\.", r"transformer.encoder.text_layers.\1.linear\2."),
    (ENC + r"text_enhancer_layer\.layer_norm_before\.", r"transformer.encoder.text_layers.\1.norm1."),
    (ENC + r"text_enhancer_layer\.layer_norm_after\.", r"transformer.encoder.text_layers.\1.norm2."),
    (ENC + r"fusion_layer\.vision_param", r"transformer.encoder.fusion_layers.\1.gamma_v"),
    (ENC + r"fusion_layer\.text_param", r"transformer.encoder.fusion_layers.\1.gamma_l"),
    (ENC + r"fusion_layer\.layer_norm_vision\.", r"transformer.encoder.fusion_layers.\1.layer_norm_v."),
    (ENC + r"fusion_layer\.layer_norm_text\.", r"transformer.encoder.fusion_layers.\1.layer_norm_l."),
    (ENC + r"fusion_layer\.attn\.(values_|out_|)vision_proj\.", r"transformer.encoder.fusion_layers.\1.attn.\2v_proj."),
    (ENC + r"fusion_layer\.attn\.(values_|out_|)text_proj\.", r"transformer.encoder.fusion_layers.\1.attn.\2l_proj."),
    (DEC + r"encoder_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (DEC + r"encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (DEC + r"encoder_attn_text\.(query|key|value)\.", r"transformer.decoder.layers.\1.ca_text.\2."),
    (DEC + r"encoder_attn_text\.out_proj\.", r"transformer.decoder.layers.\1.ca_text.out_proj."),
    (DEC + r"encoder_attn_text_layer_norm\.", r"transformer.decoder.layers.\1.catext_norm."),
    (DEC + r"self_attn\.(query|key|value)\.", r"transformer.decoder.layers.\1.self_attn.\2."),
    (DEC + r"self_attn\.out_proj\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (DEC + r"self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (DEC + r"fc(\d)\.", r"transformer.decoder.layers.\1.linear\2."),
    (DEC + r"final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"^model\.decoder\.layer_norm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.reference_points_head\.", "transformer.decoder.ref_point_head."),
    (r"^model\.decoder\.bbox_embed\.", "transformer.decoder.bbox_embed."),
    (r"^model\.enc_output", "transformer.enc_output"),
    (r"^model\.encoder_output_bbox_embed\.", "transformer.enc_out_bbox_embed."),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.query_position_embeddings\.", "transformer.tgt_embed."),
    (r"^model\.text_backbone\.", "bert."),
    (r"^model\.input_proj_vision\.", "input_proj."),
    (r"^model\.text_projection\.", "feat_map."),
    (r"^bbox_embed\.", "bbox_embed."),
]


def official_state_dict(hub_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official layout: renamed keys, q/k/v fused (qkv / in_proj), `module.` prefixes."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hub_state.items():
        if re.search(r"swin\.layernorm\.", key):  # Swin's last norm: transformers-only, unused
            continue
        pattern, repl = next((p, r) for p, r in TO_OFFICIAL if re.match(p, key))
        name = re.sub(pattern, repl, key)
        part = re.search(r"\.(query|key|value)\.(weight|bias)$", name)
        if part and not name.startswith("bert."):  # BERT keeps separate query/key/value
            stem = name[: part.start()]
            fused_name = f"{stem}.qkv.{part[2]}" if stem.endswith(".attn") else f"{stem}.in_proj_{part[2]}"
            fused.setdefault(fused_name, {})[part[1]] = value
        else:
            out[name] = value
    for name, parts in fused.items():
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]])
    # buffers the official code saves, which the converter must drop
    out["backbone.0.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    out["bert.embeddings.position_ids"] = torch.arange(512)[None]
    return OrderedDict((f"module.{k}", v) for k, v in out.items())


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("orig") / "tiny", shortest_edge=96, longest_edge=160)


def test_convert_official_checkpoint_reproduces_the_model(original, tmp_path):
    state = official_state_dict(load_file(original / "model.safetensors"))
    assert any(k.startswith("module.transformer.encoder.text_layers.0.self_attn.in_proj_weight") for k in state)
    src = tmp_path / "groundingdino_tiny.pth"
    torch.save({"model": state, "epoch": 3}, src)
    out = tmp_path / "converted"
    code = main(["convert", str(src), "--out", str(out), "--config", str(original / "config.json"),
                 "--tokenizer", str(tokenizer_dir())])
    assert code == 0
    before = OpenSetDetector.from_pretrained(str(original))
    after = OpenSetDetector.from_pretrained(str(out))
    after.settings = before.settings  # the converted processor has the official 800/1333 resize
    phrases = ["a cat", "a small dog"]
    images = [random_image(90, 120, 20), random_image(120, 70, 21)]
    prompts = before.encode_phrases(phrases) * 2
    a, b = before.forward(images, prompts), after.forward(images, prompts)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.pred_boxes, b.pred_boxes, atol=1e-6)
    r1, r2 = before.detect(images, phrases, box_threshold=0.3), after.detect(images, phrases, box_threshold=0.3)
    assert [len(r) for r in r1] == [len(r) for r in r2] and len(r1[0]) > 0
    assert all(torch.allclose(x.boxes, y.boxes, atol=1e-6) for x, y in zip(r1, r2))


class Payload:
    """A class the checkpoint pickles by reference: unpickling would have to run its code."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_convert_rejects_what_is_no_official_checkpoint(original, tmp_path, capsys):
    code_state = tmp_path / "code.pth"
    torch.save({"model": {"module.bert.x": Payload()}}, code_state)
    not_model = tmp_path / "other.pth"
    torch.save({"weights": [1, 2]}, not_model)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    cases = {"builtins.print": code_state, "weights is no tensor": not_model, "not a PyTorch checkpoint": garbage}
    for needle, src in cases.items():
        code = main(["convert", str(src), "--out", str(tmp_path / "out"), "--config", str(original / "config.json"),
                     "--tokenizer", str(tokenizer_dir())])
        err = capsys.readouterr()
        assert code == 1 and "code ran" not in err.out
        assert len(err.err.strip().splitlines()) == 1 and needle in err.err, err.err
        assert not (tmp_path / "out").exists()
