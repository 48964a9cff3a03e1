"""diffnnunet_ensemble: nnU-Net's ensemble of prediction folders (the mean of the members' probabilities) that keeps
the uncertainty: one pooled CASE_uncertainty map per case, the members' maps plus their disagreement (the formula in
diffnnunet/inference/ensembling.py and documentation/which_method.md). With --error_map (the ensemble's
error_map.json that diffnnunet_find_best_configuration fits) the map is recalibrated into the estimated probability
that the ensemble's label is wrong; without it, it is a ranking score in [0, 1]."""
from __future__ import annotations

import argparse
import os

from diffnnunet.cli.common import UserError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffnnunet_ensemble", description=__doc__, allow_abbrev=False)
    p.add_argument("-i", nargs="+", required=True,
                   help="prediction folders of the members, each written by diffnnunet_predict with "
                        "--save_probabilities (and --save_uncertainty for their own maps)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-np", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 2)),
                   help="processes (1: all in this process)")
    p.add_argument("--save_npz", action="store_true", help="also write the mean probabilities (.npz/.pkl)")
    p.add_argument("--error_map", default=None, metavar="FILE",
                   help="the ensemble's error map (error_map.json in its folder under nnUNet_results/DatasetXXX/"
                        "ensembles, written by diffnnunet_find_best_configuration): the written map becomes the "
                        "estimated P(wrong label); without it the pooled map is a ranking score")
    return p


@cli_entry("diffnnunet_ensemble")
def main(argv=None):
    from diffnnunet.inference.ensembling import ensemble_prediction_folders, load_error_map

    args = build_parser().parse_args(argv)
    if os.path.abspath(args.o) in {os.path.abspath(f) for f in args.i}:
        raise UserError(f"-o {args.o}: the output folder must not be one of the members")
    try:
        error_map = None if args.error_map is None else load_error_map(args.error_map)  # before writing anything
        cases = ensemble_prediction_folders(args.i, args.o, args.save_npz, args.np, error_map)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    what = "P(wrong label) map" if error_map else "pooled uncertainty map"
    print(f"ensembled {len(cases)} case(s) of {len(args.i)} members into {args.o} (segmentation, "
          f"{what}{', probabilities' if args.save_npz else ''})")


if __name__ == "__main__":
    main()
