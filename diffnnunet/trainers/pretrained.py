"""``diffnnunet_train -pretrained_weights FILE``: fine-tuning with nnU-Net's semantics, loaded safely.

As nnU-Net's ``load_pretrained_weights``: every weight of the network is taken from the checkpoint's
``network_weights`` under the same name and shape, except nnU-Net's segmentation output layers (``.seg_layers.``),
which a stock network re-learns for another label set. A diffusion method's label channels enter its input as well
as its output, so its pretrained weights must come from a run of the same method and plans (same labels); the
weights taken are those it predicts with (the EMA weights where the run kept an EMA), and the new run's EMA starts
from them. Unlike nnU-Net's loader the file is read with ``weights_only=True``.
"""
from __future__ import annotations

from diffnnunet.trainers.checkpointing import unwrapped
from diffnnunet.utils import load_checkpoint_safely

#: weights never transferred (nnU-Net's rule: the stock network's segmentation output layers)
SKIPPED = (".seg_layers.",)


def load_pretrained_weights(trainer, path: str) -> int:
    """Initialise ``trainer`` (if needed) and copy the checkpoint's weights into its network (module docstring);
    returns the number of tensors copied. Raises ValueError naming the file and the first weight that is missing
    or has another shape."""
    if not trainer.was_initialized:
        trainer.initialize()
    stored = load_checkpoint_safely(path)["network_weights"]
    stored = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in stored.items()}
    network = unwrapped(trainer.network)
    own = network.state_dict()
    taken = {}
    for key, value in own.items():
        if any(s in key for s in SKIPPED):
            continue
        if key not in stored:
            raise ValueError(f"{path}: pretrained weights have no '{key}' (they must come from a run of the same "
                             "method and plans)")
        if stored[key].shape != value.shape:
            raise ValueError(f"{path}: pretrained '{key}' has shape {tuple(stored[key].shape)}, this network "
                             f"{tuple(value.shape)} (another label set, topology or method?)")
        taken[key] = stored[key]
    network.load_state_dict({**own, **taken})
    ema = getattr(trainer, "ema", None)
    if ema is not None:
        ema.load(network.state_dict(), 0)
    return len(taken)
