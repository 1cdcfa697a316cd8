"""Figure helpers: each Venn count sits in its own region; radar polygons close; save writes PNG + PDF."""

import math
from itertools import product

import pytest

from c2c.plots import _VENN_CENTRES, _VENN_LABELS, figure, radar, save, venn3


def test_each_venn_label_lies_in_exactly_its_circles():
    assert set(_VENN_LABELS) == {flags for flags in product((True, False), repeat=3) if any(flags)}
    for flags, (x, y) in _VENN_LABELS.items():
        inside = tuple(math.dist((x, y), centre) < 1.0 for centre in _VENN_CENTRES)
        assert inside == flags, (flags, (x, y))


def test_venn_radar_and_save(tmp_path):
    counts = {flags: 10 * i for i, flags in enumerate(_VENN_LABELS)}
    fig, ax = figure(4, 4)
    venn3(ax, counts, ("receiver", "sharer", "C2C"), none=7)
    texts = {t.get_text() for t in ax.texts}
    assert {f"{c:,}" for c in counts.values()} <= texts and {"receiver", "sharer", "C2C", "none: 7"} <= texts
    paths = save(fig, "venn", "test", "caption", folder=tmp_path)
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)
    fig, ax = figure(4, 4, subplot_kw={"projection": "polar"})
    radar(ax, ["a", "b", "c"], {"x": [0.1, 0.2, 0.3]})
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [0.1, 0.2, 0.3, 0.1]  # closed polygon
    with pytest.raises(ValueError, match="spokes"):
        radar(ax, ["a", "b"], {"x": [0.1]})
