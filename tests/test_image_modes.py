"""Images deeper than 8 bits decode to their picture, not to a constant one: each mode's pixels
against the scaling written plainly in NumPy (PIL's own convert clips them at 255)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tritower.data.samples import decode_image
from tritower.data.transforms import EvalTransform

RAMP = np.arange(64, dtype=np.float64).reshape(8, 8) / 63.0  # 0 .. 1


def _encoded(values: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format=fmt)
    return buffer.getvalue()


CASES = {
    "16-bit PNG": (lambda: (RAMP * 65535).astype(np.uint16), "PNG", lambda v: v * 255 / 65535),
    "int32 TIFF, 16-bit range": (lambda: (RAMP * 60000).astype(np.int32), "TIFF", lambda v: v * 255 / 65535),
    "int32 TIFF, 8-bit range": (lambda: (RAMP * 200).astype(np.int32), "TIFF", lambda v: v),
    "float TIFF in [0, 1]": (lambda: RAMP.astype(np.float32), "TIFF", lambda v: v * 255),
    "float TIFF in [-1, 3]": (lambda: (RAMP * 4 - 1).astype(np.float32), "TIFF", lambda v: (v + 1) * 255 / 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deep_grey_images_decode_to_their_picture(case: str) -> None:
    make, fmt, expected = CASES[case]
    values = make()
    decoded = np.asarray(decode_image(_encoded(values, fmt)), dtype=np.float64)
    assert decoded.shape == (8, 8, 3)
    reference = np.clip(np.rint(expected(values.astype(np.float64))), 0, 255)
    for channel in range(3):
        np.testing.assert_allclose(decoded[..., channel], reference, atol=1)
    assert decoded.max() - decoded.min() > 150  # a ramp, not a constant image


def test_a_deep_image_given_to_the_eval_transform_is_scaled_too() -> None:
    image = Image.open(io.BytesIO(_encoded((RAMP * 65535).astype(np.uint16), "PNG")))
    pixels = EvalTransform(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(image).numpy()
    assert pixels.max() - pixels.min() > 0.6
