"""Plain-text tables of a summary.json."""
from __future__ import annotations


def _fmt(v) -> str:
    if v is None:
        return "-"
    try:
        return f"{float(v):.4f}" if float(v) == float(v) else "nan"
    except (TypeError, ValueError):
        return str(v)


def format_summary(summary: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'label':>10s} {'Dice':>8s} {'IoU':>8s} {'HD95 mm':>9s} {'NSD':>8s}")
    rows = list(summary["mean"].items()) + [("fg mean", summary["foreground_mean"])]
    for key, m in rows:
        lines.append(f"{str(key):>10s} {_fmt(m['Dice']):>8s} {_fmt(m['IoU']):>8s} {_fmt(m.get('HD95')):>9s} "
                     f"{_fmt(m.get('NSD')):>8s}")
    unc = summary.get("uncertainty")
    if unc:
        lines.append(f"uncertainty: ECE {_fmt(unc.get('ECE'))}  Brier {_fmt(unc.get('Brier'))}  "
                     f"AUROC(uncertainty vs error) {_fmt(unc.get('AUROC_uncertainty_vs_error'))} "
                     f"(1000 bins: {_fmt(unc.get('AUROC_binned_1000'))})  AURC {_fmt(unc.get('AURC'))} "
                     f"(oracle {_fmt(unc.get('AURC_optimal'))})  within predicted label, mean "
                     f"{_fmt(unc.get('AUROC_within_label_mean'))}  ({unc.get('n_cases')} cases)")
        dice = unc.get("uncertainty_error_dice")
        if dice:
            lines.append(f"uncertainty > {unc.get('uncertainty_threshold')} vs errors, Dice per label: "
                         + "  ".join(f"{k}: {_fmt(v)}" for k, v in dice.items()))
    return "\n".join(lines)
