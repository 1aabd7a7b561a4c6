"""Quality-check retries: each attempt has its own seed (and the next database mask), no attempt repeats another,
each failure is one line for the CLI (the library prints nothing), and the record lists every attempt."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import maisi.pipeline.pipeline as P
from maisi.cli import main
from maisi.data.phantom import make_phantom
from maisi.io.volume import write_volume
from maisi.pipeline.masks import phantom_database
from maisi.pipeline.pipeline import Pipeline
from maisi.pipeline.validation import (
    MAX_ATTEMPTS,
    SEED_BITS,
    GenerationRequest,
    attempt_seed,
    check_numbers,
)
from pipeline_support import FAST, save_tiny_model


def req(**change) -> GenerationRequest:
    return GenerationRequest(**{**FAST, "quality_check": True, **change})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))[0]  # randomised: outputs depend on seed and mask


@pytest.fixture(scope="module")
def pipe(model_dir) -> Pipeline:
    return Pipeline.from_pretrained(model_dir, device="cpu", progress=False)


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> str:
    """Two chest masks: a third attempt wraps around to the first mask."""
    return str(phantom_database(tmp_path_factory.mktemp("db"), spans=[(1, 1)], variants=2, size=32, spacing=8.0))


@pytest.fixture(scope="module")
def user_mask(tmp_path_factory) -> str:
    ph = make_phantom("chest", size=32, spacing=8.0, seed=3)
    path = tmp_path_factory.mktemp("mask") / "mine.nii.gz"
    write_volume(path, ph.label, ph.affine, np.uint8)
    return str(path)


def failing_qc(verdicts=None):
    """A quality check whose verdicts are given (default: always fails), failing 'bone' with the body's median."""
    it = iter(verdicts) if verdicts is not None else itertools.repeat(False)

    def check(hu, label):
        passed = next(it)
        bone = {"median_hu": float(np.median(hu[label > 0])), "range": [71.4, 1000.0], "passed": passed}
        return {"passed": passed, "failed": [] if passed else ["bone"], "organs": {"bone": bone}}

    return check


@pytest.fixture
def latents(monkeypatch) -> list[tuple[list[int], list[str], torch.Tensor]]:
    """(seeds, mask files, latents) of every sample_latents call."""
    calls = []
    original = Pipeline.sample_latents

    def spy(self, plan, seeds, masks, regions, desc=""):
        z = original(self, plan, seeds, masks, regions, desc)
        calls.append((list(seeds), [m.source["file"] for m in masks], z.clone()))
        return z

    monkeypatch.setattr(Pipeline, "sample_latents", spy)
    return calls


def test_attempt_seeds_are_distinct_32_bit_and_never_a_sample_seed():
    seeds = [0, 1, 2, 7, 1000, 2**SEED_BITS - 2, 2**SEED_BITS - 1]
    got = {(s, a): attempt_seed(s, a) for s in seeds for a in range(MAX_ATTEMPTS)}
    assert len(set(got.values())) == len(got)  # no two (sample, attempt) pairs share a seed
    assert all(got[s, 0] == s for s in seeds)  # attempt 0 keeps the sample's seed
    # retries lie above every sample seed, inside 32 bits (torch's CPU generator ignores the higher ones)
    assert all(2**SEED_BITS <= v < 2**32 for (_, a), v in got.items() if a)
    for seed, attempt in [(2**SEED_BITS, 1), (-1, 0), (0, MAX_ATTEMPTS)]:
        with pytest.raises(ValueError, match="seed must be in"):
            attempt_seed(seed, attempt)


@pytest.mark.parametrize("change, match", [
    ({"seed": 2**SEED_BITS - 1, "num_samples": 2}, r"below 2\^28"),
    ({"quality_retries": MAX_ATTEMPTS}, r"quality_retries must be in 0\.\.15"),
])
def test_seed_range_errors(change, match):
    with pytest.raises(ValueError, match=match):
        check_numbers(GenerationRequest(**change), 1000)


def test_retry_uses_a_new_seed_and_the_next_mask(pipe, database, latents, monkeypatch):
    monkeypatch.setattr(P, "check_quality", failing_qc([False, True]))
    descs = []
    bar = P.tqdm
    monkeypatch.setattr(P, "tqdm", lambda *a, desc="", **k: descs.append(desc) or bar(*a, desc=desc, **k))
    r = req(mask_database=database, seed=5, quality_retries=2)
    (s,) = pipe.generate(r)
    a, retry = s.record["attempts"], attempt_seed(5, 1)
    assert [x["seed"] for x in a] == [5, retry] and (s.seed, s.record["image_seed"]) == (5, retry)
    assert [x["quality_passed"] for x in a] == [False, True] and a[0]["failed"]["bone"]["range"] == [71.4, 1000.0]
    assert a[0]["mask"]["file"] != a[1]["mask"]["file"] and a[1]["mask"]["rank"] == 1
    assert "seed + a * 2**28" in s.record["seed_rule"]
    sampling = [d for d in descs if d.startswith("sampling")]
    assert sampling == ["sampling 1 sample(s), attempt 1/3", "sampling 1 sample(s), attempt 2/3"]
    (_, _, z0), (seeds1, files1, z1) = latents
    assert seeds1 == [retry] and files1 == [a[1]["mask"]["file"]] and not torch.equal(z0, z1)
    # the retry is the new seed's sample on the next mask, not the old seed's
    plan = pipe.plan(r)
    mask = pipe.mask_for(plan, 5, 1)
    regions = [pipe._regions(plan, mask)]
    torch.testing.assert_close(pipe.sample_latents(plan, [retry], [mask], regions), z1, rtol=0, atol=0)
    assert not torch.equal(pipe.sample_latents(plan, [5], [mask], regions), z1)


def test_user_mask_retries_differ(pipe, user_mask, latents, monkeypatch):
    monkeypatch.setattr(P, "check_quality", failing_qc())
    (s,) = pipe.generate(req(body_region=(), mask=user_mask, seed=3, quality_retries=2))
    a = s.record["attempts"]
    assert len(a) == 3 and {x["mask"]["file"] for x in a} == {user_mask}  # the user's mask every time ...
    assert [x["seed"] for x in a] == [attempt_seed(3, i) for i in range(3)]  # ... with a new seed each time
    for (_, _, x), (_, _, y) in itertools.combinations(latents, 2):
        assert not torch.equal(x, y)


def test_user_mask_is_read_once_per_job(pipe, user_mask, monkeypatch):
    """Two samples with two retries each: six attempts, one read (and resampling) of the user's mask."""
    monkeypatch.setattr(P, "check_quality", failing_qc())
    reads = []
    original = P.M.load_user_mask
    monkeypatch.setattr(P.M, "load_user_mask", lambda *a, **k: reads.append(a) or original(*a, **k))
    samples = pipe.generate(req(body_region=(), mask=user_mask, num_samples=2, quality_retries=2))
    assert sum(len(s.record["attempts"]) for s in samples) == 6
    assert len(reads) == 1


def test_no_two_attempts_share_seed_and_mask(pipe, database, monkeypatch):
    """Three samples, three attempts each, two database masks: the masks wrap around, the seeds never repeat."""
    monkeypatch.setattr(P, "check_quality", failing_qc())
    r = req(mask_database=database, num_samples=3, quality_retries=2)
    pairs = [[(x["seed"], x["mask"]["file"]) for x in s.record["attempts"]] for s in pipe.generate(r)]
    flat = [p for sample in pairs for p in sample]
    assert len(flat) == 9 and len(set(flat)) == 9
    assert len({f for _, f in flat}) == 2  # masks repeat: only the seeds keep the attempts apart
    batched = [[(x["seed"], x["mask"]["file"]) for x in s.record["attempts"]]
               for s in pipe.generate(replace(r, batch_size=3))]
    assert batched == pairs  # sample k's attempts do not depend on the batch


def test_each_failure_is_one_line_and_the_library_prints_nothing(pipe, database, monkeypatch, capsys):
    monkeypatch.setattr(P, "check_quality", failing_qc())
    lines: list[str] = []
    (s,) = pipe.generate(req(mask_database=database, seed=4, quality_retries=1), on_event=lines.append)
    a = s.record["attempts"]
    med = [f'{x["failed"]["bone"]["median_hu"]:.1f}' for x in a]
    assert lines == [
        f"sample 0 (seed 4): attempt 1/2 failed — bone median {med[0]} HU outside [71.4, 1000.0]; "
        f"retrying (attempt 2/2) with seed {attempt_seed(4, 1)} and mask {a[1]['mask']['file']}",
        f"sample 0 (seed 4): attempt 2/2 failed — bone median {med[1]} HU outside [71.4, 1000.0]; "
        "no attempts left, keeping it (see the record)",
    ]
    assert capsys.readouterr() == ("", "")


def test_cli_prints_each_retry(model_dir, database, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P, "check_quality", failing_qc([False, True]))
    assert main(["generate", "--weights", str(model_dir), "--size", "32", "--spacing", "8", "--steps", "1",
                 "--mask-database", database, "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sample 0 (seed 0): attempt 1/3 failed — bone median" in out
    assert f"retrying (attempt 2/3) with seed {attempt_seed(0, 1)} and mask chest_1_label.nii.gz" in out
    rec = json.loads((tmp_path / "sample_seed0_record.json").read_text())
    assert [x["seed"] for x in rec["attempts"]] == [0, attempt_seed(0, 1)]
