"""The charts of training/plots.py: what they draw, and that the PNGs are real pictures."""

from PIL import Image

from flow_lune.training.block_features import BASE_BLOCK_WEIGHTS, BLOCK_NAMES
from flow_lune.training.plots import Series, heatmaps, lambda_series, line_chart, plot_lambda, plot_losses, same_as


def colours_of(path) -> int:
    with Image.open(path) as img:
        return len(set(img.convert("RGB").get_flattened_data()))


def test_lambda_plot_shows_overlapping_lines_and_names_them(tmp_path):
    """down_blocks.i and up_blocks.(3-i), equal without an assessor: the dashed up line is on top, both named."""
    weights = [float(w) for w in BASE_BLOCK_WEIGHTS]
    assert weights[:4] == weights[5:][::-1]  # the base weights are symmetric, so these lines coincide
    records = [{"step": s, "lambda": dict(zip(BLOCK_NAMES, weights))} for s in range(1, 6)]
    values = [[r["lambda"][b] for r in records] for b in BLOCK_NAMES]
    assert same_as(values) == {5: 3, 6: 2, 7: 1, 8: 0}
    series = lambda_series(records)
    assert [s.label for s in series][5:] == [
        "up_blocks.0 = down_blocks.3",
        "up_blocks.1 = down_blocks.2",
        "up_blocks.2 = down_blocks.1",
        "up_blocks.3 = down_blocks.0",
    ]
    for down, up in ((0, 8), (1, 7), (2, 6), (3, 5)):
        assert series[up].linestyle == "--" and series[down].linestyle == "-"
        assert series[up].zorder > series[down].zorder  # drawn over the solid line it equals
        assert series[up].color != series[down].color
    path = plot_lambda(records, tmp_path / "lambda.png")
    assert colours_of(path) > 20  # lines, text and antialiasing: not a blank page


def test_line_chart_and_heatmaps_write_pngs(tmp_path):
    one = line_chart([Series([3], [0.5], "one step")], tmp_path / "one.png", "t", "x", "y")
    assert colours_of(one) > 5  # a single point is drawn as a marker
    records = [{"step": s, "loss": 1.0 / s, "flow_loss": 0.5 / s} for s in range(1, 5)]
    assert colours_of(plot_losses(records, tmp_path / "loss.png")) > 20
    table = [[(r + c) / 10 for c in range(10)] for r in range(3)]
    path = heatmaps([("a", table), ("b", table)], ["r0", "r1", "r2"], tmp_path / "h.png", xlabel="sigma")
    with Image.open(path) as img:
        assert img.height > img.width / 2  # two panels stacked
    assert colours_of(path) > 20
