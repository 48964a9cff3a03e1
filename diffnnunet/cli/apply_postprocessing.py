"""diffnnunet_apply_postprocessing: nnU-Net's nnUNetv2_apply_postprocessing for diffnnunet's prediction folders.

nnU-Net's command lists every file with the segmentation's ending, so it would read CASE_uncertainty maps as
segmentations and write them back as label images. This wrapper runs nnU-Net's ``apply_postprocessing_to_folder``
on the segmentations only and copies each CASE_uncertainty map unchanged beside its postprocessed segmentation
(a voxel that the postprocessing sets to background keeps its map value), plus dataset.json and plans.json.
"""
from __future__ import annotations

import argparse
import os
import shutil

from diffnnunet.cli.common import UserError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffnnunet_apply_postprocessing", description=__doc__, allow_abbrev=False)
    p.add_argument("-i", required=True, help="input folder (predictions)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-pp_pkl_file", required=True, help="postprocessing.pkl (diffnnunet_find_best_configuration)")
    p.add_argument("-np", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 2)),
                   help="processes (1: all in this process)")
    p.add_argument("-plans_json", default=None, help="plans file (default: INPUT/plans.json)")
    p.add_argument("-dataset_json", default=None, help="dataset.json (default: INPUT/dataset.json)")
    return p


@cli_entry("diffnnunet_apply_postprocessing")
def main(argv=None):
    from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle, subfiles
    from nnunetv2.postprocessing import remove_connected_components as module

    from diffnnunet.inference.ensembling import (
        SerialMultiprocessing,
        case_files,
        uncertainty_file,
        without_uncertainty_maps,
    )
    from diffnnunet.utils import atomic_outputs, partial_path, swapped

    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.i):
        raise UserError(f"{args.i}: folder not found")
    if os.path.abspath(args.i) == os.path.abspath(args.o):
        raise UserError(f"-o {args.o}: write the postprocessed files to another folder than the input")
    if not os.path.isfile(args.pp_pkl_file):
        raise UserError(f"{args.pp_pkl_file}: postprocessing file not found")
    dataset_json = args.dataset_json or os.path.join(args.i, "dataset.json")
    plans_json = args.plans_json or os.path.join(args.i, "plans.json")
    for path in (dataset_json, plans_json):
        if not os.path.isfile(path):
            raise UserError(f"{path}: not found (give -plans_json / -dataset_json of one of the models)")
    ending = load_json(dataset_json)["file_ending"]
    segs = case_files(args.i, ending)
    if not segs:
        raise UserError(f"{args.i}: no segmentation ending with {ending}")
    pp_fns, pp_fn_kwargs = load_pickle(args.pp_pkl_file)
    pool = swapped(module, "multiprocessing", SerialMultiprocessing()) if args.np <= 1 else None
    with swapped(module, "subfiles", without_uncertainty_maps(subfiles)):
        if pool is None:
            module.apply_postprocessing_to_folder(args.i, args.o, pp_fns, pp_fn_kwargs, plans_json, dataset_json,
                                                  args.np)
        else:
            with pool:
                module.apply_postprocessing_to_folder(args.i, args.o, pp_fns, pp_fn_kwargs, plans_json,
                                                      dataset_json, 1)
    extras = [p for p in (uncertainty_file(os.path.join(args.i, s[: -len(ending)]), ending) for s in segs)
              if os.path.isfile(p)]
    with atomic_outputs() as written:
        for src in extras + [dataset_json, plans_json]:
            written.append(os.path.join(args.o, os.path.basename(src)))
            shutil.copy(src, partial_path(written[-1]))
    copied = len(extras)
    applied = ", ".join(f.__name__ for f in pp_fns) or "nothing to apply: copies"
    print(f"postprocessed {len(segs)} case(s) into {args.o} ({applied}); {copied} uncertainty map(s) copied "
          "unchanged")


if __name__ == "__main__":
    main()
