"""``python -m grpo_kernels train [--model PATH] [--steps N] [--out DIR] ...``: the main job.

See :mod:`grpo_kernels.trainer.cli` (``python -m grpo_kernels train --help`` lists every flag).
"""

import logging
import os
import sys
from typing import NoReturn, Optional, Sequence

from .trainer import parallel
from .trainer.cli import main


def run(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run :func:`main` and exit with its status; under torchrun, without interpreter finalization.

    After FSDP2 training, ``destroy_process_group`` leaves the gloo process group alive (torch keeps
    references to it that ``gc.collect()`` does not clear: 2 of them, measured in one process with
    torch 2.13), so its worker threads live on into interpreter finalization. A gloo thread that then
    releases a tensor with a Python object attached takes the GIL, the finalizing interpreter makes
    that thread exit, and the exit unwinds through C++ ``noexcept`` frames: ``terminate called
    without an active exception``, SIGABRT, and torchrun reports the whole (finished) job as failed,
    about once in every few 2-process FSDP runs on an Intel AMX machine. Everything the job writes is
    closed by the time :func:`main` returns, so a rank that torchrun started flushes its streams and
    leaves with ``os._exit``: no finalization, no threads to race with.
    """
    code = main(argv)  # argparse's and the CLI's errors raise SystemExit: they leave the usual way
    if not parallel.in_torchrun():
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
