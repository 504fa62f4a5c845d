"""The markdown report of the densify benchmark (layer 3): cases, methods, every run, the pivot
of mean IoU on unannotated voxels and, when a method is labelled ``rf``, every method's margin
over it; rendered from the records of ``<out>/results.jsonl`` (:mod:`sparse3d.bench.runs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sparse3d.atomic import write_text_atomic
from sparse3d.bench.runs import _read_json, environment, read_results, run_key


def _fmt(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return "–" if not np.isfinite(f) else f"{f:.{digits}f}"


def _mean_of(summary: dict[str, Any] | None) -> float:
    from sparse3d.metrics import summary_mean

    return summary_mean(summary)


def _latest(records: list[dict[str, Any]]) -> dict[tuple[str, int, str, str], dict[str, Any]]:
    """The last record of every run key, in file order of their first appearance."""
    latest: dict[tuple[str, int, str, str], dict[str, Any]] = {}
    for rec in records:
        latest[run_key(rec)] = rec
    return latest


def _case_rows(out: Path, cases: list[str]) -> list[str]:
    rows = [
        "| case | shape z×y×x | voxels | voxel µm z,y,x | classes (fraction of voxels) | source |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        infos = sorted((out / "cases").glob(f"{case}_k*.json"))
        info = _read_json(infos[0]) if infos else None
        if info is None:
            continue
        fractions = info["class_fractions"]
        classes = ", ".join(f"{c} {fractions[c]:.1%}" for c in info["class_names"])
        shape = "×".join(str(s) for s in info["shape_zyx"])
        voxel = ", ".join(f"{v:g}" for v in info["voxel_size_zyx_um"])
        rows.append(
            f"| {case} | {shape} | {info['voxels']:,} | {voxel} | {classes} | "
            f"{info['description']} |"
        )
    return rows


def _run_rows(latest: list[dict[str, Any]], cases: list[str], labels: list[str]) -> list[str]:
    """The rows of "Every run": one per latest record, by case, k and method."""
    from sparse3d.metrics import summary_class_iou

    lines = []
    order = {c: i for i, c in enumerate(cases)}
    by_label = {lab: i for i, lab in enumerate(labels)}
    for r in sorted(latest, key=lambda r: (order[r["case"]], int(r["k"]), by_label[r["label"]])):
        if r.get("status") != "ok":
            err = str(r.get("error") or "").replace("|", "\\|")[:160]
            lines.append(
                f"| {r['case']} | {r['k']} | {r['label']} | | failed: {err} | | | "
                f"{_fmt(r.get('wall_s'), 0)} | {_fmt(r.get('peak_rss_gib'), 2)} |"
            )
            continue
        un = r.get("unannotated") or {}
        per_class = summary_class_iou(un)
        names = r.get("class_names") or list(per_class)
        per = ", ".join(f"{n} {_fmt(per_class.get(n))}" for n in names)
        lines.append(
            f"| {r['case']} | {r['k']} | {r['label']} | {_fmt(100 * r['annotated_fraction'], 1)}% "
            f"| {_fmt(_mean_of(un))} | {per} | {_fmt(_mean_of(r.get('all_voxels') or {}))} "
            f"| {_fmt(r.get('wall_s'), 0)} | {_fmt(r.get('peak_rss_gib'), 2)} |"
        )
    return lines


def _margin_rows(
    cell: dict[tuple[str, int, str], float], rows: list[tuple[str, int]], labels: list[str]
) -> list[str]:
    """The section "Margin over rf" (empty without an ``rf`` method or without another one)."""
    others = [lab for lab in labels if lab != "rf"]
    if "rf" not in labels or not others:
        return []
    lines = [
        "",
        "## Margin over rf (mean IoU on unannotated voxels, method − rf)",
        "",
        "| case | k | " + " | ".join(others) + " |",
        "|---|---|" + "---|" * len(others),
    ]
    margins: dict[str, list[float]] = {lab: [] for lab in others}
    for c, k in rows:
        base = cell.get((c, k, "rf"))
        vals = []
        for lab in others:
            v = cell.get((c, k, lab))
            if base is None or v is None or not (np.isfinite(base) and np.isfinite(v)):
                vals.append("–")
                continue
            margins[lab].append(v - base)
            vals.append(f"{v - base:+.3f}")
        lines.append(f"| {c} | {k} | " + " | ".join(vals) + " |")
    means = [f"{np.mean(m):+.3f}" if m else "–" for m in margins.values()]
    lines.append("| **mean** | | " + " | ".join(means) + " |")
    return lines


def _pivot_rows(latest: list[dict[str, Any]], cases: list[str], labels: list[str]) -> list[str]:
    """The sections "Mean IoU on unannotated voxels" (rows case/k, columns methods) and the
    margin over rf, from the latest finished run per (case, k, label)."""
    ks = sorted({int(r["k"]) for r in latest})
    cell: dict[tuple[str, int, str], float] = {}
    for r in latest:
        if r.get("status") == "ok":
            cell[(r["case"], int(r["k"]), r["label"])] = _mean_of(r.get("unannotated") or {})
    lines = [
        "",
        "## Mean IoU on unannotated voxels",
        "",
        "| case | k | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    rows = [(c, k) for c in cases for k in ks if any((c, k, lab) in cell for lab in labels)]
    for c, k in rows:
        vals = [_fmt(cell.get((c, k, lab))) for lab in labels]
        lines.append(f"| {c} | {k} | " + " | ".join(vals) + " |")
    return lines + _margin_rows(cell, rows, labels)


def render_table(out: Path, records: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """The markdown report of ``records`` (latest record per run)."""
    latest = list(_latest(records).values())
    cases = list(dict.fromkeys(r["case"] for r in latest))
    labels = list(dict.fromkeys(r["label"] for r in latest))
    lines = [
        "# Densify benchmark: dense segmentation from k annotated planes per axis",
        "",
        f"`python -m sparse3d.bench` — torch.backends.cpu.get_cpu_capability() "
        f"`{env['cpu_capability']}`, nproc {env['nproc']}, {env['date']}, commit "
        f"`{env['commit']}`.",
        "",
        "IoU = TP / (TP + FP + FN) per class; *unannotated*: voxels off the annotated planes "
        "(what densify has to infer), *all*: every voxel. Wall time and peak resident memory "
        "are of the whole densify process (training, prediction, writing).",
        "",
        "## Cases",
        "",
        *_case_rows(out, cases),
        "",
        "## Methods",
        "",
        "| label | densify overrides |",
        "|---|---|",
    ]
    pairs = dict.fromkeys((r["label"], r["overrides"]) for r in latest)
    lines += [f"| {lab} | `{ovr}` |" if ovr else f"| {lab} | (defaults) |" for lab, ovr in pairs]
    lines += [
        "",
        "## Every run",
        "",
        "| case | k | method | annotated | mean IoU unannotated | per class (unannotated) "
        "| mean IoU all | wall s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _run_rows(latest, cases, labels)
    lines += _pivot_rows(latest, cases, labels)
    return "\n".join(lines) + "\n"


def write_table(out: Path, table: Path, env: dict[str, Any] | None = None) -> Path:
    """Write the markdown report of ``<out>/results.jsonl`` to ``table`` (atomically)."""
    records = read_results(out)
    text = render_table(out, records, env or environment())
    return write_text_atomic(table, text)
