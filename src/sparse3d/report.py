"""Tables 1-3 from run folders: ``python -m sparse3d.report runs/ [--out report.md]`` (layer 3).

Reads only run folders (``metrics.json``), never imports torch. Our IoU (mean over classes on
the held-out labelled voxels, ``heldout``: the test slices less their crossings with training
slices; the paper's protocol) sits beside the paper's number; where a dense ground truth existed,
the IoU over every voxel (``all_voxels``) is shown too. Several seeds of one cell are averaged
and counted.

Other learners' tables (``--compare experiments/results/tables_rf.md``, the files
``experiments/rf_tables.py`` writes) add their held-out IoU beside ours, job by job.

Run folders of earlier versions are read too: their ``dense`` is today's ``all_voxels``, and
their ``heldout`` still counted the crossings with training slices (today's ``heldout_all``);
the report says how many such runs it holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from importlib import resources
from pathlib import Path
from statistics import mean
from typing import Any

from sparse3d.atomic import atomic_path, write_text_atomic
from sparse3d.mdtables import md_tables
from sparse3d.runfolder import find_runs, read_metrics

#: The paper's Tables 1-3, shipped inside the package (found in a wheel install too).
PAPER_RESULTS = "paper_results.json"
MODELS = ("unet3d_nobn", "unet3d", "unet2d")


def paper_results() -> dict[str, Any]:
    """The paper's numbers (Tables 1-3), read from the package's ``paper_results.json``."""
    return json.loads(resources.files("sparse3d").joinpath(PAPER_RESULTS).read_text())


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for d in find_runs(paths):
        m = read_metrics(d)
        if m and m.get("status") == "done":
            m["_dir"] = str(d)
            if "all_voxels" not in m and "dense" in m:  # written before the rename
                m["all_voxels"] = m["dense"]
            m["_legacy_heldout"] = "heldout_all" not in m
            runs.append(m)
    return runs


#: first header cell of each protocol's table, as ``experiments/rf_tables.py`` writes it
_ROW_LABELS = {"test slices": "semi_cv", "test volume": "full_auto", "GT slices": "slice_sweep"}


class Comparison:
    """Another learner's held-out IoU per job, read from a table file of
    ``experiments/rf_tables.py``: ``values[(protocol, job)]`` with ``job`` the fold (``"1"``) or,
    for Table 2, ``(setup, sample)`` (``("1", "2")``)."""

    def __init__(self, name: str, values: dict[tuple[str, Any], float], source: str) -> None:
        self.name, self.values, self.source = name, values, source

    @classmethod
    def read(cls, path: Path, setups: dict[str, str]) -> Comparison:
        if not path.is_file():
            raise SystemExit(f"error: --compare {path}: no such file")
        setup_of = {label: key for key, label in setups.items()}
        name, values = None, {}
        for rows in md_tables(path.read_text()):
            head = rows[0]
            protocol = _ROW_LABELS.get(head[0])
            col = next((i for i, h in enumerate(head) if h.endswith(" held-out")), None)
            if protocol is None or col is None:
                continue
            name = head[col][: -len(" held-out")]
            for cells in rows[1:]:
                if cells[0].startswith("**") or cells[col] == "–":
                    continue  # the file's own average: recomputed here from the jobs
                job = (setup_of[cells[0]], cells[1]) if protocol == "slice_sweep" else cells[0]
                values[(protocol, job)] = float(cells[col])
        if name is None:
            raise SystemExit(f"error: {path} holds no table of experiments/rf_tables.py")
        return cls(name, values, str(path))

    def cell(self, protocol: str, job: Any) -> str:
        if job == "average":
            v = [x for (p, _), x in self.values.items() if p == protocol]
        else:
            v = [self.values[(protocol, job)]] if (protocol, job) in self.values else []
        return "–" if not v else f"{mean(v):.3f}"

    def has(self, protocol: str) -> bool:
        return any(p == protocol for p, _ in self.values)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    s = f"{mean(values):.3f}"
    return s if len(values) == 1 else f"{s} (n={len(values)})"


def _iou(run: dict[str, Any], key: str) -> float | None:
    s = run.get(key)
    return None if not s else s.get("mean")


def _protocol_table(runs, protocol, paper, title, row_label, compare=()) -> list[str]:
    sel = [r for r in runs if r.get("protocol") == protocol]
    if not sel:
        return []
    cols = paper["columns"]
    models = [m for m in MODELS if any(r["model"] == m for r in sel)]
    models += sorted({r["model"] for r in sel} - set(models))
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in sel:
        for key in ("heldout", "all_voxels"):
            v = _iou(r, key)
            if v is not None:
                cells[(str(r["fold"]), r["model"], key)].append(v)
                cells[("average", r["model"], key)].append(v)
    presets = sorted({r.get("preset", "?") for r in sel})
    lines = [f"### {title}", "", f"presets: {', '.join(presets)}; IoU = mean over classes.", ""]
    head = [row_label]
    for m in models:
        name = cols.get(m, m)
        head += [f"{name} ours", f"{name} paper", f"{name} ours, all voxels"]
    others = [c for c in compare if c.has(protocol)]
    head += [f"{c.name} (held-out)" for c in others]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    folds = sorted({str(r["fold"]) for r in sel}, key=int) + ["average"]
    for f in folds:
        row = [f if f != "average" else "**average**"]
        for m in models:
            p = paper["rows"].get(f, {}).get(m)
            row += [
                _cell(cells.get((f, m, "heldout"), [])),
                "–" if p is None else f"{p:.3f}",
                _cell(cells.get((f, m, "all_voxels"), [])),
            ]
        row += [c.cell(protocol, f) for c in others]
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _sweep_table(runs, paper, compare=()) -> tuple[list[str], dict[str, dict[int, float]]]:
    sel = [r for r in runs if r.get("protocol") == "slice_sweep"]
    if not sel:
        return [], {}
    samples = sorted({int(r["sample"]) for r in sel})
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    all_vox: dict[tuple[int, int], list[float]] = defaultdict(list)
    frac: dict[int, list[float]] = defaultdict(list)
    for r in sel:
        v = _iou(r, "heldout")
        if v is not None:
            cells[(int(r["setup"]), int(r["sample"]))].append(v)
        d = _iou(r, "all_voxels")
        if d is not None:
            all_vox[(int(r["setup"]), int(r["sample"]))].append(d)
        frac[int(r["setup"])].append(r.get("train_voxel_fraction", float("nan")))
    lines = ["### Table 2 — effect of the number of annotated slices (IoU)", ""]
    head = ["GT slices", "GT voxels ours", "GT voxels paper"]
    others = [c for c in compare if c.has("slice_sweep")]
    for s in samples:
        head += [f"S{s} ours", f"S{s} paper", f"S{s} ours, all voxels"]
        head += [f"S{s} {c.name}" for c in others]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    curve: dict[str, dict[int, float]] = {}
    for setup in sorted({int(r["setup"]) for r in sel}):
        key = str(setup)
        row = [
            paper["setups"].get(key, key),
            f"{100 * mean(frac[setup]):.1f}%",
            f"{100 * paper['gt_voxels'][key]:.1f}%" if key in paper["gt_voxels"] else "–",
        ]
        for s in samples:
            p = paper["rows"].get(key, {}).get(str(s))
            row += [
                _cell(cells.get((setup, s), [])),
                "–" if p is None else f"{p:.3f}",
                _cell(all_vox.get((setup, s), [])),
            ]
            row += [c.cell("slice_sweep", (key, str(s))) for c in others]
            if cells.get((setup, s)):
                curve.setdefault(f"S{s}", {})[setup] = mean(cells[(setup, s)])
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""], curve


def _plot(curve: dict[str, dict[int, float]], paper: dict[str, Any], out: Path) -> Path | None:
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    labels = paper["setups"]
    for i, (name, pts) in enumerate(sorted(curve.items())):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], "o-", color=f"C{i}", label=f"{name} ours")
        s = name[1:]
        ps = [(int(k), v[s]) for k, v in paper["rows"].items() if s in v]
        ax.plot(
            [p[0] for p in ps],
            [p[1] for p in ps],
            "x--",
            color=f"C{i}",
            alpha=0.6,
            label=f"{name} paper",
        )
    ax.set_xticks([int(k) for k in labels], [labels[k] for k in labels])
    ax.set_xlabel("annotated slices (yz, xz, xy)")
    ax.set_ylabel("IoU (held-out slices)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out


def build_report(paths: list[Path], out: Path, compare: list[Path] = ()) -> str:
    paper = paper_results()
    others = [Comparison.read(p, paper["slice_sweep"]["setups"]) for p in compare]
    runs = load_runs(paths)
    if not runs:
        raise SystemExit(
            f"error: no finished run (metrics.json) under {', '.join(map(str, paths))}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# sparse3d results", "", f"{len(runs)} finished runs. Paper: {paper['source']}.", ""]
    lines += [
        "Ours: IoU on the held-out slices, less the voxels where they cross training slices; "
        "all voxels: IoU on every voxel of the dense ground truth.",
        "",
    ]
    for c in others:
        lines += [f"{c.name} (held-out): the same held-out voxels, from `{c.source}`.", ""]
    legacy = sum(1 for r in runs if r.get("_legacy_heldout"))
    if legacy:
        lines += [
            f"Note: {legacy} run(s) come from an earlier version whose held-out IoU also counted "
            "the crossings with training slices.",
            "",
        ]
    lines += _protocol_table(
        runs,
        "semi_cv",
        paper["semi_cv"],
        "Table 1 — semi-automated segmentation, 3-fold cross-validation (IoU)",
        "test slices",
        others,
    )
    sweep, curve = _sweep_table(runs, paper["slice_sweep"], others)
    lines += sweep
    plot = _plot(curve, paper["slice_sweep"], out.with_suffix(".png"))
    if plot is not None:
        lines += [f"![IoU against annotated slices]({plot.name})", ""]
    lines += _protocol_table(
        runs,
        "full_auto",
        paper["full_auto"],
        "Table 3 — fully-automated segmentation, leave one volume out (IoU)",
        "test volume",
        others,
    )
    text = "\n".join(lines)
    write_text_atomic(out, text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sparse3d.report", description=__doc__)
    ap.add_argument(
        "paths", nargs="*", type=Path, default=[Path("runs")], help="run or sweep folders"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="markdown file (default: <first>/report.md)"
    )
    ap.add_argument(
        "--compare",
        nargs="*",
        type=Path,
        default=[],
        help="table files of experiments/rf_tables.py (tables_rf.md, tables_refine.md)",
    )
    a = ap.parse_args(argv)
    out = a.out or (a.paths[0] / "report.md")
    text = build_report(a.paths, out, a.compare)
    sys.stdout.write(text + f"\nwritten: {out}\n")


if __name__ == "__main__":
    main()
