"""What every entry point shares: one-line errors, dataset/folder resolution, process counts."""
from __future__ import annotations

import functools
import os
import sys
import traceback


class UserError(Exception):
    """A problem with the user's input; printed as one line naming the file or value and the problem."""


def cli_entry(prog: str):
    """Decorate ``main(argv)``: errors become ``prog: error: ...`` on stderr and a non-zero exit; set
    ``DIFFNNUNET_DEBUG=1`` for the full traceback."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            os.environ.setdefault("nnUNet_def_n_proc", "2")
            os.environ.setdefault("nnUNet_n_proc_DA", "2")
            try:
                main(argv)
            except SystemExit:
                raise
            except KeyboardInterrupt:
                print(f"{prog}: interrupted (train resumes with --continue, predict with --continue_prediction)",
                      file=sys.stderr)
                sys.exit(130)
            except UserError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                sys.exit(2)
            except Exception as e:  # noqa: BLE001 - the CLI boundary: one line instead of a wall of traceback
                if os.environ.get("DIFFNNUNET_DEBUG"):
                    traceback.print_exc()
                msg = " ".join(str(e).split()) or "(no message)"
                print(f"{prog}: error: {type(e).__name__}: {msg}", file=sys.stderr)
                sys.exit(1)
        return run
    return wrap


def require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise UserError(f"environment variable {name} is not set (see documentation/getting_started.md)")
    return value


def resolve_dataset_name(dataset: str) -> str:
    """Dataset ID ('801', '1') or full name ('Dataset801_Foo') -> full name, searched in raw and preprocessed."""
    roots = [os.environ.get(v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")]
    roots = [r for r in roots if r and os.path.isdir(r)]
    if dataset.startswith("Dataset"):
        if any(os.path.isdir(os.path.join(r, dataset)) for r in roots):
            return dataset
        raise UserError(f"dataset '{dataset}' not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results")
    try:
        did = int(dataset)
    except ValueError:
        raise UserError(f"dataset '{dataset}' is neither an integer ID nor a name starting with 'Dataset'") from None
    prefix = f"Dataset{did:03d}_"
    for r in roots:
        hits = sorted(d for d in os.listdir(r) if d.startswith(prefix) and os.path.isdir(os.path.join(r, d)))
        if len(hits) > 1:
            raise UserError(f"dataset ID {did} is ambiguous in {r}: {', '.join(hits)}")
        if hits:
            return hits[0]
    raise UserError(f"dataset ID {did} not found (no {prefix}* folder in nnUNet_raw, nnUNet_preprocessed or "
                    "nnUNet_results)")


def parse_device(name: str):
    from diffnnunet.utils import resolve_device
    try:
        return resolve_device(name)
    except RuntimeError as e:
        raise UserError(str(e)) from None
