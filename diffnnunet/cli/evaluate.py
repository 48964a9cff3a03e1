"""diffnnunet_evaluate: Dice, IoU, HD95, NSD per case and label, and uncertainty quality, in nnU-Net's schema."""
from __future__ import annotations

import argparse
import os

from diffnnunet.cli.common import UserError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffnnunet_evaluate", description=__doc__, allow_abbrev=False)
    p.add_argument("-ref", required=True, help="folder of reference segmentations")
    p.add_argument("-pred", required=True, help="folder of predictions (CASE_uncertainty / CASE.npz are used "
                                                "for uncertainty quality when present)")
    p.add_argument("-djfile", required=True, help="dataset.json (labels, regions, file_ending)")
    p.add_argument("-o", default=None, help="output json (default: PRED/summary.json)")
    p.add_argument("-np", type=int, default=2, help="processes")
    p.add_argument("--nsd_tolerance", default="2.0",
                   help="NSD tolerance in mm: one number for all labels, or 'default=2,1=1.5,2=3' per label key "
                        "(keys as in summary.json, e.g. 1 or (1, 2))")
    p.add_argument("--chill", action="store_true", help="do not require a prediction for every reference")
    p.add_argument("--plots", action="store_true",
                   help="also write reliability.png (from CASE.npz) and risk_coverage.png (from the uncertainty) "
                        "beside the output json")
    return p


def parse_tolerance(text: str):
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for part in text.split(";" if ";" in text else ","):
            key, value = part.rsplit("=", 1)
            out[key.strip()] = float(value)
        return out
    except ValueError:
        raise UserError(f"--nsd_tolerance '{text}': expected a number or KEY=MM pairs") from None


@cli_entry("diffnnunet_evaluate")
def main(argv=None):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from diffnnunet.cli.checks import load_dataset_json
    from diffnnunet.evaluation import evaluate_folder
    from diffnnunet.evaluation.report import format_summary

    args = build_parser().parse_args(argv)
    for folder in (args.ref, args.pred):
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: folder not found")
    dj = load_dataset_json(args.djfile)
    lm = LabelManager(dj["labels"], regions_class_order=dj.get("regions_class_order"))
    labels = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    ending = dj["file_ending"]
    examples = [f for f in os.listdir(args.ref) if f.endswith(ending)]
    if not examples:
        raise UserError(f"{args.ref}: no reference files ending with {ending}")
    rw = determine_reader_writer_from_dataset_json(dj, os.path.join(args.ref, examples[0]),
                                                   allow_nonmatching_filename=True, verbose=False)()
    output = args.o or os.path.join(args.pred, "summary.json")
    try:
        summary = evaluate_folder(args.ref, args.pred, output, rw, ending, labels, lm.ignore_label, args.np,
                                  parse_tolerance(args.nsd_tolerance), lm.has_regions, chill=args.chill,
                                  plots=args.plots)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    print(format_summary(summary))
    print(f"written: {output}")
    if args.plots:
        written = (summary.get("uncertainty") or {}).get("plots") or []
        folder = os.path.dirname(os.path.abspath(output))
        print("plots: " + (", ".join(os.path.join(folder, f) for f in written) if written else
                           f"none (no CASE.npz or CASE_uncertainty{ending} in {args.pred})"))


if __name__ == "__main__":
    main()
