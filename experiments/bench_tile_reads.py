"""Reading the refining network's training tiles at scale: through the volume's dask array
against straight from its HDF5 file, side by side.

densify's blockwise refine trains its network in the main process on random tiles of the
sparse3d volume (image and sparse label). This opens the volume as the blockwise path does
(dask chunks of one block, ``--block``), draws ``--tiles`` random tiles of ``--tile`` voxels
and reads each one through the dask array (``compute(scheduler="sync")``) and through
:class:`sparse3d.densify.network_lazy.FileDataset`, alternating for ``--rounds`` rounds; prints
milliseconds per tile and the median ratio. Volumes: ``experiments/densify_scaling.py`` builds
them (e.g. ``mni_30M_k2.h5``).

    python experiments/bench_tile_reads.py --volume /tmp/scal/mni_30M_k2.h5 --block 160,192,144
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from sparse3d.data.lazy import lazy_volume
from sparse3d.densify.network_lazy import FileDataset, _here


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume", type=Path, required=True, help="a sparse3d volume (.h5)")
    ap.add_argument("--block", type=_ints, required=True, help="densify's block z,y,x (its plan)")
    ap.add_argument("--tile", type=_ints, default=(32, 64, 64))
    ap.add_argument("--tiles", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    print(f"cpu {torch.backends.cpu.get_cpu_capability()}, bf16 flags {bf16 or 'none'}")
    lazy = lazy_volume(args.volume, chunks=args.block)
    shape = lazy.shape_zyx
    rng = np.random.default_rng(0)
    starts = [
        tuple(int(rng.integers(0, n - t + 1)) for n, t in zip(shape, args.tile, strict=True))
        for _ in range(args.tiles)
    ]
    boxes = [tuple(slice(s, s + t) for s, t in zip(st, args.tile, strict=True)) for st in starts]
    image, label = FileDataset(args.volume, "image"), FileDataset(args.volume, "label")
    ways = {
        "dask": (lambda b: _here(lazy.image[(slice(None), *b)]), lambda b: _here(lazy.label[b])),
        "file": (lambda b: image[(slice(None), *b)], lambda b: label[b]),
    }
    print(f"volume {shape}, dask chunks {lazy.image.chunksize}, tile {args.tile}")
    ms: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(args.rounds):
        for way, (read_image, read_label) in ways.items():
            t0 = time.perf_counter()
            for b in boxes:
                read_image(b)
                read_label(b)
            ms[way].append((time.perf_counter() - t0) / len(boxes) * 1e3)
            print(f"round {r + 1} {way}: {ms[way][-1]:.1f} ms per tile (image + label)")
    ratio = statistics.median(d / f for d, f in zip(ms["dask"], ms["file"], strict=True))
    print(
        f"median: dask {statistics.median(ms['dask']):.1f} ms, file "
        f"{statistics.median(ms['file']):.1f} ms per tile; file is {ratio:.1f}x faster"
    )
    image.close()
    label.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
