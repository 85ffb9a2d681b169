"""Every quarantine reason, cleaning, and the row accounting invariant (kept + quarantined == read)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kgrec.config import DataConfig
from kgrec.data.ingest import ingest
from kgrec.data.readers import read_source
from kgrec.data.schema import EVENT_TYPES, Dataset
from kgrec.data.validation import REASONS, check_image_reference, first_occurrences, validate_source


def _png(path: Path, rgb=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), rgb).save(path)


def _quarantine(out: Path) -> dict[tuple[str, int], str]:
    q = {}
    for p in (out / "quarantine").glob("*.parquet"):
        for r in pq.read_table(p).to_pylist():
            q[(r["file"], r["line"])] = r["reason"]
    return q


def _assert_accounting(report) -> None:
    for name, t in report.tables.items():
        if not t.implicit:
            assert t.kept + t.quarantined == t.read, name
        assert t.written == t.kept - t.merged, name


@pytest.fixture()
def bad_source(tmp_path: Path) -> Path:
    """A native source with one row per quarantine reason; the line number tells which reason is expected."""
    src = tmp_path / "src"
    _png(src / "images" / "ok.png")
    (src / "images" / "text.png").write_text("this is not an image")
    noise = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "images" / "big.png")
    good = (src / "images" / "big.png").read_bytes()
    (src / "images" / "truncated.png").write_bytes(good[: len(good) // 2])  # header intact, pixel data cut
    _png(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", src / "images" / "escape.png")
    os.symlink(src / "images" / "ok.png", src / "images" / "inside_link.png")
    long_title = "x" * 60
    items = [
        "item_id,title,brand,category,attributes,price,image",
        'A,Red mug,Acme,Home>Mug,"{""Colour"": ""Red""}",3.5,images/ok.png',                  # 2 ok
        'B,  Blue   mug ,ACME, home > mug ,"{""colour"": ""red""}",4,images/inside_link.png',   # 3 ok (cleaned)
        ",No id,,,,,",                                                                            # 4 missing
        f"C,{long_title},,,,,",                                                                   # 5 too_long
        "D,Mug,,,,cheap,",                                                                        # 6 bad_type
        "E,Mug,,,,-3,",                                                                           # 7 invalid_value
        'F,Mug,,,"[1, 2]",,',                                                                     # 8 bad_type
        "A,Again,,,,,",                                                                           # 9 duplicate_id
        "G,Mug,,,,,../outside.png",                                                               # 10 outside
        "H,Mug,,,,,/etc/passwd",                                                                  # 11 outside
        "I,Mug,,,,,images/escape.png",                                                            # 12 outside
        "J,Mug,,,,,images/nothere.png",                                                           # 13 missing
        "K,Mug,,,,,images/text.png",                                                              # 14 not image
        "L,Mug,,,,,images/truncated.png",                                                         # 15 unreadable
        "M,Mug,,,,,https://example.com/a.png",                                                    # 16 outside
        "N,Mug",                                                                                  # 17 malformed
    ]
    (src / "items.csv").write_text("\n".join(items) + "\n")
    (src / "items.csv").write_bytes((src / "items.csv").read_bytes() + b"O,\xc3\x28 mug,,,,,\n")  # 18 invalid_utf8
    (src / "users.csv").write_text("user_id,region\nu1,north\nu2,south\nu1,east\n")  # line 4 duplicate
    events = [
        "user_id,item_id,type,timestamp,value,query",
        "u1,A,view,2025-06-01T10:00:00Z,,",            # 2 ok
        "u1,A,view,2025-06-01T10:00:00Z,,",            # 3 exact duplicate: merged
        "u1,B,Add_To_Cart,2025-06-01T10:01:00+02:00,,",  # 4 ok (synonym, offset)
        "u2,A,purchase,1748772000,,red mug",           # 5 ok (unix seconds)
        "u2,A,rating,2025-06-02,4,",                   # 6 ok (date)
        "u1,ZZ,view,2025-06-01T10:00:00Z,,",           # 7 unknown_item
        "u9,A,view,2025-06-01T10:00:00Z,,",            # 8 unknown_user
        "u1,A,teleport,2025-06-01T10:00:00Z,,",        # 9 invalid_event_type
        "u1,A,view,not a date,,",                      # 10 bad_timestamp
        "u1,A,view,2150-01-01T00:00:00Z,,",            # 11 bad_timestamp (range)
        "u1,A,view,,,",                                # 12 missing_required (timestamp)
        "u1,A,rating,2025-06-01T10:00:00Z,five,",      # 13 bad_type
        "u1,D,view,2025-06-01T10:00:00Z,,",            # 14 unknown_item (D was quarantined)
        ",A,view,2025-06-01T10:00:00Z,,",              # 15 missing_required
    ]
    (src / "events.csv").write_text("\n".join(events) + "\n")
    (src / "links.csv").write_text("item_id,entity_id\nA,brand:acme\nA,brand:acme\nZZ,brand:x\n")
    (src / "triples.csv").write_text("head,relation,tail\nbrand:acme,founded_in,country:uk\nbrand:acme,,x\n")
    (src / "split.csv").write_text("user_id,item_id,split\nu1,A,train\nu2,A,Validation\nu1,A,holdout\n")
    return src


EXPECTED = {
    ("items.csv", 4): "missing_required", ("items.csv", 5): "too_long", ("items.csv", 6): "bad_type",
    ("items.csv", 7): "invalid_value", ("items.csv", 8): "bad_type", ("items.csv", 9): "duplicate_id",
    ("items.csv", 10): "image_outside_root", ("items.csv", 11): "image_outside_root",
    ("items.csv", 12): "image_outside_root", ("items.csv", 13): "image_missing",
    ("items.csv", 14): "image_not_an_image", ("items.csv", 15): "image_unreadable",
    ("items.csv", 16): "image_outside_root", ("items.csv", 17): "malformed_row", ("items.csv", 18): "invalid_utf8",
    ("users.csv", 4): "duplicate_id",
    ("events.csv", 7): "unknown_item", ("events.csv", 8): "unknown_user", ("events.csv", 9): "invalid_event_type",
    ("events.csv", 10): "bad_timestamp", ("events.csv", 11): "bad_timestamp", ("events.csv", 12): "missing_required",
    ("events.csv", 13): "bad_type", ("events.csv", 14): "unknown_item", ("events.csv", 15): "missing_required",
    ("links.csv", 4): "unknown_item", ("triples.csv", 3): "missing_required", ("split.csv", 4): "invalid_value",
}


def test_every_reason_is_quarantined_with_its_line(bad_source, tmp_path):
    out = tmp_path / "ds"
    report = ingest(bad_source, out, config=DataConfig(max_text_length=50))
    assert _quarantine(out) == EXPECTED
    assert set(REASONS) == set(EXPECTED.values()) | set()  # every documented reason is exercised
    _assert_accounting(report)
    t = report.tables
    assert (t["items"].read, t["items"].kept, t["items"].quarantined) == (17, 2, 15)
    assert (t["events"].read, t["events"].kept, t["events"].merged, t["events"].written) == (14, 5, 1, 4)
    assert (t["links"].kept, t["links"].merged, t["links"].written) == (2, 1, 1)
    q = pq.read_table(out / "quarantine" / "events.parquet").to_pylist()
    row = next(r for r in q if r["line"] == 7)
    assert row["message"] == "events.csv line 7: item_id 'ZZ' is not in the catalog"
    assert json.loads(row["raw"])["item_id"] == "ZZ"
    report_json = json.loads((out / "quarantine" / "report.json").read_text())
    assert report_json["quarantined"] == len(EXPECTED)
    assert "image_outside_root" in report.to_text()


def test_cleaning_is_applied_and_counted(bad_source, tmp_path):
    out = tmp_path / "ds"
    report = ingest(bad_source, out, config=DataConfig(max_text_length=50))
    ds = Dataset.open(out)
    items = {it.item_id: it for it in ds.iter_items()}
    assert items["B"].title == "Blue mug"
    assert items["A"].brand == items["B"].brand  # "Acme" / "ACME": one spelling (a tie keeps the first seen)
    assert items["B"].category == "Home>Mug"
    assert items["A"].attributes == {"colour": "Red"} and items["B"].attributes == {"colour": "Red"}
    assert items["B"].image == "images/inside_link.png" and (out / "images" / "inside_link.png").is_file()
    ev = ds.events
    assert list(ev.type) == ["view", "cart", "purchase", "rating"]
    assert ev.timestamp[1].isoformat() == "2025-06-01T08:01:00+00:00"
    assert ev.timestamp[2].isoformat() == "2025-06-01T10:00:00+00:00"
    assert ev["query"][2] == "red mug" and ev.value[3] == 4.0
    assert sorted(ds.split.split) == ["train", "valid"]
    cleaned = report.tables["items"].cleaned
    assert cleaned["trimmed"] == 2 and cleaned["whitespace_collapsed"] >= 1 and cleaned["case_normalised"] >= 1
    assert report.tables["events"].cleaned["event_type_normalised"] == 1


def test_implicit_users_without_users_file(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title\nA,a\nB,b\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,type,timestamp\nx,A,view,2025-01-01\ny,B,view,2025-01-01\n"
                                         "x,B,click,2025-01-02\n")
    report = ingest(tmp_path, tmp_path / "ds")
    ds = Dataset.open(tmp_path / "ds")
    assert sorted(ds.users.user_id) == ["x", "y"] and report.tables["users"].implicit
    assert report.quarantined == 0


def test_parquet_nanosecond_timestamps_are_truncated_not_fatal(tmp_path):
    import pandas as pd
    import pyarrow as pa

    (tmp_path / "items.csv").write_text("item_id,title\nA,a\n")
    ev = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["A", "A"], "type": ["view", "view"],
                       "timestamp": [pd.Timestamp("2024-01-01 00:00:00.000001999"), pd.Timestamp("2024-01-01")]})
    pq.write_table(pa.Table.from_pandas(ev, preserve_index=False), tmp_path / "events.parquet")
    assert pq.read_schema(tmp_path / "events.parquet").field("timestamp").type.unit == "ns"
    report = ingest(tmp_path, tmp_path / "ds")
    ds = Dataset.open(tmp_path / "ds")
    assert report.quarantined == 0
    assert [t.isoformat() for t in ds.events.timestamp] == ["2024-01-01T00:00:00.000001+00:00",
                                                            "2024-01-01T00:00:00+00:00"]


def test_attribute_names_that_become_one_quarantine_the_row(tmp_path):
    import pandas as pd

    from kg.loading import attribute_value_id
    from kgrec.errors import DataError

    pd.DataFrame({"item_id": ["A", "B", "C"], "title": ["a", "b", "c"],
                  "attributes": [json.dumps({"Color": "red", "color": "blue"}), json.dumps({"Size=EU": "42"}),
                                 json.dumps({"size": "EU=42"})]}).to_json(tmp_path / "items.jsonl", orient="records",
                                                                          lines=True)
    report = ingest(tmp_path, tmp_path / "ds")
    ds = Dataset.open(tmp_path / "ds")
    items = {it.item_id: it.attributes for it in ds.iter_items()}
    assert items == {"B": {"size_eu": "42"}, "C": {"size": "EU=42"}}  # two AttributeValue ids, not one
    assert report.tables["items"].reasons == {"bad_type": 1}
    q = pq.read_table(tmp_path / "ds" / "quarantine" / "items.parquet").to_pylist()
    assert [r["line"] for r in q] == [1] and "'Color' and 'color' are the same name 'color'" in q[0]["message"]
    with pytest.raises(DataError, match="contains '='"):
        attribute_value_id("size=eu", "42")


def test_path_traversal_variants_rejected(tmp_path):
    root = tmp_path / "root"
    _png(root / "a.png")
    _png(tmp_path / "secret.png")
    for ref in ["../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png"), "C:\\x.png",
                "\\\\server\\x.png", "file:///etc/passwd"]:
        assert check_image_reference(root, ref)[0] == "image_outside_root", ref
    assert check_image_reference(root, "sub/../a.png")[0] is None
    assert check_image_reference(root, "./a.png")[0] is None


def test_first_occurrences_never_merges_different_rows():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=2000)
    b = rng.integers(0, 5, size=2000)
    first = first_occurrences([a, b])
    seen, expected = set(), []
    for x, y in zip(a, b):
        expected.append((x, y) not in seen)
        seen.add((x, y))
    assert first.tolist() == expected and first.sum() == 25


_ids = st.sampled_from(["A", "B", "C", " A ", "ZZ", "", "nan", "x" * 70])
_types = st.sampled_from(list(EVENT_TYPES) + ["VIEW", " Purchase", "add_to_cart", "teleport", ""])
_timestamps = st.sampled_from(["2025-06-01T10:00:00Z", "2025-06-01", "1748772000", "bad", "", "3000-01-01",
                               "2025-06-01T10:00:00+05:30", "-99999999999999"])
_values = st.sampled_from(["", "1", "4.5", "abc", "nan", "inf"])
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r"), max_size=12)


@settings(max_examples=int(os.environ.get("KGREC_HYPOTHESIS_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_ids, _ids, _types, _timestamps, _values, _text), min_size=1, max_size=25),
       garbage=st.lists(st.binary(max_size=20), max_size=3))
def test_events_property_nothing_lost_and_kept_rows_valid(rows, garbage):
    """Random malformed events: every line is kept or quarantined exactly once; kept rows obey the data model."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d)
        (src / "items.csv").write_text("item_id,title\nA,a\nB,b\nC,c\n")
        import csv
        import io
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["user_id", "item_id", "type", "timestamp", "value", "query"])
        w.writerows(rows)
        # garbage lines: arbitrary bytes (invalid UTF-8 included) except line breaks and quotes, one record each
        clean = [g.replace(b"\n", b" ").replace(b"\r", b" ").replace(b'"', b" ") for g in garbage]
        data = buf.getvalue().encode("utf-8") + b"".join(g + b"\n" for g in clean)
        (src / "events.csv").write_bytes(data)
        raw = read_source(src)
        res = validate_source(raw, DataConfig(max_id_length=64)).results["events"]
        assert res.kept + res.quarantined == res.read
        assert res.written == res.kept - res.merged
        ev = res.table.to_pylist()
        assert all(e["type"] in EVENT_TYPES for e in ev)
        assert all(e["item_id"] in {"A", "B", "C"} for e in ev)
        assert all(e["user_id"] and e["user_id"] == e["user_id"].strip() and len(e["user_id"]) <= 64 for e in ev)
        assert all(e["timestamp"] is not None and 2000 <= e["timestamp"].year <= 2100 for e in ev)
        q_lines = res.quarantine.column("line").to_pylist()
        assert len(q_lines) == len(set(q_lines))  # one reason per row
        assert set(res.quarantine.column("reason").to_pylist()) <= set(REASONS)
        assert res.read + res.blank_rows == len(rows) + len(garbage)


@settings(max_examples=int(os.environ.get("KGREC_HYPOTHESIS_EXAMPLES", 30)), deadline=None)
@given(attrs=st.lists(st.one_of(
    st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), st.integers(), st.floats(allow_nan=False),
                                                  st.booleans(), st.none()), max_size=3),
    st.lists(st.integers(), max_size=2), st.text(max_size=8), st.dictionaries(st.text(max_size=3),
                                                                              st.dictionaries(st.text(max_size=2),
                                                                                              st.integers()),
                                                                              min_size=1, max_size=1)),
    min_size=1, max_size=12))
def test_items_property_attributes(attrs):
    """Any attributes value: a flat object is kept (names normalised), anything else is quarantined as bad_type."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d)
        lines = [json.dumps({"item_id": f"I{i}", "title": "t", "attributes": a}) for i, a in enumerate(attrs)]
        (src / "items.jsonl").write_text("\n".join(lines) + "\n")
        res = validate_source(read_source(src), DataConfig()).results["items"]
        assert res.kept + res.quarantined == res.read == len(attrs)
        for a, in_q in zip(attrs, [f"I{i}" not in set(res.table.column("item_id").to_pylist()) for i in range(len(attrs))]):
            flat = isinstance(a, dict) and not any(isinstance(v, dict) for v in a.values())
            plain_text = isinstance(a, str) and a.strip() in ("", "null", "{}", "nan", "NaN", "None")
            assert in_q == (not flat and not plain_text), a
        for text in res.table.column("attributes").to_pylist():
            if text is not None:
                obj = json.loads(text)
                assert all(k == k.strip().lower() and " " not in k and isinstance(v, str) for k, v in obj.items())
