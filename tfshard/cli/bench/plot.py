"""Suite `plot`: PNG charts (matplotlib, imported only here) of the JSON files the suites wrote.

Charts go into docs/images/ by default; x labels are fitted so that they never
overlap (`fit_labels`).
"""

import json
import textwrap
from pathlib import Path

from tfshard.cli.bench import common

#: Room left between two x labels, in points.
LABEL_GAP_POINTS = 3


def suite_plot(args):
    """PNG charts of bench-results JSON files (forward/predict, comm, generate, load)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench.py plot needs matplotlib: .venv/bin/pip install matplotlib "
                         "(or pip install -e '.[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.files:
        data = json.loads(Path(path).read_text())
        stem, runs = Path(path).stem, data["runs"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        if stem.startswith(("forward", "predict")):
            names = list(runs)
            tps = [r["tokens"] / r["seconds"] for r in runs.values()]
            bars = ax.bar(names, tps, color=["#888"] + ["#3a7"] * (len(names) - 1))
            for bar, v, r in zip(bars, tps, runs.values()):
                ax.annotate(f"{r.get('ratio', v / tps[0]):.2f}x",
                            (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
            ax.set_ylabel("tokens/s")
            ax.set_ylim(0, max(tps) * 1.2)
            a = data["args"]
            ax.set_title(f"{a['model']}: {a['rows']}x{a['seq_len']} tokens, batch "
                         f"{a['batch_size']} (ratio to unsharded, same run)")
        elif stem.startswith("comm"):
            # The collectives every backend ran (the MPI run adds a numpy_function row).
            labels = [n for n in next(iter(runs.values()))["collectives"]
                      if all(n in r["collectives"] for r in runs.values())]
            width = 0.8 / len(runs)
            for i, (backend, r) in enumerate(runs.items()):
                ax.bar([j + i * width for j in range(len(labels))],
                       [1e3 * r["collectives"][n]["ms"] for n in labels], width, label=backend)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))],
                          [n.replace(" [", "\n[") for n in labels], fontsize=7)
            ax.set_ylabel("µs per collective")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
            ax.set_title("one collective, float32 (median of chains in one tf.function)")
        elif stem.startswith("generate"):
            names = list(runs)
            ax.bar(names, [r["decode_ms"] for r in runs.values()], color="#37a")
            ax.tick_params(axis="x", labelsize=7)
            ax.set_ylabel("decode ms/token")
            ax.set_title(f"generate: {stem.split('-')[1]} (lower is better)")
        elif stem.startswith("load"):
            for label, rows in runs.items():
                ax.bar([f"{n}\n{label}" for n in rows], [r["rise_mib"] for r in rows.values()])
            ax.set_ylabel("peak RSS rise, MiB (worst rank)")
            ax.tick_params(axis="x", labelsize=6)
        else:
            plt.close(fig)
            continue
        fit_labels(fig, ax)
        target = out / f"{stem.rsplit('-', 2)[0]}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        print(f"wrote {target}")


def fit_labels(fig, ax):
    """Lays out a bar chart's x labels so that no two overlap, and the figure around them.

    Each label line is wrapped at its spaces to the width of its bar's slot; if two
    labels still overlap (a long word), they are turned 30 degrees (right-aligned at
    their tick, unwrapped), then 90; then made smaller, down to 4 points. Every step is measured on
    the drawn figure (`tight_layout` included), so the result holds for any number and
    length of labels.

    Args:
        fig: the matplotlib figure.
        ax: its axes, bars and labels drawn.
    """
    fig.tight_layout()
    fig.canvas.draw()
    labels = ax.get_xticklabels()
    texts = [t.get_text() for t in labels]
    if not any(texts):
        return
    ticks, size = ax.get_xticks(), labels[0].get_fontsize()
    slot = ax.get_window_extent().width / len(texts)
    chars = max(4, int(slot / (0.6 * size * fig.dpi / 72)))  # ~0.6 em per character
    wrapped = ["\n".join(textwrap.fill(line, chars, break_long_words=False,
                                       break_on_hyphens=False) or line
                         for line in text.split("\n")) for text in texts]
    # Turned labels keep their own lines: wrapping only widens them on the x axis.
    for lines, rotation, align in ((wrapped, 0, "center"), (texts, 30, "right"),
                                   (texts, 90, "center")):
        ax.set_xticks(ticks, lines, fontsize=size, rotation=rotation, ha=align,
                      rotation_mode="anchor" if rotation == 30 else "default")
        if not _labels_overlap(fig, ax):
            break
    else:
        while size > 4 and _labels_overlap(fig, ax):
            size -= 1
            ax.set_xticks(ticks, texts, fontsize=size, rotation=90, ha="center")
    _room_for_labels(fig, ax)


def _room_for_labels(fig, ax):
    """Makes the figure taller by what its x labels take beyond a line of text, so that
    turned or wrapped labels do not squeeze the bars (the labels' widths do not change)."""
    renderer = fig.canvas.get_renderer()
    tallest = max(t.get_window_extent(renderer).height for t in ax.get_xticklabels())
    extra = tallest - 2 * ax.get_xticklabels()[0].get_fontsize() * fig.dpi / 72
    if extra > 0:
        fig.set_figheight(fig.get_figheight() + extra / fig.dpi)
        fig.tight_layout()


def _labels_overlap(fig, ax):
    """Whether two x labels overlap (or come closer than `LABEL_GAP_POINTS`), laid out."""
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    gap = LABEL_GAP_POINTS * fig.dpi / 72
    boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()),
                   key=lambda box: box.x0)
    return any(left.x1 + gap > right.x0 for left, right in zip(boxes, boxes[1:]))


def add_parsers(sub):
    """Adds the suite `plot` to the benchmarks' subcommands."""
    p = common.add_commands(sub, {"plot": suite_plot},
                            help="PNG charts of bench-results/*.json (needs matplotlib)")["plot"]
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default=str(common.ROOT / "docs" / "images"))
