"""Prompt difficulty families of the procedural set, and the routing purity they are scored by."""

from __future__ import annotations

import numpy as np
import pytest

from aptp.benchmarks.quality.routing import family_purity
from aptp.train.data import ProceduralCaptions
from aptp.train.data.procedural import FAMILIES


def test_every_prompt_has_the_family_of_what_it_shows():
    data = ProceduralCaptions(300, seed=3)
    seen = set()
    for i in range(len(data)):
        a = data.attributes(i)
        expected = "hard" if a["is_text"] else ("easy" if a["count"] == 1 else "medium")
        assert a["family"] == expected
        seen.add(a["family"])
    assert seen == set(FAMILIES)


def test_family_purity_and_nmi():
    families = ["easy"] * 4 + ["hard"] * 4
    separated = family_purity([0, 0, 0, 0, 1, 1, 1, 1], families, 2)
    assert separated["nmi"] == pytest.approx(1.0)
    assert separated["families"]["hard"] == {"prompts": 4, "code_share": [0.0, 1.0], "purity": 1.0, "dominant_code": 1}
    mixed = family_purity([0, 1, 0, 1, 0, 1, 0, 1], families, 2)
    assert mixed["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert mixed["families"]["easy"]["purity"] == 0.5
    with pytest.raises(ValueError):
        family_purity([0, 1], ["easy"], 2)
    assert np.isclose(family_purity([0, 0, 1, 1], ["a", "a", "a", "b"], 2)["families"]["a"]["purity"], 2 / 3)
