"""The layering of the README's architecture section, checked on the source: every import of
every module (also those inside functions) goes to the same or a lower layer, and layers 0-1
never import Lightning, Hydra or OmegaConf. Also the size rules: no module over 500 lines
(generated data and tables excepted) without a reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sparse3d"

#: layer of each module (dotted name below ``sparse3d``); a package entry covers its modules
LAYERS: dict[str, int] = {
    "__init__": 0,
    "labels": 0,
    "crop": 0,
    "atomic": 0,
    "axes": 0,
    "mirror": 0,
    "mdtables": 0,
    "models": 1,
    "losses": 1,
    "schedules": 1,
    "metrics": 1,
    "data": 1,
    "inference": 1,
    "checkpoint": 1,
    "evaluation": 1,
    "outputs": 1,
    "viz": 1,
    "runfolder": 1,
    "densify.features": 1,
    "densify.forests": 1,
    "densify.network": 1,
    "densify.suggest": 1,
    "distributed": 1,
    "datamodule": 2,
    "module": 2,
    "callbacks": 2,
    "parallel": 2,
    "densify.network_fit": 2,
    "cli": 3,
    "experiment": 3,
    "fitting": 3,
    "train": 3,
    "densify": 3,
    "densify.options": 0,
    "densify.plan": 1,
    "densify.blocks": 1,
    "densify.engine": 1,
    "densify.blockwise": 1,
    "densify.block_features": 1,
    "densify.stores": 1,
    "densify.network_lazy": 3,
    "predict": 3,
    "report": 3,
    "bench": 3,
    "napari_plugin": 3,
}
FRAMEWORKS = ("lightning", "hydra", "omegaconf")
#: modules allowed over the size limit, with the reason
LONG_MODULES: dict[str, str] = {
    "data.realcases": "the catalogue of the benchmark's six cases, each a short loader; 545 lines",
}
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def _dotted(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


def _layer(dotted: str) -> int:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(dotted)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in the file, nested ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["sparse3d", *path.relative_to(SRC).with_suffix("").parts[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if name == "sparse3d"]
    return out


def test_every_module_has_a_layer():
    missing = [_dotted(p) for p in _modules() if not _try_layer(_dotted(p))]
    assert not missing, f"add these modules to LAYERS (and the README): {missing}"


def _try_layer(dotted: str) -> bool:
    try:
        _layer(dotted)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("path", _modules(), ids=_dotted)
def test_imports_flow_one_way(path: Path):
    me = _dotted(path)
    mine = _layer(me)
    wrong = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if top in FRAMEWORKS and mine <= 1:
            wrong.append(f"line {line}: layer {mine} imports {name}")
        if top == "sparse3d" and name != "sparse3d":
            target = name.removeprefix("sparse3d.")
            if _try_layer(target) and _layer(target) > mine:
                wrong.append(f"line {line}: layer {mine} imports {name} (layer {_layer(target)})")
    assert not wrong, f"{me}: " + "; ".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The rule can fail: a layer-1 module importing Lightning or train is caught."""
    fake = SRC / "data" / "_layer_probe.py"
    assert not fake.exists()
    source = "def f():\n    import lightning\n    from sparse3d.train import train\n"
    tree_imports = [n for _, n in _imports_of_source(source, fake)]
    assert "lightning" in tree_imports and "sparse3d.train" in tree_imports
    assert _layer("data._layer_probe") == 1 < _layer("train")


def _imports_of_source(source: str, path: Path) -> list[tuple[int, str]]:
    tmp = path.with_name(path.name + ".txt")
    try:
        tmp.write_text(source)
        return _imports(tmp)
    finally:
        tmp.unlink()


@pytest.mark.parametrize("path", _modules(), ids=_dotted)
def test_modules_stay_small(path: Path):
    lines = len(path.read_text().splitlines())
    if _dotted(path) in LONG_MODULES:
        return
    assert lines <= MAX_LINES, f"{_dotted(path)} has {lines} lines: split it (limit {MAX_LINES})"
