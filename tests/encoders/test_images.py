"""Every bad-image case: decode result, reason, and that a batch with them still encodes the good ones."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from encoders.images import load_image
from tests.encoders.conftest import draw_product, png_bytes

GOOD = draw_product("red", "Shoes>Running", seed=1)


@pytest.mark.parametrize(
    "data,ok,reason",
    [
        (b"not an image", False, "not a decodable image"),
        (png_bytes(GOOD)[:150], False, "truncated"),
        (b"", False, "empty"),
        (png_bytes(GOOD.convert("CMYK"), "JPEG"), True, None),
        (png_bytes(GOOD.convert("L")), True, None),
        (png_bytes(GOOD.convert("1")), True, None),
        (png_bytes(GOOD.convert("P")), True, None),
        (png_bytes(GOOD.convert("RGBA")), True, None),
        (png_bytes(Image.fromarray(np.full((8, 8), 60000, dtype=np.uint16))), True, None),
        (png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))), True, None),
    ],
    ids=["corrupt", "truncated", "empty", "cmyk", "grey", "1bit", "palette", "rgba", "16bit", "1px"],
)
def test_load_image_cases(data, ok, reason):
    loaded = load_image(data)
    assert loaded.ok is ok
    if ok:
        assert loaded.image.mode == "RGB" and loaded.image.size[0] >= 1
    else:
        assert reason in loaded.reason


def test_transparent_pixels_become_white_and_16bit_is_rescaled():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(png_bytes(rgba)).image.getpixel((0, 0)) == (255, 255, 255)
    arr = np.zeros((4, 4), dtype=np.uint16)
    arr[0, 0] = 65535
    im = load_image(png_bytes(Image.fromarray(arr))).image
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (0, 0, 0)


def test_huge_images_are_shrunk_or_refused(tmp_path):
    big = png_bytes(Image.new("RGB", (3000, 2000), (0, 0, 255)))
    loaded = load_image(big, max_side=512)
    assert loaded.ok and max(loaded.image.size) == 512
    refused = load_image(big, max_pixels=1_000_000)
    assert not refused.ok and "too large" in refused.reason
    jpeg = png_bytes(Image.new("RGB", (4000, 3000), (0, 200, 0)), "JPEG")
    drafted = load_image(jpeg, max_pixels=5_000_000, max_side=500)  # JPEG draft decoding gets under the limit
    assert drafted.ok and max(drafted.image.size) <= 500


def test_missing_file_and_directory(tmp_path):
    assert "not found" in load_image(tmp_path / "nope.png").reason
    assert "directory" in load_image(tmp_path).reason


def test_clip_batch_survives_bad_images(tiny_clip, tmp_path):
    good_path = tmp_path / "good.png"
    GOOD.save(good_path)
    inputs = [good_path, b"junk", tmp_path / "missing.png", GOOD, png_bytes(GOOD)[:100], png_bytes(GOOD.convert("CMYK"), "JPEG")]
    vectors, reasons = tiny_clip.encode_images_with_status(inputs)
    assert vectors.shape == (6, tiny_clip.dim)
    norms = np.linalg.norm(vectors, axis=1)
    assert [r is None for r in reasons] == [True, False, False, True, False, True]
    np.testing.assert_allclose(norms[[0, 3, 5]], 1.0, atol=1e-5)
    np.testing.assert_array_equal(norms[[1, 2, 4]], 0.0)
    np.testing.assert_allclose(vectors[0], vectors[3], atol=1e-5)  # path and PIL input give the same vector


def test_dataloader_workers_decode_the_same(tiny_clip, tmp_path):
    from encoders.clip import ClipEncoder

    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        draw_product("blue", "Bags>Backpacks", seed=i).save(p)
        paths.append(p)
    paths.append(tmp_path / "missing.png")
    inline, reasons0 = tiny_clip.encode_images_with_status(paths)
    workers = ClipEncoder("kgrec-tiny-test", device="cpu", batch_size=2, num_workers=2, seed=0)
    parallel, reasons2 = workers.encode_images_with_status(paths)
    np.testing.assert_allclose(inline, parallel, atol=1e-5)
    assert reasons0 == reasons2 and reasons2[-1] is not None
