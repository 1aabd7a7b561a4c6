"""The experiment's data: real and synthetic cases, the checks made before any compute, and the arms."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maisi.evaluation.augment.options import AugmentOptions, Source
from maisi.evaluation.errors import OptionError
from maisi.evaluation.inputs import pair_volumes, read_label
from maisi.io.digest import sha256_file
from maisi.labels import BODY, label_name


@dataclass(frozen=True)
class Case:
    """One image/label pair with the digests that identify it: file sha256 of the image, voxel hash of the label."""

    image: Path
    label: Path
    image_sha: str
    label_hash: str  # sha256 of the label's shape and voxel ids, whatever the file format
    ids: frozenset[int]  # the ids its label map holds (0 left out)
    mask_file: Path | None = None  # synthetic: the mask it was generated from (its record's mask file)


def label_digest(label: np.ndarray) -> str:
    h = hashlib.sha256(repr(tuple(label.shape)).encode())
    h.update(np.ascontiguousarray(label, np.int32).tobytes())
    return h.hexdigest()


def _case(image: Path, label: Path, mask_file: Path | None = None) -> Case:
    arr = read_label(label)
    return Case(image.resolve(), label.resolve(), sha256_file(image), label_digest(arr),
                frozenset(int(v) for v in np.unique(arr) if v), mask_file)


def load_cases(source: Source, key: str | None, field: str) -> list[Case]:
    """The pairs of a datalist or folder, refused (naming `field`) when there are none."""
    try:
        pairs = pair_volumes(source, source, key)
    except (FileNotFoundError, ValueError) as e:
        raise OptionError(f"{{{field}}}: {e}", field) from None
    if not pairs:
        raise OptionError(f"{{{field}}} ({source}) holds no image/label pairs; give at least one", field)
    return [_case(i, lab) for i, lab in pairs]


def load_synthetic(folder: Source) -> list[Case]:
    """Generated pairs of a folder, in sample order: sample_seed<S>_record.json names its image, label and mask."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OptionError(f"{{synthetic}}: no such folder: {folder}", "synthetic")
    cases = []
    for rec_path in sorted(folder.glob("*_record.json"), key=lambda p: (len(p.name), p.name)):
        rec = json.loads(rec_path.read_text())
        files = rec.get("files", {})
        if "image" not in files or "label" not in files:
            raise OptionError(f"{{synthetic}}: {rec_path.name} names no image and label file (generated without a "
                              f"mask?); the experiment needs image–mask pairs", "synthetic")
        mask = (rec.get("mask") or {}).get("file")
        cases.append(_case(folder / files["image"], folder / files["label"], Path(mask) if mask else None))
    return cases


def check_sets(train: Sequence[Case], test: Sequence[Case]) -> None:
    """Refuse a test set that overlaps the training set: the same file or the same content."""
    for t in test:
        for r in train:
            same = (t.image == r.image and "the same image file") or (t.label == r.label and "the same label file") \
                or (t.image_sha == r.image_sha and "the same image content (sha256)") \
                or (t.label_hash == r.label_hash and "the same label voxels")
            if same:
                raise OptionError(f"test case {t.image.name} and training case {r.image.name} are {same}: the test "
                                  f"set must be held out from {{train}}", "test", "train")


def check_not_from_test(synthetic: Sequence[Case], test: Sequence[Case]) -> None:
    """Refuse synthetic pairs made from a test mask: by the mask file their record names, or by their label voxels."""
    files = {t.label for t in test}
    hashes = {t.label_hash for t in test}
    shas = {sha256_file(t.label) for t in test}
    for s in synthetic:
        m = s.mask_file
        from_file = m is not None and (m.resolve() in files or (m.is_file() and sha256_file(m) in shas))
        if from_file or s.label_hash in hashes:
            raise OptionError(f"synthetic pair {s.image.name} was generated from a test mask "
                              f"({m.name if m else s.label.name}): it would leak the test set into training",
                              "synthetic", "test")


def scored_labels(train: Sequence[Case], test: Sequence[Case], labels: Sequence[int] | None) -> tuple[int, ...]:
    """The ids to segment: `labels`, or every id of the training masks (body left out); each must occur in both
    sets, and without `labels` the test masks may hold no id the training masks lack."""
    vocab_train = set().union(*(c.ids for c in train)) - {BODY}
    vocab_test = set().union(*(c.ids for c in test)) - {BODY}

    def names(ids: set[int]) -> str:
        return ", ".join(f"{i} ({label_name(i)})" for i in sorted(ids))

    if labels is None:
        extra = vocab_test - vocab_train
        if extra:
            raise OptionError(f"mismatched label vocabularies: the test masks hold {names(extra)}, which no training "
                              f"mask holds; give {{labels}} to score a shared subset", "labels", "test")
        wanted = vocab_train
    else:
        wanted = {int(v) for v in labels}
    for where, vocab, fld in (("training", vocab_train, "train"), ("test", vocab_test, "test")):
        missing = wanted - vocab
        if missing:
            raise OptionError(f"mismatched label vocabularies: no {where} mask holds {names(missing)}; change "
                              f"{{labels}} or {{{fld}}}", "labels", fld)
    if not wanted:
        raise OptionError("the training masks hold no label to segment (only background and body)", "train")
    return tuple(sorted(wanted))


def build_arms(options: AugmentOptions, real: Sequence[Case], synthetic: Sequence[Case]) -> dict[str, list[Case]]:
    """Each arm's training cases: baseline = real; real+N = real + the first N synthetic pairs; synthetic = the
    first max(counts) synthetic pairs alone."""
    need = options.pairs_needed()
    if len(synthetic) < need:
        raise OptionError(f"{{counts}} asks for {need} synthetic pairs but {{synthetic}} has {len(synthetic)}",
                          "counts", "synthetic")
    arms = {"baseline": list(real)}
    for n in sorted(options.counts):
        arms[f"real+{n}"] = list(real) + list(synthetic[:n])
    if options.synthetic_only:
        arms["synthetic"] = list(synthetic[:need])
    return arms
