"""Noise processes. Every process speaks one vocabulary (like diffusers schedulers):

``q_sample(x0, t, noise)``       forward process, a sample of q(x_t | x_0)
``training_target(x0, noise, t)`` what the network regresses for the configured parameterisation
``predict_x0(output, x_t, t)``   map a network output back to an estimate of x_0
``set_timesteps(k)``             the respaced, descending timesteps for k-step sampling
``step(x0_hat, x_t, t, t_prev)`` one reverse step from x_t to x_{t_prev}

Processes hold their schedules as registered buffers and never own a network: the network is an argument.
"""
from diffnnunet.processes.bernoulli import BernoulliProcess
from diffnnunet.processes.categorical import CategoricalProcess
from diffnnunet.processes.gaussian import GaussianProcess, make_beta_schedule

PROCESSES = {"gaussian": GaussianProcess, "bernoulli": BernoulliProcess, "categorical": CategoricalProcess}

__all__ = ["GaussianProcess", "BernoulliProcess", "CategoricalProcess", "make_beta_schedule", "PROCESSES"]
