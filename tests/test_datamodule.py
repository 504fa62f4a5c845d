"""The data module's labels: training slices for training, test slices (less the crossings
with training slices) for evaluation, built with the one sparse-label helper."""

from __future__ import annotations

import numpy as np

from sparse3d.data.annotation import slice_mask
from sparse3d.data.volume import VolumeMeta, load_volume, write_volume
from sparse3d.datamodule import SparseDataModule
from sparse3d.labels import LabelSpec

LABELS = LabelSpec(("a", "b"), 5)
SHAPE = (6, 8, 7)


def test_train_and_eval_labels_keep_their_slices_only(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("v1", "v2"):
        dense = rng.integers(0, 2, SHAPE).astype(np.uint8)
        label = np.where(slice_mask(SHAPE, {"z": (1, 4), "x": (2,)}), dense, 5).astype(np.uint8)
        meta = VolumeMeta((1.0, 1.0, 1.0), ("c",), LABELS, {"z": (1, 4), "x": (2,)})
        paths[name] = str(
            write_volume(tmp_path / f"{name}.h5", rng.random((1, *SHAPE)), label, meta)
        )
    train = {"v1": {"z": [1], "y": [], "x": [2]}, "v2": {"z": [1, 4], "y": [], "x": [2]}}
    test = {"v1": {"z": [4], "y": [], "x": []}}  # v2 has no test slices
    dm = SparseDataModule(
        paths, train, test, "sparse", LABELS, 3, input_tile=(4, 4, 4), output_tile=(4, 4, 4)
    )
    dm.setup()
    v1, v2 = dm.volumes["v1"], dm.volumes["v2"]
    source = np.asarray(load_volume(paths["v1"]).label)
    on_train = slice_mask(SHAPE, {"z": (1,), "x": (2,)})
    np.testing.assert_array_equal(v1.train_label[on_train], source[on_train])
    assert np.all(v1.train_label[~on_train] == 5)
    on_test = slice_mask(SHAPE, {"z": (4,)})
    np.testing.assert_array_equal(v1.eval_label_all[on_test], source[on_test])
    assert np.all(v1.eval_label_all[~on_test] == 5)
    assert np.all(v1.eval_label[on_train] == 5)  # crossings with training slices: not held out
    held = on_test & ~on_train
    np.testing.assert_array_equal(v1.eval_label[held], source[held])
    assert np.all(v2.eval_label == 5) and np.all(v2.eval_label_all == 5)
    assert v2.train_label.dtype == np.uint8 and (v2.train_label != 5).any()
