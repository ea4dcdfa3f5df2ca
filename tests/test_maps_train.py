"""Maps made from images (canny, normals), written into shards, and a map adapter trained from them."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ConvNextConfig, ConvNextModel, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

from gligen.cli import main as gligen_main
from gligen.data.format import read_shards
from gligen.layout import Condition, Layout
from gligen.maps.extract import canny, normals_from_depth
from gligen.pipeline import GligenPipeline
from gligen.training import Trainer, load_config
from gligen.training.dataset import ShardDataset
from tests.tiny import save_tiny_sd, tiny_train_config


def square_picture(size=64, left=16, right=48):
    image = np.zeros((size, size, 3), np.uint8)
    image[left:right, left:right] = (230, 200, 40)
    return Image.fromarray(image)


def test_canny_finds_the_edges_of_a_square():
    edges = np.asarray(canny(square_picture())) > 0
    rows, cols = np.nonzero(edges)
    assert edges.sum() > 4 * 20  # the four sides
    # every edge pixel lies on the square's outline (within a pixel), none inside or far outside
    on_outline = (np.minimum(np.abs(rows[:, None] - [15, 16, 47, 48]).min(1), np.abs(cols[:, None] - [15, 16, 47, 48]).min(1)) <= 1)
    assert on_outline.all()
    assert not edges[24:40, 24:40].any() and not edges[:8].any()


def test_normals_of_a_tilted_plane():
    x = np.tile(np.arange(64, dtype=np.float64), (64, 1))  # nearer to the right: the surface faces left
    normals = np.asarray(normals_from_depth(x)).astype(float) / 255 * 2 - 1
    assert np.allclose(normals, normals[32, 32], atol=0.02)  # a plane: one normal
    nx, ny, nz = normals[32, 32]
    assert nx < -0.3 and abs(ny) < 0.02 and nz > 0.3
    assert abs(np.linalg.norm(normals[32, 32]) - 1) < 0.02
    flat = np.asarray(normals_from_depth(np.ones((8, 8)))).astype(float) / 255 * 2 - 1
    assert np.allclose(flat, [0, 0, 1], atol=0.01)


def test_condition_command(tmp_path, capsys):
    square_picture().save(tmp_path / "photo.png")
    assert gligen_main(["condition", str(tmp_path / "photo.png"), "--type", "canny", "--out", str(tmp_path / "map.png")]) == 0
    with Image.open(tmp_path / "map.png") as written:
        assert np.array_equal(np.asarray(written), np.asarray(canny(square_picture())))
    capsys.readouterr()
    assert gligen_main(["condition", str(tmp_path / "photo.png"), "--type", "depth", "--out", str(tmp_path / "d.png")]) == 1
    err = capsys.readouterr().err
    assert "depth maps need a depth model (e.g. Intel/dpt-hybrid-midas): give its transformers directory" in err
    assert "Traceback" not in err
    assert gligen_main(["data", "shapes", "--n", "2", "--condition", "hed", "--condition-model", str(tmp_path),
                        "--out", str(tmp_path / "s")]) == 1
    assert f"{tmp_path}: no ControlNetHED.pth in this directory" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    assert gligen_main(["condition", str(tmp_path / "photo.png"), "--type", "sem", "--out", str(tmp_path / "m.png")]) == 1
    assert "sem maps need an ADE20K semantic segmenter" in capsys.readouterr().err
    assert gligen_main(["condition", str(tmp_path / "nowhere.png"), "--type", "canny", "--out", str(tmp_path / "x.png")]) == 1
    assert "nowhere.png" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def canny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps_training")
    assert gligen_main(["data", "shapes", "--n", "8", "--size", "40", "--samples-per-shard", "4", "--condition", "canny",
                        "--canny-low", "50", "--canny-high", "150", "--out", str(root / "shards")]) == 0
    torch.manual_seed(0)
    ConvNextModel(ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[4, 4, 8, 8])).save_pretrained(root / "convnext")
    return {"sd": save_tiny_sd(root / "sd"), "root": root}


def test_shards_carry_canny_maps_made_at_write_time(canny_setup):
    samples = list(read_shards(canny_setup["root"] / "shards"))
    assert len(samples) == 8
    for sample in samples:
        assert sample.condition == "canny"
        expected = np.asarray(canny(sample.image, 50, 150))
        assert np.array_equal(np.asarray(sample.condition_map)[..., 0], expected)
    assert any(np.asarray(s.condition_map).any() for s in samples)


def test_a_canny_adapter_trains_from_shards_and_generates(canny_setup, tmp_path):
    root = canny_setup["root"]
    config = tiny_train_config(canny_setup["sd"], root / "shards", tmp_path / "run", "model.feature_type=null",
                               "model.condition=canny", f"model.condition_backbone={root / 'convnext'}",
                               "model.condition_resize_input=32", "max_steps=10", "grounding_drop=0", "data.caption_drop=0",
                               "optim.lr=3e-3", "checkpoint_every=10")
    trainer = Trainer(config)
    adapter = trainer.adapter
    assert adapter.position_net is None and adapter.condition_type == "canny" and adapter.config.extra_in_channels == 8
    backbone = ConvNextModel.from_pretrained(root / "convnext").state_dict()
    torch.testing.assert_close(adapter.map_tokenizer.convnext_tiny_backbone.stages[3][0].pwconv1.weight,
                               backbone["encoder.stages.3.layers.0.pwconv1.weight"], rtol=0, atol=0)
    base = {k: v.clone() for k, v in trainer.parts["unet"].state_dict().items() if ".fuser." not in k and "conv_in" not in k}
    before = {k: v.clone() for k, v in adapter.adapter_state_dict().items()}
    batch = next(iter(ShardDataset(trainer.config.data, batch_size=4, seed=1, condition="canny")))
    assert batch.maps.shape == (4, 3, 16, 16)

    def fixed_loss():
        trainer.generator.manual_seed(123)
        with torch.no_grad():
            return sum(trainer.loss(batch).item() for _ in range(4)) / 4

    loss_before = fixed_loss()
    out = trainer.train()
    assert fixed_loss() < loss_before
    after = adapter.adapter_state_dict()
    changed = {k.split(".")[0] for k, v in after.items() if not torch.equal(v, before[k])}
    assert {"map_tokenizer", "map_downsampler", "conv_in_extra"} <= changed
    assert any(".fuser.alpha_attn" in k and not torch.equal(v, before[k]) for k, v in after.items())
    unet = trainer.parts["unet"].state_dict()
    assert all(torch.equal(unet[k], v) for k, v in base.items())  # the base stays frozen

    square_picture(16, 4, 12).save(tmp_path / "photo.png")
    canny(square_picture(16, 4, 12)).save(tmp_path / "edges.png")
    pipe = GligenPipeline.from_pretrained(str(canny_setup["sd"]), adapter=str(out))
    layout = Layout("a yellow square", width=16, height=16, condition=Condition("canny", str(tmp_path / "edges.png")))
    assert pipe([layout], num_inference_steps=2).images[0].size == (16, 16)


def test_training_skips_samples_without_the_map(canny_setup, tmp_path):
    shards = tmp_path / "plain"
    assert gligen_main(["data", "shapes", "--n", "4", "--size", "40", "--out", str(shards)]) == 0
    config = load_config("configs/tiny_test.yaml", [
        f"model.base={canny_setup['sd']}", f"data.shards={shards}", "data.resolution=16", "model.condition=depth"])
    with pytest.warns(UserWarning, match="no depth.png"), pytest.raises(Exception, match="no readable sample"):
        next(iter(ShardDataset(config.data, batch_size=2, condition="depth")))


def test_depth_and_normal_maps_from_a_transformers_depth_model(tmp_path):
    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32,
                       patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, backbone_out_indices=[0, 1, 2, 3])
    model = DPTForDepthEstimation(config).eval()
    model.save_pretrained(tmp_path / "dpt")
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(tmp_path / "dpt")
    photo = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    photo.save(tmp_path / "photo.png")
    for kind in ("depth", "normal"):
        out = tmp_path / f"{kind}.png"
        assert gligen_main(["condition", str(tmp_path / "photo.png"), "--type", kind, "--model", str(tmp_path / "dpt"),
                            "--out", str(out)]) == 0
        with Image.open(out) as written:
            assert written.size == (48, 40) and written.mode == ("L" if kind == "depth" else "RGB")
            values = np.asarray(written)
    inputs = DPTImageProcessor.from_pretrained(tmp_path / "dpt")(images=photo, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**inputs).predicted_depth[:, None]
    expected = torch.nn.functional.interpolate(predicted, (40, 48), mode="bicubic")[0, 0].numpy()
    depth = np.asarray(Image.open(tmp_path / "depth.png")).astype(float)
    assert np.corrcoef(depth.ravel(), expected.ravel())[0, 1] > 0.99  # the model's inverse depth, rescaled to 0..255
    assert depth.min() == 0 and depth.max() == 255
    assert np.allclose(np.linalg.norm(values.astype(float) / 255 * 2 - 1, axis=-1), 1, atol=0.02)  # unit normals


def reference_hed(state: dict, rgb: torch.Tensor) -> torch.Tensor:
    """ControlNet 1.1's HED forward written out with functional ops: (1, 3, H, W) in 0..255 -> (H, W) in [0, 1]."""
    x, logits = rgb - state["norm"], []
    for block, convs in enumerate((2, 2, 3, 3, 3), 1):
        if block > 1:
            x = torch.nn.functional.max_pool2d(x, kernel_size=2, stride=2)
        for i in range(convs):
            x = torch.relu(torch.nn.functional.conv2d(x, state[f"block{block}.convs.{i}.weight"],
                                                      state[f"block{block}.convs.{i}.bias"], padding=1))
        edge = torch.nn.functional.conv2d(x, state[f"block{block}.projection.weight"], state[f"block{block}.projection.bias"])
        logits.append(torch.nn.functional.interpolate(edge, rgb.shape[2:], mode="bilinear"))
    return torch.sigmoid(torch.stack(logits).mean(0))[0, 0]


def test_hed_maps_from_controlnets_hed_weights(tmp_path, capsys):
    from safetensors.torch import save_file

    from gligen.maps.hed import HedNetwork

    torch.manual_seed(0)
    state = {k: v * 0.05 if k.endswith("weight") else v for k, v in HedNetwork().state_dict().items()}
    state["norm"] = torch.tensor([120.0, 115.0, 100.0]).reshape(1, 3, 1, 1)
    (tmp_path / "annotators").mkdir()
    torch.save(state, tmp_path / "annotators" / "ControlNetHED.pth")  # a plain pickle of tensors, as released
    save_file(state, tmp_path / "hed.safetensors")
    photo = square_picture().resize((36, 28))
    photo.save(tmp_path / "photo.png")
    out = tmp_path / "hed.png"
    assert gligen_main(["condition", str(tmp_path / "photo.png"), "--type", "hed", "--model",
                        str(tmp_path / "annotators"), "--out", str(out)]) == 0
    rgb = torch.from_numpy(np.asarray(photo.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    expected = (reference_hed(state, rgb) * 255).clamp(0, 255).byte().numpy()
    with Image.open(out) as written:
        assert written.mode == "L" and written.size == (36, 28)
        assert np.abs(np.asarray(written).astype(int) - expected).max() <= 1
    from_safetensors = HedNetwork.from_pretrained(tmp_path / "hed.safetensors").edge_map(photo)
    assert np.abs(np.asarray(from_safetensors).astype(int) - expected).max() <= 1

    torch.save({"block1.convs.0.weight": state["block1.convs.0.weight"]}, tmp_path / "partial.pth")
    capsys.readouterr()
    assert gligen_main(["condition", str(tmp_path / "photo.png"), "--type", "hed", "--model",
                        str(tmp_path / "partial.pth"), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'partial.pth'}: not ControlNet's HED network (missing block1.convs.0.bias)" in err
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()


def test_sem_maps_from_a_transformers_ade20k_segmenter(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(num_labels=150, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                             decoder_hidden_size=16, sr_ratios=[1, 1, 1, 1])
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(tmp_path / "segformer")
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "segformer")
    photo = Image.fromarray((np.random.default_rng(1).random((24, 40, 3)) * 255).astype(np.uint8))
    photo.save(tmp_path / "photo.png")
    assert gligen_main(["condition", str(tmp_path / "photo.png"), "--type", "sem", "--model", str(tmp_path / "segformer"),
                        "--out", str(tmp_path / "sem.png")]) == 0
    inputs = SegformerImageProcessor.from_pretrained(tmp_path / "segformer")(images=photo, return_tensors="pt")
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(model(**inputs).logits, (24, 40), mode="bilinear")
    with Image.open(tmp_path / "sem.png") as written:
        labels = np.asarray(written)
    assert written.mode == "L" and labels.shape == (24, 40)
    assert np.array_equal(labels, logits[0].argmax(0).numpy() + 1)  # ADE20K's PNG labels: class i is i + 1
