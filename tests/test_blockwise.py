"""densify block by block (sparse3d.densify.blocks, .blockwise, .plan, .pipeline): the same
numbers as one whole-volume pass, memory set by the budget, the same result on one worker and on
a two-worker LocalCluster, OME-Zarr output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pytest
import zarr
from hydra import compose, initialize_config_dir

from sparse3d.cli import CONF_DIR, UserError
from sparse3d.data.normalize import channel_percentiles
from sparse3d.data.volume import VolumeMeta, write_volume
from sparse3d.densify.block_features import FeatureSpec
from sparse3d.densify.blocks import BlockGrid, block_for_budget
from sparse3d.densify.blockwise import LazyInput, stacked_forests_blockwise
from sparse3d.densify.command import densify
from sparse3d.densify.engine import Engine
from sparse3d.densify.features import feature_halo, voxel_features
from sparse3d.densify.forests import RandomForestSegmenter, stacked_probabilities
from sparse3d.densify.plan import forest_bytes, plan_blocks
from sparse3d.labels import LabelSpec

SHAPE = (30, 44, 52)
SLICES = {"z": [8, 21], "y": [22], "x": [13, 38]}
SIGMAS = (0.7, 1.6, 3.0)
VOXEL = (2.0, 1.0, 1.0)
K, IGN = 3, 3


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two channels, three classes (an ellipsoid, a slab, the rest): image (2, Z, Y, X) float32,
    dense truth and its sparse annotation on SLICES (Z, Y, X) uint8."""
    rng = np.random.default_rng(0)
    z, y, x = np.indices(SHAPE)
    truth = (((z - 15) / 10) ** 2 + ((y - 22) / 15) ** 2 + ((x - 26) / 18) ** 2 < 1).astype(
        np.uint8
    )
    truth[x > 42] = 2
    image = np.stack(
        [truth + rng.normal(0, 0.6, SHAPE), (truth == 2) + rng.normal(0, 0.8, SHAPE)]
    ).astype(np.float32)
    label = np.full(SHAPE, IGN, np.uint8)
    label[SLICES["z"]] = truth[SLICES["z"]]
    label[:, SLICES["y"]] = truth[:, SLICES["y"]]
    label[:, :, SLICES["x"]] = truth[:, :, SLICES["x"]]
    return image, truth, label


def _forest(n_trees: int) -> RandomForestSegmenter:
    # one job: scikit-learn's threads add the trees' votes in any order (last-bit differences)
    return RandomForestSegmenter(K, IGN, n_trees=n_trees, samples_per_class=400, seed=0, n_jobs=1)


def _blockwise(image, label, stages, folds, block, cache, tmp_path, workers=2):
    """``cache``: None (features recomputed in each pass), ``"disk"`` (kept as files under
    ``tmp_path``) or a token (kept in this process's memory)."""
    vol = LazyInput(da.from_array(image, chunks=(2, 16, 16, 16)), da.from_array(label), K, IGN,
                    SLICES)  # fmt: skip
    keep_dir = str(tmp_path / "features") if cache == "disk" else None
    spec = FeatureSpec(
        SIGMAS, VOXEL, channel_percentiles(image), (1.0, 2.5), 1,
        cache=None if cache in (None, "disk") else cache, keep_dir=keep_dir,
    )  # fmt: skip
    grid = BlockGrid(SHAPE, block)
    stores = stacked_forests_blockwise(
        vol, grid, spec, _forest(12), _forest(6) if folds else None, stages, folds, tmp_path,
        Engine(workers=workers, progress=False),
    )  # fmt: skip
    return zarr.open_array(stores.full.path)[:], zarr.open_array(stores.crossfit.path)[:]


@pytest.mark.parametrize("cache", [None, "kept", "disk"])
def test_random_forest_blockwise_equals_one_pass(tmp_path, cache):
    image, _, label = _scene()
    feats = voxel_features(image, VOXEL, SIGMAS)
    expected = _forest(12).fit(feats, label).predict_proba(feats)
    full, crossfit = _blockwise(image, label, 1, 0, (16, 32, 32), cache, tmp_path)
    np.testing.assert_array_equal(full, expected)  # bit for bit, seams included
    np.testing.assert_array_equal(crossfit, expected)


@pytest.mark.parametrize("cache", [None, "kept", "disk"])
def test_stacked_crossfit_forests_blockwise_equal_one_pass(tmp_path, cache):
    """refine.max_steps=0: two auto-context stages, three plane folds."""
    image, _, label = _scene()
    feats = voxel_features(image, VOXEL, SIGMAS)
    full, crossfit = stacked_probabilities(
        feats, label, SLICES, _forest(12), _forest(6), stages=2, context_sigmas=(1.0, 2.5),
        n_folds=3,
    )  # fmt: skip
    b_full, b_cross = _blockwise(image, label, 2, 3, (16, 32, 32), cache, tmp_path)
    np.testing.assert_array_equal(b_full, full)
    np.testing.assert_array_equal(b_cross, crossfit)
    assert not np.array_equal(crossfit, full)  # the folds did change the planes
    if cache == "disk":
        assert not (tmp_path / "features").exists()  # the kept features are gone


def _passes_and_filters(monkeypatch) -> list[list]:
    """``[[pass name, filter-feature computations in it]]`` of the blockwise runs that follow."""
    from sparse3d.densify import block_features

    passes: list[list] = []
    original_run, original_features = Engine.run, block_features.voxel_features

    def run(self, tasks, desc):
        passes.append([desc, 0])
        return original_run(self, tasks, desc)

    def features(*args, **kwargs):
        passes[-1][1] += 1
        return original_features(*args, **kwargs)

    monkeypatch.setattr(Engine, "run", run)
    monkeypatch.setattr(block_features, "voxel_features", features)
    return passes


def test_a_later_stage_reads_only_the_context_for_its_training_rows(tmp_path, monkeypatch):
    """A stage is a training-rows pass and a prediction pass: the fold forests predict their
    planes in the prediction pass, from the block's features, and a later stage's training rows
    take the first stage's filter features (same voxels, same image) and compute only the
    context (there was a pass per fold, and each stage filtered the image around its training
    voxels again)."""
    passes = _passes_and_filters(monkeypatch)
    image, _, label = _scene()
    _blockwise(image, label, 2, 3, (16, 32, 32), None, tmp_path)
    names = [name for name, _ in passes]
    assert names == [
        "scan labels",
        "training features",
        "forest, stage 1",
        "training context",
        "forest, stage 2",
    ]
    filtered = dict(passes)
    assert filtered["training context"] == 0
    assert filtered["forest, stage 1"] == filtered["forest, stage 2"] == 8  # 2 x 2 x 2 blocks


@pytest.mark.parametrize("cache", ["kept", "disk"])
def test_kept_features_are_computed_once_per_block_in_the_whole_run(tmp_path, monkeypatch, cache):
    """With the features kept (in memory, or on disk where the blocks run on worker
    processes), each block's filter features are computed once for both stages and all their
    passes, as the in-memory path computes the volume's once (they were computed once per
    stage)."""
    passes = _passes_and_filters(monkeypatch)
    image, _, label = _scene()
    _blockwise(image, label, 2, 3, (16, 32, 32), cache, tmp_path)
    assert sum(n for _, n in passes) == 8  # 2 x 2 x 2 blocks


def test_refine_plan_counts_the_fold_forests_its_workers_hold():
    from sparse3d.densify.options import RefineOptions, RfOptions
    from sparse3d.densify.pipeline import volume_plan

    def peak(folds: int) -> int:
        plan, _ = volume_plan(
            (64, 200, 200), 1, 3, (1.0, 1.0, 1.0), "refine", RfOptions(),
            RefineOptions(folds=folds), 2, 8_000_000_000, block=(64, 100, 100),
        )  # fmt: skip
        return plan.peak_bytes

    fold_forests = 3 * forest_bytes(30, 3, RfOptions().samples_per_class)
    assert peak(3) - peak(1) >= 2 * fold_forests  # each of the 2 workers holds them


def test_a_halo_too_small_leaves_seams(tmp_path, monkeypatch):
    """The equality above depends on the halo: without one the block borders differ."""
    image, _, label = _scene()
    feats = voxel_features(image, VOXEL, SIGMAS)
    expected = _forest(12).fit(feats, label).predict_proba(feats)
    monkeypatch.setattr(FeatureSpec, "halo", property(lambda self: (0, 0, 0)))
    full, _ = _blockwise(image, label, 1, 0, (16, 32, 32), None, tmp_path)
    assert np.abs(full - expected).max() > 0.05


def test_feature_halo_covers_derivative_and_structure_tensor_radius():
    # sigma 5 in the finest voxels: 4 sigma for the derivatives, 4 sigma / 2 for the tensor
    assert feature_halo((5.0,), None) == (30, 30, 30)
    # an axis twice as coarse needs half the voxels
    assert feature_halo((5.0,), (2.0, 1.0, 1.0)) == (15, 30, 30)


def test_block_for_budget_grows_with_the_budget_and_refuses_too_little():
    def cost(block, halo=10):
        return np.prod(np.asarray(block) + 2 * halo) * 400.0

    small = block_for_budget((500, 500, 500), cost, 200e6)
    big = block_for_budget((500, 500, 500), cost, 2e9)
    assert all(s % 16 == 0 for s in small) and np.prod(big) > np.prod(small)
    assert cost(small) <= 200e6 < cost(np.asarray(small) + 16)
    with pytest.raises(ValueError, match="GiB per worker"):
        block_for_budget((500, 500, 500), lambda b: cost(b, 30), 1e6)


def test_blocks_cut_each_axis_evenly_and_keep_both_workers_busy():
    """355 voxels at a 176 cube would leave a 3-voxel sliver that filters a whole halo; the
    blocks must cut each axis into near-equal parts, fit the budget, and give two workers an
    even number of blocks."""
    halo = (30, 30, 30)

    def cost(block):
        return np.prod(np.minimum(np.asarray(block) + 60, (298, 355, 285))) * 100.0

    budget = cost((176, 176, 176))
    block = block_for_budget((298, 355, 285), cost, budget, halo=halo, workers=2)
    assert cost(block) <= budget
    counts = [-(-n // b) for n, b in zip((298, 355, 285), block, strict=True)]
    for n, b, c in zip((298, 355, 285), block, counts, strict=True):
        last = n - (c - 1) * b
        assert last >= b / 2, (block, n)  # no sliver
    assert np.prod(counts) % 2 == 0


def test_store_chunks_never_straddle_two_blocks_and_stay_small():
    """Blocks written by different workers must never share a chunk, and a network tile read
    from a store should not decompress a whole block."""
    for shape, block in [((298, 355, 285), (160, 192, 144)), ((40, 700, 90), (40, 176, 90))]:
        grid = BlockGrid(shape, block)
        chunks = grid.store_chunks()
        assert max(chunks) <= 64
        for n, b, c, count in zip(shape, block, chunks, grid.counts, strict=True):
            starts = {i * b for i in range(count)}
            assert all(s % c == 0 for s in starts), (block, chunks)  # every block starts a chunk
            if count == 1:
                assert c == min(n, 64)


def test_network_pass_fits_each_worker_share_of_the_budget():
    from sparse3d.densify.plan import NET_BYTES_PER_VOXEL, network_pass_voxels

    plan = plan_blocks((300, 1024, 1024), 1, 50, 3, (30, 30, 30), 2, 8 * 10**9, 300 * 2**20)
    n = network_pass_voxels(plan, 10**12)
    assert n * NET_BYTES_PER_VOXEL <= plan.budget_bytes / 2
    assert network_pass_voxels(plan, 1000) == 1 << 18  # never below a useful slab
    assert network_pass_voxels(plan, 10**6) == 10**6  # the option's cap when it is smaller


def test_plan_says_what_it_needs_and_what_to_change():
    plan = plan_blocks((300, 1024, 1024), 1, 50, 3, (30, 30, 30), 2, 8 * 10**9, 300 * 2**20)
    assert plan.peak_bytes <= plan.budget_bytes and plan.n_blocks > 1
    assert "GB peak" in plan.line() and "2 workers" in plan.line()
    with pytest.raises(ValueError, match="memory_budget=1.0GB is too small.*raise memory_budget"):
        plan_blocks((300, 1024, 1024), 1, 50, 3, (30, 30, 30), 2, 10**9, 300 * 2**20)


# --------------------------------------------------------------------------------------------
# the command line, block by block


@pytest.fixture()
def volume(tmp_path) -> Path:
    image, truth, label = _scene()
    meta = VolumeMeta(VOXEL, ("a", "b"), LabelSpec(("ball", "slab", "rest"), IGN), SLICES)
    return write_volume(tmp_path / "vol.h5", image, label, meta, dense_label=truth)


def _cfg(out: Path, src: Path, *extra: str):
    args = [
        "method=rf", f"inputs=[{src}]", f"out={out}", "logger=none", "rf.n_trees=12",
        "rf.n_jobs=1", "rf.samples_per_class=400", "rf.sigmas=[0.7,1.6,3.0]", *extra,
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="densify", overrides=args)


def _labels(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["labels"][...]


@pytest.mark.slow
def test_same_segmentation_on_one_worker_and_a_two_worker_local_cluster(volume, tmp_path):
    """One block on one worker, eight on a LocalCluster of two processes: the same
    segmentation, equal to the whole-volume forest's."""
    one = densify(_cfg(tmp_path / "one", volume, "cluster.n_workers=1"))
    two = densify(
        _cfg(
            tmp_path / "two",
            volume,
            "cluster.n_workers=2",
            "block=[16,32,32]",
            "cluster.processes=true",
        )
    )
    assert "1 block" in one["volumes"]["vol"]["plan"]
    assert "2 workers" in two["volumes"]["vol"]["plan"] and "1 block " not in two["volumes"][
        "vol"]["plan"]  # fmt: skip
    a, b = _labels(tmp_path / "one" / "vol_seg.h5"), _labels(tmp_path / "two" / "vol_seg.h5")
    np.testing.assert_array_equal(a, b)
    image, truth, label = _scene()
    feats = voxel_features(image, VOXEL, SIGMAS)
    expected = _forest(12).fit(feats, label).predict_proba(feats).argmax(0)
    np.testing.assert_array_equal(a, expected)
    assert one["volumes"]["vol"]["unannotated"]["mean"] == pytest.approx(
        two["volumes"]["vol"]["unannotated"]["mean"]
    )
    assert one["volumes"]["vol"]["unannotated"]["mean"] > 0.8


def test_memory_guard_stops_before_any_work(volume, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="memory_budget=0.5GB is too small"):
        densify(_cfg(out, volume, "memory_budget=500MB"))
    assert not (out / "vol_seg.h5").exists() and not (out / "densify.json").exists()


def test_ome_zarr_output_has_napari_label_metadata_and_a_pyramid(volume, tmp_path):
    out = tmp_path / "out"
    summary = densify(_cfg(out, volume, "output_format=ome-zarr", "cluster.n_workers=1"))
    seg = out / "vol_seg.ome.zarr"
    assert Path(summary["volumes"]["vol"]["segmentation"]) == seg
    attrs = json.loads((seg / ".zattrs").read_text())
    assert attrs["multiscales"][0]["axes"][0]["name"] == "z"
    assert "image-label" in attrs
    assert summary["volumes"]["vol"]["suggestion"]["axis"] in ("z", "y", "x")
    level0 = zarr.open_array(str(seg / "0"), mode="r")[:]
    # napari's codes: 0 unlabelled, class c is c + 1; every voxel gets a class
    assert level0.min() >= 1 and level0.max() <= K
    image, truth, label = _scene()
    assert ((level0 - 1) == truth).mean() > 0.9
    # a second run refuses to overwrite it
    with pytest.raises(UserError, match="exists"):
        densify(_cfg(out, volume, "output_format=ome-zarr"))


def test_suggestion_from_block_sums_equals_the_whole_volume_one():
    from sparse3d.densify.suggest import plane_scores, plane_sums, scores_from_sums

    u = np.random.default_rng(1).random(SHAPE)
    grid = BlockGrid(SHAPE, (16, 32, 32))
    parts = [plane_sums(u[b.core], SLICES, b.core, SHAPE) for b in grid]
    sums = {ax: (sum(p[ax][0] for p in parts), sum(p[ax][1] for p in parts)) for ax in "zyx"}
    blockwise = scores_from_sums(sums, SHAPE, SLICES)
    whole = plane_scores(u, SLICES)
    for ax in "zyx":
        np.testing.assert_allclose(blockwise[ax], whole[ax])
        assert np.isinf(whole[ax]).any() and np.isfinite(whole[ax]).any()


@pytest.mark.slow
@pytest.mark.parametrize("slabs", [False, True])
def test_refine_blockwise_matches_the_in_memory_path(volume, tmp_path, monkeypatch, slabs):
    """Same forests, same training tiles (centres in the same order, read from the stores), a
    network predicted block by block with its receptive field as halo: the segmentation of the
    whole-volume path, up to the rounding of convolutions of other sizes. ``slabs``: a memory
    share too small for one pass over a block, which is then predicted in overlapping slabs."""
    if slabs:
        import sparse3d.densify.pipeline as pipeline

        monkeypatch.setattr(pipeline, "network_pass_voxels", lambda plan, cap: 4096)
    common = [
        "method=refine", "refine.max_steps=4", "refine.fold_trees=4", "refine.input_tile=[16,32,32]",
        "refine.batch_size=1",
    ]  # fmt: skip
    blockwise = densify(_cfg(tmp_path / "b", volume, *common, "block=[16,32,32]",
                             "cluster.kind=threads"))  # fmt: skip
    memory = densify(_cfg(tmp_path / "m", volume, *common, "in_memory=true"))
    a, b = _labels(tmp_path / "b" / "vol_seg.h5"), _labels(tmp_path / "m" / "vol_seg.h5")
    assert (a != b).mean() < 1e-3
    iou_b = blockwise["volumes"]["vol"]["unannotated"]["mean"]
    iou_m = memory["volumes"]["vol"]["unannotated"]["mean"]
    assert abs(iou_b - iou_m) < 0.005
    assert blockwise["steps"]["vol"]["steps"] == memory["steps"]["vol"]["steps"] == 4


@pytest.mark.slow
def test_cluster_address_attaches_to_a_running_scheduler(volume, tmp_path):
    """One option moves the run to a scheduler already running (here one on this machine's
    loopback); the blocks run on its workers, the segmentation is the one-pass forest's."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:  # fmt: skip
        summary = densify(
            _cfg(
                tmp_path / "remote",
                volume,
                f"cluster.address={cluster.scheduler_address}",
                "block=[16,32,32]",
            )  # fmt: skip
        )
    assert "2 workers" in summary["volumes"]["vol"]["plan"]
    image, truth, label = _scene()
    feats = voxel_features(image, VOXEL, SIGMAS)
    expected = _forest(12).fit(feats, label).predict_proba(feats).argmax(0)
    np.testing.assert_array_equal(_labels(tmp_path / "remote" / "vol_seg.h5"), expected)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["block=[16,32,32]", "in_memory=true"])
def test_refine_predicts_in_the_precision_its_network_trained_in(
    volume, tmp_path, monkeypatch, path
):
    """``refine.precision=bf16``: both paths hand the trained precision to the prediction, and
    densify.json records it."""
    import sparse3d.densify.network as network
    import sparse3d.densify.network_lazy as network_lazy

    seen = []

    def spy(original):
        def predict(*args, **kwargs):
            seen.append(kwargs.get("precision", args[6] if len(args) > 6 else "fp32"))
            return original(*args, **kwargs)

        return predict

    # the blockwise pass calls network_lazy's name; the in-memory path imports it from .network
    monkeypatch.setattr(network_lazy, "predict_same_padded", spy(network.predict_same_padded))
    monkeypatch.setattr(network, "predict_same_padded", spy(network.predict_same_padded))
    facts = densify(_cfg(
        tmp_path / "b", volume, "method=refine", "refine.max_steps=2", "refine.fold_trees=4",
        "refine.input_tile=[16,32,32]", "refine.batch_size=1", "refine.precision=bf16",
        "cluster.kind=threads", path,
    ))  # fmt: skip
    assert seen and set(seen) == {"bf16"}
    assert facts["steps"]["vol"]["network_precision"] == "bf16"


def test_file_dataset_reads_what_the_volume_dask_array_reads(volume):
    from sparse3d.data.lazy import lazy_volume
    from sparse3d.densify.network_lazy import FileDataset

    lazy = lazy_volume(volume, chunks=(16, 32, 32))
    image, label = FileDataset(volume, "image"), FileDataset(volume, "label")
    assert image.shape == lazy.image.shape and label.shape == lazy.label.shape
    box = (slice(3, 19), slice(5, 37), slice(10, 42))
    got = image[(slice(None), *box)]
    np.testing.assert_array_equal(got, lazy.image[(slice(None), *box)].compute())
    assert got.dtype == lazy.image.dtype
    np.testing.assert_array_equal(label[box], lazy.label[box].compute())
    image.close()
    label.close()
    assert image._file is None


@pytest.mark.slow
def test_blockwise_refine_reads_its_training_tiles_straight_from_the_file(
    volume, tmp_path, monkeypatch
):
    """Through the volume's dask array a small tile read its whole block; the network's
    training tiles of image and label come from the file itself, none through dask."""
    import sparse3d.densify.network_lazy as network_lazy

    through_dask = []
    original = network_lazy._here

    def spy(part):
        through_dask.append(hasattr(part, "compute"))
        return original(part)

    monkeypatch.setattr(network_lazy, "_here", spy)
    densify(_cfg(
        tmp_path / "b", volume, "method=refine", "refine.max_steps=3", "refine.fold_trees=4",
        "refine.input_tile=[16,32,32]", "refine.batch_size=1", "cluster.kind=threads",
        "block=[16,32,32]",
    ))  # fmt: skip
    assert len(through_dask) >= 6 and not any(through_dask)


@pytest.mark.slow
def test_local_workers_neither_spill_nor_pause_but_keep_the_terminate_guard():
    """A block's arrays are task memory that spilling cannot move: the local cluster's workers
    do not spill, warn or pause over it (a paused worker would wait on its own block), and the
    nanny still ends a worker past 95 % of its limit."""
    from sparse3d.densify.engine import open_client

    client, close = open_client("local", 1, 1 << 30, dashboard=False)
    try:
        fractions = client.run(
            lambda dask_worker: (
                dask_worker.memory_manager.memory_target_fraction,
                dask_worker.memory_manager.memory_spill_fraction,
                dask_worker.memory_manager.memory_pause_fraction,
            )
        )
        terminate = client.run(
            lambda dask_worker: dask_worker.memory_manager.memory_terminate_fraction, nanny=True
        )
    finally:
        close()
    assert list(fractions.values()) == [(False, False, False)]
    assert list(terminate.values()) == [0.95]


@pytest.mark.slow
def test_starting_the_local_cluster_leaves_this_process_environment_alone(monkeypatch):
    """The nanny sets OMP_NUM_THREADS=1 (and more) in this process before spawning its worker;
    torch imported after it, or a child process, would run one thread. The variables come back
    as they were: unset stays unset, a user's own value stays."""
    from sparse3d.densify.engine import open_client

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    client, close = open_client("local", 1, 1 << 30, dashboard=False)
    try:
        worker_env = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
    finally:
        close()
    assert list(worker_env.values()) == ["1"]  # the worker itself still runs one thread
    assert "OMP_NUM_THREADS" not in os.environ
    assert os.environ["MKL_NUM_THREADS"] == "7"


@pytest.mark.slow
def test_local_workers_start_with_glibc_settings_for_large_arrays(monkeypatch):
    """dask's nanny would start its workers with MALLOC_TRIM_THRESHOLD_=65536, which makes
    every array over 128 KiB a fresh mapping of zeroed pages (a block's filters ran 1.6x
    slower); densify's workers start with WORKER_MALLOC instead, and this process keeps its own
    environment."""
    from sparse3d.densify.engine import WORKER_MALLOC, open_client

    for key in WORKER_MALLOC:
        monkeypatch.delenv(key, raising=False)
    client, close = open_client("local", 1, 1 << 30, dashboard=False)
    try:
        worker_env = client.run(lambda: {k: os.environ.get(k) for k in WORKER_MALLOC})
    finally:
        close()
    assert list(worker_env.values()) == [{k: str(v) for k, v in WORKER_MALLOC.items()}]
    assert not any(key in os.environ for key in WORKER_MALLOC)


def test_slurm_jobs_export_the_worker_malloc_settings_before_the_users_prologue():
    from sparse3d.densify.engine import WORKER_MALLOC, slurm_arguments

    args = slurm_arguments({"cores": 2, "job_script_prologue": ["module load foo"]})
    assert args["cores"] == 2
    assert args["job_script_prologue"] == [
        *(f"export {k}={v}" for k, v in WORKER_MALLOC.items()),
        "module load foo",
    ]
    assert slurm_arguments(None)["job_script_prologue"][0].startswith("export MALLOC_")
    # a prologue from the user's jobqueue config, or under its older name, is kept too
    import dask

    with dask.config.set({"jobqueue.slurm.job-script-prologue": ["module load bar"]}):
        assert slurm_arguments({})["job_script_prologue"][-1] == "module load bar"
    args = slurm_arguments({"env_extra": ["source env.sh"]})
    assert "env_extra" not in args
    assert args["job_script_prologue"][-1] == "source env.sh"


def test_features_are_kept_on_disk_only_where_it_has_room(tmp_path, monkeypatch):
    """200 bytes per voxel of one channel (50 float32 features): kept where that is at most
    half the scratch disk's free space, else computed again in each pass."""
    import shutil
    from collections import namedtuple

    from sparse3d.densify import pipeline

    usage = namedtuple("usage", "total used free")
    need = 4 * 50 * 1000  # one channel, the default five scales, 1000 voxels
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 2 * need))
    assert pipeline._disk_keep(tmp_path, 1, (0.7, 1.0, 1.6, 3.5, 5.0), (10, 10, 10)) == (
        tmp_path / "features"
    )
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 2 * need - 1))
    assert pipeline._disk_keep(tmp_path, 1, (0.7, 1.0, 1.6, 3.5, 5.0), (10, 10, 10)) is None


def test_a_truncated_kept_features_file_is_an_error_not_garbage(tmp_path):
    from sparse3d.densify.block_features import block_features, kept_file

    image, _, _ = _scene()
    spec = FeatureSpec(SIGMAS, VOXEL, channel_percentiles(image), (), 1, keep_dir=str(tmp_path))
    region = (slice(0, 8), slice(0, 8), slice(0, 8))
    path = kept_file(spec, region)
    path.write_bytes(b"\0" * 100)
    with pytest.raises(OSError, match="bytes of kept features"):
        block_features(None, region, None, None, region, spec)


def test_a_local_cluster_makes_way_for_work_in_this_process():
    """in_this_process closes a LocalCluster of this machine (once) and runs its tasks as as
    many threads here; an engine on a scheduler elsewhere, or one without a cluster, stays."""
    from sparse3d.densify.engine import cpu_count

    closed = []
    local = Engine(client=object(), workers=2, close_local=lambda: closed.append(1))
    here = local.in_this_process()
    assert closed == [1]
    assert here.client is None and here.close_local is None
    assert here.workers == 2 and here.threads_per_task == max(1, cpu_count() // 2)
    assert here.in_this_process() is here and closed == [1]
    remote = Engine(client=object(), workers=4)
    assert remote.in_this_process() is remote
    threads = Engine(workers=2)
    assert threads.in_this_process() is threads


@pytest.mark.slow
def test_refine_network_runs_in_this_process_after_the_local_cluster_closes(
    volume, tmp_path, monkeypatch
):
    """On a LocalCluster the forests run on its worker processes; the network then trains and
    predicts with the cluster closed, and the segmentation is the threads engine's."""
    import sparse3d.densify.network_lazy as network_lazy

    seen = []
    original = network_lazy.refine_network_blockwise

    def spy(vol, grid, spec, stores, opts, engine, *args, **kwargs):
        seen.append(engine.client)
        return original(vol, grid, spec, stores, opts, engine, *args, **kwargs)

    monkeypatch.setattr(network_lazy, "refine_network_blockwise", spy)
    common = [
        "method=refine", "refine.max_steps=4", "refine.fold_trees=4", "refine.input_tile=[16,32,32]",
        "refine.batch_size=1", "block=[16,32,32]", "cluster.n_workers=2",
    ]  # fmt: skip
    cluster = densify(_cfg(tmp_path / "c", volume, *common, "cluster.processes=true"))
    threads = densify(_cfg(tmp_path / "t", volume, *common, "cluster.kind=threads"))
    assert "2 workers" in cluster["volumes"]["vol"]["plan"]
    assert "threads" in threads["volumes"]["vol"]["plan"]
    assert seen == [None, None]
    np.testing.assert_array_equal(
        _labels(tmp_path / "c" / "vol_seg.h5"), _labels(tmp_path / "t" / "vol_seg.h5")
    )


@pytest.mark.slow
def test_a_terminated_run_removes_its_scratch(volume, tmp_path):
    """SIGTERM (``kill``, a batch system's time limit) in the middle of a run: densify leaves
    through Python's exit, so its scratch folder (stores, kept features: gigabytes on a real
    volume) is removed, as after Ctrl-C; no segmentation is written."""
    import signal
    import subprocess
    import sys
    import time

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "sparse3d.densify", "method=refine", f"inputs=[{volume}]",
        f"out={out}", "logger=none", "rf.n_trees=12", "rf.n_jobs=1", "rf.samples_per_class=400",
        "rf.sigmas=[0.7,1.6,3.0]", "refine.fold_trees=4", "refine.input_tile=[16,32,32]",
        "refine.max_steps=100000", "block=[16,32,32]", "cluster.kind=threads",
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(scratch.glob("sparse3d-*/*.zarr")):  # a pass has written a store
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no store appeared in two minutes"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM  # stopped mid-run, not finished
    assert not list(scratch.glob("sparse3d-*"))
    assert not list(out.glob("*_seg.h5"))
