"""UNet sessions specialised to the shapes they run (`aptp.runtime.shape_sessions`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from aptp.errors import ArtifactError, RuntimeInputError
from aptp.runtime.artifacts import load_artifacts
from aptp.runtime.engine import OnnxRuntimeEngine
from aptp.runtime.residency import ResidencyManager
from aptp.runtime.shape_sessions import ShapeSessionEngine, check_shape_sessions
from runtime_fixtures import shallow_copy, tiny_export
from test_residency import MiB, FakeEngine, FakeProbe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("shape_sessions"))


def _engines(root, cls=ShapeSessionEngine, **kwargs):
    artifacts = load_artifacts(root)
    entry = artifacts.unet(sorted(artifacts.experts)[0])
    return cls(entry.onnx, threads=1, sha256=artifacts.sha256(entry.onnx),
               external_data=artifacts.external_weights(entry.onnx), **kwargs)


def _feed(engine, batch, seed=0, size=None):
    engine.load()
    rng = np.random.default_rng(seed)
    shapes = {i.name: i.shape for i in engine.session.get_inputs()}
    channels, hidden = shapes["sample"][1], shapes["encoder_hidden_states"][2]
    size = size or 8
    return {"sample": rng.standard_normal((batch, channels, size, size), dtype=np.float32),
            "timestep": np.full((batch,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 7, hidden), dtype=np.float32)}


def test_a_specialised_session_gives_the_dynamic_sessions_outputs(export):
    dynamic = _engines(export, OnnxRuntimeEngine)
    shaped = _engines(export, min_calls=1)
    for batch in (1, 2, 3):
        feed = _feed(dynamic, batch, seed=batch)
        expected = dynamic.infer(feed)["out_sample"]
        got = shaped.infer(feed)["out_sample"]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert shaped.shapes[-1]["batch"] == batch  # it really ran on a session fixed to this batch
    assert shaped.created == 3 and len(shaped.shapes) == 1  # the default keeps one (LRU)


def test_a_shape_is_specialised_on_its_min_calls_th_call_and_the_cap_is_lru(export):
    engine = _engines(export, min_calls=2, max_sessions=2)
    feeds = {b: _feed(engine, b, seed=b) for b in (1, 2, 3)}
    engine.infer(feeds[1])
    assert engine.created == 0  # once is not enough
    engine.infer(feeds[1])
    engine.infer(feeds[2])
    engine.infer(feeds[2])
    assert [s["batch"] for s in engine.shapes] == [1, 2]
    engine.infer(feeds[1])  # batch 1 is now the most recently used
    engine.infer(feeds[3])
    engine.infer(feeds[3])
    assert [s["batch"] for s in engine.shapes] == [1, 3] and engine.created == 3
    engine.unload()
    assert engine.shapes == [] and engine.extra_bytes == 0


def test_warm_creates_the_sessions_for_given_shapes_and_zero_turns_it_off(export):
    engine = _engines(export, max_sessions=2)
    engine.warm([_feed(engine, 2), _feed(engine, 4)])
    assert [s["batch"] for s in engine.shapes] == [2, 4] and engine.created == 2
    off = _engines(export, max_sessions=0, min_calls=1)
    off.infer(_feed(off, 2))
    assert off.created == 0 and off.shapes == []


def test_a_weight_file_swapped_after_loading_is_refused_when_a_shape_is_specialised(export, tmp_path):
    root = shallow_copy(export, tmp_path / "copy")
    engine = _engines(root, min_calls=1)
    feed = _feed(engine, 2)  # loads the dynamic session on the verified weights
    data = engine.external_data[0][0]
    weights = np.fromfile(data, np.uint8)
    data.unlink()
    (weights ^ 1).tofile(data)  # same size, other bytes
    with pytest.raises(ArtifactError, match="sha256"):
        engine.infer(feed)


@pytest.mark.parametrize("bad", [-1, 65, 1.5, True, "2"])
def test_bad_counts_are_one_clear_error(bad):
    with pytest.raises(RuntimeInputError, match="shape_sessions must be an integer in"):
        check_shape_sessions(bad)


class _ShapedFake(FakeEngine):
    """A fake engine whose runs may add specialised sessions of `extra` bytes each."""

    extra_bytes = 0

    def specialise(self, extra: int) -> None:
        self.extra_bytes += extra
        self.probe.bytes += extra

    def unload(self) -> None:
        if self.loaded:
            self.probe.bytes -= self.extra_bytes
            self.extra_bytes = 0
        super().unload()


def test_the_budget_charges_what_specialised_sessions_add_and_not_twice():
    probe, log, engines = FakeProbe(), [], {}

    def factory(key):
        engines[key] = _ShapedFake(key, 10 * MiB, probe, log, work=2 * MiB)
        return engines[key]

    manager = ResidencyManager(40 * MiB, factory, lambda k: 10 * MiB, probe=probe)
    baseline = probe.bytes
    with manager.use(0) as engine:
        engine.run()
        engine.specialise(9 * MiB)  # created during a measured use: extra, not working memory
    record = manager.record(0)
    assert record.extra_bytes == 9 * MiB and record.run_bytes == 2 * MiB
    assert manager.resident_bytes == probe.bytes - baseline == 21 * MiB
    with manager.use(1) as other:
        other.run()
    with manager.use(0) as engine:
        engine.specialise(9 * MiB)  # 30 + 12 > 40: the other session is evicted to fit
    assert manager.resident_keys == [0] and manager.resident_bytes == probe.bytes - baseline == 30 * MiB
    manager.clear()
    assert manager.record(0).extra_bytes == 0
