"""Byte-level builders for the malformed-input corpus (make_bad_corpus.py): images, including
hand-made PNGs whose header claims any size, and compact tar shards."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image


# -- image bytes -------------------------------------------------------------------------------------
def _pil_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG put together by hand: any size in the header, whatever pixel data we like."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def image_bytes() -> dict[str, bytes]:
    red = Image.new("RGB", (8, 8), (200, 10, 10))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    noisy = _pil_png(noise)
    jpeg = io.BytesIO()
    red.save(jpeg, format="JPEG", quality=90)
    return {
        "ok.png": _pil_png(red),
        "truncated.png": noisy[: len(noisy) // 2],
        "zero.png": b"",
        "text.png": b"this is a text file, not a PNG image\n",
        "signature_only.png": b"\x89PNG\r\n\x1a\n broken after the signature",
        "bomb.png": _raw_png(40_000, 40_000, zlib.compress(b"\0" * 64)),  # 1.6 G pixels: PIL's bomb check
        "large.png": _raw_png(5_000, 5_000, zlib.compress(b"\0" * 64)),  # 25 M pixels > data.max_image_pixels
        "corrupt_idat.png": _raw_png(8, 8, b"\x78\x9c" + b"\xff" * 40),  # valid CRCs, garbage deflate stream
        "jpeg_named.png": jpeg.getvalue(),  # a JPEG under a .png name: PIL sniffs the content, so it reads
    }


# -- container writers -------------------------------------------------------------------------------
def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive without tarfile's 10 KB record padding (still valid: ends with two zero blocks)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
        end = tar.offset
    return buf.getvalue()[:end] + b"\0" * 1024
