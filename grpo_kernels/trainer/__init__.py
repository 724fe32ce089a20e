"""A thin GRPO trainer on the fused kernels, and the main job's task.

``GRPOTrainer`` samples completions with ``transformers`` ``generate``, scores them with reward
functions, and updates the policy through :class:`grpo_kernels.FusedLinearGRPOLoss` on the
model's final hidden states: one file per step of the story (tasks -> rewards -> trainer), plus
the model/tokenizer loading, checkpoints, metrics, the command line, and data parallelism
under torchrun (``parallel``).
"""

from .checkpoint import CheckpointError, latest_checkpoint
from .config import TrainerConfig
from .metrics import plot_metrics
from .model import HeadSpec, build_tokenizer, completion_hidden, lm_head, load_model_and_tokenizer
from .rewards import RewardFn, compute_rewards
from .tasks import ArithmeticTask, digit_match, exact_match
from .trainer import Batch, GRPOTrainer

__all__ = [
    "ArithmeticTask",
    "Batch",
    "CheckpointError",
    "GRPOTrainer",
    "HeadSpec",
    "RewardFn",
    "TrainerConfig",
    "build_tokenizer",
    "completion_hidden",
    "compute_rewards",
    "digit_match",
    "exact_match",
    "latest_checkpoint",
    "lm_head",
    "load_model_and_tokenizer",
    "plot_metrics",
]
