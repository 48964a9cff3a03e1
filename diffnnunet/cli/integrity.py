"""Whole-file and finite-value checks for every image and label the project reads.

nnU-Net's readers differ in how they treat a damaged file: nibabel, tifffile, Pillow and SimpleITK's MetaImage and
NRRD readers raise on a truncated file, but SimpleITK's NIfTI reader (nnU-Net's default for ``.nii.gz``) returns
the missing part of a truncated ``.nii`` or ``.nii.gz`` as zeros without an error. So before any reader sees a
file, :func:`check_file_whole` verifies it independently of the reader: a gzip stream must decompress to its end
with a valid CRC, and a NIfTI file must hold at least the bytes its header promises (offset + voxels x bytes per
voxel). :func:`nonfinite_count` counts NaN and +-Inf voxels once the array is read.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from diffnnunet.cli.common import UserError

_CHUNK = 1 << 22


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"  # gzip magic: readers accept a plain file named *.gz too


def _read_stream(path: str, keep: bool) -> tuple[int, bytes | None]:
    """(decompressed size, the bytes if ``keep``) of ``path``; raises UserError on a broken gzip stream."""
    if not _is_gzip(path):
        if not keep:
            return os.path.getsize(path), None
        with open(path, "rb") as f:
            data = f.read()
        return len(data), data
    size, blocks = 0, []
    try:
        with gzip.open(path, "rb") as f:
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                size += len(block)
                if keep:
                    blocks.append(block)
    except EOFError:
        raise UserError(f"{path}: truncated file (the compressed stream ends after {size} bytes, before its "
                        "end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise UserError(f"{path}: corrupt compressed data ({' '.join(str(e).split()) or type(e).__name__})"
                        ) from None
    return size, (b"".join(blocks) if keep else None)


def _parse_nifti(data: bytes):
    """A nibabel NIfTI-1/2 image over ``data`` (the whole file), or None when nibabel cannot parse the header
    (then nothing is claimed about the file; nnU-Net's reader decides)."""
    import nibabel

    for cls in (nibabel.Nifti1Image, nibabel.Nifti2Image):
        try:
            return cls.from_bytes(data)
        except Exception:  # noqa: BLE001 - not this flavour (or not NIfTI at all)
            continue
    return None


def check_file_whole(path: str) -> int:
    """Raise ``UserError('PATH: ...')`` if ``path`` is truncated or its compressed stream is corrupt; return the
    number of non-finite values the file stores (counted for NIfTI, 0 for formats left to their reader).

    Every gzip-compressed file is decompressed to its end (gzip checks its CRC-32 and length); a ``.nii``/
    ``.nii.gz`` must also be at least as long as its header says (offset + voxels x bytes per voxel), and its
    stored values are counted here because SimpleITK's NIfTI reader turns NaN and +-Inf into 0 without a word.
    Other formats are left to their readers, which raise on truncation (checked for nnU-Net's readers:
    MetaImage, NRRD, TIFF, PNG, BMP) and keep NaN (counted by :func:`require_finite` on the array read).
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    nifti = path.endswith((".nii", ".nii.gz"))
    size, data = _read_stream(path, keep=nifti)
    if not nifti:
        return 0
    image = _parse_nifti(data)
    if image is None:
        return 0
    proxy = image.dataobj
    promised = int(proxy.offset) + math.prod(int(s) for s in proxy.shape) * image.header.get_data_dtype().itemsize
    if size < promised:
        raise UserError(f"{path}: truncated file ({size} bytes of data, the NIfTI header promises {promised})")
    if not np.issubdtype(image.header.get_data_dtype(), np.inexact):
        return 0
    return nonfinite_count(np.asanyarray(proxy))


def nonfinite_count(array: np.ndarray) -> int:
    """Number of NaN / +-Inf values in ``array`` (0 for integer arrays)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def require_finite(array: np.ndarray, path: str, what: str = "image", stored: int = 0) -> None:
    """Raise ``UserError`` naming ``path`` and the count when ``array`` (as read) holds NaN or +-Inf, or the file
    itself stores ``stored`` > 0 of them (a reader may have replaced them)."""
    bad = max(stored, nonfinite_count(array))
    if bad:
        raise UserError(f"{path}: {bad} non-finite voxel value(s) (NaN/Inf) in the {what}; fix the file (a "
                        f"model must not see NaN/Inf)")
