"""What the command line does with what users type and the files they give it.

- key=value overrides are taken before, between and after options, by every command that takes them (argparse
  alone refused `dinoreg train --config tiny_cpu a=1 --output-dir D b=2` with "unrecognized arguments: b=2");
- stdout and stderr are line-buffered into files and pipes: the log of a run killed with SIGKILL holds what it printed;
- a bad input is one line on stderr, exit code 1 or 2, no traceback: `--config` naming a folder, an output path
  that cannot be one, an argument argparse refuses (bad weights files and checkpoint folders at every entry point
  are the table of tests/test_hostile_inputs.py).
"""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from launch_helpers import TINY, subprocess_env, wait_for_training_rows

from dinoreg.cli import build_parser, line_buffered_output, main

# A tiny run that fails or starts within a second or two.
RUN = [*TINY, "train.batch_size_per_gpu=4", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=4",
       "optim.warmup_epochs=0", "evaluation.knn_enabled=false", "train.log_every=1", "monitor.period=0",
       "train.dataset_path=synthetic:size=32"]


def one_line(capsys, code, *named):
    """The command's refusal: exit code 1 or 2, one non-empty line on stderr naming each of ``named``; the line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err and len(lines) == 1, err
    for name in named:
        assert str(name) in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ overrides anywhere


@pytest.mark.parametrize("command, options", [
    (["train"], ["--output-dir", "D"]), (["bench", "train"], ["--iterations", "1"]),
    (["bench", "memory"], ["--gpus", "2"]), (["bench", "heads"], []), (["bench", "checkpoint"], ["--repeats", "1"]),
    (["submit"], ["--output-dir", "D", "--gpus-per-node", "0"]),
])
def test_overrides_are_taken_before_between_and_after_options(command, options):
    args = build_parser().parse_args([*command, "a=1", "--config", "tiny_cpu", "b=2", *options, "c=3", "d=4"])
    assert args.overrides == ["a=1", "b=2", "c=3", "d=4"]  # in the order written: a later one wins
    assert args.config == "tiny_cpu"


def test_the_issues_command_line_and_the_order_of_overrides(tmp_path, capsys):
    code = main(["train", "--config", "tiny_cpu", "optim.epochs=3", "--output-dir", str(tmp_path / "run"),
                 "train.seed=7", "--print-config", "optim.epochs=4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "  epochs: 4\n" in out and "  seed: 7\n" in out and f"output_dir: {tmp_path / 'run'}" in out


def test_an_unknown_option_among_overrides_is_still_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "a=1", "--output-dir", "D", "--bogus", "b=2"])
    line = one_line(capsys, exit_info.value.code, "dinoreg", "unrecognized arguments: --bogus", "--help")
    assert "b=2" not in line


def test_a_stray_word_after_an_option_is_a_malformed_override(capsys):
    code = main(["train", "--output-dir", "D", "optim.epochs=2", "--print-config", "epochs"])
    one_line(capsys, code, "malformed override 'epochs'", "key=value")


def test_submit_takes_overrides_anywhere_and_keeps_its_job_command_after_dashes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cpu_job = ["--gpus-per-node", "0", "--tasks-per-node", "1", "--timeout-min", "30"]
    assert main(["submit", "--dry-run", "optim.epochs=2", *cpu_job, "train.seed=3", "--output-dir", "runs/x"]) == 0
    assert "optim.epochs=2 train.seed=3" in capsys.readouterr().out
    job = ["train", "--output-dir", "runs/y", "optim.epochs=2", "--no-resume", "train.seed=3"]
    assert main(["submit", "--dry-run", *cpu_job, "--", *job]) == 0  # the job command is parsed the same way
    assert "runs: dinoreg train --output-dir runs/y optim.epochs=2 --no-resume train.seed=3" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ line-buffered output


def test_the_entry_point_line_buffers_output_that_is_no_terminal(monkeypatch):
    streams = {name: io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for name in ("stdout", "stderr")}
    for name, stream in streams.items():
        assert not stream.line_buffering
        monkeypatch.setattr(sys, name, stream)
    line_buffered_output()
    assert all(stream.line_buffering for stream in streams.values())
    print("a line")
    assert streams["stdout"].buffer.getvalue() == b"a line\n"  # in the buffer below, not held back


def test_the_log_of_a_killed_run_holds_its_first_lines(tmp_path):
    run, log = tmp_path / "run", tmp_path / "out.log"
    with open(log, "w") as stdout:
        process = subprocess.Popen([sys.executable, "-m", "dinoreg", "train", "--output-dir", str(run), *RUN,
                                    "optim.epochs=50"], stdout=stdout, stderr=subprocess.STDOUT, env=subprocess_env())
    try:
        wait_for_training_rows(run, 2, process=process)  # logged: so printed too
        time.sleep(0.2)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert "[1/200] " in log.read_text(), log.read_text()  # the first step's line


def test_ctrl_c_stops_a_run_in_one_line_with_the_shells_code(tmp_path):
    run = tmp_path / "run"
    # SIGINT at its default, as in a terminal: a suite started in the background inherits it ignored
    process = subprocess.Popen([sys.executable, "-m", "dinoreg", "train", "--output-dir", str(run), *RUN,
                                "optim.epochs=50"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=subprocess_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_training_rows(run, 1, process=process)
    process.send_signal(signal.SIGINT)  # not among checkpoint.save_on_signals: KeyboardInterrupt
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "dinoreg: interrupted (Ctrl-C); a training run resumes from its last checkpoint when started again"]


# ------------------------------------------------------------------------------------------ paths and arguments


def test_config_naming_a_folder_says_so_and_what_to_give(tmp_path, capsys):
    code = main(["train", "--config", str(tmp_path), "--output-dir", str(tmp_path / "run")])
    line = one_line(capsys, code, f"'{tmp_path}' is a folder", "give a YAML file", "tiny_cpu")
    assert code == 2 and "does not exist" not in line


def test_config_naming_a_run_folder_points_to_its_config(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("optim:\n  epochs: 2\n")
    code = main(["bench", "memory", "--config", str(tmp_path)])
    one_line(capsys, code, "dinoreg bench memory: invalid configuration:", "is a folder",
             f"such as {tmp_path / 'config.yaml'}")


@pytest.mark.parametrize("recipe, override, named", [
    ("optim: [1, 2\n", [], "recipe.yaml: could not parse YAML at line 2, column 1"),
    ("optim:\n  lr: ${nope}\n", [], "optim.lr: Interpolation key 'nope' not found"),
    ("{}\n", ["optim.epochs=x"], "optim.epochs (override 'optim.epochs=x'): expected an integer, got 'x'"),
    ("{}\n", ["train.batch_size_per_gpu=1"], "train.batch_size_per_gpu: got 1; must be >= 2"),
])
def test_one_problem_in_a_config_is_one_line(recipe, override, named, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    code = main(["train", "--config", str(path), "--output-dir", str(tmp_path / "run"), *override])
    line = one_line(capsys, code, named)
    assert line.startswith("dinoreg train: invalid configuration: "), line
    assert code == 2


def test_a_config_that_is_not_text_is_one_line(tmp_path, capsys):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(128, 256)))
    one_line(capsys, main(["train", "--config", str(path), "--print-config"]), str(path), "cannot be read")


@pytest.mark.parametrize("args, named", [
    (["train", "--output-dir", "{file}"], "argument --output-dir: {file} is a file, not a folder"),
    (["train", "--output-dir", "{file}/run"], "{file} is a file, so {file}/run cannot be created"),
    (["bench", "heads", "--json", "{folder}"], "argument --json: {folder} is a folder; give a file path"),
    (["model-info", "--json", "{file}/info.json"], "argument --json: {file} is a file"),
    (["eval", "knn", "--weights", "w.pth", "--data", "synthetic", "--output-dir", "{file}"],
     "argument --output-dir: {file} is a file"),
    (["data", "export-synthetic", "{file}"], "{file} is a file, not a folder"),
    (["data", "pack", "{folder}", "--output", "{folder}/o", "--shard-size", "1XB"],
     "argument --shard-size: expected a size such as 1GiB, 500MB or 1000000 (bytes), got '1XB'"),
    (["data", "index", "{folder}", "--output", "{file}"], "argument --output/-o: {file} is a file, not a folder"),
    (["data", "index", "{folder}", "--output", "{folder}/o", "--workers", "0"],
     "argument --workers: expected a positive integer, got 0"),
    (["train", "--print-config", "--config"], "argument --config: expected one argument"),
    (["bench", "memory", "--gpu-memory-gib", "-1"], "argument --gpu-memory-gib: expected a positive number, got -1.0"),
    (["bench", "memory", "--gpu-memory-gib", "nan"], "argument --gpu-memory-gib: expected a positive number, got nan"),
    (["bench", "memory", "--reserve-gib", "-0.5"], "argument --reserve-gib: expected a number >= 0, got -0.5"),
    (["eval", "segmentation", "--weights", "w.pth", "--output-dir", "o", "--weight-decay", "x"],
     "argument --weight-decay: expected a number >= 0, got 'x'"),
])
def test_a_bad_argument_or_path_is_refused_in_one_line_before_any_work(args, named, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    paths = {"file": tmp_path / "file", "folder": tmp_path}
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(**paths) for arg in args])
    one_line(capsys, exit_info.value.code, named.format(**paths), "--help")


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    """Only the project's InputError (and OSError) become one line: a ValueError from inside the code is a bug, and
    propagates with its traceback (before, `dinoreg train` turned every ValueError into one line)."""
    from dinoreg.errors import InputError  # noqa: PLC0415
    from dinoreg.train import loop  # noqa: PLC0415
    from dinoreg.train.initial_weights import StartError  # noqa: PLC0415

    assert issubclass(StartError, InputError) and issubclass(StartError, ValueError)  # old handlers still catch it

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(loop, "train", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["train", "--output-dir", str(tmp_path / "bug"), *TINY])

    def user_error(*args, **kwargs):
        raise StartError("train.init_from: /nowhere does not exist; give a dinoreg run")

    monkeypatch.setattr(loop, "train", user_error)
    assert main(["train", "--output-dir", str(tmp_path / "user"), *TINY]) == 1
    assert capsys.readouterr().err == "dinoreg train: train.init_from: /nowhere does not exist; give a dinoreg run\n"


@pytest.mark.parametrize("args, named", [
    (["data", "index", "{folder}/nothing", "--output", "{folder}/o"], "{folder}/nothing does not exist"),
    (["data", "index", "{file}", "--output", "{folder}/o"], "{file} is neither a folder nor a .txt file list"),
    (["data", "index", "{folder}/empty", "--output", "{folder}/o"], "no images to index"),
    (["data", "pack", "synthetic", "--output", "{folder}/o"], "the synthetic dataset lives in memory"),
    (["data", "pack", "{folder}/empty", "--output", "{folder}/busy"], "--output {folder}/busy exists and is not an "
                                                                        "empty folder"),
])
def test_a_dataset_tool_refuses_a_bad_source_or_output_in_one_line(args, named, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    paths = {"file": tmp_path / "file", "folder": tmp_path}
    code = main([arg.format(**paths) for arg in args])
    line = one_line(capsys, code, named.format(**paths))
    assert line.startswith(f"dinoreg data {args[1]}: error: ") and code == 2
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))  # nothing left behind
