"""Model files: round trip, Lightning checkpoints, refusal of pickled objects, clear errors."""

from __future__ import annotations

import pytest
import torch

from sparse3d.checkpoint import CheckpointError, ModelMeta, load_model, save_model
from sparse3d.models import UNet
from sparse3d.models.blocks import PaperBatchNorm

#: set by _Payload when it is unpickled; must stay False: refused files never run code
UNPICKLED: list[str] = []


class _Payload:
    def __reduce__(self):
        return (UNPICKLED.append, ("code ran",))


def _kw(base: int = 2) -> dict:
    """UNet arguments of the test network, as ``ModelMeta.net`` holds them."""
    return {
        "in_channels": 3,
        "num_classes": 3,
        "base_channels": base,
        "depth": 3,
        "norm": "batch",
        "bn_eval_stats": "running",
    }


def _net(base: int = 2) -> UNet:
    torch.manual_seed(0)
    net = UNet(**_kw(base))
    for m in net.modules():
        if isinstance(m, PaperBatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _meta(base: int = 2) -> ModelMeta:
    return ModelMeta(
        net=_kw(base),
        class_names=("inside_tubule", "tubule", "background"),
        ignore_index=3,
        channel_names=("lectin", "dapi", "catenin"),
        voxel_size_zyx_um=(2.04, 1.76, 1.76),
        normalization={"kind": "percentile", "low": 1.0, "high": 99.5},
    )


def _x(net: UNet) -> torch.Tensor:
    return torch.randn(1, 3, *net.input_shape_for_output((4, 4, 4)))


def test_round_trip_gives_identical_outputs(tmp_path):
    net = _net()
    meta = _meta()
    path = save_model(tmp_path / "model.pt", net, meta)
    loaded, meta2 = load_model(path)
    assert meta2 == meta
    assert meta2.labels.num_classes == 3 and loaded.bn_eval_stats == "running"
    assert not loaded.training
    x = _x(net)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model(path, net, meta)
    save_model(path, net, meta, overwrite=True)


def test_meta_dict_round_trip_is_plain():
    meta = _meta()
    d = meta.to_dict()
    assert isinstance(d["class_names"], list) and isinstance(d["voxel_size_zyx_um"], list)
    assert ModelMeta.from_dict(d) == meta
    with pytest.raises(ValueError, match="lacks"):
        ModelMeta.from_dict({"net": d["net"]})


def test_lightning_checkpoint_is_accepted(tmp_path):
    net = _net()
    meta = _meta()
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    state["loss.class_weights"] = torch.ones(3)  # other members of the training module
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "hyper_parameters": {"model_meta": meta.to_dict()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}],
        "lr_schedulers": [],
        "loops": {},
        "callbacks": {},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    loaded, meta2 = load_model(path)
    assert meta2 == meta
    x = _x(net)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_lightning_checkpoint_without_meta_is_refused(tmp_path):
    net = _net()
    path = tmp_path / "x.ckpt"
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {},
        },
        path,
    )
    with pytest.raises(CheckpointError, match="model_meta"):
        load_model(path)


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    net = _net()
    payload = {
        "format": "sparse3d-model",
        "version": 1,
        "meta": _meta().to_dict(),
        "state_dict": net.state_dict(),
        "extra": _Payload(),
    }
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    UNPICKLED.clear()
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "pickled" in msg and "refused" in msg and str(path) in msg
    assert "\n" not in msg
    assert UNPICKLED == []


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    small = _net(base=2)
    with pytest.raises(ValueError, match="does not describe"):
        save_model(tmp_path / "m.pt", small, _meta(base=4))
    path = tmp_path / "m.pt"
    torch.save(
        {
            "format": "sparse3d-model",
            "version": 1,
            "meta": _meta(base=4).to_dict(),
            "state_dict": small.state_dict(),
        },
        path,
    )
    with pytest.raises(CheckpointError, match="do not fit the architecture") as info:
        load_model(path)
    assert "shape" in str(info.value) and "\n" not in str(info.value)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(text)
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(CheckpointError, match="not a sparse3d model file"):
        load_model(other)
    plain = tmp_path / "plain.pt"
    torch.save(_net().state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a sparse3d model file"):
        load_model(plain)
    future = tmp_path / "v9.pt"
    torch.save({"format": "sparse3d-model", "version": 9, "meta": {}, "state_dict": {}}, future)
    with pytest.raises(CheckpointError, match="version 9"):
        load_model(future)


def test_meta_checks_channels_and_classes():
    net = _net()
    kw = _kw()
    with pytest.raises(ValueError, match="channel_names"):
        ModelMeta(kw, ("a", "b", "c"), 3, ("lectin",))
    with pytest.raises(ValueError, match="class_names"):
        ModelMeta(kw, ("a", "b"), 3, ("x", "y", "z"))
    with pytest.raises(ValueError, match="normalization"):
        ModelMeta(kw, ("a", "b", "c"), 3, ("x", "y", "z"), normalization={"kind": "zscore"})
    rebuilt = ModelMeta(kw, ("a", "b", "c"), 3, ("x", "y", "z")).build_net().state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }
