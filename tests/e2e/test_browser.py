"""End to end in real headless Chromium: the page served on a loopback port runs a text search, an image search and
a user recommendation, and shows result images and explanations (sentence, KG path graph, contribution chart).

Fails (never skips) when Chromium is missing: run ``scripts/install_browser.sh`` first (``make test`` does).
"""
from __future__ import annotations

import pytest

from tests.e2e.browser import chromium_driver, missing_browser, running_server
from tests.kgrec.conftest_serve import serve_app, serve_recommender  # noqa: F401  (fixtures)

WAIT_S = 60


@pytest.fixture(scope="module")
def base_url(serve_app):
    with running_server(serve_app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    why = missing_browser()
    if why:
        pytest.fail(why)
    driver = chromium_driver()
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        status = _text(driver, "#status")
        pytest.fail(f"timed out waiting for {what}; page status: {status!r}")


def _card_ids(driver):
    # read in one script: the grid is re-rendered while we poll, so element handles would go stale
    return driver.execute_script("return [...document.querySelectorAll('#results .card')].map(c => c.dataset.item)")


def _text(driver, css):
    return driver.execute_script(f"const e = document.querySelector({css!r}); return e ? e.textContent : ''")


def _images_loaded(driver) -> tuple[int, int]:
    """(result images, of which decoded with a non-zero size)."""
    return tuple(driver.execute_script(
        "const imgs = [...document.querySelectorAll('#results .card img')];"
        "return [imgs.length, imgs.filter(i => i.complete && i.naturalWidth > 0).length];"))


def test_search_and_recommend_in_chromium(browser, base_url, serve_recommender, demo_dataset, tmp_path):
    d = browser
    d.get(base_url + "/")
    _wait(d, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), "the user list")
    options = d.find_elements("css selector", "#user-picker option")
    assert len(options) == 80
    assert "200 items" in d.find_element("id", "health").text

    # 1. text search for an item's own title: results with decoded images
    row = serve_recommender.items.dropna(subset=["image"]).iloc[0]
    expected = [r.item_id for r in serve_recommender.search(text=row["title"], k=12)]
    box = d.find_element("id", "search-text")
    box.clear()
    box.send_keys(row["title"])
    d.find_element("id", "search-button").click()
    _wait(d, lambda d: _card_ids(d) == expected, "the search results")
    _wait(d, lambda d: _images_loaded(d)[0] > 0 and _images_loaded(d)[0] == _images_loaded(d)[1],
          "the result images to load")
    assert row["item_id"] in _card_ids(d)

    # 2. image search through the file input: the item itself comes first
    img_row = serve_recommender.items.dropna(subset=["image"]).iloc[3]
    box.clear()
    d.find_element("id", "search-image").send_keys(str(demo_dataset.root / img_row["image"]))
    d.find_element("id", "search-button").click()
    _wait(d, lambda d: _card_ids(d)[:1] == [img_row["item_id"]], "the image search results")
    d.execute_script("document.getElementById('search-image').value = ''")

    # 3. recommendation for a user, with the explanation panel
    from selenium.webdriver.support.ui import Select

    user = str(serve_recommender.events["user_id"].value_counts().index[0])
    Select(d.find_element("id", "user-picker")).select_by_value(user)
    d.find_element("id", "recommend-button").click()
    expected = serve_recommender.recommend(user, 12, explain=True)
    _wait(d, lambda d: _card_ids(d) == [r.item_id for r in expected], "the recommendations")
    _wait(d, lambda d: _images_loaded(d)[0] > 0 and _images_loaded(d)[0] == _images_loaded(d)[1],
          "the recommendation images to load")
    sentence = _wait(d, lambda d: _text(d, "#explanation .sentence"), "the explanation")
    assert sentence == expected[0].explanation["sentence"].replace("*", "")  # *titles* are shown in italics
    bars = d.find_elements("css selector", "#explanation svg.contrib rect")
    assert len(bars) >= 1
    n_paths = len(expected[0].explanation["paths"])
    assert len(d.find_elements("css selector", "#explanation svg.path")) == n_paths
    if n_paths:
        circles = d.find_elements("css selector", "#explanation svg.path circle")
        assert len(circles) == sum(len(p["nodes"]) for p in expected[0].explanation["paths"])

    # clicking another card shows that card's explanation
    with_paths = next((i for i, r in enumerate(expected) if r.explanation["paths"]), 1)
    d.find_elements("css selector", "#results .card")[with_paths].click()
    _wait(d, lambda d: _text(d, "#explanation .sentence")
          == expected[with_paths].explanation["sentence"].replace("*", ""), "the second explanation")
    assert len(d.find_elements("css selector", "#explanation svg.path")) == len(expected[with_paths].explanation["paths"])
    d.save_screenshot(str(tmp_path / "page.png"))

    # 4. an error is shown on the page, not a stack trace
    d.get(base_url + "/")
    _wait(d, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), "the page")
    d.execute_script("document.getElementById('user-picker').append(new Option('ghost', 'ghost'));"
                     "document.getElementById('user-picker').value = 'ghost';")
    d.find_element("id", "recommend-button").click()
    status = _wait(d, lambda d: "404" in _text(d, "#status") and _text(d, "#status"),
                   "the error message")
    assert "unknown user 'ghost'" in status
