"""Readers on small files written by the tests: line numbers, rejected rows, and each public format."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kgrec.data.ingest import ingest
from kgrec.data.readers import LINE_COL, detect_format, read_delimited, read_jsonl, read_parquet, read_source
from kgrec.data.schema import Dataset
from kgrec.errors import DataError

SHARED_ML100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k-kg"


def _lines(raw) -> list[int]:
    return raw.table.column(LINE_COL).to_pylist()


def test_csv_exact_lines_with_quoted_newlines_blank_lines_and_bad_rows(tmp_path):
    p = tmp_path / "items.csv"
    p.write_bytes(b'item_id,title,price\n'
                  b'A,"two\nline title",1\n'       # lines 2-3
                  b'\n'                            # 4: blank
                  b'B,short\n'                     # 5: too few columns
                  b'C,"ok",2\n'                    # 6
                  b'D,\xff\xfe bad,3\n'            # 7: invalid UTF-8
                  b'E,x,4,extra\n'                 # 8: too many columns
                  b'F,"a ""quoted"" one",5\n')     # 9
    raw = read_delimited(p)
    assert raw.table.column("item_id").to_pylist() == ["A", "C", "F"]
    assert _lines(raw) == [2, 6, 9]
    assert raw.table.column("title").to_pylist()[2] == 'a "quoted" one'
    rej = {(r["line"], r["reason"]) for r in raw.rejected}
    assert rej == {(5, "malformed_row"), (7, "invalid_utf8"), (8, "malformed_row")}
    assert raw.blank_rows == 1 and raw.num_read == 6


def test_jsonl_rejects_bad_json_non_objects_and_bad_utf8(tmp_path):
    p = tmp_path / "items.jsonl"
    p.write_bytes(b'{"item_id": "A", "title": "t", "attributes": {"Colour": "Red"}, "price": 9.5}\n'
                  b'{"item_id": "B", \n'
                  b'\n'
                  b'[1, 2]\n'
                  b'{"item_id": "C", "title": "\xff"}\n'
                  b'{"item_id": 7, "title": "numeric id"}\n')
    raw = read_jsonl(p)
    assert raw.table.column("item_id").to_pylist() == ["A", "7"]
    assert _lines(raw) == [1, 6]
    assert json.loads(raw.table.column("attributes")[0].as_py()) == {"Colour": "Red"}
    assert raw.table.column("price").to_pylist() == ["9.5", None]
    assert sorted((r["line"], r["reason"]) for r in raw.rejected) == [(2, "malformed_row"), (4, "malformed_row"),
                                                                      (5, "invalid_utf8")]


def test_native_attr_columns_parquet_and_extra_user_columns(tmp_path):
    pq.write_table(pa.table({"item_id": ["A", "B"], "title": ["Red mug", "Blue mug"],
                             "attr_colour": ["Red", "blue"], "attr_material": ["ceramic", None],
                             "price": [3.5, 4.0]}), tmp_path / "items.parquet")
    (tmp_path / "users.csv").write_text("user_id,Age Band,region\nu1,18-24,north\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,type,timestamp\nu1,A,view,1700000000\n")
    assert detect_format(tmp_path) == "native"
    report = ingest(tmp_path, tmp_path / "ds")
    ds = Dataset.open(tmp_path / "ds")
    attrs = {r.item_id: r.attributes for r in ds.iter_items()}
    assert attrs == {"A": {"colour": "Red", "material": "ceramic"}, "B": {"colour": "blue"}}
    assert json.loads(ds.users.attributes[0]) == {"age_band": "18-24", "region": "north"}
    assert ds.events.timestamp[0].isoformat() == "2023-11-14T22:13:20+00:00"
    assert report.tables["items"].read == 2 and report.quarantined == 0


def _write_recbole(root: Path, split_style: str) -> None:
    (root / "toy.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                   "1\tToy Story\t1995\tAnimation Comedy\n2\tHeat\t1995\tAction Crime\n"
                                   "3\tCasino\t1995\tDrama\n")
    (root / "toy.user").write_text("user_id:token\tage:token\tgender:token\n10\t24\tM\n11\t53\tF\n")
    (root / "toy.kg").write_text("head_id:token\trelation_id:token\ttail_id:token\n"
                                 "m.1\tfilm.genre\tm.9\nm.2\tfilm.genre\tm.9\n")
    (root / "toy.link").write_text("item_id:token\tentity_id:token\n1\tm.1\n2\tm.2\n")
    inter = [("10", "1", "4", "881250949"), ("10", "2", "3", "881250950"), ("11", "1", "5", "891717742"),
             ("11", "3", "2", "891717743")]
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    rows = ["\t".join(r) + "\n" for r in inter]
    if split_style == "tsv":
        (root / "toy.inter").write_text(header + "".join(rows))
        plain = "user_id\titem_id\trating\ttimestamp\n"
        (root / "train.tsv").write_text(plain + rows[0] + rows[2])
        (root / "valid.tsv").write_text(plain + rows[1])
        (root / "test.tsv").write_text(plain + rows[3])
    else:  # RecBole benchmark files only
        (root / "toy.train.inter").write_text(header + rows[0] + rows[2])
        (root / "toy.valid.inter").write_text(header + rows[1])
        (root / "toy.test.inter").write_text(header + rows[3])


@pytest.mark.parametrize("split_style", ["tsv", "benchmark_inter"])
def test_recbole_atomic_files_keep_the_split(tmp_path, split_style):
    _write_recbole(tmp_path, split_style)
    assert detect_format(tmp_path) == "recbole"
    report = ingest(tmp_path, tmp_path / "ds")
    ds = Dataset.open(tmp_path / "ds")
    ev = ds.events
    assert len(ev) == 4 and set(ev.type) == {"rating"}
    by_pair = {(u, i): (v, t.isoformat()) for u, i, v, t in zip(ev.user_id, ev.item_id, ev.value, ev.timestamp)}
    assert by_pair[("10", "1")] == (4.0, "1997-12-04T15:55:49+00:00")
    assert [by_pair[k][0] for k in [("10", "2"), ("11", "1"), ("11", "3")]] == [3.0, 5.0, 2.0]
    split = ds.split
    assert sorted(zip(split.user_id, split.item_id, split.split)) == [
        ("10", "1", "train"), ("10", "2", "valid"), ("11", "1", "train"), ("11", "3", "test")]
    items = {it.item_id: it for it in ds.iter_items()}
    assert items["1"].title == "Toy Story" and items["1"].category == "Animation"
    assert items["1"].attributes == {"class": "Animation Comedy", "release_year": "1995"}
    assert json.loads(ds.users.attributes[0]) == {"age": "24", "gender": "M"}
    assert len(ds.triples) == 2 and len(ds.links) == 2
    assert report.quarantined == 0


@pytest.mark.skipif(not SHARED_ML100K.is_dir(), reason="ml-100k sample not beside the repository")
def test_recbole_ml100k_split_hashes_match_the_exported_protocol(tmp_path):
    ingest(SHARED_ML100K, tmp_path / "ds")
    ds = Dataset.open(tmp_path / "ds")
    expected = json.loads((SHARED_ML100K / "manifest.json").read_text())["sha256_sorted_pairs"]
    split = ds.split
    for name, digest in expected.items():
        part = split[split.split == name]
        pairs = sorted(zip(part.user_id.astype(int), part.item_id.astype(int)))
        assert hashlib.sha256("\n".join(f"{u}\t{i}" for u, i in pairs).encode()).hexdigest() == digest
    assert ds.manifest["counts"]["events"] == 100_000 and ds.manifest["counts"]["items"] == 1682


def test_kgat_layout(tmp_path):
    (tmp_path / "train.txt").write_text("0 0 1 2\n1 1\n2 2 0\n")
    (tmp_path / "test.txt").write_text("0 3\n1 0 2\n\n2\n")  # a blank line and a user with no test items
    (tmp_path / "kg_final.txt").write_text("0 0 5\n1 0 5\n5 1 6\n")
    (tmp_path / "relation_list.txt").write_text("org_id remap_id\nfilm.genre 0\nfilm.country 1\n")
    assert detect_format(tmp_path) == "kgat"
    report = ingest(tmp_path, tmp_path / "ds")
    ds = Dataset.open(tmp_path / "ds")
    assert len(ds.events) == 9 and set(ds.events.type) == {"purchase"} and ds.events.timestamp.isna().all()
    assert sorted(ds.items.item_id) == ["0", "1", "2", "3"]
    assert sorted(ds.users.user_id) == ["0", "1", "2"]
    counts = ds.split.split.value_counts().to_dict()
    assert counts == {"train": 6, "test": 3}
    assert set(ds.triples.relation) == {"film.genre", "film.country"}
    assert (ds.links.item_id == ds.links.entity_id).all() and len(ds.links) == 4
    assert report.tables["users"].implicit
    assert report.tables["events"].blank_rows == 2 and report.tables["split"].blank_rows == 0  # counted once


def test_hm_layout(tmp_path):
    (tmp_path / "articles.csv").write_text(
        "article_id,product_code,prod_name,product_type_name,product_group_name,graphical_appearance_name,"
        "colour_group_name,section_name,detail_desc\n"
        "108775015,108775,Strap top,Vest top,Garment Upper body,Solid,Black,Womens Basic,Jersey top\n"
        "110065001,110065,OP T-shirt,Bra,Underwear,Solid,White,Lingerie,Microfibre T-shirt bra\n")
    (tmp_path / "customers.csv").write_text("customer_id,FN,Active,age\nc1,1,1,49\nc2,,,25\n")
    (tmp_path / "transactions_train.csv").write_text(
        "t_dat,customer_id,article_id,price,sales_channel_id\n"
        "2018-09-20,c1,0108775015,0.0508,2\n2018-09-20,c1,0108775015,0.0508,2\n"
        "2018-09-21,c2,110065001,0.03,1\n2018-09-22,c2,108775015,0.0308,1\n")
    img = tmp_path / "images" / "010" / "0108775015.jpg"
    img.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), (0, 0, 0)).save(img)
    assert detect_format(tmp_path) == "hm"
    report = ingest(tmp_path, tmp_path / "ds")
    ds = Dataset.open(tmp_path / "ds")
    items = {it.item_id: it for it in ds.iter_items()}
    assert set(items) == {"0108775015", "0110065001"}
    a = items["0108775015"]
    assert a.category == "Garment Upper body>Vest top" and a.attributes["colour"] == "Black"
    assert a.image == "images/010/0108775015.jpg" and (ds.root / a.image).is_file()
    assert items["0110065001"].image is None
    assert a.price == pytest.approx((0.0508 * 2 + 0.0308) / 3)
    assert report.tables["events"].merged == 1 and len(ds.events) == 3  # same customer, article, day: merged
    assert json.loads(ds.users.attributes[1]) == {"age": "25"}


def test_unknown_layout_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="cannot tell the format.*--format on the command line, fmt= in Python"):
        detect_format(tmp_path)
    with pytest.raises(DataError, match="unknown format"):
        read_source(tmp_path, fmt="xml")
    (tmp_path / "items.csv").write_text("id,name\n1,x\n")
    with pytest.raises(DataError, match="item_id"):
        ingest(tmp_path, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_all_lines_rejected_still_accounts_for_every_row(tmp_path):
    (tmp_path / "items.jsonl").write_bytes(b'{"item_id": \n[1]\n\xff\n')
    (tmp_path / "events.csv").write_text("user_id,item_id,type,timestamp\n")
    report = ingest(tmp_path, tmp_path / "ds")
    assert (report.tables["items"].read, report.tables["items"].quarantined) == (3, 3)
    assert report.tables["events"].read == 0
    assert Dataset.open(tmp_path / "ds").manifest["counts"]["items"] == 0


def test_jsonl_keys_differing_in_case_share_a_column(tmp_path):
    p = tmp_path / "items.jsonl"
    p.write_text('{"Item_ID": "A", "Title": "x"}\n{"item_id": "B", "title": "y", "extra": {"k": 1}}\n')
    raw = read_jsonl(p)
    assert raw.table.column("item_id").to_pylist() == ["A", "B"]
    assert raw.table.column("title").to_pylist() == ["x", "y"]
    assert raw.table.column("extra").to_pylist() == [None, '{"k": 1}']


def test_keys_or_columns_equal_in_lower_case_in_one_row_are_refused(tmp_path):
    p = tmp_path / "items.jsonl"
    p.write_text('{"item_id": "A", "Title": "x", "title": "y"}\n{"item_id": "B", "Title": "z", "title": null}\n')
    raw = read_jsonl(p)
    assert raw.table.column("item_id").to_pylist() == ["B"] and raw.table.column("title").to_pylist() == ["z"]
    assert [(r["line"], r["reason"]) for r in raw.rejected] == [(1, "malformed_row")]
    assert "['Title', 'title'] are the same column" in raw.rejected[0]["message"]
    pq.write_table(pa.table({"item_id": ["A"], "Title": ["x"], "title": ["y"]}), tmp_path / "items.parquet")
    with pytest.raises(DataError, match=r"columns \['Title', 'title'\] are the same name in lower case"):
        read_parquet(tmp_path / "items.parquet")


def test_attr_column_and_attributes_json_disagreeing_reject_the_row(tmp_path):
    (tmp_path / "items.csv").write_text(
        'item_id,title,attributes,attr_colour\n'
        'A,a,"{""Colour"": ""red""}",blue\n'      # disagree: rejected with its line
        'B,b,"{""colour"": ""red""}",red\n'       # agree: one value
        'C,c,"{""size"": ""XL""}",green\n'        # different names: merged
        'D,d,"{""Colour"": ""red""}",blue\n')     # same values as A (cached): rejected too
    report = ingest(tmp_path, tmp_path / "ds")
    ds = Dataset.open(tmp_path / "ds")
    assert {it.item_id: it.attributes for it in ds.iter_items()} == {
        "B": {"colour": "red"}, "C": {"colour": "green", "size": "XL"}}
    q = pq.read_table(tmp_path / "ds" / "quarantine" / "items.parquet").to_pylist()
    assert [(r["line"], r["reason"]) for r in q] == [(2, "bad_type"), (5, "bad_type")]  # as a clash inside JSON
    assert "'colour' is 'blue' in its column but 'red' in the attributes JSON" in q[0]["message"]
    assert report.tables["items"].read == 4 and report.tables["items"].quarantined == 2
