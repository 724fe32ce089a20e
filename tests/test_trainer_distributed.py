"""The trainer under torchrun: 2 gloo processes on CPU against one process on the same global batch.

Each multi-process case launches ``python -m torch.distributed.run --standalone --nproc_per_node 2
-m grpo_kernels train ...`` as a subprocess (the real command line and its process-group set-up),
with the main job shrunk to seconds: the built-in model, 4 prompts x 4 completions per step, 4
steps. The one-process runs it is compared with are the same command without torchrun. Parameters
are compared after loading the runs' final checkpoints into one process (which also loads the
2-process DCP checkpoints into one process). Tolerance: 1e-4 absolute, 1% of one Adam step at
lr 1e-2: the ranks' gradients are reduced in another order than one process sums them, and Adam
divides by |grad|, so a rounding-level difference on a near-zero gradient moves a weight by a
small fraction of a step.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, exact_match, latest_checkpoint, load_model_and_tokenizer  # noqa: E402
from grpo_kernels.trainer.checkpoint import DCP_FORMAT_VERSION, FORMAT_VERSION, read_state  # noqa: E402
from grpo_kernels.trainer.cli import main  # noqa: E402
from grpo_kernels.trainer.trainer import _check_split  # noqa: E402
from test_trainer_checkpoints import kill_at_mid_write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
# Two checkpoints (steps 2 and 4), a reference model (beta 0.1 by default), two micro-batches per update.
RUN = ["--prompts-per-step", "4", "--num-generations", "4", "--num-eval", "6", "--eval-steps", "2", "--save-steps", "2",
       "--lr", "0.01", "--warmup-steps", "1", "--gradient-accumulation-steps", "2", "--no-progress"]
TOL = 1e-4


def _env() -> dict:
    # One thread per process: the two processes share this machine's cores.
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def torchrun(*args: str, nproc: int = 2, script: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc -m grpo_kernels train ARGS`` (or ``script ARGS``)."""
    target = [script] if script else ["-m", "grpo_kernels", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target, *args]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def one_process(*args: str) -> None:
    assert main(["train", *args, "--threads", "1", "--no-progress"]) == 0


def final_params(run: Path) -> list[torch.Tensor]:
    """The parameters of a run's newest checkpoint (either format), loaded into one process."""
    config = TrainerConfig(**read_state(latest_checkpoint(run), verify_files=False)["config"])
    model, tokenizer = load_model_and_tokenizer(None, config.seed)
    trainer = GRPOTrainer(config, model, tokenizer, [{"prompt": "1+1=", "answer": "2"}], [exact_match])
    trainer.load_checkpoint(run)
    assert trainer.step == config.steps
    return [p.detach().clone() for p in model.parameters()] + [p.detach().clone() for p in trainer.ref_model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The one-process run (format 2 checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("one") / "run"
    one_process(*RUN, "--steps", str(STEPS), "--out", str(out))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(reference, tmp_path, mode):
    """2 processes (DDP, or FSDP2 with --fsdp) end with the parameters of 1 process; rank 0 alone writes."""
    out = tmp_path / "run"
    res = torchrun(*RUN, "--steps", str(STEPS), "--out", str(out), *(["--fsdp"] if mode == "fsdp" else []))
    state = read_state(latest_checkpoint(out))
    assert state["format"] == DCP_FORMAT_VERSION and state["world_size"] == 2
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(state["files"])
    diff = max_diff(final_params(reference), final_params(out))
    print(f"{mode}: max |param(2 processes) - param(1 process)| after {STEPS} steps = {diff:.2e}")
    assert diff < TOL
    # The global batch is the one-process batch: same rewards, advantages, held-out accuracy.
    one, two = records(reference), records(out)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3, 4]  # one writer: no duplicate lines
    for a, b in zip(one, two):
        for key in ("reward", "reward_std", "frac_reward_zero_std", "completion_length", "eval/accuracy"):
            assert (key in a) == (key in b), key
            if key in a:  # pytest >= 9.2 refuses approx(None)
                assert a[key] == pytest.approx(b[key], rel=1e-6), key
        for key in ("loss", "kl", "grad_norm", "clip_ratio/region_mean"):
            assert (key in a) == (key in b), key
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
    # Rank 0 alone prints, plots and writes the checkpoint metadata.
    assert res.stdout.count("held-out greedy accuracy at step 0") == 1 and (out / "metrics.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "metrics.png"]


# A torchrun child: the main job's own entry point, with an exit handler that says whether the rank
# went through interpreter finalization (where FSDP2's still-alive gloo threads can abort it).
FINALIZING_CHILD = textwrap.dedent("""
    import atexit, sys
    atexit.register(lambda: print("RANK REACHED INTERPRETER FINALIZATION", flush=True))
    from grpo_kernels.__main__ import run
    run(["train", *sys.argv[1:]])
""")


def test_fsdp_ranks_exit_without_interpreter_finalization(tmp_path):
    """Under torchrun the main job's ranks leave with their status and their output complete, but never enter
    interpreter finalization: after FSDP2 training torch keeps the gloo process group alive past
    destroy_process_group, and its threads can abort a finalizing rank (SIGABRT, the finished job reported failed)."""
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(FINALIZING_CHILD)
    res = torchrun(*RUN, "--steps", "2", "--out", str(out), "--fsdp", script=str(script))
    assert "RANK REACHED INTERPRETER FINALIZATION" not in res.stdout + res.stderr
    assert "checkpoint:" in res.stdout and [r["step"] for r in records(out)] == [0, 1, 2]  # flushed before leaving
    assert latest_checkpoint(out).name == "step_00000002"
    # A bad flag still exits non-zero with argparse's message (its SystemExit leaves the usual way).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), "--no-such-flag"]
    bad = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0 and "--no-such-flag" in bad.stderr


# A torchrun child that freezes rank 0 inside the checkpoint write of step KILL_AT (after every rank's
# DCP files, before state.json and the rename), so the test kills the job there for certain.
KILLED_CHILD = textwrap.dedent("""
    import sys, time
    import grpo_kernels.trainer.trainer as tr
    from grpo_kernels.trainer.cli import main
    kill_at = int(sys.argv[1])
    real = tr.save_dcp
    def save_dcp(d, state):
        real(d, state)
        if d.name.startswith(".tmp-step_%08d" % kill_at) and tr.torch.distributed.get_rank() == 0:
            print("MID-WRITE", flush=True)
            time.sleep(120)
    tr.save_dcp = save_dcp
    main(["train", *sys.argv[2:]])
""")


def test_kill_mid_checkpoint_then_resume_on_two_or_one_process(reference, tmp_path):
    """SIGKILL of the 2-process (DDP) job mid-write of the step-4 checkpoint: the step-2 one is the newest complete
    one, and resuming it on 2 FSDP2 processes, or on ONE process, ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(KILLED_CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), "4",
           *RUN, "--steps", str(STEPS), "--out", str(out)]
    kill_at_mid_write(cmd, _env(), 240)  # torchrun and both ranks at once
    assert latest_checkpoint(out).name == "step_00000002"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-step_00000004")]  # the torn write
    again = tmp_path / "again"  # the same killed run, resumed on 2 processes instead, and with FSDP2 (resharded)
    shutil.copytree(out, again)
    torchrun("--resume", str(again), "--fsdp")
    diff = max_diff(final_params(reference), final_params(again))
    print(f"killed at the step-4 write, resumed from step 2 in 2 FSDP2 processes: max |param - uninterrupted| = {diff:.2e}")
    assert diff < TOL and [r["step"] for r in records(again)] == [0, 1, 2, 3, 4]
    one_process("--resume", str(out))
    assert read_state(latest_checkpoint(out))["format"] == FORMAT_VERSION  # one process writes format 2 again
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert [r["step"] for r in records(out)] == [0, 1, 2, 3, 4]
    diff = max_diff(final_params(reference), final_params(out))
    print(f"killed at the step-4 write, resumed from step 2 in 1 process: max |param - uninterrupted| = {diff:.2e}")
    assert diff < TOL


def test_one_process_checkpoint_resumes_in_two(reference, tmp_path):
    """The one-process run's step-2 checkpoint (format 2), resumed by 2 FSDP2 processes, ends where it ends."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(reference) if r["step"] <= 2))
    torchrun("--resume", str(out), "--fsdp", "--no-progress")
    assert read_state(latest_checkpoint(out))["world_size"] == 2
    diff = max_diff(final_params(reference), final_params(out))
    print(f"1-process checkpoint at step 2 resumed in 2 FSDP2 processes: max |param - uninterrupted| = {diff:.2e}")
    assert diff < TOL


def test_bad_distributed_settings_are_named(tmp_path):
    config = TrainerConfig(out_dir=str(tmp_path), prompts_per_step=3, num_generations=2)
    with pytest.raises(ValueError, match="prompts_per_step must be divisible by the world size 2.*got 3"):
        _check_split(config, 2)
    config = TrainerConfig(out_dir=str(tmp_path), prompts_per_step=4, num_generations=2, gradient_accumulation_steps=8)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must divide each rank's 4 completions"):
        _check_split(config, 2)
    with pytest.raises(ValueError, match="share_prompts must be True"):
        _check_split(config.replace(gradient_accumulation_steps=1, share_prompts=False), 2)
    with pytest.raises(SystemExit, match="--fsdp shards the model over torchrun's processes"):
        main(["train", "--fsdp", "--out", str(tmp_path / "x"), "--steps", "1"])
    model, tokenizer = load_model_and_tokenizer(None, 0)
    with pytest.raises(ValueError, match="fsdp=True needs an initialized torch.distributed process group"):
        GRPOTrainer(config, model, tokenizer, [{"prompt": "1+1="}], [exact_match], fsdp=True)


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group in this process: the data-parallel code path (DDP, DCP) without a launch."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dcp_checkpoint_that_does_not_fit_is_refused(tmp_path, one_rank_group, tokenizer):
    """Format 3 checked like format 2: state.json fields, the optimizer's parameter names, the beta, the tensors."""
    import test_trainer

    config = TrainerConfig(out_dir=str(tmp_path / "run"), steps=2, prompts_per_step=2, num_generations=2, save_steps=1,
                           eval_steps=0, beta=0.0)
    model, tok = load_model_and_tokenizer(None, 0)
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    trainer = GRPOTrainer(config, model, tok, rows, [exact_match])
    assert trainer.dp is not None and trainer.dp.world_size == 1
    trainer.train(progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert read_state(ckpt)["format"] == DCP_FORMAT_VERSION
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)

    def fresh(cfg=config, model=None):
        return GRPOTrainer(cfg, model or load_model_and_tokenizer(None, 0)[0], tok, rows, [exact_match])

    assert fresh().load_checkpoint(ckpt) == ckpt  # the checkpoint itself is fine
    with pytest.raises(ValueError, match="has no reference model"):
        fresh(config.replace(beta=0.1)).load_checkpoint(ckpt)
    other = test_trainer.tiny_model(tokenizer)  # another architecture: other names and shapes
    with pytest.raises(ValueError, match="optimizer.param_groups\\[0\\]"):
        fresh(model=other).load_checkpoint(ckpt)
    narrow = test_trainer.tiny_model(tokenizer, num_hidden_layers=4)  # the same names, other shapes
    with pytest.raises(ValueError, match="DCP tensors do not fit this run.s model and optimizer .Size mismatch"):
        fresh(model=narrow).load_checkpoint(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    for field, value, message in (("world_size", 0, "world_size must be an int >= 1"),
                                  ("optimizer", {"param_groups": [dict(state["optimizer"]["param_groups"][0],
                                                                       params=["x"] * 38)]},
                                   "optimizer.param_groups\\[0\\].params must be this optimizer's parameter names")):
        (ckpt / "state.json").write_text(json.dumps({**state, field: value}))
        with pytest.raises(ValueError, match=message):
            fresh().load_checkpoint(ckpt)
    (ckpt / "state.json").write_text(json.dumps(state))
    (ckpt / "__0_0.distcp").write_bytes(b"\0" + (ckpt / "__0_0.distcp").read_bytes()[1:])
    with pytest.raises(ValueError, match="checksum mismatch"):
        fresh().load_checkpoint(ckpt)
