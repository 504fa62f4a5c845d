"""Tests of the training tile datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from torch.utils.data import DataLoader

from sparse3d.data.annotation import slice_mask
from sparse3d.data.dataset import SliceDataset, TileDataset
from sparse3d.data.transforms import RandGrayValued, RandPaperDeformd

IGNORE = 3
INPUT, OUTPUT = (20, 36, 32), (8, 12, 12)
SLICES = {"z": (4, 15), "y": (20,), "x": (9, 30)}


def make_volume(shape=(22, 50, 44), seed=0, slices=SLICES):
    rng = np.random.default_rng(seed)
    image = rng.random((2, *shape), dtype=np.float32)
    dense = rng.integers(0, 3, shape).astype(np.uint8)
    label = np.where(slice_mask(shape, slices), dense, IGNORE).astype(np.uint8)
    return image, label


def deform(**kw):
    return RandPaperDeformd(
        spatial_size=INPUT, label_spatial_size=OUTPUT, grid_spacing=16, ignore_index=IGNORE,
        voxel_size_zyx_um=(2.04, 1.76, 1.76), **kw,
    )  # fmt: skip


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "transform",
    [None, "deform", "compose", "generic"],
)
def test_tile_items_shapes_and_labels(transform):
    vols = [make_volume(seed=0), make_volume((18, 40, 60), seed=1)]
    if transform == "deform":
        transform = deform()
    elif transform == "compose":
        transform = Compose([deform(), RandGrayValued()])
    elif transform == "generic":
        transform = Compose([lambda d: d])  # sees tile + margin, result centre-cropped
    ds = TileDataset(vols, INPUT, OUTPUT, 6, transform=transform, ignore_index=IGNORE, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (2, *INPUT) and item["image"].dtype == torch.float32
        assert item["label"].shape == OUTPUT and item["label"].dtype == torch.int64
        values = set(item["label"].unique().tolist())
        assert values <= {0, 1, 2, IGNORE}
        if transform is None:
            assert values - {IGNORE}  # output crop always holds annotated voxels


def test_tile_dataset_reproducible_and_epoch_dependent():
    vols = [make_volume(seed=0), make_volume((18, 40, 60), seed=1)]
    a = TileDataset(vols, INPUT, OUTPUT, 5, transform=deform(), ignore_index=IGNORE, seed=7)
    b = TileDataset(vols, INPUT, OUTPUT, 5, transform=deform(), ignore_index=IGNORE, seed=7)
    for i in (3, 0, 4):  # order does not matter (worker-count independence)
        assert_same(a[i], b[i])
    first = a[2]
    a.set_epoch(1)
    assert not torch.equal(first["image"], a[2]["image"])
    a.set_epoch(0)
    assert_same(first, a[2])
    c = TileDataset(vols, INPUT, OUTPUT, 5, transform=deform(), ignore_index=IGNORE, seed=8)
    assert not torch.equal(first["image"], c[2]["image"])


def test_tile_dataset_worker_independent():
    vols = [make_volume(seed=0)]
    ds = TileDataset(vols, INPUT, OUTPUT, 4, transform=deform(), ignore_index=IGNORE, seed=1)
    direct = torch.stack([ds[i]["image"] for i in range(4)])
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    batched = torch.cat([b["image"] for b in loader])
    torch.testing.assert_close(batched, direct, rtol=0, atol=0)


def test_identity_deform_equals_plain_extraction():
    vols = [make_volume(seed=2)]
    plain = TileDataset(vols, INPUT, OUTPUT, 4, ignore_index=IGNORE, seed=5)
    ident = TileDataset(
        vols, INPUT, OUTPUT, 4, ignore_index=IGNORE, seed=5,
        transform=deform(sigma_voxels=0.0, rotate_range_deg=(0, 0, 0), scale_range=(1, 1)),
    )  # fmt: skip
    for i in range(4):
        assert_same(plain[i], ident[i])


def test_volume_choice_follows_labelled_voxels():
    vols = [make_volume(seed=0), make_volume(seed=1, slices={})]  # second: nothing annotated
    ds = TileDataset(vols, INPUT, OUTPUT, 3, ignore_index=IGNORE)
    assert ds.volume_weights.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="annotated"):
        TileDataset([vols[1]], INPUT, OUTPUT, 3, ignore_index=IGNORE)
    with pytest.raises(ValueError, match="spatial_size"):
        TileDataset(vols, INPUT, OUTPUT, 3, transform=RandPaperDeformd(spatial_size=OUTPUT))


def test_slice_dataset_shapes_and_orientations():
    vols = [make_volume(seed=0), make_volume((18, 40, 60), seed=1)]
    ds = SliceDataset(vols, [SLICES, SLICES], (24, 28), (12, 16), 8, ignore_index=IGNORE, seed=0)
    assert {axis for _, axis, _ in ds.slices} == {"z", "y", "x"}
    assert len(ds.slices) == 2 * 5
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (2, 24, 28) and item["label"].shape == (12, 16)
        assert set(item["label"].unique().tolist()) - {IGNORE}
    t = RandPaperDeformd(
        spatial_size=(24, 28), label_spatial_size=(12, 16), grid_spacing=16,
        rotate_range_deg=(180.0,), voxel_size_zyx_um=(1.0, 1.0), ignore_index=IGNORE,
    )  # fmt: skip
    ds2 = SliceDataset(vols, [SLICES, SLICES], (24, 28), (12, 16), 4, transform=t, seed=0)
    ds3 = SliceDataset(vols, [SLICES, SLICES], (24, 28), (12, 16), 4, transform=t, seed=0)
    for i in range(4):
        item = ds2[i]
        assert item["image"].shape == (2, 24, 28) and item["label"].shape == (12, 16)
        assert_same(item, ds3[i])


def test_slice_dataset_plane_content():
    image, label = make_volume(seed=4)
    ds = SliceDataset([(image, label)], [{"y": (20,)}], (6, 6), (6, 6), 2, ignore_index=IGNORE)
    item = ds[0]
    plane = label[:, 20, :]  # xz slice: (Z, X)
    # the label tile is a window of the annotated xz plane
    windows = np.lib.stride_tricks.sliding_window_view(plane, (6, 6))
    assert (windows == item["label"].numpy()).all(axis=(-1, -2)).any()


def test_output_tile_must_be_a_centred_crop_of_the_input_tile():
    """Valid convolutions shrink each axis by an even count; an odd difference has no centred
    output tile and is refused up front instead of rounded."""
    vols = [make_volume(seed=0)]
    with pytest.raises(ValueError, match="centred crop"):
        TileDataset(vols, (20, 36, 32), (8, 11, 12), 2, ignore_index=IGNORE)
    with pytest.raises(ValueError, match="centred crop"):
        TileDataset(vols, (8, 12, 12), (20, 36, 32), 2, ignore_index=IGNORE)
    with pytest.raises(ValueError, match="centred crop"):
        SliceDataset(vols, [SLICES], (24, 27), (12, 16), 2, ignore_index=IGNORE)


def test_generic_transform_result_is_cropped_exactly_around_the_tile():
    """A generic transform sees the tile plus ``margin_zyx`` per side; cropping its result back
    gives exactly the plain tile (image and label), for odd margins too."""
    vols = [make_volume(seed=2)]
    plain = TileDataset(vols, INPUT, OUTPUT, 4, ignore_index=IGNORE, seed=5)
    framed = TileDataset(
        vols, INPUT, OUTPUT, 4, ignore_index=IGNORE, seed=5,
        transform=Compose([lambda d: d]), margin_zyx=(3, 5, 1),
    )  # fmt: skip
    for i in range(4):
        assert_same(plain[i], framed[i])

    def shave(d):  # one voxel off one side: no centred crop exists
        return {"image": d["image"][..., 1:], "label": d["label"][..., 1:]}

    odd = TileDataset(
        vols, INPUT, OUTPUT, 2, ignore_index=IGNORE, seed=5,
        transform=Compose([shave]), margin_zyx=(2, 2, 2),
    )  # fmt: skip
    with pytest.raises(ValueError, match="centre-crop"):
        odd[0]
