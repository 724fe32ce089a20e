"""Integrations with training frameworks. Each submodule imports its framework; import it explicitly.

- ``grpo_kernels.integrations.trl``: ``GRPOTrainer``, a drop-in for ``trl.GRPOTrainer`` (``pip install 'grpo_kernels[trl]'``).
"""
