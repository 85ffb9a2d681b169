"""Encoder fixtures: tiny seeded models built from configs, and a small generated catalog with images."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 210, 40)}
CATEGORIES = {"Shoes>Running": "circle", "Furniture>Tables": "square", "Bags>Backpacks": "triangle"}


def draw_product(colour: str, category: str, size: int = 64, seed: int = 0) -> Image.Image:
    """A product picture: a coloured shape (shape = category) on a light, slightly noisy background."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in 235 + rng.integers(-15, 15, size=3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    jitter = int(rng.integers(-6, 6))
    box = (12 + jitter, 12 - jitter, size - 12 + jitter, size - 12 - jitter)
    rgb = tuple(int(np.clip(c + rng.integers(-20, 20), 0, 255)) for c in COLOURS[colour])
    shape = CATEGORIES[category]
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=rgb)
    return im


def png_bytes(im: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_catalog(root: Path, n_per_cell: int = 2, bad_images: bool = True):
    """A Dataset of len(COLOURS) * len(CATEGORIES) * n_per_cell good items, plus one item per bad-image case."""
    from kgrec.data.schema import Dataset

    img_dir = root.parent / f"{root.name}-src" / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for colour in COLOURS:
        for category in CATEGORIES:
            for j in range(n_per_cell):
                item_id = f"i{k:03d}"
                draw_product(colour, category, seed=k).save(img_dir / f"{item_id}.png")
                leaf = category.split(">")[-1].lower()
                rows.append(
                    dict(
                        item_id=item_id,
                        title=f"{colour} {leaf[:-1]} model {j}",
                        description=f"A {colour} product from the {leaf} range.",
                        brand="Acme",
                        category=category,
                        attributes=json.dumps({"colour": colour}),
                        price=10.0 + k,
                        image=f"images/{item_id}.png",
                    )
                )
                k += 1
    if bad_images:
        good = draw_product("red", "Shoes>Running", seed=99)
        cases = {
            "corrupt": b"this is not an image at all",
            "truncated": png_bytes(good)[:200],
            "empty": b"",
            "cmyk": png_bytes(good.convert("CMYK"), "JPEG"),
            "grey": png_bytes(good.convert("L")),
            "rgba": png_bytes(good.convert("RGBA")),
            "sixteen": png_bytes(Image.fromarray((np.asarray(good.convert("L"), dtype=np.uint16) * 257))),
            "onepixel": png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))),
            "huge": png_bytes(Image.new("RGB", (3000, 2000), (0, 0, 255))),
        }
        for name, data in cases.items():
            (img_dir / f"bad-{name}.img").write_bytes(data)
            rows.append(dict(item_id=f"bad-{name}", title=f"{name} image item", description="", brand=None,
                             category="Shoes>Running", attributes="{}", price=None, image=f"images/bad-{name}.img"))
        rows.append(dict(item_id="bad-missing", title="missing image item", description="", brand=None,
                         category=None, attributes=None, price=None, image="images/does-not-exist.png"))
        rows.append(dict(item_id="bad-noimage", title="No image at all", description="テキストのみ — 只有文字",
                         brand=None, category=None, attributes=None, price=None, image=None))
        rows.append(dict(item_id="bad-nothing", title="", description="", brand=None, category=None,
                         attributes=None, price=None, image=None))
    return Dataset.write(root, {"items": pa.Table.from_pylist(rows)}, images_from=img_dir.parent)


class CountingEncoder:
    """Delegates to an encoder and counts the inputs that reached the model."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls = {"encode": 0, "encode_texts": 0, "encode_images_with_status": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, inputs):
        self.calls["encode"] += len(inputs)
        return self.inner.encode(inputs)

    def encode_texts(self, inputs):
        self.calls["encode_texts"] += len(inputs)
        return self.inner.encode_texts(inputs)

    def encode_images_with_status(self, inputs):
        self.calls["encode_images_with_status"] += len(inputs)
        return self.inner.encode_images_with_status(inputs)


@pytest.fixture(scope="session")
def tiny_text_encoder():
    from encoders.text import TextEncoder

    return TextEncoder.from_config(TINY_BERT, seed=0, max_length=32, batch_size=4, device="cpu")


@pytest.fixture(scope="session")
def tiny_clip():
    from encoders.clip import ClipEncoder

    return ClipEncoder("kgrec-tiny-test", device="cpu", batch_size=8, seed=0)


@pytest.fixture(scope="session")
def minilm():
    from encoders.text import TextEncoder

    return TextEncoder(device="cpu")


@pytest.fixture()
def catalog(tmp_path):
    return write_catalog(tmp_path / "catalog")
