from diffnnunet.planners.diffusion_planner import DEFAULT_DIFFUSION, DiffusionPlanner

__all__ = ["DiffusionPlanner", "DEFAULT_DIFFUSION"]
