"""Official GLIGEN map releases (canny, HED, depth, normal, sem) convert, and the converted adapter on a plain
UNet computes what an independent re-implementation of the official forward computes (written out here)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gligen.adapter import GroundingAdapter
from gligen.convert import split_gligen_unet
from gligen.grounding import GroundingInputs
from gligen.maps import CONDITION_TYPES, SEM_CLASSES
from tests.test_convert import EXECUTED, DictConfig, convert_cli, ldm_unet, official_checkpoint, tiny_gligen_unet
from tests.tiny import HIDDEN

DEPTHS, DIMS, RESIZE = (1, 2, 1, 1), (8, 8, 12, 16), 64  # a tiny ConvNeXt: stride 32, so 2x2 tokens at 64 px
LATENT = (8, 8)
EXTRA = {"hed": 1}  # UNet input channels from the downsampler; 8 for the others


# --- an official-format map release, random weights under the official names ---

def official_map_tensors(kind, seed=0):
    """`position_net.*` (the tokenizer) and `downsample_net.*` of an official map release."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=generator)

    net = {}
    if kind == "sem":
        net["in_conv.weight"], net["in_conv.bias"] = rand(3, SEM_CLASSES, 3, 3), rand(3)
    backbone = {"downsample_layers.0.0.weight": rand(DIMS[0], 3, 4, 4), "downsample_layers.0.0.bias": rand(DIMS[0]),
                "downsample_layers.0.1.weight": rand(DIMS[0], mean=1), "downsample_layers.0.1.bias": rand(DIMS[0])}
    for i, (depth, dim) in enumerate(zip(DEPTHS, DIMS)):
        if i:
            backbone.update({f"downsample_layers.{i}.0.weight": rand(DIMS[i - 1], mean=1),
                             f"downsample_layers.{i}.0.bias": rand(DIMS[i - 1]),
                             f"downsample_layers.{i}.1.weight": rand(dim, DIMS[i - 1], 2, 2),
                             f"downsample_layers.{i}.1.bias": rand(dim)})
        for j in range(depth):
            block = {"dwconv.weight": rand(dim, 1, 7, 7), "dwconv.bias": rand(dim), "norm.weight": rand(dim, mean=1),
                     "norm.bias": rand(dim), "pwconv1.weight": rand(4 * dim, dim), "pwconv1.bias": rand(4 * dim),
                     "pwconv2.weight": rand(dim, 4 * dim), "pwconv2.bias": rand(dim), "gamma": rand(dim, scale=1)}
            backbone.update({f"stages.{i}.{j}.{k}": v for k, v in block.items()})
    net.update({f"convnext_tiny_backbone.{k}": v for k, v in backbone.items()})
    tokens = (RESIZE // 32) ** 2
    net.update({"pos_embedding": rand(1, tokens, DIMS[-1]), "null_feature": rand(DIMS[-1], scale=1),
                "linears.0.weight": rand(512, DIMS[-1]), "linears.0.bias": rand(512),
                "linears.2.weight": rand(512, 512, scale=0.05), "linears.2.bias": rand(512),
                "linears.4.weight": rand(HIDDEN, 512, scale=0.05), "linears.4.bias": rand(HIDDEN)})
    state = {f"position_net.{k}": v for k, v in net.items()}
    if kind != "hed":
        channels, hidden = {"sem": (SEM_CLASSES, 16), "normal": (3, 4)}.get(kind, (1, 4))
        state.update({"downsample_net.layers.0.weight": rand(hidden, channels, 4, 4),
                      "downsample_net.layers.0.bias": rand(hidden),
                      "downsample_net.layers.2.weight": rand(8, hidden, 4, 4), "downsample_net.layers.2.bias": rand(8)})
    return state


def official_map_release(kind, config_says=True):
    """(the checkpoint dict, the reference gated UNet with the trained 4+extra first conv, SD's 4-channel conv)."""
    unet = tiny_gligen_unet("gated", 4 + EXTRA.get(kind, 8))
    checkpoint = official_checkpoint(unet)
    checkpoint["model"] = ldm_unet({k: v for k, v in unet.state_dict().items() if not k.startswith("position_net.")})
    checkpoint["model"].update(official_map_tensors(kind))
    if config_says:
        params = checkpoint["config_dict"]._content["model"]._content["params"]._content
        params["grounding_tokenizer"] = DictConfig({
            "target": f"ldm.modules.diffusionmodules.{kind}_grounding_net.PositionNet",
            "params": {"resize_input": RESIZE, "out_dim": HIDDEN}})
    torch.manual_seed(5)
    sd_conv = nn.Conv2d(4, unet.conv_in.out_channels, 3, padding=1)
    return checkpoint, unet, sd_conv


# --- the official forward, re-implemented from the release's description ---

def layer_norm_channels_first(x, weight, bias):
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * (x - mean) / torch.sqrt(var + 1e-6) + bias[:, None, None]


def reference_convnext(x, p):
    for i in range(len(DIMS)):
        if i == 0:
            x = F.conv2d(x, p["downsample_layers.0.0.weight"], p["downsample_layers.0.0.bias"], stride=4)
            x = layer_norm_channels_first(x, p["downsample_layers.0.1.weight"], p["downsample_layers.0.1.bias"])
        else:
            x = layer_norm_channels_first(x, p[f"downsample_layers.{i}.0.weight"], p[f"downsample_layers.{i}.0.bias"])
            x = F.conv2d(x, p[f"downsample_layers.{i}.1.weight"], p[f"downsample_layers.{i}.1.bias"], stride=2)
        j = 0
        while f"stages.{i}.{j}.gamma" in p:
            q = {k.split(".", 3)[3]: v for k, v in p.items() if k.startswith(f"stages.{i}.{j}.")}
            h = F.conv2d(x, q["dwconv.weight"], q["dwconv.bias"], padding=3, groups=x.shape[1]).permute(0, 2, 3, 1)
            h = F.layer_norm(h, (h.shape[-1],), q["norm.weight"], q["norm.bias"], 1e-6)
            h = F.linear(F.gelu(F.linear(h, q["pwconv1.weight"], q["pwconv1.bias"])), q["pwconv2.weight"], q["pwconv2.bias"])
            x = x + (q["gamma"] * h).permute(0, 3, 1, 2)
            j += 1
    return x


class ReferenceTokenizer(nn.Module):
    """The official `<kind>_grounding_net.PositionNet` forward on the release's tensors (diffusers calls it)."""

    def __init__(self, state, kind):
        super().__init__()
        self.p, self.kind = {k[len("position_net."):]: v for k, v in state.items() if k.startswith("position_net.")}, kind

    def forward(self, maps, masks):
        p, batch = self.p, maps.shape[0]
        x = F.interpolate(maps, RESIZE, mode="nearest")
        if self.kind == "sem":
            x = F.conv2d(x, p["in_conv.weight"], p["in_conv.bias"], padding=1)
        features = reference_convnext(x, {k[len("convnext_tiny_backbone."):]: v for k, v in p.items()
                                          if k.startswith("convnext_tiny_backbone.")})
        objs = features.reshape(batch, -1, p["pos_embedding"].shape[1]).permute(0, 2, 1)
        mask = masks.view(-1, 1, 1)
        objs = objs * mask + p["null_feature"].view(1, 1, -1) * (1 - mask) + p["pos_embedding"]
        for i in (0, 2, 4):
            objs = F.linear(objs, p[f"linears.{i}.weight"], p[f"linears.{i}.bias"])
            objs = F.silu(objs) if i < 4 else objs
        return objs


def reference_downsample(state, kind, maps):
    """The official `<kind>_grounding_downsampler.GroundingDownsampler` at latent size LATENT."""
    if kind in ("canny", "depth", "hed"):
        maps = maps[:, :1]
    if kind == "hed":
        return F.interpolate(maps, LATENT, mode="bicubic")
    size = (4 * LATENT[0], 4 * LATENT[1])
    x = F.interpolate(maps, size, mode="nearest" if kind == "sem" else "bicubic")
    x = F.silu(F.conv2d(x, state["downsample_net.layers.0.weight"], state["downsample_net.layers.0.bias"], stride=2, padding=1))
    return F.conv2d(x, state["downsample_net.layers.2.weight"], state["downsample_net.layers.2.bias"], stride=2, padding=1)


def reference_forward(unet, sd_conv, state, kind, sample, t, text, maps, masks, scale):
    """The official UNet forward at grounding scale `scale`: fusers scaled, downsampled map channels concatenated
    to a trained first conv; at scale 0 SD's first conv and no map channels (`restore_first_conv_from_SD`)."""
    unet = copy.deepcopy(unet)
    official_maps = F.one_hot(maps[:, 0], SEM_CLASSES).permute(0, 3, 1, 2).float() if kind == "sem" else maps
    if scale == 0:
        unet.conv_in = sd_conv
        return unet(sample, t, text).sample
    with torch.no_grad():  # diffusers' fuser has no scale: scale * tanh(a) == tanh(atanh(scale * tanh(a)))
        for name, param in unet.named_parameters():
            if "alpha_" in name:
                param.copy_(torch.atanh(scale * torch.tanh(param)))
    unet.position_net = ReferenceTokenizer(state, kind)
    model_input = torch.cat([sample, reference_downsample(state, kind, official_maps)], dim=1)
    gligen = {"maps": official_maps, "masks": masks}
    return unet(model_input, t, text, cross_attention_kwargs={"gligen": gligen}).sample


def map_inputs(kind, batch=2):
    generator = torch.Generator().manual_seed(7)
    if kind == "sem":
        maps = torch.randint(0, SEM_CLASSES, (batch, 1, 64, 64), generator=generator)
    else:
        maps = torch.rand(batch, 3, 64, 64, generator=generator) * 2 - 1
    masks = torch.tensor([0.0, 1.0])  # row 0: classifier-free guidance's null half
    return maps, masks


@pytest.mark.parametrize("kind", CONDITION_TYPES)
def test_official_map_release_converts_and_matches_the_official_forward(tmp_path, kind):
    checkpoint, reference, sd_conv = official_map_release(kind)
    torch.save(checkpoint, tmp_path / "release.pth")
    EXECUTED.clear()
    assert convert_cli(tmp_path / "release.pth", "--out", tmp_path / "out") == 0
    assert EXECUTED == []  # code-free unpickling

    adapter = GroundingAdapter.from_pretrained(tmp_path / "out" / "adapter").eval()
    condition = adapter.config.condition
    assert (condition.type, condition.depths, condition.dims, condition.resize_input) == (kind, list(DEPTHS), list(DIMS), RESIZE)
    assert adapter.config.feature_type is None and adapter.config.extra_in_channels == EXTRA.get(kind, 8)
    saved = adapter.adapter_state_dict()
    for key, value in checkpoint["model"].items():  # the map tensors keep their official names
        if key.startswith(("position_net.", "downsample_net.")):
            ours = key.replace("position_net.", "map_tokenizer.").replace("downsample_net.", "map_downsampler.")
            assert torch.equal(saved[ours], value), key

    plain, _ = split_gligen_unet(copy.deepcopy(reference))
    plain.conv_in = sd_conv  # the user's SD base
    plain.register_to_config(in_channels=4)
    adapter.attach(plain)
    generator = torch.Generator().manual_seed(3)
    sample, text, t = torch.randn(2, 4, *LATENT, generator=generator), torch.randn(2, 7, HIDDEN, generator=generator), 10
    maps, masks = map_inputs(kind)
    inputs = GroundingInputs(torch.zeros(2, 0, 4), torch.zeros(2, 0), None, maps=maps, map_masks=masks)
    outputs = {}
    with torch.no_grad():
        tokens = adapter.tokens(inputs)
        assert tokens.shape == (2, (RESIZE // 32) ** 2, HIDDEN)
        channels = adapter.map_channels(inputs, LATENT)
        for scale in (1.0, 0.5, 0.0):
            model_input = torch.cat([sample, channels], dim=1) if scale > 0 else sample
            got = plain(model_input, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(tokens, scale)).sample
            expected = reference_forward(reference, sd_conv, checkpoint["model"], kind, sample, t, text, maps, masks, scale)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            outputs[scale] = got
    assert (outputs[1.0] - outputs[0.0]).abs().max() > 1e-3  # the map really steers the output
    assert (outputs[1.0] - outputs[0.5]).abs().max() > 1e-4


def test_canny_and_depth_need_the_config_or_condition(tmp_path, capsys):
    checkpoint, _, _ = official_map_release("depth", config_says=False)
    torch.save(checkpoint, tmp_path / "release.pth")
    assert convert_cli(tmp_path / "release.pth", "--out", tmp_path / "out") == 1
    assert "give --condition canny or --condition depth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert convert_cli(tmp_path / "release.pth", "--out", tmp_path / "out", "--condition", "depth") == 0
    assert GroundingAdapter.from_pretrained(tmp_path / "out" / "adapter").config.condition.type == "depth"


def test_condition_must_fit_the_release(tmp_path, capsys):
    checkpoint, _, _ = official_map_release("canny")
    torch.save(checkpoint, tmp_path / "canny.pth")
    assert convert_cli(tmp_path / "canny.pth", "--out", tmp_path / "out", "--condition", "depth") == 1
    assert "config says it grounds 'canny' maps" in capsys.readouterr().err
    torch.save(official_checkpoint(tiny_gligen_unet()), tmp_path / "boxes.pth")
    assert convert_cli(tmp_path / "boxes.pth", "--out", tmp_path / "out", "--condition", "hed") == 1
    assert "grounds no maps" in capsys.readouterr().err

