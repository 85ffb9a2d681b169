"""The HTTP service through FastAPI's TestClient: every endpoint, every error path, answers equal the library's."""
from __future__ import annotations

import io
import json
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from kgrec.errors import BundleError
from tests.kgrec.conftest_serve import SERVE, serve_app, serve_recommender  # noqa: F401  (fixtures)

SCHEMA = json.loads((Path(__file__).parents[2] / "ranking" / "explanation.schema.json").read_text())


@pytest.fixture(scope="module")
def client(serve_app):
    with TestClient(serve_app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def top_user(serve_recommender):
    return str(serve_recommender.events["user_id"].value_counts().index[0])


def _png(color=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- service
def test_health_reports_the_loaded_bundle(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["items"] == 200 and body["users"] == 80 and body["ranker"] is True


def test_users_most_active_first_and_bounded(client, serve_recommender, top_user):
    r = client.get("/users", params={"limit": 5})
    assert r.status_code == 200
    body = r.json()
    assert len(body["users"]) == 5 and body["users"][0] == top_user and body["total"] == 80
    counts = serve_recommender.events["user_id"].value_counts()
    listed = [int(counts.get(u, 0)) for u in body["users"]]
    assert listed == sorted(listed, reverse=True)
    assert client.get("/users", params={"limit": 0}).status_code == 422
    assert client.get("/users", params={"limit": 1001}).status_code == 422


def test_openapi_docs_and_page_are_served(client):
    spec = client.get("/openapi.json").json()
    assert {"/recommend", "/search", "/similar", "/explain", "/items/{item_id}", "/items/{item_id}/image",
            "/health", "/users"} <= set(spec["paths"])
    assert "post" in spec["paths"]["/search"] and "get" in spec["paths"]["/search"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="user-picker"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_default_bind_address_is_loopback():
    from kgrec.config import Config

    assert Config.load(env={}).serve.host == "127.0.0.1"


# ---------------------------------------------------------------------------------------------------- recommend
def test_recommend_equals_the_library_and_excludes_seen(client, serve_recommender, top_user):
    r = client.get("/recommend", params={"user": top_user, "k": 7})
    assert r.status_code == 200
    res = r.json()["results"]
    lib = serve_recommender.recommend(top_user, 7)
    assert [x["item_id"] for x in res] == [x.item_id for x in lib]
    assert [x["score"] for x in res] == pytest.approx([x.score for x in lib], abs=1e-6)
    assert [x["rank"] for x in res] == list(range(1, 8))
    seen = set(serve_recommender.events.loc[serve_recommender.events["user_id"] == top_user, "item_id"])
    assert not seen & {x["item_id"] for x in res}
    for x in res:
        assert (x["image_url"] is None) == (x["image"] is None)
        assert "explanation" not in x or x["explanation"] is None


def test_recommend_with_explanations_follows_the_schema(client, top_user):
    res = client.get("/recommend", params={"user": top_user, "k": 3, "explain": "true"}).json()["results"]
    assert len(res) == 3
    for x in res:
        e = x["explanation"]
        jsonschema.validate(e, SCHEMA)
        assert e["item_id"] == x["item_id"] and e["sentence"]
        assert sum(e["all_contributions"].values()) + e["base_score"] == pytest.approx(x["score"], abs=1e-4)


def test_recommend_with_query_and_cold_user(client, serve_recommender):
    r = client.get("/recommend", params={"user": "brand-new-user", "k": 4, "query": "red jacket"})
    assert r.status_code == 200
    res = r.json()["results"]
    assert len(res) == 4 and all(x["sources"] for x in res)
    r = client.get("/recommend", params={"user": serve_recommender.user_ids[3], "k": 4, "query": "blue shoes"})
    assert r.status_code == 200 and len(r.json()["results"]) == 4


def test_recommend_errors(client, top_user):
    r = client.get("/recommend", params={"user": "nobody", "k": 3})
    assert r.status_code == 404 and "unknown user 'nobody'" in r.json()["detail"]
    for k in (0, -1, SERVE.max_k + 1):
        r = client.get("/recommend", params={"user": top_user, "k": k})
        assert r.status_code == 422, k
    r = client.get("/recommend", params={"user": top_user, "k": SERVE.max_k + 1})
    assert f"less than or equal to {SERVE.max_k}" in json.dumps(r.json())
    assert client.get("/recommend", params={"user": top_user, "k": "ten"}).status_code == 422
    assert client.get("/recommend", params={"k": 3}).status_code == 422  # user missing
    assert client.get("/recommend", params={"user": ""}).status_code == 422
    r = client.get("/recommend", params={"user": top_user, "query": "x" * (SERVE.max_query_chars + 1)})
    assert r.status_code == 422
    r = client.get("/recommend", params={"user": top_user, "k": SERVE.max_k})
    assert r.status_code == 200 and 0 < len(r.json()["results"]) <= SERVE.max_k


# ---------------------------------------------------------------------------------------------------- search
def test_text_search_finds_items_by_title(client, serve_recommender):
    items = serve_recommender.items.head(20)
    hits = 0
    for item_id, title in zip(items["item_id"], items["title"]):
        r = client.get("/search", params={"text": title, "k": 5})
        assert r.status_code == 200
        res = r.json()["results"]
        assert len(res) == 5 and all(x["sources"] for x in res)
        hits += item_id in [x["item_id"] for x in res]
    assert hits >= 8  # chance is 0.5 of 20


def test_text_search_errors(client):
    assert client.get("/search").status_code == 422
    assert client.get("/search", params={"text": ""}).status_code == 422
    assert client.get("/search", params={"text": "shoe", "k": SERVE.max_k + 1}).status_code == 422
    assert client.get("/search", params={"text": "y" * (SERVE.max_query_chars + 1)}).status_code == 422


def test_image_upload_finds_the_item_itself(client, serve_recommender, demo_dataset):
    row = serve_recommender.items.dropna(subset=["image"]).iloc[3]
    data = (demo_dataset.root / row["image"]).read_bytes()
    r = client.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 3 and res[0]["item_id"] == row["item_id"]
    assert res[0]["sources"]["image"] == pytest.approx(1.0, abs=1e-3)  # its own vector: cosine 1
    r = client.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": "4", "text": "a red coat"})
    assert r.status_code == 200 and len(r.json()["results"]) == 4


def test_image_upload_errors(client):
    r = client.post("/search", files={"image": ("notes.txt", b"hello, not an image", "text/plain")})
    assert r.status_code == 415 and "not a readable image" in r.json()["detail"]
    assert "0x" not in r.json()["detail"] and "BytesIO" not in r.json()["detail"]  # no memory address leaks out
    r = client.post("/search", files={"image": ("empty.png", b"", "image/png")})
    assert r.status_code == 415 and "empty" in r.json()["detail"]
    r = client.post("/search", files={"image": ("cut.png", _png()[:40], "image/png")})  # truncated PNG
    assert r.status_code == 415
    # just over the limit: read in chunks and refused after parsing
    big = _png() + b"\0" * (SERVE.max_upload_bytes + 1)
    r = client.post("/search", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413 and str(SERVE.max_upload_bytes) in r.json()["detail"]
    # far over the limit: refused from Content-Length before the body is read
    r = client.post("/search", files={"image": ("huge.png", b"\0" * (SERVE.max_upload_bytes * 3), "image/png")})
    assert r.status_code == 413
    # far over the limit without a Content-Length (chunked): counted as it arrives and refused
    head = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="h.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    def chunks():
        yield head
        for _ in range(3 * SERVE.max_upload_bytes // 65536 + 1):
            yield b"\0" * 65536
        yield b"\r\n--xyz--\r\n"

    r = client.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "larger than the upload limit" in r.json()["detail"]
    assert client.post("/search", data={"k": "3"}).status_code == 422  # no file
    r = client.post("/search", files={"image": ("q.png", _png(), "image/png")}, data={"k": str(SERVE.max_k + 1)})
    assert r.status_code == 422


@pytest.mark.parametrize("blank", ["  ", "\t", " \n "])
def test_blank_text_queries_are_422_not_arbitrary_items(client, serve_recommender, top_user, blank):
    """FastAPI's min_length counts spaces: a whitespace-only text would be encoded and match arbitrary items."""
    item = serve_recommender.item_ids[0]
    responses = {
        "GET /search": client.get("/search", params={"text": blank}),
        "POST /search": client.post("/search", files={"image": ("q.png", _png(), "image/png")},
                                    data={"text": blank, "k": "3"}),
        "GET /recommend (known user)": client.get("/recommend", params={"user": top_user, "query": blank}),
        "GET /recommend (new user)": client.get("/recommend", params={"user": "brand-new-user", "query": blank}),
        "GET /explain": client.get("/explain", params={"user": top_user, "item": item, "query": blank}),
    }
    for what, r in responses.items():
        assert r.status_code == 422, (what, r.status_code, r.text)
        assert "the query is empty" in r.json()["detail"] and "whitespace" in r.json()["detail"], what
    r = client.get("/recommend", params={"user": top_user, "query": ""})
    assert r.status_code == 422 and "empty string" in r.json()["detail"]
    assert client.get("/search", params={"text": " red coat "}).status_code == 200  # padding around words is fine


def test_cli_blank_text_queries_are_clean_errors(serve_recommender, top_user, tmp_path):
    """`kgrec search '   '`, `recommend --query '   '` and `explain --query ' '` exit 2 saying the query is empty;
    `recommend --query ''` says so too (it used to say that no query was given)."""
    from typer.testing import CliRunner

    from kgrec.cli import app

    bundle = str(serve_recommender.save(tmp_path / "b"))
    item = serve_recommender.item_ids[0]
    runs = {
        "search": ["search", "   ", "-b", bundle],
        "search ''": ["search", "", "-b", bundle],
        "recommend --query (new user)": ["recommend", "-b", bundle, "--query", "   "],
        "recommend --query (known user)": ["recommend", top_user, "-b", bundle, "--query", "\t "],
        "recommend --query ''": ["recommend", "-b", bundle, "--query", ""],
        "explain --query": ["explain", top_user, item, "-b", bundle, "--query", "  "],
    }
    for what, argv in runs.items():
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 2, (what, res.output)
        assert "error: the query is empty" in res.output, (what, res.output)
    assert "--query is an empty string" in CliRunner().invoke(app, runs["recommend --query ''"]).output
    res = CliRunner().invoke(app, ["similar", item, "-b", bundle, "-k", "3", "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)) == 3  # the bundle itself answers


def test_cli_query_only_recommendations_say_why_there_is_nothing_to_explain(serve_recommender, tmp_path,
                                                                            monkeypatch):
    from typer.testing import CliRunner

    from kgrec.cli import app
    from kgrec.pipeline import Recommender

    # the fixture's encoders are built in code: the command gets the in-memory model (it has them)
    monkeypatch.setattr(Recommender, "load", classmethod(lambda cls, *a, **kw: serve_recommender))
    bundle = str(tmp_path)
    res = CliRunner().invoke(app, ["recommend", "-b", bundle, "--query", "red coat", "-k", "3", "--explain",
                                   "--html", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "no explanations: without a USER these results come from the query alone" in res.output
    assert "no HTML report: without a USER" in res.output and "None" not in res.output
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------------- similar / explain
def test_recommend_from_chosen_items_equals_the_library(client, serve_recommender):
    chosen = serve_recommender.item_ids[3:5]
    res = client.get("/recommend/from-items", params={"items": chosen, "k": 7}).json()["results"]
    assert [x["item_id"] for x in res] == [x.item_id for x in serve_recommender.recommend_from_items(chosen, 7)]
    assert len(res) == 7 and not {x["item_id"] for x in res} & set(chosen)
    r = client.get("/recommend/from-items", params={"items": ["no-such-item"]})
    assert r.status_code == 404 and "unknown item 'no-such-item'" in r.json()["detail"]
    assert client.get("/recommend/from-items").status_code == 422  # no items
    assert client.get("/openapi.json").json()["paths"]["/recommend/from-items"]["get"]


def test_similar_equals_the_library(client, serve_recommender):
    item = serve_recommender.item_ids[10]
    res = client.get("/similar", params={"item": item, "k": 6}).json()["results"]
    assert [x["item_id"] for x in res] == [x.item_id for x in serve_recommender.similar(item, 6)]
    assert item not in {x["item_id"] for x in res}
    scores = [x["score"] for x in res]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    r = client.get("/similar", params={"item": "no-such-item"})
    assert r.status_code == 404 and "unknown item 'no-such-item'" in r.json()["detail"]
    assert client.get("/similar", params={"item": item, "k": 0}).status_code == 422


def test_explain_endpoint(client, serve_recommender, top_user):
    item = serve_recommender.recommend(top_user, 1)[0].item_id
    r = client.get("/explain", params={"user": top_user, "item": item})
    assert r.status_code == 200
    e = r.json()
    e.pop("image_url")
    jsonschema.validate(e, SCHEMA)
    assert e["sentence"] == serve_recommender.explain(top_user, item).to_dict()["sentence"]
    assert client.get("/explain", params={"user": top_user, "item": "nope"}).status_code == 404
    assert client.get("/explain", params={"user": "nobody", "item": item}).status_code == 404
    assert client.get("/explain", params={"user": top_user}).status_code == 422


# ---------------------------------------------------------------------------------------------------- items
def test_item_record_and_image(client, serve_recommender, demo_dataset):
    row = serve_recommender.items.dropna(subset=["image"]).iloc[0]
    r = client.get(f"/items/{row['item_id']}")
    assert r.status_code == 200
    body = r.json()
    assert body["item_id"] == row["item_id"] and body["title"] == row["title"]
    assert body["image_url"] == f"/items/{row['item_id']}/image"
    assert body["attributes"] == json.loads(row["attributes"]) and body["attributes"]  # an object, not JSON text
    img = client.get(body["image_url"])
    assert img.status_code == 200 and img.headers["content-type"].startswith("image/")
    assert img.content == (demo_dataset.root / row["image"]).read_bytes()
    assert client.get("/items/no-such-item").status_code == 404
    assert client.get("/items/no-such-item/image").status_code == 404


def test_item_image_path_must_stay_inside_the_dataset(client, serve_recommender, demo_dataset):
    items = serve_recommender.items
    item_id = items.dropna(subset=["image"]).index[1]
    original = items.at[item_id, "image"]
    secret = demo_dataset.root.parent / "secret.png"
    secret.write_bytes(_png())
    try:
        for bad in ("../secret.png", str(secret), "images/../../secret.png", "images/does-not-exist.png"):
            items.at[item_id, "image"] = bad
            r = client.get(f"/items/{item_id}/image")
            assert r.status_code == 404, bad
            assert r.headers["content-type"].startswith("application/json")
        items.at[item_id, "image"] = None
        r = client.get(f"/items/{item_id}/image")
        assert r.status_code == 404 and "has no image" in r.json()["detail"]
    finally:
        items.at[item_id, "image"] = original
    assert client.get(f"/items/{item_id}/image").status_code == 200


# ---------------------------------------------------------------------------------------------------- failures
def test_unexpected_errors_are_500_without_internals(client, serve_recommender, monkeypatch, caplog):
    def boom(*a, **k):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(serve_recommender, "similar", boom)
    with caplog.at_level("ERROR", logger="kgrec.serve.app"):
        r = client.get("/similar", params={"item": serve_recommender.item_ids[0]})
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text and "internal server error" in r.json()["detail"]
    assert any("secret internal detail" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records)


def test_library_errors_without_a_specific_status_are_503(client, serve_recommender, monkeypatch):
    def no_ranker(*a, **k):
        raise BundleError("this model has no trained ranker")

    monkeypatch.setattr(serve_recommender, "explain", no_ranker)
    r = client.get("/explain", params={"user": serve_recommender.user_ids[0], "item": serve_recommender.item_ids[0]})
    assert r.status_code == 503 and "no trained ranker" in r.json()["detail"]


def test_serve_command_reports_a_missing_bundle(tmp_path):
    from typer.testing import CliRunner

    from kgrec.cli import app

    result = CliRunner().invoke(app, ["serve", "--bundle", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "missing" in result.output


def test_item_ids_with_a_slash_and_only_picture_files_are_served(serve_recommender):
    import copy

    import pandas as pd

    from kgrec.serve.app import create_app

    rec = copy.copy(serve_recommender)
    first = rec.item_ids[0]
    row = rec.items.loc[[first]]
    extra = pd.concat([row.rename(index={first: "cat/123"}),
                       row.rename(index={first: "leaky"}).assign(image="manifest.json")])
    rec.items = pd.concat([rec.items, extra])
    rec.item_pos = dict(rec.item_pos, **{"cat/123": rec.item_pos[first], "leaky": rec.item_pos[first]})
    with TestClient(create_app(rec, SERVE, warmup=False), raise_server_exceptions=False) as c:
        r = c.get("/items/cat%2F123")
        assert r.status_code == 200 and r.json()["title"] == row["title"].iloc[0]
        assert r.json()["image_url"] == "/items/cat%2F123/image"
        img = c.get(r.json()["image_url"])
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert img.headers["x-content-type-options"] == "nosniff"
        assert c.get("/items/leaky/image").status_code == 404  # a dataset file that is not a picture
        assert c.get(f"/items/{first}").status_code == 200 and c.get(f"/items/{first}/image").status_code == 200
