"""diffnnunet_ensemble: nnU-Net's ensemble of prediction folders (the mean of the members' probabilities) that keeps
the uncertainty: one pooled CASE_uncertainty map per case, the members' maps plus their disagreement (the formula in
diffnnunet/inference/ensembling.py and documentation/which_method.md)."""
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
    return p


@cli_entry("diffnnunet_ensemble")
def main(argv=None):
    from diffnnunet.inference.ensembling import ensemble_prediction_folders

    args = build_parser().parse_args(argv)
    if os.path.abspath(args.o) in {os.path.abspath(f) for f in args.i}:
        raise UserError(f"-o {args.o}: the output folder must not be one of the members")
    try:
        cases = ensemble_prediction_folders(args.i, args.o, args.save_npz, args.np)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    print(f"ensembled {len(cases)} case(s) of {len(args.i)} members into {args.o} (segmentation, pooled "
          f"uncertainty map{', probabilities' if args.save_npz else ''})")


if __name__ == "__main__":
    main()
