"""``python -m grpo_kernels train [--model PATH] [--steps N] [--out DIR] ...``: the main job.

See :mod:`grpo_kernels.trainer.cli` (``python -m grpo_kernels train --help`` lists every flag).
"""

import sys
from typing import NoReturn, Optional, Sequence

from .trainer import parallel
from .trainer.cli import main


def run(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run :func:`main` and exit with its status; under torchrun, without interpreter finalization
    (:func:`grpo_kernels.trainer.parallel.exit_rank` says why: gloo threads that outlive
    ``destroy_process_group`` can abort a finalizing rank). Everything the job writes is closed by the
    time :func:`main` returns.
    """
    code = main(argv)  # argparse's and the CLI's errors raise SystemExit: they leave the usual way
    if not parallel.in_torchrun():
        sys.exit(code)
    parallel.exit_rank(code)


if __name__ == "__main__":
    run()
