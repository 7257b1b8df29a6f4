"""Reading H&E images into ``(H, W, 3)`` uint8 arrays, with clear errors for other kinds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_ALLOWED_MODES = {"RGB"}


def read_rgb(path: str | os.PathLike, *, arg: str = "image") -> np.ndarray:
    """Decode an RGB 8-bit image file (JPEG, PNG, TIFF) into an ``(H, W, 3)`` uint8 array.

    Grayscale, RGBA, palette and 16-bit images are refused with a message naming ``arg``:
    sq_spade never guesses how to turn them into H&E colours.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{arg}`: no such image file: {str(path)!r}.")
    Image.MAX_IMAGE_PIXELS = None  # histology images are legitimately huge
    with Image.open(path) as im:
        if im.mode not in _ALLOWED_MODES:
            kind = {"L": "grayscale", "RGBA": "RGBA", "P": "palette", "I;16": "16-bit", "I": "32-bit integer",
                    "LA": "grayscale+alpha", "F": "floating-point"}.get(im.mode, im.mode)
            raise ValueError(
                f"`{arg}` must be an 8-bit RGB image; {path.name!r} is {kind} (PIL mode {im.mode!r}). "
                "Convert it to RGB first (for RGBA, drop the alpha channel)."
            )
        bits = im.tag_v2.get(258) if im.format == "TIFF" else None  # BitsPerSample
        bits = (bits,) if isinstance(bits, int) else tuple(bits or ())
        if any(int(b) != 8 for b in bits):
            raise ValueError(
                f"`{arg}` must be an 8-bit RGB image; {path.name!r} has {max(int(b) for b in bits)}-bit samples "
                "(PIL would keep only the high byte). Convert it to 8-bit RGB first.")
        return np.asarray(im)
