"""grpo_kernels: fused kernels for GRPO-family RL training of language models.

Per-token log-probs and entropy straight from hidden states and the LM-head weight, without
materializing the [tokens x vocab] logits; the GRPO loss on top of them (every TRL loss_type);
group-normalized advantages. C++ kernels on CPU, Triton on GPU, a chunked PyTorch fallback anywhere.
"""

from .advantages import group_advantages
from .backends import last_backend
from .config import GRPOConfig
from .fused import FusedLinearGRPOLoss, fused_linear_grpo_loss
from .logprobs import linear_logprobs
from .policy_loss import GRPOLossOutput, grpo_loss
from .sampling import importance_sampling_ratio, off_policy_sequence_mask

__version__ = "0.1.0"

__all__ = [
    "FusedLinearGRPOLoss",
    "GRPOConfig",
    "GRPOLossOutput",
    "fused_linear_grpo_loss",
    "group_advantages",
    "grpo_loss",
    "importance_sampling_ratio",
    "last_backend",
    "linear_logprobs",
    "off_policy_sequence_mask",
]
