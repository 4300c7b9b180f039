"""Plot logged figures of several runs against the iteration, one panel per figure, as a PNG.

    python launch/plot_curves.py runs/long="no Gram anchoring" runs/long_gram="Gram anchoring from 900" \
        --out docs/figures/gram/gram.png --keys knn_top1 segmentation_miou

(the runs come before ``--keys``, which takes every word after it)

Each run is ``DIR`` or ``DIR=LABEL``; its ``metrics.jsonl`` is read (the last row of an iteration wins, as a
resumed run logs again what followed its checkpoint). Rows without a key are skipped for that key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curves(run_dir: Path, keys: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """``key -> (iterations, values)`` from ``run_dir/metrics.jsonl``."""
    last: dict[str, dict[int, float]] = {key: {} for key in keys}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in keys:
            if key in row:
                last[key][row["iteration"]] = row[key]
    return {key: (sorted(values), [values[it] for it in sorted(values)]) for key, values in last.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="Plot metrics.jsonl figures of runs against the iteration.")
    parser.add_argument("runs", nargs="+", metavar="DIR[=LABEL]", help="training output folders, optionally labelled")
    parser.add_argument("--keys", nargs="+", required=True, help="metrics.jsonl keys, one panel each")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="", help="a title above the panels")
    args = parser.parse_args()

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, len(args.keys), figsize=(4.5 * len(args.keys), 3.4), squeeze=False)
    for spec in args.runs:
        directory, _, label = spec.partition("=")
        for axis, (key, (iterations, values)) in zip(axes[0], curves(Path(directory), args.keys).items()):
            axis.plot(iterations, values, marker="o", markersize=3, label=label or directory)
    for axis, key in zip(axes[0], args.keys):
        axis.set_xlabel("iteration")
        axis.set_title(key)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if args.title:
        figure.suptitle(args.title, fontsize=10)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
