"""One weights vocabulary: every accepted form resolves and loads, through load_networks and the CLI callers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maisi.cli import main
from maisi.config import ModelConfig, UNetConfig, preset
from maisi.data.phantom import make_phantom, write_phantom
from maisi.data.prepare import PrepareConfig, resample
from maisi.io import checkpoint, hub
from maisi.io.checkpoint import save_pretrained
from maisi.io.digest import sha256_file
from maisi.networks import build, weights
from maisi.networks.controlnet import ControlNet
from maisi.networks.weights import load_component, resolve
from maisi.pipeline.models import RELEASED_DEFAULTS, load_networks
from maisi.training.loop import prepare_run_dir
from train_support import export_weights, latent_datalist, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = preset("tiny")
RELEASED = {"autoencoder": "autoencoder_v1.pt", "unet": "diff_unet_3d_rflow-ct.pt",
            "controlnet": "controlnet_3d_rflow-ct.pt"}
DEFAULTS = {"size": [32, 32, 32], "spacing": [8.0, 8.0, 8.0], "body_region": ["abdomen"]}
SCALE = 0.8


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random, so zero-initialised layers cannot make two networks look alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _run_folder(folder: Path, stage: str, model: torch.nn.Module, component: str, extra: dict | None = None) -> None:
    """A finished `maisi train` run: config.json + run.json, checkpoints/, export/."""
    prepare_run_dir(folder, stage, TINY, {"stage": stage})
    (folder / "checkpoints").mkdir()
    save_pretrained(folder / "export", model, TINY, component, extra)


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.nn.Module]:
    unet = _randomised(build("unet", TINY), 1)
    return {"autoencoder": _randomised(build("autoencoder", TINY), 0), "unet": unet,
            "controlnet": _randomised(ControlNet.from_unet(unet, TINY.controlnet), 2)}


@pytest.fixture(scope="module")
def root(tmp_path_factory, nets) -> Path:
    """The same three tiny networks in every form a weights spec accepts, and a few broken folders."""
    root = tmp_path_factory.mktemp("weights")
    for comp, net in nets.items():
        save_pretrained(root / "model" / comp, net, TINY, comp, {"scale_factor": SCALE} if comp == "unet" else None)
    (root / "model" / "generation.json").write_text(json.dumps(DEFAULTS))
    (root / "released").mkdir()
    sd = {c: n.state_dict() for c, n in nets.items()}
    torch.save(sd["autoencoder"], root / "released" / RELEASED["autoencoder"])
    torch.save({"unet_state_dict": sd["unet"], "scale_factor": torch.tensor(SCALE), "epoch": 3},
               root / "released" / RELEASED["unet"])
    torch.save({"controlnet_state_dict": sd["controlnet"], "epoch": 3}, root / "released" / RELEASED["controlnet"])
    _run_folder(root / "runs" / "vae", "vae", nets["autoencoder"], "autoencoder")
    _run_folder(root / "runs" / "diffusion", "diffusion", nets["unet"], "unet", {"scale_factor": SCALE})
    # broken: no checkpoint; two autoencoders in one folder; a run that has not finished; another UNet config
    (root / "empty" / "notes").mkdir(parents=True)
    save_pretrained(root / "two_vaes" / "a", nets["autoencoder"], TINY, "autoencoder")
    save_pretrained(root / "two_vaes" / "b" / "export", nets["autoencoder"], TINY, "autoencoder")
    prepare_run_dir(root / "unfinished", "diffusion", TINY, {})
    for comp in ("autoencoder", "unet"):  # a model folder whose ControlNet run has not finished
        save_pretrained(root / "half" / comp, nets[comp], TINY, comp, {"scale_factor": SCALE} if comp == "unet" else None)
    prepare_run_dir(root / "half" / "controlnet", "controlnet", TINY, {})
    other = ModelConfig(name="other", autoencoder=TINY.autoencoder, scheduler=TINY.scheduler,
                        unet=UNetConfig(channels=(8, 8, 16, 16), num_head_channels=(0, 0, 8, 8), num_res_blocks=1,
                                        norm_num_groups=8))
    save_pretrained(root / "other" / "controlnet", ControlNet(other.unet, other.controlnet), other, "controlnet")
    torch.save({"controlnet_state_dict": sd["controlnet"]}, root / "other" / "controlnet_3d_ddpm-ct.pt")
    return root


@pytest.fixture(autouse=True)
def hub_cache(monkeypatch, root):
    """The released set rflow-ct 'downloaded': its files are the tiny released-layout ones; the mask-generation
    files, datasets and another set's networks beside them are not picked."""
    def local_set(name: str, *, revision=None, cache_dir=None, only=None) -> dict[str, Path]:
        if name != "rflow-ct":
            raise FileNotFoundError(f"1 file(s) of set {name!r} are not in the hub cache")
        files = {f"models/{n}": root / "released" / n for n in RELEASED.values()}
        others = ("models/mask_generation_autoencoder.pt", "datasets/all_anatomy_size_conditions.json",
                  "models/diff_unet_3d_ddpm-ct.pt", "models/controlnet_3d_ddpm-ct.pt")
        found = files | {p: root / "released" / "junk" for p in others}
        return found if only is None else {p: f for p, f in found.items() if p in only}

    monkeypatch.setattr(weights, "local_set", local_set)


def _same(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    ref = reference.state_dict()
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# resolve: every form, without loading weights
# ---------------------------------------------------------------------------------------------

M, R = "maisi", "released"
FORMS = {
    "model folder": ("model", {"autoencoder": (M, "model/autoencoder"), "unet": (M, "model/unet"),
                               "controlnet": (M, "model/controlnet")}),
    "checkpoint folder": ("model/unet", {"unet": (M, "model/unet")}),
    "released files": ([f"released/{n}" for n in RELEASED.values()],
                       {c: (R, f"released/{n}") for c, n in RELEASED.items()}),
    "run folder": ("runs/diffusion", {"unet": (M, "runs/diffusion/export")}),
    "folder of runs": ("runs", {"autoencoder": (M, "runs/vae/export"), "unet": (M, "runs/diffusion/export")}),
    "set name": ("rflow-ct", {c: (R, f"released/{n}") for c, n in RELEASED.items()}),
}


def _spec(root: Path, spec: str | list[str]) -> str | Path | list[Path]:
    if isinstance(spec, list):
        return [root / s for s in spec]
    return spec if spec == "rflow-ct" else root / spec


@pytest.mark.parametrize("form", FORMS)
def test_every_form_resolves_to_its_files(root, form):
    spec, expected = FORMS[form]
    sources = resolve(_spec(root, spec))
    assert {c: (s.format, s.path) for c, s in sources.components.items()} == {
        c: (fmt, root / path) for c, (fmt, path) in expected.items()}
    assert sources.set_name == ("rflow-ct" if form == "set name" else None)
    assert sources.defaults == (DEFAULTS if form == "model folder" else {})
    assert sources.config().name == ("rflow-ct" if sources.released else "tiny")  # no --config needed


def test_no_weights_is_the_shipped_demo_model():
    sources = resolve(None)
    assert set(sources.components) == {"autoencoder", "unet", "controlnet", "mask_autoencoder", "mask_unet"}
    assert not sources.released
    assert sources.defaults["spacing"] == [4.0, 4.0, 4.0] and sources.config().name == "tiny"


@pytest.mark.parametrize("name, component, preset_name", [
    ("autoencoder_v1.pt", "autoencoder", "rflow-ct"),
    ("autoencoder_v2.pt", "autoencoder", "rflow-mr"),
    ("diff_unet_3d_rflow-ct.pt", "unet", "rflow-ct"),
    ("diff_unet_3d_ddpm-ct.pt", "unet", "ddpm-ct"),
    ("diff_unet_3d_rflow-mr.pt", "unet", "rflow-mr"),
    ("diff_unet_3d_rflow-mr-brain_v1.pt", "unet", "rflow-mr-brain"),
    ("controlnet_3d_ddpm-ct.pt", "controlnet", "ddpm-ct"),
    ("autoencoder_epoch273.pt", "autoencoder", "rflow-ct"),  # renamed files: the component from a word
    ("diff_unet_ckpt_ddpm.pt", "unet", "ddpm-ct"),
])
def test_released_names_give_component_and_preset(tmp_path, name, component, preset_name):
    (tmp_path / name).write_bytes(b"")  # resolving reads no weights
    sources = resolve(tmp_path / name)
    assert list(sources.components) == [component] and sources.config().name == preset_name


def _cached(monkeypatch, files: dict[str, Path], missing: tuple[str, ...] = ()) -> list:
    """weights.local_set over a fake hub cache holding `files` but not `missing`; returns the `only` lists asked."""
    asked = []

    def local_set(name, only=None, **kw):
        asked.append(only)
        gone = [p for p in (only or files) if p in missing]
        if gone:
            raise hub.MissingFilesError(f"{len(gone)} file(s) of set {name!r} are not in the hub cache: {gone}")
        return {p: f for p, f in files.items() if only is None or p in only}

    monkeypatch.setattr(weights, "local_set", local_set)
    return asked


MASK_MODEL = {"mask_autoencoder": "models/mask_generation_autoencoder.pt",
              "mask_unet": "models/mask_generation_diffusion_unet.pt"}


@pytest.mark.parametrize("name", weights.SETS)
def test_each_hub_set_resolves_to_its_networks(tmp_path, monkeypatch, name):
    """The hub's catalogue and the file-name table agree: every network file of a set is picked (the mask model
    too, when the set holds it and it is cached), nothing else; the mask database need not be there."""
    files = {f.path: tmp_path / Path(f.path).name for f in hub.released_set(name).files}
    nets = {f.component: files[f.path] for f in hub.released_set(name).files
            if f.component in ("autoencoder", "unet", "controlnet")}
    mask = {c: files[p] for c, p in MASK_MODEL.items() if p in files}
    asked = _cached(monkeypatch, files)
    sources = resolve(name)
    assert sources.paths == nets | mask and sources.preset == name and "unet" in nets
    assert asked[0] == sorted(p for p, f in files.items() if f in nets.values())
    if mask:  # ddpm-ct: without its mask files in the cache, the image networks still load
        asked = _cached(monkeypatch, files, missing=tuple(MASK_MODEL.values()))
        assert resolve(name).paths == nets and len(asked) == 2


def test_the_mask_set_adds_size_control_to_an_image_set(tmp_path, monkeypatch):
    """`--weights rflow-ct mask-ct`: rflow-ct's networks and NVIDIA's mask model; mask-ct alone must be cached."""
    files = {f.path: tmp_path / f.path for s in ("rflow-ct", "mask-ct") for f in hub.released_set(s).files}
    asked = _cached(monkeypatch, files)
    sources = resolve(["rflow-ct", "mask-ct"])
    assert set(sources.components) == {"autoencoder", "unet", "controlnet", "mask_autoencoder", "mask_unet"}
    assert sources.preset == "rflow-ct" and sources.paths["mask_unet"] == files[MASK_MODEL["mask_unet"]]
    assert ["datasets/all_anatomy_size_conditions.json" in (only or ()) for only in asked] == [False, True]
    assert resolve("mask-ct").preset is None  # no image architecture from a mask model
    _cached(monkeypatch, files, missing=(MASK_MODEL["mask_unet"],))
    with pytest.raises(FileNotFoundError, match="not in the hub cache"):
        resolve(["rflow-ct", "mask-ct"])


# ---------------------------------------------------------------------------------------------
# load_networks (the generation pipeline)
# ---------------------------------------------------------------------------------------------

NETWORK_SPECS = {  # spec, --config, formats of (autoencoder, unet, controlnet or None)
    "model folder": ("model", None, (M, M, M)),
    "released files": ([f"released/{n}" for n in RELEASED.values()], "tiny", (R, R, R)),
    "set name": ("rflow-ct", "tiny", (R, R, R)),
    "folder of runs + checkpoint folder": (["runs", "model/controlnet"], None, (M, M, M)),
    "released VAE + run folder": ([f"released/{RELEASED['autoencoder']}", "runs/diffusion"], None, (R, M, None)),
}


@pytest.mark.parametrize("form", NETWORK_SPECS)
def test_load_networks_takes_every_form(root, nets, form):
    spec, config, formats = NETWORK_SPECS[form]
    n = load_networks(_spec(root, spec), config)
    assert _same(n.autoencoder, nets["autoencoder"]) and _same(n.unet, nets["unet"])
    assert (n.controlnet is None) == (formats[2] is None)
    assert n.controlnet is None or _same(n.controlnet, nets["controlnet"])
    assert n.scale_factor == pytest.approx(SCALE) and n.config.name == "tiny"
    assert tuple(n.sources[c]["format"] if c in n.sources else None for c in RELEASED) == formats
    for src in n.sources.values():
        file = Path(src["path"]) / "model.safetensors" if src["format"] == M else Path(src["path"])
        assert src["sha256"] == sha256_file(file)
    assert n.defaults == (DEFAULTS if form == "model folder" else RELEASED_DEFAULTS if R in formats else {})


# ---------------------------------------------------------------------------------------------
# The CLI callers: prepare --vae, evaluate reconstruction --vae, train --init / --unet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, extra", [
    ("model", []),  # a model folder: its autoencoder
    ("runs/vae", []),
    ("rflow-ct", ["--config", "tiny"]),  # tiny files stand in for the set; the real one needs no preset
    (f"released/{RELEASED['autoencoder']}", ["--vae-preset", "tiny"]),
])
def test_prepare_vae_takes_every_form(root, nets, tmp_path, spec, extra):
    ph = make_phantom("pelvis", (16, 16, 16), 16.0, seed=0)
    write_phantom(ph, tmp_path / "in", "p")
    vae = str(_spec(root, spec))
    assert main(["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--vae", vae,
                 "--multiple-of", "16", "--device", "cpu", *extra]) == 0
    img, _, _ = resample(ph.image.round(), None, ph.affine, PrepareConfig(multiple_of=16))
    with torch.no_grad():
        mu, _ = nets["autoencoder"].encode_within(torch.from_numpy(img)[None, None])
    torch.testing.assert_close(load_file(tmp_path / "out" / "p_latent.safetensors")["mu"], mu[0])
    encoder = json.loads((tmp_path / "out" / "p_latent.json").read_text())["settings"]["encoder"]
    assert encoder == str(resolve(_spec(root, spec)).paths["autoencoder"].resolve())


@pytest.mark.parametrize("spec, extra", [("runs", []), ("rflow-ct", ["--config", "tiny"])])
def test_evaluate_reconstruction_takes_a_folder_of_runs_and_a_set(root, tmp_path, spec, extra):
    write_phantom(make_phantom("abdomen", size=16, spacing=14.0, seed=0), tmp_path / "data", "p0")
    out = tmp_path / "rep"
    assert main(["evaluate", "reconstruction", "--vae", str(_spec(root, spec)), "--data", str(tmp_path / "data"),
                 "--out", str(out), "--quiet", "--memory-gb", "1", *extra]) == 0
    used = json.loads((out / "reconstruction.json").read_text())["weights"]
    assert Path(used["path"]) == resolve(_spec(root, spec)).paths["autoencoder"]
    assert used["format"] == (R if spec == "rflow-ct" else M)


def test_train_starts_from_a_set_a_model_folder_and_a_run_folder(root, nets, tmp_path):
    """diffusion --init <run folder>; controlnet --unet <set> --init <model folder>; then generate from the runs."""
    lat = latent_datalist(tmp_path / "lat", n=2, labels=True)
    quiet = ["--data", str(lat), "--steps", "1", "--lr", "1e-9", "--batch-size", "1"]
    assert train("diffusion", "--out", str(tmp_path / "diffusion"), "--init", str(root / "runs" / "diffusion"),
                 "--ema-decay", "0", *quiet) == 0
    assert train("controlnet", "--out", str(tmp_path / "controlnet"), "--unet", "rflow-ct",
                 "--init", str(root / "model"), *quiet) == 0  # the config comes from the maisi checkpoint
    for run, comp in (("diffusion", "unet"), ("controlnet", "controlnet")):
        ref = nets[comp].state_dict()
        assert all(torch.allclose(v, ref[k], atol=1e-5) for k, v in export_weights(tmp_path / run).items())
    assert json.loads((tmp_path / "controlnet" / "export" / "config.json").read_text())["extra"]["scale_factor"] \
        == pytest.approx(SCALE)  # from the set's UNet file
    n = load_networks([root / "released" / RELEASED["autoencoder"], tmp_path / "diffusion", tmp_path / "controlnet"])
    assert n.sources["unet"]["path"] == str(tmp_path / "diffusion" / "export") and n.controlnet is not None


# ---------------------------------------------------------------------------------------------
# Errors: what was given, what is wrong, what is allowed
# ---------------------------------------------------------------------------------------------

ERRORS = [
    ("rflow-c", FileNotFoundError, "weights not found.*did you mean the released set 'rflow-ct'"),
    ("ddpm-ct", FileNotFoundError, "not in the hub cache"),
    ("empty", ValueError, "holds no maisi checkpoint .*released set"),
    (["model", f"released/{RELEASED['autoencoder']}"], ValueError, "two autoencoder weights given"),
    ("two_vaes", ValueError, "two autoencoder weights in .*two_vaes"),
    ("unfinished", ValueError, "training run without an export yet"),
    ("half", ValueError, "training runs without an export yet: controlnet"),  # not silently without it
    ([f"released/{RELEASED['unet']}", "other/controlnet_3d_ddpm-ct.pt"], ValueError, "different models"),
    (["model/autoencoder", "model/unet", "other/controlnet"], ValueError, "unet config does not match that of"),
    ("model/unet", ValueError, "generation needs an autoencoder"),
]


@pytest.mark.parametrize("spec, error, match", ERRORS)
def test_load_networks_errors(root, spec, error, match):
    with pytest.raises(error, match=match):
        load_networks(_spec(root, spec) if spec not in ("rflow-c", "ddpm-ct") else spec)


def test_a_component_the_spec_does_not_hold_or_a_file_it_cannot_load(root, tmp_path):
    with pytest.raises(ValueError, match="no VAE weights there .*it holds: unet"):
        load_component(root / "model" / "unet", "autoencoder")
    with pytest.raises(ValueError, match="unet config does not match the given config"):
        load_component(root / "model" / "unet", "unet", "rflow-ct")
    (tmp_path / "mask_generation_autoencoder.pt").write_bytes(b"")  # the mask model's file: not an image VAE
    assert set(resolve(tmp_path / "mask_generation_autoencoder.pt").components) == {"mask_autoencoder"}
    with pytest.raises(ValueError, match="no VAE weights there .*it holds: mask_autoencoder"):
        load_component(tmp_path / "mask_generation_autoencoder.pt", "autoencoder")
    (tmp_path / "mask_generation_ae.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="name NVIDIA's mask-generation files as released"):
        resolve(tmp_path / "mask_generation_ae.pt")


def test_cli_errors_name_the_spec(root, tmp_path, capsys):
    assert main(["generate", "--weights", "rflow-c", "--out", str(tmp_path)]) == 2
    assert "did you mean the released set 'rflow-ct'" in capsys.readouterr().err
    write_phantom(make_phantom("abdomen", size=16, spacing=14.0, seed=0), tmp_path / "data", "p0")
    assert main(["prepare", "--input", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--vae",
                 str(root / "model" / "unet")]) == 2  # (inputs are checked first: they must be good here)
    assert "no VAE weights there" in capsys.readouterr().err
    assert main(["evaluate", "reconstruction", "--vae", "rflow-cx", "--data", str(tmp_path / "data")]) == 2
    assert "no VAE checkpoint at rflow-cx; did you mean" in capsys.readouterr().err


def test_each_config_json_is_read_once_per_load(tmp_path, monkeypatch):
    """Resolving a model folder reads each checkpoint's config.json; loading reuses that reading."""
    folder = tmp_path / "model"
    for component in ("autoencoder", "unet", "controlnet"):
        net = _randomised(build(component, TINY) if component != "controlnet" else
                          ControlNet.from_unet(build("unet", TINY), TINY.controlnet), 0)
        save_pretrained(folder / component, net, TINY, component, extra={"scale_factor": SCALE})
    reads: list[Path] = []
    real = checkpoint.read_pretrained_config

    def counting(path):
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(weights, "read_pretrained_config", counting)
    monkeypatch.setattr("maisi.networks.read_pretrained_config", counting)
    nets = load_networks(folder)
    assert nets.controlnet is not None
    assert sorted(p.name for p in reads) == ["autoencoder", "controlnet", "unet"]
