"""Every string `dinoreg submit` puts into a job: a line break, a quote, `$(...)` or backticks either is refused with
one line (naming the option, the character and what is allowed) before anything is written, or provably does nothing:
the batch script keeps one line per option, its later #SBATCH lines survive, and no marker file appears.

`dinoreg submit --comment $'ok\\ntouch /tmp/pwned #'` used to write a bare `touch` line into the script, which ran, and
made sbatch ignore every later #SBATCH line (--time, --signal, --requeue)."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dinoreg.cli import main

NEWLINE, QUOTE, SUBSTITUTION, BACKTICKS = "ok\ntouch pwned #", "it's", "$(touch pwned)", "`touch pwned`"
HOSTILE = {"newline": NEWLINE, "quote": QUOTE, "substitution": SUBSTITUTION, "backticks": BACKTICKS}
DESCRIBED = {"newline": "a newline ('\\n')", "quote": '"\'"', "substitution": "'$'", "backticks": "'`'"}
# the options whose values are SLURM names: every hostile character is refused
NAMES = ["--job-name", "--partition", "--account", "--qos", "--constraint", "--exclude"]
CPU_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "1", "--timeout-min", "30"]
FLOPS = ["analyze", "flops", "--arch", "vit_tiny", "--patch-size", "16", "--img-size", "32", "--registers", "0"]


def refusal(tmp_path, monkeypatch, capsys, *args):
    """``dinoreg submit --dry-run ARGS`` from an empty folder: (exit code, stderr); nothing may be written."""
    monkeypatch.chdir(tmp_path)
    code = main(["submit", "--dry-run", *CPU_JOB, *args])
    captured = capsys.readouterr()
    assert not any(tmp_path.iterdir()), sorted(tmp_path.iterdir())
    return code, captured.err


def assert_one_line(code, err, option, kind):
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback, no usage
    assert err.startswith(f"dinoreg submit: {option} ") and DESCRIBED[kind] in err and "; use " in err, err


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("option", NAMES)
def test_slurm_names_refuse_every_hostile_character(option, kind, tmp_path, monkeypatch, capsys):
    code, err = refusal(tmp_path, monkeypatch, capsys, option, HOSTILE[kind], "--", *FLOPS)
    assert_one_line(code, err, option, kind)


@pytest.mark.parametrize("args, option", [
    (["--comment", NEWLINE], "--comment"),  # the injection
    (["--srun-arg=--comment=" + NEWLINE], "--srun-arg"),
    (["--python", "python3 " + NEWLINE], "--python"),
    (["--log-dir", f"logs/{NEWLINE}/%j"], "--log-dir"),
    (["--output-dir", f"runs/{NEWLINE}/%j"], "--output-dir"),
    (["--config", f"tiny_cpu{NEWLINE}"], "the job command"),
    ([f"optim.epochs={NEWLINE}"], "the job command"),
    (["--", *FLOPS[:-1], f"0{NEWLINE}"], "the job command"),
])
def test_a_line_break_is_refused_everywhere(args, option, tmp_path, monkeypatch, capsys):
    code, err = refusal(tmp_path, monkeypatch, capsys, *args)
    assert_one_line(code, err, option, "newline")
    for other in ("\r", "\0", "\u2028"):  # a carriage return, a NUL, a Unicode line separator
        code, err = refusal(tmp_path, monkeypatch, capsys, *[arg.replace("\n", other) for arg in args])
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"dinoreg submit: {option} "), err


@pytest.mark.parametrize("args, message", [
    (["--comment", "a\\b"], "'\\\\' at character 2 is not allowed (sbatch drops backslashes"),
    (["--log-dir", "logs\\x/%j"], "--log-dir 'logs\\\\x/%j': '\\\\' at character 5"),
    (["--log-dir", "logs/%u/%j"], "'%u' is not allowed: SLURM would expand it"),
    (["--output-dir", "runs/100%"], "'%' is not allowed"),
    (["--srun-arg", "hostname"], "--srun-arg 'hostname' is not an srun option"),
    (["--python", "python3 'unbalanced"], "--python \"python3 'unbalanced\": No closing quotation"),
    (["--comment", ""], "--comment is empty"),
])
def test_other_characters_slurm_or_a_shell_would_change(args, message, tmp_path, monkeypatch, capsys):
    code, err = refusal(tmp_path, monkeypatch, capsys, *args, "--", *FLOPS)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_dry_run_shows_the_job_command_and_python_quoted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "--dry-run", *CPU_JOB, "--comment", f"{QUOTE} {SUBSTITUTION} {BACKTICKS}", "--python",
                 f"env X={QUOTE!r} python3", "--", *FLOPS, "--json", f"{SUBSTITUTION}.json"]) == 0
    out = capsys.readouterr().out
    assert f"#SBATCH --comment={shlex.quote(f'{QUOTE} {SUBSTITUTION} {BACKTICKS}')}" in out
    assert "python in the job: env 'X=it'\"'\"'s' python3" in out
    assert f"runs: dinoreg {shlex.join([*FLOPS, '--json', f'{SUBSTITUTION}.json'])}" in out


def test_an_output_dir_with_quotes_and_substitutions_is_quoted_where_it_reaches_the_script(tmp_path, monkeypatch,
                                                                                           capsys):
    """The default log folder is under --output-dir, so the output dir reaches the #SBATCH lines and the srun line
    (quoted as the --log-dir of the real job below); the training command carries it pickled."""
    monkeypatch.chdir(tmp_path)
    output_dir = f"runs {QUOTE} {SUBSTITUTION} {BACKTICKS} # x/%j"
    assert main(["submit", "--dry-run", *CPU_JOB, "--output-dir", output_dir, "optim.epochs=1"]) == 0
    out = capsys.readouterr().out
    log_file = f"{tmp_path}/{output_dir}/slurm/%j_0_log.out"
    assert f"#SBATCH --output={shlex.quote(log_file)}\n" in out
    assert f"--output-dir {shlex.quote(f'{tmp_path}/{output_dir}')} optim.epochs=1\n" in out
    assert not any(tmp_path.iterdir())


def test_allowed_quotes_and_substitutions_are_inert_in_a_real_job(slurm_env, tmp_path):
    """Where quotes, `$(...)` and backticks are legitimate (a comment, a path, an srun option's value, the --python
    command, the job's own arguments), a real job carries them literally: the script has one line per option and one
    srun line, every later #SBATCH line took effect, nothing ran, and the job did its work."""
    hostile = f"{QUOTE} $(touch pwned1) `touch pwned2` # x"
    log_dir = tmp_path / f"logs {hostile}" / "%j"
    report = tmp_path / f"report {hostile}.json"
    python = f"env {shlex.quote('DINOREG_PROBE=' + hostile)} {shlex.quote(sys.executable)}"
    result = subprocess.run(
        [sys.executable, "-m", "dinoreg", "submit", *CPU_JOB, "--comment", hostile, f"--srun-arg=--comment={hostile}",
         "--python", python, "--log-dir", str(log_dir), "--json", str(tmp_path / "job.json"), "--wait", "--", *FLOPS,
         "--json", str(report)],
        env=slurm_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads((tmp_path / "job.json").read_text())
    assert json.loads(report.read_text())[0]["registers"] == 0  # the job's argument arrived as written
    assert not (tmp_path / "pwned1").exists() and not (tmp_path / "pwned2").exists()

    script = Path(info["submission_file"]).read_text().splitlines()
    commands = [line for line in script if line and not line.startswith("#")]
    assert commands[:2] == ["export PYTHONSAFEPATH=1", "export SUBMITIT_EXECUTOR=slurm"] and len(commands) == 3
    words = shlex.split(commands[2])
    assert words[0] == "srun" and f"--comment={hostile}" in words and words[-1] == str(log_dir)  # %j: submitit's
    assert words[-6:-4] == [f"DINOREG_PROBE={hostile}", sys.executable]
    assert f"#SBATCH --comment={shlex.quote(hostile)}" in script
    # SLURM read every #SBATCH line, those after --comment included: the comment whole, the time limit, the requeue
    # flag, the job name, the log path
    shown = subprocess.run(["scontrol", "-o", "show", "job", info["job_id"]], env=slurm_env, capture_output=True,
                           text=True, check=True, timeout=60).stdout
    assert f"Comment={hostile} " in shown
    assert "TimeLimit=00:30:00" in shown and "Requeue=1" in shown and "JobName=dinoreg " in shown
    assert f"StdOut={info['stdout']} " in shown
