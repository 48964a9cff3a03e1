"""DiffusionPredictor: nnU-Net's predictor with only the per-window network call replaced by the sampler.

nnU-Net's preprocessing, Gaussian-weighted sliding window (here blending *probabilities*), resampling to the
original geometry and export stay. The blended per-channel probabilities are handed to nnU-Net's export as logit(p)
(see :func:`probabilities_to_logits`), so argmax, ``--save_probabilities`` and nnUNetv2_ensemble see proper class
probabilities. Stock nnU-Net models pass straight through.
"""
from __future__ import annotations

import contextlib
import math
import os
import pydoc
from functools import partial

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.inference import predict_from_raw_data as predict_module
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from diffnnunet.config import INFERENCE_SAMPLES_PER_TRAINING_SAMPLE, resolve_diffusion
from diffnnunet.inference.export import export_prediction_atomically
from diffnnunet.inference.mirror_views import mirror_combinations
from diffnnunet.methods.uncertainty import FOLD_PARTS, FoldStatistics
from diffnnunet.utils import load_checkpoint_safely, swapped

_EPS = 1e-6
#: network input voxels per sampler forward on CPU (see DiffusionPredictor._cpu_inputs_per_forward)
CPU_VOXELS_PER_FORWARD = 2 ** 18
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The sampler's autocast dtype: ``bf16``/``fp16`` as asked, None for ``fp32``; ``auto`` is bf16 on CUDA
    devices that support it (no float16 overflow of large logits), else fp16 on CUDA, and fp32 off CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' (known: {', '.join(PRECISIONS)})")
    if precision != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("true", "1", "t")


def probabilities_to_logits(probs: torch.Tensor, has_regions: bool, kind: str = "per_channel") -> torch.Tensor:
    """Blended probabilities ``(C, *spatial)`` -> what nnU-Net's export turns back into probabilities.

    ``kind="categorical"`` (class probabilities summing to one, e.g. a softmax decoder), label datasets: log(p), so
    nnU-Net's softmax returns p. Otherwise logit(p) = log(p / (1 - p)): for regions nnU-Net's sigmoid gives p back;
    for per-channel (sigmoid) estimates of mutually exclusive labels nnU-Net's softmax gives
    P(class c) = odds_c / sum_k odds_k = p_c prod_{k!=c} (1 - p_k) / Z, the probability that channel c is the one
    'on' channel when the channels are independent Bernoullis: the one-hot constraint applied to the per-channel
    estimates. Either way the argmax is the argmax of p.
    """
    p = probs.float().clamp(_EPS, 1 - _EPS)
    if kind == "categorical" and not has_regions:
        return torch.log(p)
    return torch.log(p) - torch.log1p(-p)


def build_network(trainer_name: str, plans_manager, configuration_manager, num_input_channels: int,
                  num_output_channels: int):
    """The network a checkpoint's weights load into, as its trainer's ``build_network_architecture`` builds it: the
    method module for a configuration with a diffusion section (:func:`diffnnunet.methods.build_method`, which the
    diffusion trainers call too), a dotted trainer's own builder, else nnU-Net's plain U-Net."""
    if configuration_manager.configuration.get("diffusion") is not None:
        from diffnnunet.methods import build_method
        return build_method(plans_manager, configuration_manager, num_input_channels, num_output_channels)
    trainer = pydoc.locate(trainer_name) if "." in trainer_name else None
    if not (isinstance(trainer, type) and hasattr(trainer, "build_network_architecture")):
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        trainer = nnUNetTrainer
    return trainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                              num_output_channels, enable_deep_supervision=False)


class DiffusionPredictor(nnUNetPredictor):
    """``steps``/``samples`` override the sampling budget, which is otherwise the model folder's tuned one
    (``sampling.json``, see :mod:`diffnnunet.inference.tuning`; ignored with ``use_tuned_sampling=False``) or else
    the plans' ``sampling_steps``/``samples_per_step``; ``seed`` makes a prediction reproducible (one generator,
    restarted for every case, advanced window by window). ``precision`` is the sampler's autocast
    (:func:`autocast_dtype`); ``compile`` runs ``torch.compile`` on the method's per-step modules
    (``step_modules()``; None: nnU-Net's ``nnUNet_compile`` environment variable decides). ``uncertainty`` is the
    native map written with ``save_uncertainty``: one of :data:`diffnnunet.methods.uncertainty.MEASURES`, computed
    per window from the chains before blending; when the tuning fitted an error map for that measure
    (``sampling.json``, :func:`~diffnnunet.inference.calibration.apply_error_map`) the written map is the estimated
    probability that the voxel's label is wrong, unless ``raw_uncertainty``."""

    def __init__(self, *args, steps: int | None = None, samples: int | None = None, seed: int | None = None,
                 save_uncertainty: bool = False, use_tuned_sampling: bool = True, precision: str = "auto",
                 compile: bool | None = None, uncertainty: str | None = None, raw_uncertainty: bool = False,
                 **kwargs):
        kwargs.setdefault("allow_tqdm", True)
        super().__init__(*args, **kwargs)
        self.autocast_dtype = autocast_dtype(self.device, precision)
        self.compile_steps = _env_flag("nnUNet_compile") if compile is None else bool(compile)
        self.steps_override, self.samples_override, self.seed = steps, samples, seed
        self.save_uncertainty = save_uncertainty
        self.uncertainty_override = uncertainty
        self.raw_uncertainty = raw_uncertainty
        self.use_tuned_sampling = use_tuned_sampling
        self.fold_parts = False  # True while several folds predict a case: the sampler returns the map's parts
        self.tuned_sampling = None
        self.diffusion = None
        self.generator = None

    # -- initialisation --------------------------------------------------------------------------------------
    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json,
                              trainer_name, inference_allowed_mirroring_axes):
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)
        self._configure_sampling()
        if self.diffusion is not None:
            self._prepare_sampler_network()

    def _prepare_sampler_network(self):
        """Undo a trainer's DDP wrapper (final validation under DDP; sampling needs no gradient sync) and nnU-Net's
        ``torch.compile(network)`` (it compiles ``forward``, which the sampler does not call as a whole) and, with
        ``compile_steps``, compile the modules that run at every step instead (in place)."""
        from torch._dynamo.eval_frame import OptimizedModule
        from torch.nn.parallel import DistributedDataParallel
        if isinstance(self.network, DistributedDataParallel):
            self.network = self.network.module
        if isinstance(self.network, OptimizedModule):
            self.network = self.network._orig_mod
        settable = not isinstance(getattr(type(self.network), "exclusive_labels", None), property)
        if hasattr(self.network, "exclusive_labels") and settable:  # regions: independent sigmoids, no one-hot
            self.network.exclusive_labels = not self.label_manager.has_regions
        if self.compile_steps:
            for module in self.network.step_modules():
                module.compile(dynamic=False)

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """As nnU-Net's, but the network comes from :func:`build_network` (no class scan) and checkpoints are
        loaded with ``weights_only=True``."""
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        dataset_json = load_json(join(model_training_output_dir, "dataset.json"))
        plans_manager = PlansManager(load_json(join(model_training_output_dir, "plans.json")))
        parameters, first = [], None
        for f in ([use_folds] if isinstance(use_folds, str) else use_folds):
            f = int(f) if f != "all" else f
            ckpt = load_checkpoint_safely(join(model_training_output_dir, f"fold_{f}", checkpoint_name))
            first = first or ckpt
            parameters.append(ckpt["network_weights"])
        configuration_manager = plans_manager.get_configuration(first["init_args"]["configuration"])
        network = build_network(first["trainer_name"], plans_manager, configuration_manager,
                                determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
                                plans_manager.get_label_manager(dataset_json).num_segmentation_heads)
        network.load_state_dict(parameters[0])
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   first["trainer_name"], first.get("inference_allowed_mirroring_axes"))
        if self.use_tuned_sampling:  # the tuned budget (diffusion) and calibration (every model), kept apart
            from diffnnunet.inference.calibration import load_tuned_sampling
            self.tuned_sampling = load_tuned_sampling(model_training_output_dir) or None

    def _configure_sampling(self):
        section = self.configuration_manager.configuration.get("diffusion")
        if section is None:
            self.diffusion = None
            return
        self.diffusion = resolve_diffusion(section)  # a missing key means what the network was built with
        self.sampling_seed = int(self.seed if self.seed is not None else self.diffusion["seed"])
        self.generator = torch.Generator(device=self.device).manual_seed(self.sampling_seed)

    @property
    def sampling_steps(self) -> int:
        return int(self.steps_override or self._tuned("sampling_steps") or self.diffusion["sampling_steps"])

    @property
    def uncertainty_measure(self) -> str:
        """``uncertainty`` (the command line's) or the plans' measure, a removed one read as its replacement
        (:func:`~diffnnunet.methods.uncertainty.plans_measure`: plans of earlier versions keep loading)."""
        from diffnnunet.methods.uncertainty import plans_measure
        return self.uncertainty_override or plans_measure(self.diffusion["uncertainty"])

    @property
    def samples_per_step(self) -> int:
        return int(self.samples_override or self._tuned("samples_per_step") or self.diffusion["samples_per_step"])

    def _tuned(self, key: str, default=None):
        """A value of the model folder's sampling.json (budget, ``temperature``, ``error_map``), else ``default``."""
        return (self.tuned_sampling or {}).get(key, default)

    # -- the per-window call -----------------------------------------------------------------------------------
    #: network input voxels per sampler forward on CPU (class default; see ``_cpu_inputs_per_forward``)
    cpu_voxels_per_forward = CPU_VOXELS_PER_FORWARD

    def _cpu_inputs_per_forward(self) -> int | None:
        """On CPU the plans' GPU memory budget does not apply: network inputs per forward (chains x windows) are
        ``cpu_voxels_per_forward`` // patch voxels, at least 1. A CPU is overhead-bound on small patches, where
        larger batches pay (a 14x32x32 patch: 4 chains per forward cost 0.39x the batch-1 time per evaluation), and
        compute-bound on large ones, where batching gains nothing and multiplies the activation memory (an
        80x128x112 patch: 4 chains per forward cost 1.16x the batch-1 time per evaluation at 3.3x nnU-Net's peak
        memory). None on other devices, where the plans decide."""
        if self.device.type != "cpu":
            return None
        voxels = math.prod(int(size) for size in self.configuration_manager.patch_size)
        return max(1, int(self.cpu_voxels_per_forward) // voxels)

    @property
    def samples_per_forward(self) -> int:
        """Chains per forward: the plans' ``samples_per_forward`` (on CPU: what fits ``_cpu_inputs_per_forward``),
        at most the number of samples."""
        cpu = self._cpu_inputs_per_forward()
        chunk = cpu if cpu else int(self.diffusion.get("samples_per_forward") or self.samples_per_step)
        return max(1, min(self.samples_per_step, chunk))

    @property
    def windows_per_forward(self) -> int:
        """Windows sampled together: network inputs per forward (the plans' ``inference_batch``, what fits the
        memory budget; on CPU ``_cpu_inputs_per_forward``) divided by the chains per forward; at least 1."""
        budget = self._cpu_inputs_per_forward() or int(
            self.diffusion.get("inference_batch")
            or INFERENCE_SAMPLES_PER_TRAINING_SAMPLE * self.configuration_manager.batch_size)
        return max(1, budget // self.samples_per_forward)

    def _sample_windows(self, x: torch.Tensor):
        """Windows ``(K, C_in, *patch)`` -> (probabilities ``(K, C, *patch)``, uncertainty ``(K, 1, *patch)`` or
        None); with mirroring on, both are means over the mirrored samplings."""
        with self._autocast():
            return self._sample_windows_mirrored(x)

    def _autocast(self):
        """Inside nnU-Net's own autocast (float16 on CUDA): ours replaces it, or switches it off for fp32."""
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return torch.autocast("cuda", enabled=False) if self.device.type == "cuda" else contextlib.nullcontext()

    def _sample_windows_mirrored(self, x: torch.Tensor):
        measure = self.uncertainty_measure + (FOLD_PARTS if self.fold_parts else "")
        native = {"return_uncertainty": True, "uncertainty": measure} if self.save_uncertainty else {}
        sampler = partial(self.network.sample, steps=self.sampling_steps, samples=self.samples_per_step,
                          generator=self.generator, chunk=self.samples_per_forward, **native)

        def sample(windows):
            out = sampler(windows)
            return out if isinstance(out, tuple) else (out, None)

        prediction, uncertainty = sample(x)
        mirror_axes = self.allowed_mirroring_axes if self.use_mirroring else None
        if mirror_axes:
            combos = mirror_combinations(mirror_axes)[1:]
            for c in combos:
                p, u = sample(torch.flip(x, c))
                prediction += torch.flip(p, c)
                if uncertainty is not None:
                    uncertainty += torch.flip(u, c)
            prediction /= len(combos) + 1
            if uncertainty is not None:
                uncertainty /= len(combos) + 1
        return prediction, uncertainty

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``(K, C_in, *patch)`` -> fused class probabilities ``(K, C, *patch)``."""
        if self.diffusion is None:
            return super()._internal_maybe_mirror_and_predict(x)
        return self._sample_windows(x)[0]

    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        """nnU-Net's Gaussian-weighted sliding window, ``windows_per_forward`` windows per sampler call. Returns
        blended probabilities ``(C, *spatial)``, plus the blended native uncertainty when ``save_uncertainty`` is on
        and the method has one: one last channel, or with ``fold_parts`` the map's parts (FoldStatistics). The
        probabilities accumulate in float16 like nnU-Net's; the map and its weights in float32 (its fold parts are
        later subtracted from one another), so the result is float32."""
        if self.diffusion is None:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian
        from tqdm import tqdm

        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        heads = self.label_manager.num_segmentation_heads
        predicted = torch.zeros((heads, *data.shape[1:]), dtype=torch.half, device=results_device)
        weights = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        uncertainty = None
        gaussian = (compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                     value_scaling_factor=10, device=results_device)
                    if self.use_gaussian else torch.ones((), device=results_device))
        k = self.windows_per_forward
        with tqdm(total=len(slicers), disable=not self.allow_tqdm, desc="windows") as bar:
            for first in range(0, len(slicers), k):
                group = slicers[first:first + k]
                windows = torch.stack([data[sl] for sl in group]).to(self.device, non_blocking=True)
                probs, unc = self._sample_windows(windows)
                probs = probs.to(results_device) * gaussian
                for i, sl in enumerate(group):
                    predicted[sl] += probs[i]
                    weights[sl[1:]] += gaussian
                if unc is not None:
                    if uncertainty is None:
                        uncertainty = torch.zeros((unc.shape[1], *data.shape[1:]), dtype=torch.float32,
                                                  device=results_device)
                        map_weights = torch.zeros(data.shape[1:], dtype=torch.float32, device=results_device)
                    unc = unc.to(results_device).float() * gaussian.float()
                    for i, sl in enumerate(group):
                        uncertainty[(slice(None), *sl[1:])] += unc[i]
                        map_weights[sl[1:]] += gaussian.float()
                bar.update(len(group))
        torch.div(predicted, weights, out=predicted)
        if torch.any(torch.isinf(predicted)):
            raise RuntimeError("inf in the blended prediction (float16 overflow of the Gaussian weights)")
        if uncertainty is None:
            return predicted
        return torch.cat([predicted.float(), uncertainty / map_weights])

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's per-case prediction (all folds), with the sampling generator restarted at the seed for every
        case: a case's prediction does not depend on the cases predicted before it (``-num_parts`` splits,
        ``--continue_prediction``, the input order, validation cases spread over DDP ranks). With several folds
        and a native map, the map counts the folds' disagreement (:meth:`_predict_folds`)."""
        if self.generator is not None:
            self.generator.manual_seed(self.sampling_seed)
        if self.diffusion is not None and self.save_uncertainty and len(self.list_of_parameters) > 1:
            out = self._predict_folds(data)
        else:
            out = super().predict_logits_from_preprocessed_data(data)
        return self._apply_error_map(out)

    def _apply_error_map(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` ``(heads [+ 1], *spatial)`` with its uncertainty channel replaced (or, for the stock model,
        joined) by the tuned error map (``sampling.json``) when uncertainty is saved and ``raw_uncertainty`` is off.
        A map of the margin of the exported (temperature-scaled) probabilities applies to every model; a map of
        the native map only to the measure it was fitted for."""
        heads = self.label_manager.num_segmentation_heads
        error_map = self._tuned("error_map")
        if self.raw_uncertainty or not self.save_uncertainty or not error_map or out.shape[0] > heads + 1:
            return out
        from diffnnunet.inference.calibration import apply_error_map, error_map_input
        native = out[heads] if out.shape[0] == heads + 1 else None
        if error_map["inputs"] == "map" and (native is None or error_map["measure"] != self.uncertainty_measure):
            return out
        seg = self.label_manager.convert_logits_to_segmentation(out[:heads].float())
        x = error_map_input(error_map, native, out[:heads], self.label_manager.has_regions)  # logits already / T
        mapped = apply_error_map(x, seg, error_map).to(out.dtype)
        return torch.cat([out[:heads], mapped[None]])

    def _predict_folds(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's fold loop (the mean of the folds' exported logits), except for the native uncertainty map: each
        fold's sliding window returns the map's parts, :class:`FoldStatistics` combines them (entropy and mutual
        information gain the folds' Jensen-Shannon divergence, std the between-fold variance), where nnU-Net's
        loop would average the folds' maps and lose their disagreement."""
        from nnunetv2.configuration import default_num_processes
        n_threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, n_threads))
        heads = self.label_manager.num_segmentation_heads
        folds = FoldStatistics(self.uncertainty_measure, getattr(self.network, "categorical_chains", False))
        logits = None
        self.fold_parts = True
        try:
            for params in self.list_of_parameters:
                self.network.load_state_dict(params)
                out = self.predict_sliding_window_return_logits(data).to("cpu")
                logits = out[:heads] if logits is None else logits + out[:heads]
                if out.shape[0] > heads:
                    folds.add(out[None, heads:])
        finally:
            self.fold_parts = False
            torch.set_num_threads(n_threads)
        logits /= len(self.list_of_parameters)
        return torch.cat([logits, folds.map()[0]]) if folds.count else logits

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """Gaussian-blended probabilities, returned in the logit space nnU-Net's export expects (see
        :func:`probabilities_to_logits`), divided by the tuned temperature (``sampling.json``'s calibration, 1
        without one; :mod:`~diffnnunet.inference.calibration`); a native uncertainty channel, when present, stays
        last and unchanged."""
        out = super().predict_sliding_window_return_logits(input_image)
        if self.diffusion is None:  # the stock model's logits, calibrated like a diffusion model's
            temperature = float(self._tuned("temperature", 1.0))
            return out if temperature == 1.0 else out / temperature
        heads = self.label_manager.num_segmentation_heads
        logits = probabilities_to_logits(out[:heads], self.label_manager.has_regions,
                                         getattr(self.network, "probabilities", "per_channel"))
        temperature = float(self._tuned("temperature", 1.0))
        if temperature != 1.0:
            logits = logits / temperature
        return torch.cat([logits, out[heads:].float()]) if out.shape[0] > heads else logits

    # -- file prediction with atomic export (+ uncertainty maps) --------------------------------------------------
    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 2):
        export = partial(export_prediction_atomically, save_uncertainty=self.save_uncertainty)
        with swapped(predict_module, "export_prediction_from_logits", export):
            return super().predict_from_data_iterator(data_iterator, save_probabilities,
                                                      num_processes_segmentation_export)

    def predict_from_files_sequential(self, list_of_lists_or_source_folder,
                                      output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        """nnU-Net's prediction without worker processes (preprocessing, sampling and export in this process:
        ``diffnnunet_predict -npp 0``), with the same atomic export (+ uncertainty maps). nnU-Net's signature: it
        records its arguments by inspecting the method's own."""
        export = partial(export_prediction_atomically, save_uncertainty=self.save_uncertainty)
        with swapped(predict_module, "export_prediction_from_logits", export):
            return super().predict_from_files_sequential(list_of_lists_or_source_folder,
                                                         output_folder_or_list_of_truncated_output_files,
                                                         save_probabilities, overwrite,
                                                         folder_with_segs_from_prev_stage)
