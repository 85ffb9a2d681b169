"""Encoding a catalog: item text, statuses for every bad case, cache counts, save/load."""
from __future__ import annotations

import numpy as np

from encoders.items import ItemEmbeddings, encode_dataset, item_text
from tests.encoders.conftest import CountingEncoder, write_catalog


def test_item_text_layout_and_stability():
    row = {
        "title": "Trail  Runner ", "description": "Light shoe.", "brand": "Acme", "category": "Shoes>Running",
        "attributes": '{"size": "42", "colour": "red"}',
    }
    assert item_text(row) == "Trail Runner. Light shoe. brand: Acme; category: Shoes > Running; colour: red; size: 42"
    swapped = dict(row, attributes={"colour": "red", "size": "42"})
    assert item_text(swapped) == item_text(row)
    assert item_text({"title": "", "description": None, "attributes": None}) == ""


def test_encode_dataset_statuses_shapes_and_order(catalog, tiny_text_encoder, tiny_clip, tmp_path):
    emb = encode_dataset(catalog, tiny_text_encoder, tiny_clip, tmp_path / "cache")
    ids = catalog.items["item_id"].tolist()
    assert emb.item_ids == ids
    n = len(ids)
    assert emb.text.shape == (n, 32) and emb.image.shape == (n, tiny_clip.dim) and emb.clip_text.shape == (n, tiny_clip.dim)
    status = dict(zip(emb.item_ids, emb.status))
    reason = dict(zip(emb.item_ids, emb.reason))
    for good in ("bad-cmyk", "bad-grey", "bad-rgba", "bad-sixteen", "bad-onepixel", "bad-huge", "i000"):
        assert status[good] == "embedded", (good, reason[good])
    for bad, why in [("bad-corrupt", "decodable"), ("bad-truncated", "truncated"), ("bad-empty", "empty"),
                     ("bad-missing", "not found"), ("bad-noimage", "no image")]:
        assert status[bad] == "text_only" and why in reason[bad], (bad, reason[bad])
    assert status["bad-nothing"] == "failed"
    img_norms = np.linalg.norm(emb.image, axis=1)
    np.testing.assert_allclose(img_norms[emb.has_image], 1.0, atol=1e-5)
    np.testing.assert_array_equal(img_norms[~emb.has_image], 0.0)
    i_nothing = ids.index("bad-nothing")
    assert np.linalg.norm(emb.text[i_nothing]) == 0.0
    np.testing.assert_allclose(np.delete(np.linalg.norm(emb.text, axis=1), i_nothing), 1.0, atol=1e-5)


def test_cache_unchanged_catalog_costs_no_model_call_and_changes_reencode_alone(tmp_path, tiny_text_encoder, tiny_clip):
    import json

    import pyarrow as pa

    from kgrec.data.schema import Dataset

    ds = write_catalog(tmp_path / "cat", n_per_cell=1, bad_images=False)
    cache = tmp_path / "cache"
    text, clip = CountingEncoder(tiny_text_encoder), CountingEncoder(tiny_clip)
    first = encode_dataset(ds, text, clip, cache)
    n = len(first)
    assert text.calls["encode"] == n and clip.calls["encode_texts"] == n
    assert clip.calls["encode_images_with_status"] == n

    text2, clip2 = CountingEncoder(tiny_text_encoder), CountingEncoder(tiny_clip)
    second = encode_dataset(Dataset.open(ds.root), text2, clip2, cache)
    assert text2.calls == {"encode": 0, "encode_texts": 0, "encode_images_with_status": 0}
    assert clip2.calls == {"encode": 0, "encode_texts": 0, "encode_images_with_status": 0}
    np.testing.assert_array_equal(first.text, second.text)
    np.testing.assert_array_equal(first.image, second.image)

    # change one item's title and another item's image
    rows = ds.table("items").to_pylist()
    rows[0]["title"] = "a brand new title"
    from PIL import Image

    Image.new("RGB", (16, 16), (1, 2, 3)).save(ds.root / rows[1]["image"], format="PNG")
    ds3 = Dataset.write(ds.root, {"items": pa.Table.from_pylist(rows)})
    text3, clip3 = CountingEncoder(tiny_text_encoder), CountingEncoder(tiny_clip)
    third = encode_dataset(ds3, text3, clip3, cache)
    assert text3.calls["encode"] == 1 and clip3.calls["encode_texts"] == 1
    assert clip3.calls["encode_images_with_status"] == 1
    assert not np.allclose(third.text[0], first.text[0]) and np.allclose(third.text[2:], first.text[2:])
    assert not np.allclose(third.image[1], first.image[1]) and np.allclose(third.image[2:], first.image[2:])
    assert json.dumps(third.status_counts()) == json.dumps({"embedded": n})


def test_save_load_roundtrip(catalog, tiny_text_encoder, tiny_clip, tmp_path):
    emb = encode_dataset(catalog, tiny_text_encoder, tiny_clip, None)
    emb.save(tmp_path / "emb")
    emb.save(tmp_path / "emb")  # overwrite in place
    back = ItemEmbeddings.load(tmp_path / "emb")
    assert back.item_ids == emb.item_ids and back.status == emb.status and back.reason == emb.reason
    np.testing.assert_array_equal(back.image, emb.image)
    np.testing.assert_array_equal(back.clip_text, emb.clip_text)
    assert back.model_ids == {"text": tiny_text_encoder.model_id, "clip": tiny_clip.model_id}


def test_deterministic_across_fresh_models(catalog, tmp_path):
    from encoders.clip import ClipEncoder

    a = encode_dataset(catalog, None, ClipEncoder("kgrec-tiny-test", device="cpu", seed=1), None)
    b = encode_dataset(catalog, None, ClipEncoder("kgrec-tiny-test", device="cpu", seed=1), None)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.text.shape[1] == 0
