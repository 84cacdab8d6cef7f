"""aptp.benchmarks.quality.layout: where objects land, and whether the layout is read off x_t."""

from __future__ import annotations

import pytest
import torch

from aptp.benchmarks.quality import layout


def _grey_with_red_square(x0: int, y0: int, size: int = 16) -> torch.Tensor:
    image = torch.full((3, 64, 64), 0.5)
    image[:, y0 : y0 + size, x0 : x0 + size] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    return image


def test_chromatic_centroid_finds_the_coloured_shape_and_ignores_grey():
    images = torch.stack([_grey_with_red_square(4, 24), _grey_with_red_square(44, 44), torch.full((3, 64, 64), 0.3)])
    x, y = layout.chromatic_centroid(images)
    assert x[0] < 0.25 and 0.4 < y[0] < 0.6  # left, middle height
    assert x[1] > 0.75 and y[1] > 0.75  # bottom right
    assert (x[2], y[2]) == (0.0, 0.0)  # nothing chromatic: no centroid, not a crash


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_prediction_inverts_each_parameterisation(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    alpha_bar = 0.3
    alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    noisy = alpha * x0 + sigma * noise
    output = {"epsilon": noise, "v_prediction": alpha * noise - sigma * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(layout._x0_prediction(output, noisy, alpha_bar, prediction_type), x0, atol=1e-5, rtol=0)


def test_leak_and_placement_run_on_the_tiny_teacher():
    from aptp.train.models import load_components

    components = load_components("tiny")
    rows = layout.leak(components, timesteps=(951,), per_side=2)
    assert [(r["timestep"], r["side"], r["n"]) for r in rows] == [(951, "left", 2), (951, "right", 2)]
    assert rows[0]["real_x"] < 0.5 < rows[1]["real_x"]  # the held-out renderings really are on those sides
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("true_x", "swapped_x", "empty_x"))
    result = layout.placement(components, steps=2)
    assert sorted(result) == sorted(["left", "right", "top", "bottom", "center"])
    assert all(row["n"] == 24 and 0.0 <= row["on_asked_side"] <= 1.0 for row in result.values())


def test_cli_refuses_timesteps_outside_the_schedule(capsys, tmp_path):
    assert layout.main(["tiny", "--timesteps", "1000", "--output", str(tmp_path / "out.json")]) == 2
    assert "--timesteps [1000] outside [0, 1000)" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
