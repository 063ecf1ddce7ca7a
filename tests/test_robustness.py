"""Robustness: a corpus of bad inputs with the exact behaviour each gets, interruptions (Ctrl-C,
SIGTERM, a hang-up, kill -9) and resumes, output nobody reads, a loss that turns NaN, a checkpoint
that cannot be written, a step out of GPU memory, and two processes under torchrun.

Every bad input ends in one line on stderr naming what and where, exit code 2, and nothing
written; or, where DESIGN says rows are skipped, a counted skip in the summary line."""
import errno
import json
import os
import pathlib
import pty
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import sample
import train
from tests.conftest import separable_pairs, tiny_llama, write_jsonl
from support import cli, loading, run_state

ROOT = Path(__file__).resolve().parents[1]
PAIR = separable_pairs(1)[0]


def tiny_args(tiny_path, data, out_dir, *extra):
    return ["--base-model", tiny_path, "--data", str(data), "--test-data", "", "--out-dir", str(out_dir),
            "--head-width", "32", "--head-layers", "1", "--head-heads", "2", "--batch-size", "4",
            "--cutoff", "64", "--samples", "0", "--device", "cpu", *extra]


def fails_cleanly(capsys, main, argv, out_dir, message):
    """main(argv) through cli.run, the scripts' entry point: exit code 2, one line naming the
    problem, no traceback, nothing written to out_dir."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == cli.USAGE_ERROR
    assert len(err) >= 1 and err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert len(err[-1]) < 400  # a huge bad line is named, not echoed
    assert not out_dir.exists() or not any(out_dir.iterdir())


# ------------------------------------------------------------------------------------------------
# bad data files: (file name, content, the message's key words)

BAD_FILES = [
    ("empty.jsonl", b"", "empty.jsonl: empty file"),
    ("blank.jsonl", b"\n  \n", "blank.jsonl: empty file"),
    ("not_json.jsonl", b"chosen: yes\n", "not_json.jsonl:1: invalid JSON"),
    ("second_line.jsonl", json.dumps(PAIR).encode() + b"\n{\"chosen\": \n", "second_line.jsonl:2: invalid JSON"),
    ("list_line.jsonl", b"[1, 2]\n", "list_line.jsonl:1: expected a JSON object, got list"),
    ("number.json", b"5", "number.json: expected a list of objects"),
    ("dict.json", b'{"rows": 5}', "dict.json: expected a list of objects"),
    ("other_fields.jsonl", b'{"question": "q", "answer": "a"}\n', "no 'chosen'/'rejected' fields"),
    ("no_rejected.jsonl", b'{"chosen": [{"role": "user", "content": "q"}]}\n', "no usable preference pair"),
    ("latin1.jsonl", b'{"chosen": "caf\xe9"}\n', "latin1.jsonl:1: not UTF-8 (byte 0xe9)"),
    ("huge_line.jsonl", b'{"chosen": "' + b"x" * 5_000_000 + b"\n", "huge_line.jsonl:1: invalid JSON"),
    ("table.csv", b"chosen,rejected\nYes,No\n", "unknown file type"),
    ("bad.parquet", b"PAR1 not really", "bad.parquet: cannot read as parquet"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_file(name, content, message, tiny_path, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "run"
    fails_cleanly(capsys, train.main, tiny_args(tiny_path, path, out), out, message)


def test_split_by_prompt_with_one_prompt_names_the_cause(tiny_path, tmp_path, capsys):
    one_prompt = [{"prompt": "Do you like tea?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(6)]
    path = write_jsonl(tmp_path / "one_prompt.jsonl", one_prompt)
    out = tmp_path / "run"
    fails_cleanly(capsys, train.main, tiny_args(tiny_path, path, out), out,
                  "one_prompt.jsonl: every pair has the same prompt, so splitting by prompt leaves no test pairs: "
                  "give --test-data FILE")


def test_missing_data_file(tiny_path, tmp_path, capsys):
    out = tmp_path / "run"
    fails_cleanly(capsys, train.main, tiny_args(tiny_path, tmp_path / "nope.jsonl", out), out, "nope.jsonl: no such file")


# rows that are skipped and counted, each with the reason the summary line gives
SKIPPED_ROWS = [
    ({"chosen": PAIR["chosen"]}, "missing field"),
    ({"prompt": "q", "chosen": 5, "rejected": "No."}, "wrong type"),
    ({"prompt": "q", "chosen": {"role": "assistant", "content": "Yes."}, "rejected": "No."}, "wrong type"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "Yes.", "rejected": "No."}, "bad roles"),
    ({"prompt": [{"role": "user", "content": ""}], "chosen": "Yes.", "rejected": "No."}, "empty message"),
    ({"prompt": "q", "chosen": "", "rejected": "No."}, "empty response"),
    ({"prompt": "q", "chosen": "Yes.", "rejected": "Yes."}, "chosen == rejected"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Yes."}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "No."}]}, "prompts differ"),
]


def test_unusable_rows_are_skipped_and_counted(tiny_path, tmp_path, capsys):
    rows = separable_pairs(8) + [row for row, _ in SKIPPED_ROWS]
    rows.append({"prompt": "long " * 200, "chosen": "Yes.", "rejected": "No."})  # longer than the cutoff
    rows.append({"prompt": "q", "chosen": "Yes. " * 100_000, "rejected": "No."})  # a huge answer: cut at the cutoff
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "run"
    summary = train.main(tiny_args(tiny_path, path, out, "--max-steps", "1", "--test-fraction", "0.3",
                                   "--max-prompt", "64"))
    printed = capsys.readouterr().out
    expected = {}
    for _, reason in SKIPPED_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    line = next(x for x in printed.splitlines() if x.startswith("mixed.jsonl:"))
    assert line.startswith(f"mixed.jsonl: {len(rows)} rows, 10 pairs kept, skipped: ")
    for reason, n in expected.items():
        assert f"{reason} {n}" in line
    assert "1 of " in printed and "dropped: prompt too long (cutoff 64" in printed  # the long prompt
    assert summary["train_pairs"] + summary["test_pairs"] == 9  # 8 good pairs + the huge answer, cut to fit


# ------------------------------------------------------------------------------------------------
# flags out of range: exit code 2 before anything is read or written

BAD_FLAGS = [
    (["--alpha-tilde", "0"], "--alpha-tilde must be > 0"),
    (["--alpha-tilde", "-1"], "--alpha-tilde must be > 0"),
    (["--alpha0", "-0.5"], "--alpha0 must be >= 0"),
    (["--beta", "-0.1"], "--beta must be >= 0"),
    (["--unlikelihood", "-1"], "--unlikelihood must be >= 0"),
    (["--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
    (["--cutoff", "1"], "--cutoff must leave room for a prompt token and a response token"),
    (["--max-prompt", "0"], "--max-prompt must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--test-fraction", "1"], "--test-fraction must be in (0, 1)"),
    (["--head-width", "30"], "--head-width 30 must be a multiple of 2 x --head-heads 2"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_flag_out_of_range(flags, message, tiny_path, tmp_path, capsys):
    out = tmp_path / "run"
    fails_cleanly(capsys, train.main, tiny_args(tiny_path, tmp_path / "unread.jsonl", out, *flags), out, message)


def test_device_map_places_the_frozen_model_and_the_head_beside_its_output_layer(tiny_path, tmp_path):
    """--device-map (for a frozen model spread over GPUs) goes through accelerate; on a CPU-only
    machine "cpu" is the one map there is, and the run is the same as without it."""
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(10))
    plain = train.main(tiny_args(tiny_path, data, tmp_path / "plain", "--max-steps", "2"))
    mapped = train.main(tiny_args(tiny_path, data, tmp_path / "mapped", "--max-steps", "2", "--device-map", "cpu"))
    assert mapped["eval/rewards/margins"] == pytest.approx(plain["eval/rewards/margins"], abs=1e-6)


def test_base_model_folder_that_does_not_exist(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(4))
    out = tmp_path / "run"
    fails_cleanly(capsys, train.main, tiny_args(str(tmp_path / "no-model"), data, out), out, "no such folder")


# ------------------------------------------------------------------------------------------------
# checkpoints: missing files, corrupted weights, another base model, an existing run


@pytest.fixture(scope="module")
def trained(tiny_path, tmp_path_factory):
    """A finished tiny run (2 steps) and its data."""
    d = tmp_path_factory.mktemp("trained")
    data = write_jsonl(d / "pairs.jsonl", separable_pairs(10))
    train.main(tiny_args(tiny_path, data, d / "run", "--max-steps", "2"))
    return d / "run", data


def copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    return run


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage,message", [
    ("no head", "no head.safetensors"),
    ("no config", "no config.json"),
    ("garbage head", "head.safetensors: cannot load the head"),
    ("truncated head", "head.safetensors: cannot load the head"),
    ("garbage config", "config.json: unreadable checkpoint config"),
    ("garbage trainer state", "trainer_state.pt: unreadable"),
])
def test_damaged_checkpoint(damage, message, trained, tiny_path, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    ckpt = run / "checkpoint"
    {"no head": lambda: (ckpt / "head.safetensors").unlink(),
     "no config": lambda: (ckpt / "config.json").unlink(),
     "garbage head": lambda: (ckpt / "head.safetensors").write_bytes(b"\x00" * 100),
     "truncated head": lambda: (ckpt / "head.safetensors").write_bytes((ckpt / "head.safetensors").read_bytes()[:500]),
     "garbage config": lambda: (ckpt / "config.json").write_text("{not json"),
     "garbage trainer state": lambda: (ckpt / "trainer_state.pt").write_bytes(b"PK\x03\x04 not a zip"),
     }[damage]()
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, tiny_args(tiny_path, trained[1], run, "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1] and "Traceback" not in "".join(err)
    assert snapshot(run) == before  # a failed resume changes nothing
    if damage != "garbage trainer state":  # sample.py reads the same checkpoint the same way
        with pytest.raises(SystemExit) as e:
            cli.run(sample.main, ["--checkpoint", str(run), "--prompt", "hi", "--device", "cpu"])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_checkpoint_of_another_base_model(trained, tiny_path, tokenizer, tmp_path, capsys):
    """Named in the config: --resume with another --base-model stops before touching the run;
    sample.py finds that the base named in the config no longer fits the head (its hidden size)."""
    other = tmp_path / "other-llama"
    model = tiny_llama(tokenizer)
    model.config.hidden_size = 32  # a different model: rebuild it with the new width
    type(model)(model.config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    argv = tiny_args(str(other), trained[1], run, "--resume")
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, argv)
    assert e.value.code == 2
    assert f"was trained with --base-model {tiny_path}, not {other}" in capsys.readouterr().err
    assert snapshot(run) == before

    config = json.loads((run / "checkpoint" / "config.json").read_text())
    (run / "checkpoint" / "config.json").write_text(json.dumps({**config, "base_model": str(other)}))
    with pytest.raises(SystemExit) as e:
        cli.run(sample.main, ["--checkpoint", str(run), "--prompt", "hi", "--device", "cpu"])
    assert e.value.code == 2
    assert "(hidden size 64, vocabulary 49152), not on a model with hidden size 32" in capsys.readouterr().err


def test_resume_with_other_data_order_is_refused(trained, tiny_path, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    fails = lambda flags, message: (  # noqa: E731
        pytest.raises(SystemExit, cli.run, train.main, tiny_args(tiny_path, trained[1], run, "--resume", *flags)),
        message in capsys.readouterr().err)
    for flags, message in ((["--batch-size", "2"], "was trained with --batch-size 4, not 2"),
                           (["--seed", "1"], "was trained with --seed 0, not 1"),
                           (["--head-width", "64"], "was trained with --head-width 32, not 64")):
        raised, said = fails(flags, message)
        assert raised.value.code == 2 and said


def test_an_existing_run_is_not_overwritten(trained, tiny_path, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, tiny_args(tiny_path, trained[1], run))
    assert e.value.code == 2 and "already holds a run: --resume continues it" in capsys.readouterr().err
    assert snapshot(run) == before


@pytest.mark.parametrize("flags,message", [
    (["--checkpoint", "/no/such/run", "--prompt", "hi"], "no config.json"),
    (["--checkpoint", "RUN", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--checkpoint", "RUN", "--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--checkpoint", "RUN"], "give --prompt TEXT (repeatable) or --prompts-file FILE"),
    (["--checkpoint", "RUN", "--prompts-file", "LATIN1"], "not UTF-8 (byte 0xe9"),
    (["--checkpoint", "RUN", "--prompts-file", "EMPTY.jsonl"], "empty file"),
])
def test_sample_bad_input(flags, message, trained, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    names = {"RUN": str(trained[0]), "LATIN1": str(tmp_path / "latin1.txt"), "EMPTY.jsonl": str(tmp_path / "empty.jsonl")}
    with pytest.raises(SystemExit) as e:
        cli.run(sample.main, [names.get(f, f) for f in flags] + ["--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1] and "Traceback" not in "".join(err)


def test_sample_alpha0_is_evaluates_dial(trained, tmp_path):
    """--alpha0 a sets α0 = α̃ = a (pi~ ∝ pi1·exp(Q_R/a)), as evaluate.py's --alpha0 does."""
    out = tmp_path / "answers.json"
    sample.main(["--checkpoint", str(trained[0]), "--prompt", "Do you like tea?", "--alpha0", "2",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["alpha0"] == written["alpha_tilde"] == 2.0


def test_real_script_exit_codes(tiny_path, tmp_path):
    """The wiring of `python train.py`: exit code 2 and one line, for a flag and for a hub name
    that does not exist (offline here, so the hub is not even asked)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for flags, message in ((["--gamma", "2"], "error: --gamma must be in (0, 1], got 2.0"),
                           (["--data", "no-such-user/no-such-dataset"], "error: no-such-user/no-such-dataset: cannot load")):
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--base-model", tiny_path,
                               "--out-dir", str(tmp_path / "run")],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith(message)
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# interruptions: SIGINT / SIGTERM save and exit; kill -9 leaves the last checkpoint; resume is exact


@pytest.fixture(scope="module")
def long_run(tiny_path, tmp_path_factory):
    """Data for a run of 60 small steps (batch 2, 6 epochs) and the uninterrupted run's result: long
    enough that a signal sent after step 3 arrives well before the end, even on a busy machine."""
    d = tmp_path_factory.mktemp("long")
    data = write_jsonl(d / "pairs.jsonl", separable_pairs(24))
    argv = lambda out, *extra: tiny_args(tiny_path, data, out, "--batch-size", "2", "--epochs", "6",  # noqa: E731
                                         "--lr", "3e-3", *extra)
    train.main(argv(d / "full"))
    return argv, d / "full"


def default_signals():
    """In the child before train.py starts: SIGINT and SIGHUP as in a terminal. A child inherits an
    ignored signal, and train.py rightly keeps it ignored (run_state.StopSignals), so under `nohup`
    or a script's `cmd &` these tests would send signals the run was told to ignore."""
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def start(argv):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=default_signals)


def wait_for(condition, proc, timeout=120):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        assert time.time() - t0 < timeout, "the run never got there"
        time.sleep(0.01)


def training_steps(run):
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [json.loads(x) for x in lines if x.endswith("}") and '"loss"' in x]


def assert_same_as_uninterrupted(run, full):
    a, b = load_file(full / "checkpoint" / "head.safetensors"), load_file(run / "checkpoint" / "head.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    drop_speed = lambda rs: [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in rs]  # noqa: E731
    assert drop_speed(training_steps(run)) == drop_speed(training_steps(full))


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, cli.INTERRUPTED), (signal.SIGTERM, cli.TERMINATED),
                                         (signal.SIGHUP, cli.HUNG_UP)], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_saves_then_resume_is_exact(signum, code, long_run, tmp_path):
    argv, full = long_run
    run = tmp_path / "run"
    proc = start(argv(run))
    wait_for(lambda: len(training_steps(run)) >= 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("stopped at step ") and "Traceback" not in err
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert 3 <= config["step"] < 60 and config["step"] == training_steps(run)[-1]["step"]
    cli.run(train.main, argv(run, "--resume"))
    assert_same_as_uninterrupted(run, full)


def the_checkpoint_loads(run):
    """run/checkpoint loads as sample.py and --resume read it, and nothing half-written is left
    beside it; returns its step."""
    _, _, config = loading.load_adapter(run / "checkpoint")
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == config["step"]
    assert not (run / ".checkpoint-tmp").exists() and not (run / ".checkpoint-old").exists()
    return config["step"]


def test_a_dropped_ssh_session_saves_and_exits(long_run, tmp_path):
    """The run's terminal goes away (its pty hangs up: every write to it fails with EIO), then
    SIGHUP arrives, as when an SSH connection drops: the run saves and exits 129 all the same."""
    argv, _ = long_run
    run = tmp_path / "run"
    master, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv(run)], stdin=subprocess.DEVNULL,
                            stdout=terminal, stderr=terminal, cwd=ROOT, preexec_fn=default_signals)
    os.close(terminal)
    os.set_blocking(master, False)

    def reading_the_terminal(n_steps):
        try:
            os.read(master, 1 << 16)
        except OSError:  # nothing to read yet
            pass
        return len(training_steps(run)) >= n_steps

    try:
        t0 = time.time()
        while not reading_the_terminal(3):
            assert proc.poll() is None and time.time() - t0 < 120, "the run ended before it could be interrupted"
            time.sleep(0.01)
    finally:
        os.close(master)  # the terminal hangs up
    n = len(training_steps(run))
    wait_for(lambda: len(training_steps(run)) > n, proc)  # a step written to a hung-up terminal (then SIGHUP comes)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) == cli.HUNG_UP
    assert the_checkpoint_loads(run) == training_steps(run)[-1]["step"] >= 3


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_output_nobody_reads_does_not_stop_the_run(closed, long_run, tmp_path):
    """`train.py | head -1`, or a `tee` that died: the reader of stdout (or of stderr, where the
    progress bar is) is gone before the first line. The output is dropped and the run goes on: exit
    code 0 (not 120, from the interpreter's last flush of stdout), every step in metrics.jsonl,
    the checkpoint saved at the end, and nothing about a broken pipe on the other stream."""
    argv, _ = long_run
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv(run, "--max-steps", "4")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    getattr(proc, closed).close()
    other = (proc.stderr if closed == "stdout" else proc.stdout).read()
    assert proc.wait(timeout=120) == 0, other[-2000:]
    assert not any(word in other for word in ("Traceback", "Exception ignored", "BrokenPipe")), other[-2000:]
    assert [r["step"] for r in training_steps(run)] == [1, 2, 3, 4]
    assert the_checkpoint_loads(run) == 4 and (run / "summary.json").exists()


def test_a_hang_up_stays_ignored_under_nohup_and_a_second_one_does_not_stop_at_once():
    """nohup starts the run with SIGHUP ignored: it stays ignored. A dropped session may send
    SIGHUP twice: the second does not stop the run before it saves (a second Ctrl-C would), and
    after the first, SIGHUP stays ignored while the run exits."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with run_state.StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.01)
            assert stop.code == 0
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with run_state.StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.01)
            assert stop.code == cli.HUNG_UP
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # further hang-ups stay harmless while it exits
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with run_state.StopSignals():
            pass
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # no hang-up: put back as it was
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_kill_9_leaves_a_checkpoint_that_resumes_exactly(long_run, tmp_path):
    argv, full = long_run
    run = tmp_path / "run"
    proc = start(argv(run, "--save-every", "1"))

    def saved_step():
        try:
            return json.loads((run / "checkpoint" / "config.json").read_text())["step"]
        except (OSError, ValueError):  # none yet, or caught between the two renames of a save
            return 0

    wait_for(lambda: saved_step() >= 3, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    cli.run(train.main, argv(run, "--resume"))
    assert_same_as_uninterrupted(run, full)


def test_a_loss_that_is_not_finite_stops_and_keeps_the_last_checkpoint(long_run, tmp_path, monkeypatch, capsys):
    argv, _ = long_run
    run = tmp_path / "run"
    calls = {"n": 0}
    real_loss = train.q_adapter_loss

    def poisoned(*a, **k):  # the 6th batch's loss is NaN
        calls["n"] += 1
        loss, metrics = real_loss(*a, **k)
        return (loss * float("nan"), {**metrics, "loss": float("nan")}) if calls["n"] == 6 else (loss, metrics)

    monkeypatch.setattr(train, "q_adapter_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, argv(run, "--save-every", "2"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: the loss is nan and the gradient norm nan at step 6 (epoch 0, batches 5-5)" in err
    assert f"{run / 'checkpoint'} (step 4) is kept" in err
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(run / "checkpoint" / "head.safetensors").values())
    assert [r["step"] for r in training_steps(run)] == [1, 2, 3, 4, 5]


def fails_on_call(n, error, real, when=lambda *a, **k: True):
    """A stand-in for `real` that raises `error` on its n-th call for which `when` holds."""
    calls = {"n": 0}

    def stand_in(*a, **k):
        if when(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise error
        return real(*a, **k)
    return stand_in


def stops_with_one_line(capsys, argv, code):
    """train.py through cli.run: the exit code, and stderr's last line (returned) with no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and "Traceback" not in "".join(err), err[-5:]
    return err[-1]


# the one call that fails at the second save (step 4), and the cause the user is told
UNWRITABLE = {
    "head, disk full": (safetensors.torch, "save_file",  # safetensors wraps the OS error in its own
                        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                        lambda *a, **k: True, "No space left on device"),
    "trainer state, no permission": (pathlib.Path, "write_bytes", PermissionError(errno.EACCES, "Permission denied"),
                                     lambda path, data: path.name == "trainer_state.pt", "Permission denied"),
    "the rename, read-only": (os, "replace", OSError(errno.EROFS, "Read-only file system"),
                              lambda src, dst: pathlib.Path(src).name == ".checkpoint-tmp", "Read-only file system"),
}


@pytest.mark.parametrize("failing", UNWRITABLE, ids=list(UNWRITABLE))
def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one(failing, long_run, tmp_path, monkeypatch, capsys):
    """A full disk or a missing permission at any point of a save (the head, the trainer state,
    the rename that swaps the new checkpoint in, after the old one was moved aside): one line naming
    the folder and the cause, exit code 1, the previous checkpoint whole; --resume continues it
    exactly."""
    argv, full = long_run
    run = tmp_path / "run"
    owner, name, error, when, cause = UNWRITABLE[failing]
    monkeypatch.setattr(owner, name, fails_on_call(2, error, getattr(owner, name), when))
    last = stops_with_one_line(capsys, argv(run, "--save-every", "2"), cli.STOPPED)
    assert last == (f"error: cannot save the checkpoint in {run / 'checkpoint'}: {cause} "
                    f"(the last complete checkpoint, step 2, is kept)")
    assert the_checkpoint_loads(run) == 2
    monkeypatch.undo()
    if failing == "the rename, read-only":  # the old checkpoint had been moved aside, and came back
        cli.run(train.main, argv(run, "--resume"))
        assert_same_as_uninterrupted(run, full)


def test_out_of_gpu_memory_says_what_to_try_and_keeps_the_last_checkpoint(long_run, tmp_path, monkeypatch, capsys):
    """torch.cuda.OutOfMemoryError in the forward or backward of step 5 (on a CPU: raised in its
    place): one line with the step, the batch size and what to try, exit code 1, the checkpoint of
    step 4 whole; --resume continues it exactly."""
    argv, full = long_run
    run = tmp_path / "run"
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "batch_loss", fails_on_call(5, oom, train.batch_loss))
    last = stops_with_one_line(capsys, argv(run, "--save-every", "2"), cli.STOPPED)
    assert last.startswith("error: out of GPU memory at step 5 (epoch 0, batches 4-4) with --batch-size 2 "
                           "(the last complete checkpoint, step 4, is kept). Try --batch-size 1 --grad-accum 2 "
                           "(the same 2 pairs per step"), last
    assert "--extra max_batch" in last and "python bench.py" in last
    assert the_checkpoint_loads(run) == 4
    monkeypatch.undo()
    cli.run(train.main, argv(run, "--resume"))
    assert_same_as_uninterrupted(run, full)


# ------------------------------------------------------------------------------------------------
# two processes (torchrun, gloo on the CPU) equal one process with the same global batch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tiny_path, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(40))
    common = lambda out, batch: tiny_args(tiny_path, data, out, "--batch-size", batch, "--epochs", "2",  # noqa: E731
                                          "--lr", "3e-3")
    one = train.main(common(tmp_path / "one", "8"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "train.py"), *common(tmp_path / "two", "4")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pairwise accuracy") == 1  # only rank 0 prints its summary
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and two["steps"] == one["steps"] == 8
    a, b = load_file(tmp_path / "one" / "checkpoint" / "head.safetensors"), \
        load_file(tmp_path / "two" / "checkpoint" / "head.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for k in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/kl"):
        assert two[k] == pytest.approx(one[k], rel=1e-3, abs=1e-5)
    steps = lambda run: [r for r in training_steps(tmp_path / run)]  # noqa: E731
    for r1, r2 in zip(steps("one"), steps("two")):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
