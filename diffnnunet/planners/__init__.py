from diffnnunet.planners.diffusion_planner import DiffusionPlanner

__all__ = ["DiffusionPlanner"]
