"""Figure helpers: each Venn count sits in its own region; radar polygons close; save writes PNG + PDF; short
method labels; error bars span the intervals; the gate colour scale."""

import math
from itertools import product

import pytest
from matplotlib.colors import to_rgb

from c2c.plots import (_VENN_CENTRES, _VENN_LABELS, METHODS, TABLE_ROWS, figure, grouped_bars, interval_bars,
                       logit_limit, method_colours, method_labels, radar, save, venn3)


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


def test_method_labels_are_short_and_tell_same_named_methods_apart():
    methods = [{"name": "receiver", "key": "receiver_generate"}, {"name": "t2t", "key": "t2t_generate"},
               {"name": "c2c", "key": "c2c_generate"}, {"name": "c2c", "key": "c2c_logits"}]
    assert method_labels(methods) == ["Receiver", "T2T", "C2C generate", "C2C logits"]
    assert method_labels([{"name": "c2c", "key": "c2c"}, {"name": "c2c", "key": "c2c_identical_lr5e-4"}]) == \
        ["C2C", "C2C identical lr5e-4"]
    colours = method_colours(methods)
    assert colours[:3] == [METHODS[name][1] for name in ("receiver", "t2t", "c2c")]  # each name's colour, everywhere
    assert to_rgb(colours[3]) not in [to_rgb(c) for c in colours[:3]]  # a second C2C run gets a colour of its own
    with pytest.raises(ValueError, match="duplicate labels"):
        method_labels([{"name": "c2c", "key": "c2c"}, {"name": "c2c", "key": "c2c_"}])
    routed = methods + [{"name": "routing", "key": "routing"}]  # the table's derived row (c2c.routing)
    assert method_labels(routed)[-1] == "Routing" and method_colours(routed)[-1] == TABLE_ROWS["routing"][1]
    assert "routing" not in METHODS  # not a method one evaluates (notebook 00 runs every METHODS entry)


def test_grouped_bars_error_bars_span_the_intervals():
    fig, ax = figure()
    grouped_bars(ax, ["a", "b"], {"x": ([50.0, None], [40.0, None], [55.0, None]), "y": ([20.0, 30.0], [10.0, 25.0], [35.0, 32.0]),
                                  "z": ([1.0, 2.0], [None, None], [None, None])})
    spans = sorted(tuple(sorted(seg[:, 1])) for coll in ax.collections for seg in coll.get_segments() if len(seg))
    assert spans == [(10.0, 35.0), (25.0, 32.0), (40.0, 55.0)]  # the missing value: no bar, no error bar
    assert len(ax.collections) == 2 and len(ax.patches) == 6  # z has bars and no intervals: no error bars
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]


@pytest.mark.parametrize("horizontal", [False, True])
def test_interval_bars_error_bars_span_the_intervals(horizontal):
    fig, ax = figure()
    interval_bars(ax, ["a", "b"], [50.0, 20.0], [40.0, 10.0], [55.0, 35.0], ["red", "blue"], horizontal=horizontal)
    axis = 0 if horizontal else 1  # the value axis
    spans = sorted(tuple(sorted(seg[:, axis])) for coll in ax.collections for seg in coll.get_segments())
    assert spans == [(10.0, 35.0), (40.0, 55.0)]
    lengths = [p.get_width() if horizontal else p.get_height() for p in ax.patches]
    assert lengths == [50.0, 20.0]


def test_logit_limit_is_symmetric_and_at_least_one():
    assert logit_limit([0.003, -0.007]) == 1.0  # noise near 0 stays pale
    assert logit_limit([[0.5, -3.0], [2.0, 1.0]]) == 3.0
    assert logit_limit([]) == 1.0
