"""Checkpoints and the trainer under hostile conditions (issue 11, items 9-15).

Edited or corrupted state.json and tensor files, moved runs, runs killed before their first
checkpoint or mid-write (a real ``kill -9``), foreign directories under checkpoints/, model
directories that ask to run their own code, and reward functions that return the wrong thing or
hang. Each is either handled correctly or refused with a message that names the file and field
(or the function). Runs use the built-in model on a tiny configuration: seconds each.
"""

import builtins
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, exact_match, latest_checkpoint, load_model_and_tokenizer
from grpo_kernels.trainer.checkpoint import list_checkpoints, read_state
from grpo_kernels.trainer.cli import build_parser, main
from grpo_kernels.trainer.rewards import compute_rewards

REPO = Path(__file__).resolve().parents[1]
# The main job shrunk to seconds: 2 prompts x 2 completions per step, 4 held-out prompts, no periodic eval.
TINY = ["--prompts-per-step", "2", "--num-generations", "2", "--num-eval", "4", "--eval-steps", "0", "--no-progress"]


def train_cli(*flags: str) -> int:
    return main(["train", *TINY, *flags])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2 (beta 0.1: a reference model is saved too)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert train_cli("--out", str(out), "--steps", "2", "--save-steps", "1") == 0
    return out


def fresh_trainer(run: Path) -> GRPOTrainer:
    """A trainer with the run's settings, ready to load one of its checkpoints."""
    config = TrainerConfig(**json.loads((latest_checkpoint(run) / "state.json").read_text())["config"])
    model, tokenizer = load_model_and_tokenizer(None, config.seed)
    rows = [{"prompt": "1+1=", "answer": "2"}]
    return GRPOTrainer(config, model, tokenizer, rows, [exact_match])


def copy_checkpoint(run: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "checkpoints" / latest_checkpoint(run).name
    shutil.copytree(latest_checkpoint(run), ckpt)
    return ckpt


def edit_state(ckpt: Path, edit) -> None:
    path = ckpt / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def _set(*keys_and_value):
    """An edit that sets state[k1][k2]... = value."""
    *keys, value = keys_and_value

    def edit(state):
        d = state
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _drop(*keys):
    def edit(state):
        d = state
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


# (id, edit of state.json, field the error must name)
BAD_STATES = [
    ("step_negative", _set("step", -5), "step"),
    ("step_fraction", _set("step", 2.7), "step"),
    ("step_1e9_float", _set("step", 1e9), "step"),
    ("step_past_config_steps", _set("step", 10**9), "step"),
    ("step_string", _set("step", "2"), "step"),
    ("step_bool", _set("step", True), "step"),
    ("step_not_the_directory_name", _set("step", 1), "step"),
    ("step_missing", _drop("step"), "step"),
    ("format_unknown", _set("format", 99), "format"),
    ("config_bad_value", _set("config", "steps", "many"), "config.steps"),
    ("config_unknown_field", _set("config", "bogus", 1), "config.bogus"),
    ("config_missing_field", _drop("config", "learning_rate"), "config.learning_rate"),
    ("metadata_not_object", _set("metadata", [1, 2]), "metadata"),
    ("scheduler_negative_epoch", _set("scheduler", "last_epoch", -3), "scheduler.last_epoch"),
    ("scheduler_lambda_state", _set("scheduler", "lr_lambdas", [{"x": 1}]), "scheduler.lr_lambdas"),
    ("optimizer_lr_text", lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"), "optimizer.param_groups[0].lr"),
    ("optimizer_lr_nan", lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")), "optimizer.param_groups[0].lr"),
    # an int beyond float64 (JSON keeps it exact): refused by name, not a raw OverflowError
    ("config_int_beyond_float64", _set("config", "learning_rate", 10**400), "config.learning_rate"),
    ("optimizer_lr_int_beyond_float64", lambda s: s["optimizer"]["param_groups"][0].update(lr=10**400),
     "optimizer.param_groups[0].lr"),
    ("optimizer_unknown_param", lambda s: s["optimizer"]["param_groups"][0].update(params=[0, 1, 999]),
     "optimizer.param_groups[0].params"),
    ("rng_python_garbage", _set("rng", "python", [3, [1, 2], None]), "rng.python"),
    ("rng_torch_truncated", _set("rng", "torch", "AAAA"), "rng.torch"),
    ("files_missing", _drop("files"), "files"),
    ("files_entry_missing", _drop("files", "optimizer.safetensors"), "files"),
]


@pytest.mark.parametrize("edit,field", [(e, f) for _, e, f in BAD_STATES], ids=[i for i, _, _ in BAD_STATES])
def test_state_json_fields_are_validated(run_dir, tmp_path, edit, field):
    """Item 9: every field of state.json read back is checked; the error names the file and the field."""
    ckpt = copy_checkpoint(run_dir, tmp_path)
    edit_state(ckpt, edit)
    trainer = fresh_trainer(run_dir)
    pattern = re.escape(str(ckpt / "state.json")) + ".*" + re.escape(field)
    with pytest.raises(ValueError, match=pattern):
        trainer.load_checkpoint(ckpt)
    assert trainer.step == 0


def test_state_json_step_past_the_runs_steps_is_refused(run_dir, tmp_path):
    """Item 9: resuming a step-2 checkpoint with --steps 1 would train nothing and exit 0; it is refused."""
    ckpt = copy_checkpoint(run_dir, tmp_path)
    with pytest.raises(SystemExit, match="steps"):
        train_cli("--resume", str(ckpt.parent.parent), "--steps", "1")


@pytest.mark.parametrize("name", ["model.safetensors", "ref_model.safetensors", "optimizer.safetensors"])
def test_flipped_bytes_in_a_tensor_file_are_refused(run_dir, tmp_path, name):
    """Item 10: a checksum per tensor file, recorded on write and verified on load."""
    ckpt = copy_checkpoint(run_dir, tmp_path)
    recorded = read_state(ckpt)["files"]
    assert set(recorded) == {"model.safetensors", "ref_model.safetensors", "optimizer.safetensors"}
    data = bytearray((ckpt / name).read_bytes())
    data[-9] ^= 0x40  # inside the last tensor's data: safetensors still parses it
    (ckpt / name).write_bytes(bytes(data))
    trainer = fresh_trainer(run_dir)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=re.escape(str(ckpt / name)) + ".*checksum"):
        trainer.load_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    with pytest.raises(SystemExit, match=re.escape(name)):
        train_cli("--resume", str(ckpt), "--out", str(tmp_path / "elsewhere"), "--steps", "3")


def test_resume_of_a_moved_run_writes_where_the_run_is(tmp_path):
    """Item 11: --resume MOVED_DIR without --out continues in MOVED_DIR, not in the out_dir state.json recorded."""
    old, new = tmp_path / "old", tmp_path / "new"
    assert train_cli("--out", str(old), "--steps", "1") == 0
    old.rename(new)
    assert train_cli("--resume", str(new), "--steps", "2") == 0
    assert not old.exists()
    assert latest_checkpoint(new).name == "step_00000002"
    assert [json.loads(line)["step"] for line in (new / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # A checkpoint directory inside the moved run resumes there too.
    assert train_cli("--resume", str(new / "checkpoints" / "step_00000002"), "--steps", "3") == 0
    assert not old.exists() and latest_checkpoint(new).name == "step_00000003"
    assert read_state(latest_checkpoint(new))["config"]["out_dir"] == str(new)
    other = tmp_path / "other"  # --out naming a directory that holds another run is refused, not mixed in
    other.mkdir()
    (other / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="another run"):
        train_cli("--resume", str(new), "--out", str(other), "--steps", "4")


def test_run_stopped_before_its_first_checkpoint_restarts_with_one_flag(tmp_path, capsys):
    """Item 12: such a run is refused by --out and --resume with a message naming --restart, which works."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    (out / "checkpoints" / ".tmp-step_00000002-123").mkdir(parents=True)  # a first write that was killed
    with pytest.raises(SystemExit, match="--restart"):
        train_cli("--out", str(out), "--steps", "2")
    with pytest.raises(SystemExit, match="--restart"):
        train_cli("--resume", str(out), "--steps", "2")
    assert train_cli("--out", str(out), "--steps", "2", "--restart") == 0
    assert latest_checkpoint(out).name == "step_00000002"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # A run with a checkpoint is never restarted over: --restart refuses and points at --resume.
    with pytest.raises(SystemExit, match="--resume"):
        train_cli("--out", str(out), "--steps", "2", "--restart")
    assert "--restart" in _train_help()


def _train_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"].format_help()


def test_foreign_directory_under_checkpoints_is_ignored(tmp_path):
    """Item 13: only complete checkpoints (with state.json) count; a foreign step_99999999 is left alone."""
    out = tmp_path / "run"
    assert train_cli("--out", str(out), "--steps", "1") == 0
    foreign = out / "checkpoints" / "step_99999999"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a checkpoint")
    assert latest_checkpoint(out).name == "step_00000001"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000001"]
    assert train_cli("--resume", str(out), "--steps", "3", "--save-steps", "1", "--keep-checkpoints", "1") == 0
    assert latest_checkpoint(out).name == "step_00000003"
    assert (foreign / "notes.txt").is_file()  # retention never deletes what it did not write
    clash = out / "checkpoints" / "step_00000004"  # a foreign directory at the very step the run saves next
    clash.mkdir()
    (clash / "notes.txt").write_text("mine")
    assert train_cli("--resume", str(out), "--steps", "4") == 0
    assert (read_state(latest_checkpoint(out))["step"] == 4
            and [p.read_text() for p in (out / "checkpoints").glob("step_00000004.not-a-checkpoint-*/notes.txt")] == ["mine"])


# The child trains with a checkpoint every step and freezes inside the checkpoint write of step
# KILL_AT (after the tensor files, before state.json and the rename), so the parent kills it
# there for certain, not by luck of timing.
KILLED_CHILD = textwrap.dedent("""
    import sys, time
    import grpo_kernels.trainer.trainer as tr
    from grpo_kernels.trainer.cli import main
    kill_at = int(sys.argv[1])
    real = tr.save_optimizer
    def save_optimizer(optimizer, path):
        out = real(optimizer, path)
        if path.parent.name.startswith(".tmp-step_%08d" % kill_at):
            print("MID-WRITE", flush=True)
            time.sleep(120)
        return out
    tr.save_optimizer = save_optimizer
    main(["train", *sys.argv[2:]])
""")


def kill_at_mid_write(cmd: list[str], env: dict, timeout: float) -> int:
    """Run ``cmd`` in its own session and SIGKILL the whole session (a torchrun job: the launcher and every
    rank) when it prints ``MID-WRITE``; return its exit status. A child that never reaches the write fails the
    test after ``timeout`` s instead of hanging the suite."""
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: os.killpg(child.pid, signal.SIGKILL))
    watchdog.start()
    try:
        lines = []
        for line in child.stdout:
            lines.append(line)
            if line.startswith("MID-WRITE"):
                os.killpg(child.pid, signal.SIGKILL)
                break
        else:
            pytest.fail("the child finished without reaching the checkpoint write:\n" + "".join(lines[-50:]))
    finally:
        watchdog.cancel()
        child.wait(30)
    return child.returncode


def _train_and_kill(kill_at: int, flags: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert kill_at_mid_write([sys.executable, "-c", KILLED_CHILD, str(kill_at), *TINY, *flags], env, 120) == -signal.SIGKILL


def test_kill_9_during_a_checkpoint_write(tmp_path):
    """kill -9 mid-write of the first checkpoint: restartable with --restart; of a later one: resumes from the last good one."""
    out = tmp_path / "run"
    flags = ["--out", str(out), "--steps", "3", "--save-steps", "1"]
    _train_and_kill(1, flags)
    assert latest_checkpoint(out) is None and any((out / "checkpoints").iterdir())  # only the torn .tmp-* write
    with pytest.raises(SystemExit, match="--restart"):
        train_cli("--resume", str(out))
    _train_and_kill(2, [*flags, "--restart"])
    assert latest_checkpoint(out).name == "step_00000001"
    assert train_cli("--resume", str(out)) == 0  # checksums verified, settings from state.json
    assert latest_checkpoint(out).name == "step_00000003"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_model_directory_with_custom_code_is_never_run_or_prompted(tmp_path, monkeypatch):
    """Item 14: trust_remote_code=False: no "run custom code? [y/N]" prompt, no import of the directory's code."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gk_not_a_transformers_model",
        "auto_map": {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"},
    }))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["custom.Tok", None]}}))
    shutil.copy(REPO / "grpo_kernels" / "trainer" / "assets" / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "custom.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n")

    prompts = []

    def no_prompt(*args):  # transformers turns any error here into a refusal, so record instead of raising
        prompts.append(args)
        return "n"

    monkeypatch.setattr(builtins, "input", no_prompt)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model_and_tokenizer(str(tmp_path), seed=0)
    assert not prompts and not (tmp_path / "RAN").exists()


def test_reward_function_returning_a_dict_is_named():
    """Item 15: a dict (or any non-sequence) is refused by name instead of its keys becoming rewards."""
    def dict_reward(prompts, completions, **_):
        return {i: 1.0 for i in range(len(completions))}

    def text_reward(prompts, completions, **_):
        return "1" * len(completions)

    def tensor_reward(prompts, completions, **_):
        return torch.arange(len(completions), dtype=torch.float32)

    for fn in (dict_reward, text_reward):
        with pytest.raises(TypeError, match=fn.__name__ + ".*" + type(fn([], ["a", "b"])).__name__):
            compute_rewards([fn], ["p", "q"], ["a", "b"], {})
    assert compute_rewards([tensor_reward], ["p", "q"], ["a", "b"], {}).tolist() == [[0.0], [1.0]]


def test_reward_timeout_names_the_function():
    """Item 15: an optional per-call timeout (off by default) stops a hanging reward function, naming it."""
    assert TrainerConfig().reward_timeout == 0 and "--reward-timeout" in _train_help()
    with pytest.raises(ValueError, match="reward_timeout"):
        TrainerConfig(reward_timeout=-1.0)

    def sleepy_reward(prompts, completions, **_):
        time.sleep(30)

    def spinning_reward(prompts, completions, **_):
        while True:
            try:
                pass
            except Exception:  # a broad except in user code must not swallow the timeout
                pass

    for fn in (sleepy_reward, spinning_reward):
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match=fn.__name__ + ".*0.3"):
            compute_rewards([fn], ["p"], ["a"], {}, timeout=0.3)
        assert time.perf_counter() - t0 < 5
    # Off the main thread (no SIGALRM there) the timeout still fires.
    errors = []

    def in_thread():
        try:
            compute_rewards([sleepy_reward], ["p"], ["a"], {}, timeout=0.3)
        except TimeoutError as exc:
            errors.append(exc)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join(10)
    assert len(errors) == 1 and "sleepy_reward" in str(errors[0])
    assert compute_rewards([exact_match], ["p"], ["5"], {"answer": ["5"]}, timeout=5.0).tolist() == [[1.0]]


def test_flags_given_on_resume_take_effect(tmp_path):
    """--lr and --weight-decay on resume were recorded in the config but the loaded optimizer kept the old ones."""
    out = tmp_path / "run"
    flags = ["--lr-scheduler", "constant", "--warmup-steps", "0"]
    assert train_cli("--out", str(out), "--steps", "1", "--lr", "0.001", *flags) == 0
    assert train_cli("--resume", str(out), "--steps", "2", "--lr", "0.004", "--weight-decay", "0.1") == 0
    assert [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0.001, 0.004]
    state = read_state(latest_checkpoint(out))
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1 and state["scheduler"]["base_lrs"] == [0.004]
