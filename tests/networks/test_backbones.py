"""2D feature extractors: genuine packaged EfficientNet-Lite0 weights, RadImageNet ResNet-50 loading, TorchScript."""

import pytest
import torch
from safetensors.torch import save_file

from maisi.io.checkpoint import CheckpointError
from maisi.networks.backbones import (
    ResNet50,
    efficientnet_lite0,
    load_extractor,
    resnet50_radimagenet,
    torchscript_extractor,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0()


def _checkerboard(square: int, size: int = 224) -> torch.Tensor:
    i = torch.arange(size)
    return (((i[:, None] // square) + (i[None, :] // square)) % 2).float()[None, None]


def test_lite0_weights_are_genuine_imagenet(lite0):
    bn = lite0.net._bn0
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # trained statistics
    assert bn.running_mean.abs().max() > 0.1
    # A fine checkerboard is classified as ImageNet class 904 'window screen', confidently and reproducibly.
    p = lite0.logits(_checkerboard(4, 96)).softmax(1)
    assert int(p.argmax()) == 904 and float(p.max()) > 0.5
    assert torch.equal(lite0.logits(_checkerboard(4, 96)), lite0.logits(_checkerboard(4, 96)))


def test_lite0_feature_shapes_and_frozen(lite0):
    x = torch.rand(2, 1, 40, 56)
    feats = lite0(x)
    assert [f.shape[1] for f in feats] == [16, 24, 40, 112, 1280]
    assert feats[0].shape[2:] == (20, 28)
    assert lite0.pooled(x).shape == (2, 1280)
    lite0.train()
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())
    # 1-channel input equals the same slice replicated to 3 channels
    assert torch.allclose(lite0.pooled(x), lite0.pooled(x.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="N×1×H×W"):
        lite0(torch.rand(2, 2, 16, 16))


@pytest.mark.parametrize("keras", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_resnet50_loads_both_layouts(tmp_path, keras):
    ref = ResNet50(keras=keras)
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(3, 2048)
    path = tmp_path / "r50.safetensors"
    save_file(state, str(path))
    model = resnet50_radimagenet(path)
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(model.pooled(x), ref.eval().pooled(x))
    assert model.pooled(x).shape == (1, 2048)


def test_resnet50_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="RadImageNet weights not found"):
        resnet50_radimagenet(tmp_path / "missing.pt")
    bad = tmp_path / "bad.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 3, 3)}, str(bad))
    with pytest.raises(CheckpointError):
        resnet50_radimagenet(bad)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a ResNet-50"):
        resnet50_radimagenet(other)


def test_torchscript_extractor(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU())
    path = tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    ext = load_extractor(f"torchscript:{path}")
    assert ext.pooled(torch.rand(3, 1, 12, 12)).shape == (3, 5)
    with pytest.raises(FileNotFoundError):
        torchscript_extractor(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a TorchScript"):
        torchscript_extractor(junk)
    with pytest.raises(ValueError, match="unknown extractor"):
        load_extractor("vgg16")
