"""compute_dtype: names and refusals; warn_if_slow: bf16 on a CPU without native bf16, warned once per pipeline."""

import warnings

import pytest
import torch

from maisi.networks.precision import SlowPrecisionWarning, compute_dtype, warn_if_slow
from maisi.pipeline.pipeline import Pipeline
from pipeline_support import save_tiny_model


def test_names_and_refusals():
    assert compute_dtype("fp32", torch.device("cpu")) is torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        compute_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        compute_dtype("fp16", torch.device("cpu"))


@pytest.mark.parametrize("capability,warns", [("AVX2", True), ("DEFAULT", True), ("AVX512", False)])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, capability, warns):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compute_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # checking a name never warns
        warn_if_slow(torch.bfloat16, torch.device("cpu"))
    slow = [w for w in caught if issubclass(w.category, SlowPrecisionWarning)]
    assert bool(slow) == warns
    if warns:
        assert capability in str(slow[0].message) and "use fp32" in str(slow[0].message)


def test_a_bf16_pipeline_on_a_slow_cpu_warns_once(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    (folder,) = save_tiny_model(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = Pipeline.from_pretrained(folder, device="cpu", progress=False, precision="bf16")
    assert pipe.dtype is torch.bfloat16
    assert len([w for w in caught if issubclass(w.category, SlowPrecisionWarning)]) == 1
