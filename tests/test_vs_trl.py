"""benchmarks/vs_trl.py's tables: one table from several runs' JSON files (--tabulate), ablation columns,
the accuracy spread and the mean curve. (Its arguments and the large-head model: tests/test_trainer_speed.py.)"""

from __future__ import annotations

import json

import pytest



def _run(trainer, seed, acc, wall, flags="", curve=None):
    return {"trainer": trainer, "seed": seed, "accuracy": acc, "wall_s": wall, "median_step_s": wall / 100,
            "peak_rss_mb": 500.0, "ours_flags": flags, "curve": curve or {}}


def _write(path, results, steps=2000, threads=2, large_head=False, commit="abc1234"):
    info = {"machine": {"cpu": "Test CPU"}, "commit": commit, "steps": steps, "threads": threads,
            "large_head": large_head, "results": results}
    path.write_text(json.dumps(info))
    return str(path)


def test_label_gives_ablations_their_own_column(vs_trl):
    assert vs_trl.label(_run("ours", 0, 0.9, 1)) == "ours"
    assert vs_trl.label(_run("ours", 0, 0.9, 1, flags="--prompt-sampling replacement")) == "ours --prompt-sampling replacement"
    assert vs_trl.label(_run("trl", 0, 0.9, 1, flags="--ignored")) == "trl"  # the flags are ours' only
    assert vs_trl.label({"trainer": "trl-bias-kl", "seed": 0}) == "trl-bias-kl"  # old files: no ours_flags


def test_table_spread_row(vs_trl):
    results = [_run("ours", 0, 0.90, 100), _run("ours", 1, 0.80, 100), _run("ours", 2, 0.70, 100),
               _run("trl", 0, 0.85, 300)]
    lines = vs_trl.table(results, ["ours", "trl"], [0, 1, 2]).splitlines()
    assert lines[-1] == "| accuracy sd (min-max) | 0.100 (0.700-0.900) | - |"  # one trl seed: no spread
    assert lines[-2] == "| ours' wall time / column's | 1.00x | 0.33x |"


def test_tabulate_merges_one_file_per_run(vs_trl, tmp_path):
    files = [_write(tmp_path / "ours_0.json", [_run("ours", 0, 0.9, 100, curve={"500": 0.2, "2000": 0.9})]),
             _write(tmp_path / "trl_0.json", [_run("trl", 0, 0.8, 250, curve={"500": 0.1, "2000": 0.8})]),
             _write(tmp_path / "ours_1.json", [_run("ours", 1, 0.7, 110, curve={"500": 0.4, "2000": 0.7})], commit="def5678"),
             _write(tmp_path / "iid_0.json", [_run("ours", 0, 0.6, 90, flags="--prompt-sampling replacement")])]
    header, results, columns, seeds = vs_trl.tabulate(files)
    assert columns == ["ours", "trl", "ours --prompt-sampling replacement"]  # first-appearance order
    assert seeds == [0, 1] and len(results) == 4
    assert header == "main job, 2000 steps, 2 threads, Test CPU; commit abc1234, def5678"
    lines = vs_trl.table(results, columns, seeds).splitlines()
    assert lines[2].startswith("| 0 | 0.900, 100 s") and lines[2].endswith("| 0.600, 90 s (900 ms/step, 500 MB) |")
    assert lines[3] == "| 1 | 0.700, 110 s (1100 ms/step, 500 MB) | - | - |"  # not run (no file), not failed
    assert lines[4] == "| mean | 0.800, 105 s | 0.800, 250 s | 0.600, 90 s |"
    curve = vs_trl.curve_table(results, columns).splitlines()
    assert curve[2] == "| 500 | 0.300 (n=2) | 0.100 (n=1) | - |"
    assert curve[3] == "| 2,000 | 0.800 (n=2) | 0.800 (n=1) | - |"


@pytest.mark.parametrize("other,message", [
    (dict(steps=500), "has steps=500; "),
    (dict(threads=1), "has threads=1; "),
    (dict(large_head=True), "has large_head=True; "),
], ids=["steps", "threads", "large-head"])
def test_tabulate_refuses_unlike_runs(vs_trl, tmp_path, other, message):
    a = _write(tmp_path / "a.json", [_run("ours", 0, 0.9, 100)])
    b = _write(tmp_path / "b.json", [_run("trl", 0, 0.8, 200)], **other)
    with pytest.raises(ValueError, match=f"tabulate: .*b.json {message}"):
        vs_trl.tabulate([a, b])


def test_tabulate_refuses_a_run_given_twice(vs_trl, tmp_path):
    a = _write(tmp_path / "a.json", [_run("ours", 3, 0.9, 100)])
    b = _write(tmp_path / "b.json", [_run("ours", 3, 0.8, 100)])
    with pytest.raises(ValueError, match="tabulate: ours seed 3 is in both .*a.json and .*b.json"):
        vs_trl.tabulate([a, b])


def test_tabulate_keeps_a_failed_run_beside_its_rerun(vs_trl, tmp_path):
    a = _write(tmp_path / "a.json", [{"trainer": "trl", "seed": 0, "ours_flags": "", "error": "timeout"}])
    b = _write(tmp_path / "b.json", [_run("trl", 0, 0.8, 200), {"trainer": "trl", "seed": 1, "ours_flags": "",
                                                                "error": "boom"}])
    header, results, columns, seeds = vs_trl.tabulate([a, b])
    lines = vs_trl.table(results, columns, seeds).splitlines()
    assert lines[2] == "| 0 | 0.800, 200 s (2000 ms/step, 500 MB) |"  # the rerun's result wins over the failure
    assert lines[3] == "| 1 | failed |"


def test_main_tabulate_prints_the_tables_and_runs_nothing(vs_trl, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vs_trl.subprocess, "run", lambda *a, **k: pytest.fail("--tabulate must not start a run"))
    a = _write(tmp_path / "a.json", [_run("ours", 0, 0.9, 100, curve={"1000": 0.5})])
    assert vs_trl.main(["--tabulate", a]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 0.900, 100 s (1000 ms/step, 500 MB) |" in out and "| 1,000 | 0.500 (n=1) |" in out
    assert vs_trl.main(["--tabulate", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_main_table_has_the_ablation_column(vs_trl, tmp_path, capsys, monkeypatch):
    """A run with --ours-flags is tabulated under its label (not an empty "ours" column)."""
    class Done:
        returncode, stderr = 0, ""
        stdout = json.dumps(_run("ours", 0, 0.864, 120, flags="--prompt-sampling replacement"))
    monkeypatch.setattr(vs_trl.subprocess, "run", lambda cmd, **kw: Done() if "--worker" in cmd else
                        type("Git", (), {"stdout": ""})())
    out = tmp_path / "r.json"
    assert vs_trl.main(["--seeds", "0", "--trainers", "ours", "--ours-flags", "--prompt-sampling replacement",
                        "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| seed | ours --prompt-sampling replacement |" in text
    assert "| 0 | 0.864, 120 s (1200 ms/step, 500 MB) |" in text
    assert json.loads(out.read_text())["results"][0]["accuracy"] == 0.864
