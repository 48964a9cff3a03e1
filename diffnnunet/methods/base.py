"""What every method shares: label encoding and the method interface the trainer and predictor call."""
from __future__ import annotations

import torch
from torch import nn

from diffnnunet.config import resolve_diffusion

#: plans keys of switches removed because they measured no better than the simpler choice; a plans file of an earlier
#: version may still hold one at its old default-off value (false / 0), any other value fails in
#: :func:`check_removed_plans_keys`
REMOVED_PLANS_KEYS = ("mirror_chains", "anchor_in_map", "recycling", "aux_head_weight", "timestep_bias")
#: the removed keys whose "on" changed the network's weights (an extra head): such a model cannot load any more
WEIGHT_CHANGING_KEYS = ("aux_head_weight",)
_warned: set = set()


def check_removed_plans_keys(diffusion: dict | None) -> None:
    """Plans of earlier versions with a key of :data:`REMOVED_PLANS_KEYS` turned on: a key that only changed how the
    model was trained or how its map is made is ignored with one warning on stderr (the model still loads and
    predicts); one of :data:`WEIGHT_CHANGING_KEYS` raises ValueError naming it. Absent keys and their old
    default-off values pass silently."""
    import sys
    for key in REMOVED_PLANS_KEYS:
        if not (diffusion or {}).get(key):
            continue
        if key in WEIGHT_CHANGING_KEYS:
            raise ValueError(f"plans key '{key}' was removed in this version (measured no better) and changed the "
                             "network's weights; retrain without it (delete it from the plans)")
        if key not in _warned:
            _warned.add(key)
            print(f"warning: plans key '{key}' was removed in this version (measured no better) and is ignored",
                  file=sys.stderr)


def encode_target(target: torch.Tensor, num_channels: int, has_regions: bool, ignore_label: int | None):
    """nnU-Net's training target -> ``(x0, mask)`` with ``x0`` in {0, 1} of shape ``(B, num_channels, *spatial)``.

    Mutually exclusive labels (``target`` is ``(B, 1, *spatial)`` of label ids) become one-hot *with* background;
    region-based targets (``(B, R[+1], *spatial)`` binary, nnU-Net's region transform) are used per region. The
    ignore label (a label id, or the extra last channel for regions) becomes ``mask`` ``(B, 1, *spatial)``, 1 where
    the voxel counts; ``mask`` is None when the dataset has no ignore label.
    """
    if has_regions:
        if ignore_label is not None:
            mask = 1.0 - target[:, -1:].float()
            return target[:, :-1].float(), mask
        return target.float(), None
    labels = target[:, 0].long()
    mask = None
    if ignore_label is not None:
        mask = (labels != ignore_label).float()[:, None]
        labels = torch.where(labels == ignore_label, torch.zeros_like(labels), labels)
    x0 = torch.nn.functional.one_hot(labels, num_channels).movedim(-1, 1).float()
    return x0, mask


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean over channels of 2|P.G| / (|P| + |G|), summed over batch and space (batch Dice). ``(B, C, *sp)``."""
    if mask is not None:
        probs, target = probs * mask, target * mask
    axes = [0] + list(range(2, probs.ndim))
    inter = (probs * target).sum(axes)
    denom = probs.sum(axes) + target.sum(axes)
    return 1 - ((2 * inter + smooth) / (denom + smooth)).mean()


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` ``(B, C, *sp)`` over the voxels where ``mask`` ``(B, 1, *sp)`` is 1 (all if None)."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / (mask.sum() * values.shape[1]).clamp(min=1)


class DiffusionMethod(nn.Module):
    """Interface of a method module: the whole model of one paper (networks + noise process) as one nn.Module,
    so nnU-Net checkpoints, ``build_network_architecture`` and the predictor handle it like any network.

    ``training_loss(image (B, M, *sp), x0 (B, N, *sp) in {0,1}, mask, generator, t=None, noise=None) -> dict``
    with key ``loss`` (summed, differentiable) and one detached entry per term; ``t`` ``(B,)`` and ``noise`` fix the
    otherwise random timesteps and noise (tests compare gradients with them).
    ``forward(*args, mode="network")`` is the one entry point: ``mode="network"`` runs :meth:`network_forward` (the
    per-step network call the sampler makes as ``self(...)``), ``mode="loss"`` runs :meth:`training_loss`. Training
    calls ``network(image, x0, mask, mode="loss")`` so that a DistributedDataParallel wrapper sees the training
    computation in its forward and all-reduces the gradients (calling ``training_loss`` directly bypasses it).
    ``sample(image, steps, samples, generator, chunk, return_uncertainty, uncertainty)`` -> probabilities
    ``(B, N, *sp)``, and with ``return_uncertainty`` also the ``uncertainty`` map ``(B, 1, *sp)`` (larger = less
    certain; a measure of :mod:`diffnnunet.methods.uncertainty` over the chains) or None when the
    method has no native one (the export then uses the normalized entropy of the probabilities).
    """

    #: the plans' ``diffusion.method`` of this class (its key in ``METHODS`` and ``DEFAULT_DIFFUSION``)
    name: str | None = None
    #: the plans identifier the planner writes for this method (one plans file per method)
    plans_name = "DiffnnUNetPlans"
    #: "per_channel": independent per-channel foreground probabilities (sigmoids); "categorical": class
    #: probabilities summing to one over channels (softmax). The predictor converts accordingly.
    probabilities = "per_channel"

    @property
    def categorical_chains(self) -> bool:
        """Whether ``sample``'s uncertainty chains are class probabilities summing to one (categorical entropy) or
        independent per-channel ones (binary entropy); the predictor combines several folds' maps with the same
        entropy (:class:`~diffnnunet.methods.uncertainty.FoldStatistics`)."""
        return self.probabilities == "categorical"

    #: ``forward(mode=...)`` -> the method it runs; a method with an extra network ``name`` (see
    #: :meth:`extra_optimised`) adds its loss as mode ``"<name>_loss"`` (cDAL: ``"discriminator_loss"``) so that
    #: step also runs through the DDP wrapper
    forward_modes = {"loss": "training_loss"}
    #: DDP's ``find_unused_parameters``: True for a method whose loss leaves some parameters out of a step
    ddp_find_unused_parameters = False

    def __init__(self, diffusion: dict | None = None):
        """``diffusion``: the plans' section, checked for removed keys (:func:`check_removed_plans_keys`) and kept
        as :attr:`settings` with every missing key filled in (:func:`diffnnunet.config.resolve_diffusion`: the one
        meaning of a missing key, which the trainer and the predictor read too)."""
        super().__init__()
        check_removed_plans_keys(diffusion)
        #: the resolved plans section this module was built from
        self.settings = resolve_diffusion(diffusion, self.name)

    @staticmethod
    def feature_map_size(arch_kwargs: dict, input_channels: int, num_classes: int, patch_size) -> int:
        """Feature-map elements of the whole method network for one sample (the planner's VRAM proxy)."""
        raise NotImplementedError

    @classmethod
    def configure_plans(cls, settings: dict, plan: dict) -> dict:
        """Hook for the planner: ``settings`` (a copy of the method's defaults plus ``samples_per_forward``) and the
        configuration's ``plan`` (patch_size, spacing, batch_size, architecture) -> the diffusion section to store.
        Methods whose settings depend on the configuration (e.g. a latent's downsampling) override this."""
        return settings

    def extra_optimised(self) -> dict:
        """name -> submodule trained by its own optimizer and LR schedule (trainers/optimizers.py), stepped before
        the main one with ``forward(mode="<name>_loss")``; its parameters are left out of the main optimizer.
        Default: none."""
        return {}

    def extra_steps(self) -> dict:
        """name -> the ``part`` argument of each of the extra network's optimizer steps per training iteration
        (``forward(mode="<name>_loss", part=...)``, in order). Default: one step, ``part`` None, per extra network."""
        return {name: (None,) for name in self.extra_optimised()}

    def forward(self, *args, mode: str = "network", **kwargs):
        """``mode="network"``: :meth:`network_forward`; another mode: the method ``forward_modes[mode]`` names."""
        if mode == "network":
            return self.network_forward(*args, **kwargs)
        if mode not in self.forward_modes:
            raise ValueError(f"unknown forward mode '{mode}' (known: network, {', '.join(self.forward_modes)})")
        return getattr(self, self.forward_modes[mode])(*args, **kwargs)

    def network_forward(self, image: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One network evaluation (what ``self(...)`` runs); ``image`` ``(B, M, *spatial)`` alone must also work
        (nnU-Net's plain ``network(x)`` calls) and return label logits ``(B, N, *spatial)``."""
        raise NotImplementedError

    def training_loss(self, image, x0, mask=None, generator: torch.Generator | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict:
        raise NotImplementedError

    def step_modules(self) -> list:
        """The submodules whose forward runs at every sampling step (what ``torch.compile`` pays off on; the
        predictor compiles them with ``compile=True``). Default: the whole method, called as ``self(...)``."""
        return [self]

    def benchmark_forward(self, image: torch.Tensor):
        """A zero-argument callable running ONE network evaluation of the sampler (one sample, one step, the
        conditioning precomputed) on ``image`` ``(1, M, *patch)``: the unit benchmarks/inference.py counts."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, image, steps: int, samples: int, generator: torch.Generator | None = None,
               chunk: int | None = None, return_uncertainty: bool = False, uncertainty: str = "entropy"):
        raise NotImplementedError
