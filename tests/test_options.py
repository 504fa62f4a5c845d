"""densify's typed options: defaults construct, every range check names its key; parse_bytes."""

from __future__ import annotations

import pytest

from sparse3d.densify.options import ClusterOptions, RefineOptions, RfOptions, parse_bytes


def test_defaults_construct():
    rf, refine, cluster = RfOptions(), RefineOptions(), ClusterOptions()
    assert rf.n_trees >= 1 and rf.sigmas
    assert 0 <= refine.forest_weight <= 1 and len(refine.input_tile) == 3
    assert cluster.kind == "local" and cluster.n_workers is None
    assert set(rf.forest_kwargs()) == {
        "n_trees",
        "max_depth",
        "samples_per_class",
        "seed",
        "n_jobs",
    }


RF_BAD = [
    ("sigmas", []),
    ("sigmas", [1.0, 0.0]),
    ("sigmas", [float("nan")]),
    ("n_trees", 0),
    ("max_depth", 0),
    ("samples_per_class", 0),
    ("n_jobs", 0),
    ("n_jobs", -2),
]

REFINE_BAD = [
    ("rf_stages", 0),
    ("folds", 0),
    ("fold_trees", 0),
    ("base_channels", 0),
    ("depth", 0),
    ("batch_size", 0),
    ("max_steps", -1),
    ("rounds", 0),
    ("time_budget_s", -5.0),
    ("time_budget_s", 0.0),
    ("context_sigmas", [1.0, -1.0]),
    ("input_tile", [32, 64]),
    ("input_tile", [32, 0, 64]),
    ("lr", 0.0),
    ("pseudo_threshold", 1.5),
    ("pseudo_threshold", -0.1),
    ("pseudo_weight", -0.1),
    ("pseudo_class_fraction", 0.0),
    ("pseudo_class_fraction", 1.2),
    ("forest_weight", 2.0),
    ("forest_weight", -0.5),
    ("class_weights", "inverse"),
    ("centre_sampling", "edge"),
    ("flip_axes", ["z", "t"]),
    ("max_voxels_per_pass", 0),
    ("precision", "fp16"),
]

CLUSTER_BAD = [
    ("kind", "kubernetes"),
    ("n_workers", 0),
    ("address", "localhost:8786"),
]


@pytest.mark.parametrize(
    ("cls", "prefix", "key", "value"),
    [(RfOptions, "rf", k, v) for k, v in RF_BAD]
    + [(RefineOptions, "refine", k, v) for k, v in REFINE_BAD]
    + [(ClusterOptions, "cluster", k, v) for k, v in CLUSTER_BAD],
    ids=lambda v: str(v),
)
def test_range_check_names_the_key(cls, prefix, key, value):
    with pytest.raises(ValueError, match=rf"^{prefix}\.{key}\b"):
        cls(**{key: value})


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (RfOptions, "max_depth", None),
        (RfOptions, "n_jobs", -1),
        (RefineOptions, "max_steps", 0),
        (RefineOptions, "time_budget_s", 30.0),
        (RefineOptions, "forest_weight", 1.0),
        (RefineOptions, "pseudo_class_fraction", 1.0),
        (RefineOptions, "flip_axes", []),
        (RefineOptions, "class_weights", "sqrt"),
        (RefineOptions, "precision", "auto"),
        (ClusterOptions, "kind", "threads"),
        (ClusterOptions, "address", "tcp://host:8786"),
    ],
    ids=lambda v: str(v),
)
def test_edge_values_are_accepted(cls, key, value):
    assert getattr(cls(**{key: value}), key) == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2 * 10**9),
        ("1.5GiB", int(1.5 * 2**30)),
        ("500MB", 500 * 10**6),
        ("500mb", 500 * 10**6),
        (" 64 KiB ", 64 * 2**10),
        ("1024", 1024),
        (4096, 4096),
        (2.5e9, 2_500_000_000),
        (None, None),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "2XB", "GB", "-1GB", "0", 0, -5, "1.2.3GB", float("inf")])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="memory_budget"):
        parse_bytes(text)
