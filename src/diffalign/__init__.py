"""diffalign: align text-to-image diffusion models to a black-box score (DDPO, DAG-DB, DAG-KL) or to
light human feedback (HERO, D3PO), with LoRA adapters that stock diffusers loads.

The data path, top to bottom: prompts -> :func:`sample_trajectories` (DDIM with per-step log-probs) ->
a reward -> an algorithm's loss -> the optimizer, driven by one :class:`Trainer` on accelerate.
"""

from .algorithms import DDPO, Algorithm, build_algorithm
from .config import ConfigError, RunConfig, load_config
from .evaluate import evaluate_lora, evaluate_run
from .metrics import diversity, drift, vendi_score
from .pipeline import attach_lora, load_pipeline, save_lora
from .report import write_report
from .rewards import REWARDS, Reward, RewardError, build_reward
from .sampling import Trajectories, ddim_step_with_logprob, sample_trajectories
from .trainer import Trainer, TrainResult, train

__version__ = "0.1.0"


def run_feedback(*args, **kwargs):
    """Run a human-feedback session (HERO, D3PO, DDPO-binary); see :mod:`diffalign.feedback.loop`."""
    from .feedback.loop import run_feedback as _run

    return _run(*args, **kwargs)


__all__ = [
    "DDPO", "REWARDS", "Algorithm", "ConfigError", "Reward", "RewardError", "RunConfig", "TrainResult", "Trainer",
    "Trajectories", "attach_lora", "build_algorithm", "build_reward", "ddim_step_with_logprob", "diversity", "drift",
    "evaluate_lora", "evaluate_run", "load_config", "load_pipeline", "run_feedback", "sample_trajectories",
    "save_lora", "train", "vendi_score", "write_report",
]
