from diffnnunet.evaluation.metrics import compute_case_metrics, evaluate_folder, surface_metrics
from diffnnunet.evaluation.uncertainty import auroc_from_histograms, ece_from_bins

__all__ = ["compute_case_metrics", "evaluate_folder", "surface_metrics", "auroc_from_histograms", "ece_from_bins"]
