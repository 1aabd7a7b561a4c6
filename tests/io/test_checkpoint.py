"""Checkpoint I/O: project format round trip, released layouts, strict key checks, unsafe or broken files."""

import collections
import json
import re

import pytest
import torch
from torch import nn

import maisi.networks
from maisi.config import preset
from maisi.io import checkpoint as ckpt


class Net(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv3d(1, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3, 4)))


class Upgradable(Net):
    @staticmethod
    def upgrade_state_dict(state):
        notes = [f"dropped unused key {k}" for k in state if k.endswith("proj_attn.weight")]
        return {k: v for k, v in state.items() if not k.endswith("proj_attn.weight")}, notes


@pytest.fixture
def fake_build(monkeypatch):
    monkeypatch.setattr(maisi.networks, "build", lambda component, config: Net(), raising=False)


def test_project_format_round_trip_reproduces_outputs(tmp_path, fake_build):
    torch.manual_seed(0)
    model, cfg = Net(), preset("tiny")
    folder = ckpt.save_pretrained(tmp_path / "m", model, cfg, "unet", extra={"scale_factor": torch.tensor(0.9)})
    loaded, cfg2, extra = maisi.networks.load_pretrained(folder)
    assert cfg2 == cfg and extra == {"scale_factor": pytest.approx(0.9)}
    x = torch.randn(2, 1, 5, 6, 7)
    assert torch.equal(model(x), loaded(x))
    meta = json.loads((folder / "config.json").read_text())
    assert meta["component"] == "unet" and meta["format"] == "maisi-checkpoint"


def test_project_format_detects_swapped_or_damaged_weights(tmp_path, fake_build):
    a = ckpt.save_pretrained(tmp_path / "a", Net(), preset("tiny"), "unet")
    b = ckpt.save_pretrained(tmp_path / "b", Net(), preset("tiny"), "unet")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(ckpt.CheckpointError, match="sha256 differs"):
        maisi.networks.load_pretrained(a)
    data = (b / "model.safetensors").read_bytes()
    (b / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated safetensors"):
        maisi.networks.load_pretrained(b, verify_hash=False)
    (b / "config.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="not a maisi checkpoint config"):
        maisi.networks.load_pretrained(b)
    with pytest.raises(FileNotFoundError):
        maisi.networks.load_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "layout, component, extra_keys",
    [
        ("raw", "autoencoder", set()),
        ("unet", "unet", {"scale_factor", "epoch", "loss", "num_train_timesteps"}),
        ("controlnet", "controlnet", {"epoch", "loss"}),
    ],
)
def test_released_layouts_load_strictly(tmp_path, monkeypatch, layout, component, extra_keys):
    torch.manual_seed(1)
    src = Net()
    state = src.state_dict()
    if layout == "unet":
        obj = {"unet_state_dict": state, "scale_factor": torch.tensor(1.0055), "epoch": 3, "loss": 0.1,
               "num_train_timesteps": 1000}
    elif layout == "controlnet":
        obj = {"controlnet_state_dict": state, "epoch": 3, "loss": 0.1}
    else:
        obj = state
    torch.save(obj, tmp_path / "w.pt")
    monkeypatch.setattr(maisi.networks, "build", lambda c, cfg: Net(), raising=False)
    model, extra = maisi.networks.load_released(tmp_path / "w.pt", component, preset("tiny"))
    assert set(extra) == extra_keys
    x = torch.randn(1, 1, 4, 4, 4)
    assert torch.equal(model(x), src(x))


def test_key_check_names_missing_unexpected_and_shape_mismatches():
    state = Net(width=4).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    state["conv.weight"] = torch.zeros(4, 1, 5, 5, 5)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_state_dict_strict(Net(width=4), state, source="w.pt")
    text = str(err.value)
    assert "missing in file (1): head.bias" in text
    assert "unexpected in file (1): extra.weight" in text
    assert "conv.weight: file (4, 1, 5, 5, 5) vs model (4, 1, 3, 3, 3)" in text


def test_known_renames_are_applied_explicitly_and_reported():
    state = Net().state_dict()
    state["attn.proj_attn.weight"] = torch.zeros(2)
    with pytest.warns(UserWarning, match="dropped unused key attn.proj_attn.weight"):
        notes = ckpt.load_state_dict_strict(Upgradable(), state)
    assert notes == ["dropped unused key attn.proj_attn.weight"]


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_code_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state": Net().state_dict(), "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="refused to load") as e:
        ckpt.read_checkpoint_file(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
    # names what it imports, and never passes on torch's advice to load it with weights_only=False
    assert re.search(r"it imports [\w.]*exec$", str(e.value)) and "weights_only" not in str(e.value)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty or truncated"), (b"hello, this is not a checkpoint at all", "not a PyTorch checkpoint or safetensors"),
     (b"garbage\n", "not a PyTorch checkpoint or safetensors file \\(it starts with b'garbage"),
     (b"\x80\x02 a broken legacy pickle", "not a readable PyTorch checkpoint")],
)
def test_non_checkpoints_get_clear_errors(tmp_path, content, message):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match=message) as e:
        ckpt.read_checkpoint_file(tmp_path / "x.pt")
    assert "pickled objects" not in str(e.value)  # junk is not called code


def test_legacy_pickle_checkpoints_still_load(tmp_path):
    torch.save(Net().state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert set(ckpt.read_checkpoint_file(tmp_path / "old.pt")) == set(Net().state_dict())


def test_truncated_pt_and_wrong_layouts(tmp_path):
    torch.save(Net().state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="not a readable PyTorch checkpoint"):
        ckpt.read_checkpoint_file(tmp_path / "t.pt")
    with pytest.raises(ckpt.CheckpointError, match="no unet weights found"):
        ckpt.split_released({"controlnet_state_dict": {}, "epoch": 1}, "unet")
    with pytest.raises(ckpt.CheckpointError, match="expected a dict"):
        ckpt.split_released([1, 2], "autoencoder")
    with pytest.raises(ValueError, match="unknown component"):
        ckpt.split_released({}, "vae")
    with pytest.raises(FileNotFoundError):
        ckpt.read_checkpoint_file(tmp_path / "missing.pt")


def test_ordered_dict_state_dicts_are_accepted(tmp_path):
    torch.save(collections.OrderedDict(Net().state_dict()), tmp_path / "o.pt")
    assert set(ckpt.read_state_dict(tmp_path / "o.pt")) == set(Net().state_dict())
