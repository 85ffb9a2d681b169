"""Explanations: schema, cited features are ranker inputs, faithfulness of the top-cited feature, and the report."""
from __future__ import annotations

import re

import jsonschema
import numpy as np
import pytest

from ranking.explain import ExplanationError, Explainer, explanation_schema
from ranking.features import FeatureBuilder
from ranking.report import contribution_svg, render_report, write_report


@pytest.fixture(scope="module")
def explainer(trained):
    return Explainer(trained.ctx, trained.ranker)


def ranked_top(trained, user: int, k: int = 5) -> list[int]:
    """The ranker's top-k of a user's retrieval candidates (what `recommend` shows)."""
    cand = trained.candidates[user]
    fm = trained.builder.build(np.array([user]), cand.reshape(1, -1))
    order = np.argsort(-trained.ranker.predict(fm.X), kind="stable")[:k]
    return [int(cand[j]) for j in order]


def sample_explanations(trained, explainer, n_users: int = 30, k: int = 5):
    users = np.linspace(0, trained.ctx.num_users - 1, n_users).astype(int)
    for u in users:
        items = ranked_top(trained, int(u), k)
        exps = explainer.explain_items(trained.ctx.user_ids[u], [trained.ctx.item_ids[i] for i in items])
        yield int(u), items, exps


def test_explanation_json_matches_schema_and_scores(trained, explainer):
    schema = explanation_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    n = 0
    for u, items, exps in sample_explanations(trained, explainer, n_users=8):
        fm = trained.builder.build(np.array([u]), np.array([items]))
        scores = trained.ranker.predict(fm.X)
        for e, s in zip(exps, scores):
            d = e.to_dict()
            jsonschema.validate(d, schema)
            assert d["score"] == pytest.approx(s, abs=1e-9)
            assert sum(d["all_contributions"].values()) + d["base_score"] == pytest.approx(d["score"], abs=1e-9)
            n += 1
    assert n == 40


def test_cited_features_are_ranker_inputs_with_positive_contributions(trained, explainer):
    inputs = set(trained.ranker.feature_names)
    cited_any = 0
    for _, _, exps in sample_explanations(trained, explainer, n_users=10):
        for e in exps:
            for f in e.features:
                assert f.name in inputs
                assert f.contribution > 0 and f.contribution == pytest.approx(e.all_contributions[f.name])
                assert f.phrase and f.phrase in e.sentence or len(e.features) > 3
            contribs = [f.contribution for f in e.features]
            assert contribs == sorted(contribs, reverse=True)
            cited_any += bool(e.features)
    assert cited_any >= 45  # nearly every recommendation has at least one cited reason


def test_faithfulness_neutralising_top_cited_feature_lowers_score(trained, explainer):
    """Over a sample of recommendations, setting the top-cited feature to its training median lowers the score in
    at least 90% of cases."""
    names = list(trained.ranker.feature_names)
    medians = trained.ranker.medians_
    lowered, total = 0, 0
    for u, items, exps in sample_explanations(trained, explainer, n_users=40):
        fm = trained.builder.build(np.array([u]), np.array([items]))
        for row, e in zip(fm.X, exps):
            if not e.features:
                continue
            j = names.index(e.features[0].name)
            x = row.copy()
            x[j] = medians[j]
            new = trained.ranker.predict(x[None, :])[0]
            lowered += new < e.score
            total += 1
    assert total >= 150
    assert lowered / total >= 0.9, (lowered, total)


def test_one_off_explain_matches_explainer(trained, explainer):
    from ranking import explain

    u, i = trained.ctx.user_ids[7], trained.ctx.item_ids[int(trained.candidates[7][0])]
    one = explain(u, i, context=trained.ctx, ranker=trained.ranker)
    assert one.to_dict() == explainer.explain(u, i).to_dict()
    from kgrec.errors import UnknownIdError

    with pytest.raises(UnknownIdError, match="not known"):
        explain("nobody", i, context=trained.ctx, ranker=trained.ranker)


def test_feature_mismatch_is_refused(trained):
    class Other(FeatureBuilder):
        names = ("gnn_score",)

    with pytest.raises(ExplanationError, match="retrain"):
        Explainer(trained.ctx, trained.ranker, builder=Other(trained.ctx))


def test_phrases_state_true_facts(trained, explainer):
    """'you often buy from X' only when the user bought at least two items of brand X, and X is the item's brand."""
    ctx = trained.ctx
    checked = 0
    for u, _, exps in sample_explanations(trained, explainer, n_users=30):
        bought = ctx.history[u].indices
        for e in exps:
            i = ctx.item_index(e.item_id)
            for f in e.features:
                m = re.match(r"you often buy from \*(.+)\*", f.phrase)
                if m:
                    assert m.group(1) == ctx.brand_name(i)
                    others = [j for j in bought if j != i]
                    assert sum(ctx.brand_of_item[j] == ctx.brand_of_item[i] for j in others) >= 2
                    checked += 1
    assert checked >= 1


def test_html_report_has_images_paths_and_chart(trained, explainer, tmp_path):
    u = 3
    items = ranked_top(trained, u, 3)
    exps = explainer.explain_items(trained.ctx.user_ids[u], [trained.ctx.item_ids[i] for i in items])
    # one real image, embedded as a data URI
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    exps[0].image = "images/a.png"
    path = write_report(tmp_path / "report.html", {trained.ctx.user_ids[u]: exps}, image_root=tmp_path)
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 1
    assert html.count("data:image/svg+xml;base64,") == 2  # placeholders for items without images
    assert html.count("<svg") == 3  # one contribution chart per item
    for e in exps:
        assert e.item_title in html
        for f in e.features:
            assert f.name in html
    svg = str(contribution_svg(exps[0], max_bars=5))
    assert svg.count("<rect") == 5
    assert "<script" not in render_report({"x": exps})
    # the ranker's overall split-gain chart, once above the cards, its bars in the shares' order
    from ranking.report import gain_svg
    from ranking.train import gain_shares

    shares = gain_shares(trained.ranker)
    assert shares and sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    page = render_report({"x": exps}, ranker_gain=shares)
    assert "What the ranker rests on overall" in page and "What the ranker rests on" not in render_report({"x": exps})
    assert page.count("<svg") == html.count("<svg") + 1
    chart = str(gain_svg(shares, max_bars=4))
    assert chart.count("<rect") == min(4, len(shares))
    top = list(shares)[: min(4, len(shares))]
    assert [chart.index(f">{n}<") for n in top] == sorted(chart.index(f">{n}<") for n in top)
    assert f"{list(shares.values())[0]:.0%}" in chart


def test_entity_phrase_names_an_entity_the_users_items_share(trained, explainer):
    from ranking.explain import _entity_phrase

    ctx = trained.ctx
    checked = 0
    for u in range(0, ctx.num_users, 3):
        hist = [j for j in explainer._history_items(u)]
        for i in range(ctx.num_items):
            others = [j for j in hist if j != i]
            shared = set(ctx.item_entity[i].indices) & set(ctx.item_entity[others].indices) if others else set()
            phrase = _entity_phrase(explainer, 1.0, u, i)
            if not shared:
                assert phrase is None
                continue
            name = re.match(r"it is linked to \*(.+)\* like items you [a-z ,]+", phrase)[1]
            assert name in {ctx.entity_ids[e] for e in shared}
            checked += 1
    assert checked >= 20


def test_phrases_say_what_the_user_did_with_the_items(trained):
    """"items you bought" only for purchases: ratings say "rated", carts "put in your cart", a user with views only
    (history falls back to what they touched) "looked at"; an also-bought partner gets its own verb."""
    import scipy.sparse as sp

    from ranking.context import RankingContext
    from ranking.explain import _PHRASES, _also_bought_phrase

    def m(rows: list[tuple[int, int]]) -> sp.csr_matrix:
        r, c = zip(*rows) if rows else ((), ())
        return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(4, 3))

    none = sp.csr_matrix((3, 0))
    also = sp.csr_matrix(np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]], dtype=float))
    ctx = RankingContext(
        user_ids=["buyer", "rater", "mixed", "viewer"], item_ids=["a", "b", "c"],
        user_vectors=np.ones((4, 2)), item_vectors=np.ones((3, 2)),
        interactions={"purchase": m([(0, 1), (2, 1)]), "rating": m([(1, 1), (2, 2)]), "view": m([(3, 1)]),
                      "cart": m([(1, 0)])},
        item_brand=none, item_category=none, item_attribute=none, item_entity=none, also_bought=also)
    ex = Explainer.__new__(Explainer)
    ex.ctx = ctx
    assert [ex._history_verb(u) for u in range(4)] == ["bought", "carted or rated", "bought or rated", "looked at"]
    assert ex._history_verb(2, [2]) == "rated" and ex._history_verb(2, [1]) == "bought"
    assert ex._history_verb(1, [0]) == "put in your cart"
    assert _PHRASES["modality_weighted_similarity"](ex, 0.9, 1, 0) == "it resembles items you carted or rated"
    assert _also_bought_phrase(ex, 1.0, 2, 0) == "it is often bought together with *b*, which you bought"
    closely = _PHRASES["kg_shortest_path"](ex, 2, 3, 0)
    assert closely == "it is closely connected to items you looked at in the product graph"


def test_report_embeds_only_files_that_are_pictures_inside(tmp_path):
    """A real PNG / JPEG / GIF / WebP is embedded with its type; a text file named .png (say, a key someone's bundle
    points at by absolute path) and a JPEG named .png get the SVG placeholder, never their bytes."""
    import base64

    from PIL import Image

    from ranking.report import image_data_uri

    img = Image.new("RGB", (4, 4), (200, 30, 30))
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.gif", "GIF"), ("d.webp", "WEBP")):
        img.save(tmp_path / name, fmt)
        uri = image_data_uri(name, tmp_path, "Red thing")
        mime = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}[fmt]
        assert uri.startswith(f"data:{mime};base64,")
        assert base64.b64decode(uri.split(",", 1)[1]) == (tmp_path / name).read_bytes()
    secret = tmp_path / "id_rsa.png"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n")
    img.save(tmp_path / "photo.png", "JPEG")  # wrong extension for its content
    for name in (str(secret), "photo.png"):  # absolute paths are taken as they are (update keeps them)
        uri = image_data_uri(name, tmp_path, "Red thing")
        assert uri.startswith("data:image/svg+xml;base64,")
        assert b"PRIVATE KEY" not in base64.b64decode(uri.split(",", 1)[1])


def test_terminal_text_shows_what_held_the_score_back_and_both_modality_factors(trained, explainer):
    seen_against = 0
    for _, _, exps in sample_explanations(trained, explainer, n_users=6):
        for e in exps:
            text = e.to_text()
            negative = sorted((v, k) for k, v in e.all_contributions.items() if v < 0)[:2]
            if negative:
                seen_against += 1
                assert "  - held back by: " + ", ".join(f"{k} {v:+.3f}" for v, k in negative) in text
            else:
                assert "held back by" not in text
            m = e.modality
            if m.weights:
                line = next(l for l in text.splitlines() if "modality weight x similarity" in l)
                assert line.endswith(f"weighed most: {m.dominant}")
                for k, w in m.weights.items():
                    s = m.similarities.get(k)
                    assert (f"{k} {w:.2f} x {s:.2f} = {w * s:.2f}" if s is not None and s == s else f"{k} {w:.2f} x n/a") in line
    assert seen_against > 0
