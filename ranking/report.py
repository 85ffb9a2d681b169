"""HTML report of explained recommendations (Jinja2): item images, KG paths and a contribution bar chart.

``write_report(path, {user_id: [Explanation, ...]}, image_root=dataset_root)`` writes one self-contained HTML file:
images are embedded as data URIs (a coloured placeholder when an item has none), the per-feature contribution
chart is inline SVG, and there is no JavaScript or network access.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from kgrec.data.schema import atomic_write_bytes
from ranking.explain import Explanation

logger = logging.getLogger(__name__)

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
_MAX_IMAGE_BYTES = 2 * 1024 * 1024
_STAR = re.compile(r"\*([^*]+)\*")


def emphasis(text: str) -> Markup:
    """Escape ``text`` and turn ``*name*`` into ``<strong>name</strong>``."""
    return Markup(_STAR.sub(r"<strong>\1</strong>", html.escape(text, quote=False)))


def picture_type(data: bytes) -> str | None:
    """The MIME type of the picture ``data`` holds as Pillow identifies it from its header, or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return Image.MIME.get(im.format or "")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def image_data_uri(image: str | None, image_root: str | Path | None, label: str) -> str:
    """A data URI for an item image under ``image_root``, or an SVG placeholder with the item's initials.

    Only a picture is embedded: the extension must name a picture type and the file's first bytes must be that type
    (image paths may be absolute — ``update`` keeps new items' paths — so a report of a bundle from someone else must
    not carry another file of this machine that merely ends in ``.png``)."""
    if image and image_root is not None:
        p = Path(image_root) / image
        mime = _MIME.get(p.suffix.lower())
        if mime and p.is_file() and p.stat().st_size <= _MAX_IMAGE_BYTES:
            data = p.read_bytes()
            if picture_type(data) == mime:
                return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
            logger.warning("image %s is not a %s picture inside; not embedded", p, mime)
        else:
            logger.debug("image %s not embeddable (missing, too large or unknown type)", p)
    hue = int(hashlib.sha256(label.encode()).hexdigest()[:4], 16) % 360
    initials = "".join(w[0] for w in label.split()[:2]).upper() or "?"
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="120" height="120">'
        f'<rect width="120" height="120" rx="10" fill="hsl({hue},45%,72%)"/>'
        f'<text x="60" y="74" font-family="sans-serif" font-size="40" text-anchor="middle" fill="#fff">'
        f"{html.escape(initials)}</text></svg>"
    )
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode("ascii")


def _bars_svg(items: list[tuple[str, float]], *, width: int, value_w: int, diverging: bool, label: str,
              value: Callable[[float], str], bottom: int) -> Markup:
    """Horizontal bars (inline SVG), one row per ``(name, value)``: names right-aligned in a 190 px column, bars
    scaled to the largest absolute value, each value printed at its bar's end. ``diverging``: bars grow both ways
    from a middle line, positive green, negative red; else one colour from the left."""
    if not items:
        return Markup("")
    label_w, bar_w, row_h = 190, width - 190 - value_w, 20
    scale = max(abs(v) for _, v in items) or 1.0
    mid = label_w + bar_w / 2
    rows = []
    for k, (name, v) in enumerate(items):
        y = k * row_h + 4
        if diverging:
            w = abs(v) / scale * (bar_w / 2)
            x, colour = (mid, "#2e7d32") if v >= 0 else (mid - w, "#c62828")
            text = (f'<text x="{mid + (w + 4 if v >= 0 else -w - 4):.1f}" y="{y + 13}" font-size="10" '
                    f'text-anchor="{"start" if v >= 0 else "end"}" fill="#444">{value(v)}</text>')
        else:
            w = v / scale * bar_w
            x, colour = label_w, "#5b8def"
            text = f'<text x="{label_w + w + 4:.1f}" y="{y + 13}" font-size="10" fill="#444">{value(v)}</text>'
        x_attr = f"{x:.1f}" if diverging else f"{x}"
        rows.append(
            f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="11">{html.escape(name)}</text>'
            f'<rect x="{x_attr}" y="{y + 3}" width="{max(w, 0.5):.1f}" height="12" fill="{colour}"/>' + text
        )
    height = len(items) * row_h + bottom
    axis = f'<line x1="{mid}" y1="0" x2="{mid}" y2="{height}" stroke="#999" stroke-width="1"/>' if diverging else ""
    return Markup(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
                  f'aria-label="{label}" font-family="sans-serif">' + axis + "".join(rows) + "</svg>")


def contribution_svg(explanation: Explanation, max_bars: int = 8, width: int = 420) -> Markup:
    """Horizontal bar chart (inline SVG) of the largest absolute feature contributions, positive green, negative
    red, with the bias and the total score in the caption."""
    items = sorted(explanation.all_contributions.items(), key=lambda kv: -abs(kv[1]))[:max_bars]
    return _bars_svg(items, width=width, value_w=60, diverging=True, label="feature contributions",
                     value=lambda v: f"{v:+.3f}", bottom=10)


def gain_svg(shares: Mapping[str, float], max_bars: int = 10, width: int = 420) -> Markup:
    """Horizontal bar chart (inline SVG) of the largest shares of the ranker's split gain (``gain_shares``)."""
    return _bars_svg(list(shares.items())[:max_bars], width=width, value_w=50, diverging=False,
                     label="the ranker's split gain per feature", value=lambda v: f"{v:.0%}", bottom=8)


def render_report(
    explanations: Mapping[str, Iterable[Explanation]],
    *,
    title: str = "Explained recommendations",
    image_root: str | Path | None = None,
    subtitle: str | None = None,
    ranker_gain: Mapping[str, float] | None = None,
) -> str:
    """HTML text for ``{user_id: [Explanation, ...]}`` (lists in recommendation order). ``ranker_gain``: the
    ranker's split-gain shares (``ranking.train.gain_shares``), shown once above the cards: what the ranker rests on
    overall, next to each recommendation's own contributions."""
    env = Environment(loader=PackageLoader("ranking", "templates"), autoescape=select_autoescape(["html", "j2"]))
    env.filters["emphasis"] = emphasis
    users: list[dict[str, Any]] = []
    for user_id, exps in explanations.items():
        cards = []
        for rank, e in enumerate(exps, start=1):
            weights = e.modality.weights or {}
            cards.append(
                {
                    "rank": rank,
                    "e": e,
                    "image": image_data_uri(e.image, image_root, e.item_title),
                    "chart": contribution_svg(e),
                    "weights": [(m, weights[m], e.modality.similarities.get(m)) for m in ("text", "image", "graph") if m in weights],
                }
            )
        users.append({"user_id": user_id, "cards": cards})
    template = env.get_template("report.html.j2")
    return template.render(
        title=title,
        subtitle=subtitle,
        users=users,
        gain_chart=gain_svg(ranker_gain or {}),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_report(
    path: str | Path,
    explanations: Mapping[str, Iterable[Explanation]],
    **kwargs: Any,
) -> Path:
    """Render and write the report atomically; returns the path."""
    text = render_report(explanations, **kwargs)
    p = Path(path)
    atomic_write_bytes(p, text.encode("utf-8"))
    logger.info("wrote explanation report %s (%d users)", p, len(explanations))
    return p
