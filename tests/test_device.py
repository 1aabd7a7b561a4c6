"""maisi.device.pick_device: the default, the allowed names, and a clear refusal before any work."""

import pytest
import torch

from maisi.device import pick_device


def test_default_and_cpu():
    assert pick_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu") == pick_device(torch.device("cpu"))


@pytest.mark.parametrize("name", ["bogus", "mps", "cuda:x", "", "meta"])
def test_unknown_names_are_refused(name):
    with pytest.raises(ValueError, match=rf"device '{name}' is not one of cpu, cuda, cuda:N"):
        pick_device(name)


def test_a_gpu_the_machine_lacks_is_refused():
    with pytest.raises(ValueError, match="device 'cuda:99'"):
        pick_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_every_front_door_uses_it(tmp_path):
    from maisi.pipeline.pipeline import Pipeline
    from maisi.training import distributed as D

    with pytest.raises(ValueError, match="device 'bogus' is not one of"):
        Pipeline.from_pretrained(device="bogus")
    with pytest.raises(ValueError, match="device 'bogus' is not one of"):
        D.init("bogus")
