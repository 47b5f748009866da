"""The report's pictures, drawn with matplotlib from the pipeline's artifacts and saved as SVG beside the report.

SVG with text kept as text: small files that diff in git and render in any browser and on GitHub. The files are
byte-identical for the same inputs (fixed ids, no date), so `dvc repro` reruns change them only when a number does.
"""
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from qlora_nli.analysis.calibration import label_probabilities, reliability_bins
from qlora_nli.prompts import LABELS

MODELS = (("baseline", "pretrained (zero-shot)"), ("finetuned", "fine-tuned (QLoRA)"))
COLORS = {"baseline": "#7f7f7f", "finetuned": "#1f77b4"}
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "qlora-nli", "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False}


def svg(fig):
    """The figure as SVG text, without the creation date (the same bytes for the same figure)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buffer.getvalue()


def training_curves(train):
    """Training and validation loss per epoch, and the validation accuracy beside them."""
    epochs = np.arange(1, len(train["train_loss_per_epoch"]) + 1)
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(8, 3))
    loss.plot(epochs, train["train_loss_per_epoch"], "o-", label="training loss")
    loss.plot(epochs, train["val_loss_per_epoch"], "s-", label="validation loss")
    loss.set(xlabel="epoch", ylabel="loss per answer token", xticks=epochs, title="Loss")
    loss.legend(frameon=False)
    acc.plot(epochs, train["val_accuracy_per_epoch"], "o-", color=COLORS["finetuned"])
    acc.set(xlabel="epoch", ylabel="accuracy", xticks=epochs, ylim=(0, 1), title="Validation accuracy")
    return svg(fig)


def confusion_matrices(metrics):
    """Both models' confusion matrices (rows gold, columns predicted), counts written in the cells."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, (name, title) in zip(axes, MODELS):
        matrix = np.array(metrics[name]["confusion_matrix"])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), n in np.ndenumerate(matrix):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
        ax.set(xticks=range(len(LABELS)), yticks=range(len(LABELS)), xticklabels=LABELS, yticklabels=LABELS,
               xlabel="predicted", ylabel="gold", title=title)
    return svg(fig)


def reliability_diagrams(metrics, predictions):
    """Accuracy against mean confidence per bin on the test pairs, before and after the temperature fitted on the
    validation pairs, one panel per model; the diagonal is perfect calibration."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), sharey=True)
    for ax, (name, title) in zip(axes, MODELS):
        calibration = metrics[name]["calibration"]
        rows = predictions[name]
        scores, correct = [r["scores"] for r in rows], [r["correct"] for r in rows]
        ax.plot([0, 1], [0, 1], ":", color="black", linewidth=0.8)
        for temperature, style, label in ((1.0, "o-", "as scored"),
                                          (calibration["temperature"], "s--", "after temperature")):
            confidence = label_probabilities(scores, temperature).max(axis=1)
            bins = [b for b in reliability_bins(confidence, correct, calibration["n_bins"]) if b["n"]]
            ece = calibration["ece"] if temperature == 1.0 else calibration["ece_after_temperature"]
            ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], style,
                    label=f"{label} (ECE {100 * ece:.1f}%)")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean confidence", title=title)
        ax.legend(frameon=False, loc="upper left")
    axes[0].set_ylabel("accuracy")
    return svg(fig)


def accuracies(metrics, sets):
    """Accuracy with its Wilson 95% interval for the test pairs and every extra set, both models."""
    names = ["SNLI test", *sets]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.7 * len(names)))
    for offset, (name, title) in zip((0.15, -0.15), MODELS):
        docs = [metrics[name], *(sets[s][name] for s in sets)]
        y = np.arange(len(names))[::-1] + offset
        acc = np.array([d["accuracy"] for d in docs])
        lo, hi = np.array([d["accuracy_ci95"] for d in docs]).T
        ax.errorbar(acc, y, xerr=[acc - lo, hi - acc], fmt="o", capsize=3, color=COLORS[name], label=title)
        for x, yy, d in zip(acc, y, docs):
            ax.annotate(f"{100 * x:.1f}% (n={d['n']})", (x, yy), xytext=(0, 6), textcoords="offset points",
                        ha="center", fontsize=7)
    ax.axvline(1 / len(LABELS), color="black", linestyle=":", linewidth=0.8)
    ax.set(yticks=np.arange(len(names))[::-1], yticklabels=names, xlim=(0, 1), xlabel="accuracy (Wilson 95% CI; "
           "dotted: chance)")
    ax.legend(frameon=False, loc="lower right")
    return svg(fig)


def probe_flips(metrics):
    """Per probe, the share of the pairs a model got right on the original that it gets wrong on the probe."""
    probes = list(dict.fromkeys([*metrics["baseline"]["probes"], *metrics["finetuned"]["probes"]]))
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.6 * len(probes)))
    y = np.arange(len(probes))[::-1]
    for offset, (name, title) in zip((0.18, -0.18), MODELS):
        stats = [metrics[name]["probes"].get(p) or {} for p in probes]
        share = [s["flipped_when_original_right"] / s["original_right"] if s.get("original_right") else 0.0
                 for s in stats]
        bars = ax.barh(y + offset, share, height=0.35, color=COLORS[name], label=title)
        for bar, s in zip(bars, stats):
            ax.annotate(f"{s.get('flipped_when_original_right', 0)} / {s.get('original_right', 0)}",
                        (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
    ax.set(yticks=y, yticklabels=probes, xlim=(0, 1), xlabel="right on the original pair, wrong on the probe")
    ax.legend(frameon=False, loc="lower right")
    return svg(fig)


def report_figures(art, predictions):
    """{file name: SVG text} of every figure the report shows; `art` as stages.report loads it."""
    metrics = {"baseline": art["baseline"], "finetuned": art["finetuned"]}
    with plt.rc_context(STYLE):
        figures = {"training.svg": training_curves(art["train"]),
                   "confusion.svg": confusion_matrices(metrics),
                   "accuracy.svg": accuracies(metrics, art["sets"])}
        if metrics["baseline"].get("calibration") and metrics["finetuned"].get("calibration"):
            figures["reliability.svg"] = reliability_diagrams(metrics, predictions)
        if metrics["baseline"]["probes"] or metrics["finetuned"]["probes"]:
            figures["probes.svg"] = probe_flips(metrics)
    return figures


def write_figures(folder, figures):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in figures.items():
        (folder / name).write_text(text)
