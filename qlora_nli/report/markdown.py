"""Markdown formatting shared by the report stages: one way to print a number, so reports match the metrics files."""
from qlora_nli.analysis.features import error_change


def pct(x):
    """A fraction stored with 4 decimals, as a percentage that keeps all of them: 0.6234 -> 62.34%."""
    return "n/a" if x is None else f"{100 * x:.2f}%"


def pp(x):
    """A difference of fractions in percentage points, signed: 0.05 -> +5.00 pp."""
    return f"{100 * x:+.2f} pp"


def ci(interval, fmt=pct):
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"


def pvalue(p):
    return f"{p:.4g}"  # stored with 4 significant digits; a tiny p stays visible as 1.2e-07


def table(headers, rows):
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def slice_table(slices):
    """Error rates by feature slice (rows of features.error_rates_by_slice), baseline vs fine-tuned."""
    rows = [(s["slice"], s["value"], s["n"], pct(s["baseline_error"]), pct(s["finetuned_error"]),
             pp(error_change(s))) for s in slices]
    return table(["slice", "value", "pairs", "baseline error", "fine-tuned error", "change"], rows)


def confusion_matrix(matrix, labels):
    """Rows are gold labels, columns predicted labels; unparseable outputs are not in the matrix."""
    return table(["gold \\ predicted", *labels], [(g, *row) for g, row in zip(labels, matrix)])
