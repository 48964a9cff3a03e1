from diffnnunet.inference.predictor import DiffusionPredictor, probabilities_to_logits

__all__ = ["DiffusionPredictor", "probabilities_to_logits"]
