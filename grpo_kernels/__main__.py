"""``python -m grpo_kernels train [--model PATH] [--steps N] [--out DIR] ...``: the main job.

See :mod:`grpo_kernels.trainer.cli` (``python -m grpo_kernels train --help`` lists every flag).
"""

from .trainer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
