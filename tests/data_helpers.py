"""Helpers for the data tests: a DICOM series writer, a stand-in VAE encoder, a small label map."""

import math

import numpy as np
import pydicom
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_dicom_series(folder, hu: np.ndarray, spacing, origin) -> None:
    """Slices along z; rows run P->A reversed (LPS +y), columns R->L (LPS +x), as scanners store them."""
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = hu.shape
    sx, sy, sz = spacing
    series, study = generate_uid(), generate_uid()
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "phantom", k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-(origin[0] + (nx - 1) * sx), -(origin[1] + (ny - 1) * sy), origin[2] + k * sz]
        ds.PixelSpacing = [sy, sx]  # row spacing, column spacing
        ds.SliceThickness = sz
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = (np.round(hu[::-1, ::-1, k].T) + 1024).clip(0, 65535).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        pydicom.dcmwrite(str(folder / f"slice{k:03d}.dcm"), ds, enforce_file_format=True) \
            if int(pydicom.__version__.split(".")[0]) >= 3 else ds.save_as(str(folder / f"slice{k:03d}.dcm"))


class PoolEncoder:
    """Stands in for the VAE: μ = 4×-average-pooled image (4 channels), σ = local std + 0.01."""

    def __init__(self):
        self.calls = 0

    def plan_within(self, op, shape, memory_gb):
        from maisi.networks.memory import MemoryPlan

        return MemoryPlan("unsplit", 4 * 2 * math.prod(shape) / 1024**3)

    def encode_within(self, x, memory_gb=None, *, plan=None):
        self.calls += 1
        mu = torch.nn.functional.avg_pool3d(x, 4)
        sd = (torch.nn.functional.avg_pool3d(x * x, 4) - mu * mu).clamp_min(0).sqrt() + 0.01
        return mu.repeat(1, 4, 1, 1, 1), sd.repeat(1, 4, 1, 1, 1)


def organ_blocks(shape=(20, 20, 20)) -> np.ndarray:
    """A uint8 label map of blocks: a liver holding a hepatic tumour, and a left kidney."""
    lab = np.zeros(shape, np.uint8)
    lab[4:16, 4:16, 4:16] = 1  # liver
    lab[8:12, 8:12, 8:12] = 26  # hepatic tumour inside
    lab[2:5, 14:18, 6:10] = 14  # left kidney
    return lab
