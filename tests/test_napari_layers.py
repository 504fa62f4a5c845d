"""What the Densify widget reads from layers, without Qt (``sparse3d.napari_plugin.layers``),
and the plugin's registration: the npe2 manifest, found through the package's entry point."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sparse3d.cli import UserError
from sparse3d.napari_plugin.layers import (
    ProgressClock,
    channels_of,
    class_names_of,
    parse_class_names,
    parse_options,
    parse_voxel,
    voxel_size_of,
)


def layer(data, name="img", rgb=False, scale=(1, 1, 1), features=None):
    return SimpleNamespace(
        data=data, name=name, rgb=rgb, scale=np.asarray(scale), features=features
    )


def test_channels_from_3d_4d_rgb_and_several_layers():
    zyx = np.zeros((4, 5, 6))
    assert channels_of([layer(zyx)]).shape == (1, 4, 5, 6)
    assert channels_of([layer(np.zeros((2, 4, 5, 6)))]).shape == (2, 4, 5, 6)
    rgb = np.arange(4 * 5 * 6 * 3).reshape(4, 5, 6, 3)
    out = channels_of([layer(rgb, rgb=True)])
    assert out.shape == (3, 4, 5, 6) and np.array_equal(out[1], rgb[..., 1])
    both = channels_of([layer(zyx + 1), layer(np.zeros((2, 4, 5, 6)))])
    assert both.shape == (3, 4, 5, 6) and (both[0] == 1).all()
    with pytest.raises(UserError, match="differ in shape"):
        channels_of([layer(zyx), layer(np.zeros((4, 5, 7)))])
    with pytest.raises(UserError, match="need \\(Z, Y, X\\)"):
        channels_of([layer(np.zeros((5, 6)))])
    with pytest.raises(UserError, match="choose an image"):
        channels_of([])


def test_class_names_from_features():
    pd = pytest.importorskip("pandas")
    indexed = pd.DataFrame({"index": [2, 1, 0], "class_name": ["cell", "bg", "none"]})
    assert class_names_of(layer(None, features=indexed)) == ["bg", "cell"]
    by_row = pd.DataFrame({"name": ["none", "bg", "cell", "edge"]})  # row = label value
    assert class_names_of(layer(None, features=by_row)) == ["bg", "cell", "edge"]
    gap = pd.DataFrame({"index": [1, 3], "class": ["a", "c"]})
    assert class_names_of(layer(None, features=gap)) == ["a", "class2", "c"]
    assert class_names_of(layer(None, features=pd.DataFrame({"area": [1, 2]}))) == []
    assert class_names_of(layer(None, features=pd.DataFrame())) == []


def test_fields():
    assert parse_class_names(" a, b ,, c ") == ["a", "b", "c"]
    assert parse_class_names("  ") is None
    assert parse_voxel("2, 1.5, 1") == (2.0, 1.5, 1.0)
    for bad in ("1, 2", "a, b, c", "1, 0, 1", "1, nan, 1"):
        with pytest.raises(UserError, match="voxel size"):
            parse_voxel(bad)
    assert parse_options(" refine.max_steps=5  rf.n_trees=10 ") == (
        "refine.max_steps=5",
        "rf.n_trees=10",
    )
    with pytest.raises(UserError, match="key=value"):
        parse_options("refine.max_steps 5")
    assert voxel_size_of(layer(None, scale=(1, 3, 2, 2))) == (3.0, 2.0, 2.0)


def test_progress_line_and_eta():
    now = [100.0]
    clock = ProgressClock(clock=lambda: now[0])
    assert clock.update("forests", 0.0)[0] == -1  # no fraction: busy, time spent
    now[0] = 110.0
    clock.update("network", 0.0)
    now[0] = 120.0
    percent, line = clock.update("network", 0.25)  # 10 s for a quarter: 30 s to go
    assert percent == 25 and "ETA 30 s" in line and "20 s so far" in line
    now[0] = 200.0
    assert "ETA 1:30" in clock.update("network", 0.5)[1]  # 90 s for half
    assert clock.update("done", 1.0) == (100, "done · 1:40")


def test_manifest_is_registered_and_its_commands_import():
    npe2 = pytest.importorskip("npe2")
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "sparse3d"]
    assert eps and eps[0].value == "sparse3d.napari_plugin:napari.yaml"
    manifest = npe2.PluginManifest.from_distribution("sparse3d")
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    assert [w.display_name for w in manifest.contributions.widgets] == ["Densify"]
    assert manifest.contributions.readers[0].command == "sparse3d.get_reader"
    pytest.importorskip("qtpy")
    import importlib

    for python_name in commands.values():
        module, attr = python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
