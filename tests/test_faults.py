"""What clusters do to a run, done for real: SIGTERM and SIGINT sent to a training process (one process and two
under torchrun), torn, garbled and missing checkpoints, a checkpoint folder carrying a pickle that would run code,
a full tmpfs and a read-only one under the checkpoints, the best weights and the teacher cache, and a second process
in a run folder that another holds. Each case checks the exit code, the one-line message and that no earlier
checkpoint was lost; resumed runs must give the same loss sequence as an uninterrupted one, bit for bit."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bispikclm.cli import main
from bispikclm.errors import UserError
from bispikclm.runfolder import (LOCK, Interrupted, RunFolderBusy, RunLock, WriteFailed, check_manifest, committing,
                                 load_state, save_state, write_manifest)
from helpers import REPO, cli, cli_command, make_teacher, make_tokenizer, mount, tmpfs, write_recipe

STEPS = 60


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
    """A small OPT teacher, a recipe of STEPS steps and the uninterrupted run of it (the reference)."""
    root = tmp_path_factory.mktemp("faults")
    teacher = make_teacher("opt", root / "opt", make_tokenizer(data_dir, root / "tok"))
    recipe = write_recipe(root / "r.yaml", teacher, data_dir, tokens=4 * 32 * STEPS)
    done = cli("train", str(recipe), "--out", str(root / "whole"))
    assert done.returncode == 0, done.stderr
    return root, teacher, recipe


def losses(run: Path) -> dict[int, float]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):        # a line being written
            rows.append(json.loads(line))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def logged(run: Path) -> int:
    return max(losses(run), default=0) if (run / "metrics.jsonl").is_file() else 0


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def start(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    argv, env = cli_command(*args, launcher=launcher)
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended too early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def same_run(run: Path, reference: Path) -> None:
    """``run`` logged every step once, with the reference's losses, and ended with its weights, bit for bit."""
    got, expected = losses(run), losses(reference)
    assert list(got) == list(range(1, STEPS + 1)) and got == expected
    a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(reference / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def intact(run: Path) -> list[str]:
    """The run's checkpoints, each checked against its manifest; ``latest`` names the newest; nothing half-written."""
    names = checkpoints(run)
    assert names and all(check_manifest(run / "checkpoints" / n) is None for n in names), names
    assert (run / "checkpoints" / "latest").read_text() == names[-1]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    return names


# ---- signals and the lock, through `bispikclm train` ----------------------------------------------------------------

def test_sigterm_checkpoints_and_resumes_bit_for_bit_and_a_second_writer_is_refused(setup):
    """SIGTERM: the run finishes its step, writes a checkpoint (none is due: save_every is 0), exits 143 with one
    line; meanwhile a second `--resume` into its folder is refused naming its PID, and touches nothing."""
    root, _, recipe = setup
    run = root / "sigterm"
    proc = start("train", str(recipe), "--out", str(run))
    wait_until(lambda: logged(run) >= 5, proc)
    proc.send_signal(signal.SIGSTOP)                 # held still, lock and all, while a second run tries
    try:
        before = (run / "metrics.jsonl").read_bytes()
        second = cli("train", str(recipe), "--out", str(run), "--resume")
        assert second.returncode == 2, second.stderr
        assert last_line(second.stderr).startswith(f"bispikclm train: error: {run} is in use by PID {proc.pid} (train "
                                                   f"on host ")
        assert (run / "metrics.jsonl").read_bytes() == before and not checkpoints(run)
        proc.send_signal(signal.SIGTERM)
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = logged(run)
    assert 5 <= step < STEPS and list(losses(run)) == list(range(1, step + 1))
    assert "SIGTERM received" in err
    assert last_line(err) == (f"bispikclm train: stopped by SIGTERM after step {step}; checkpoint {run}/checkpoints/"
                              f"step-{step:08d} is complete; run the same command with --resume to continue")
    assert intact(run) == [f"step-{step:08d}"] and not (run / LOCK).exists()

    resumed = cli("train", str(recipe), "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "warning" not in resumed.stderr           # a clean stop leaves no lock to take over
    same_run(run, root / "whole")


def test_resume_skips_torn_garbled_missing_and_pickled_checkpoints(setup, capsys):
    """SIGINT (exit 130) after several checkpoints; then the newest is torn (weights truncated), the one before
    garbled (trainer_state.json), `latest` names a folder that is gone, and a newer folder carries a pickle that would
    create a file. Resume says in one line which it skipped and why, runs none of the pickle, and continues from the
    newest intact checkpoint to the reference's losses. When no checkpoint is usable: one line, exit 2, nothing
    changed."""
    root, _, recipe = setup
    run = root / "damaged"
    proc = start("train", str(recipe), "--out", str(run), "--set", "train.save_every=2",
                 "--set", "train.keep_checkpoints=4")
    wait_until(lambda: logged(run) >= 9, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert " stopped by SIGINT after step " in last_line(err)
    names = intact(run)
    assert len(names) == 4
    ckpt = run / "checkpoints"
    torn, garbled, good = names[-1], names[-2], names[-3]
    with open(ckpt / torn / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    state = ckpt / garbled / "trainer_state.json"
    state.write_text(state.read_text().replace('"step"', '"stpe"', 1))
    (ckpt / "latest").write_text("step-00009999")

    marker = root / "pickle-ran"
    payload = pickle.dumps({"optimizer": _CreatesFile(str(marker))})
    pickle.loads(payload)                            # the payload is live: unpickling it creates the file
    assert marker.is_file()
    marker.unlink()
    crafted = ckpt / "step-00009998"                 # a folder from someone else, with a manifest that matches
    shutil.copytree(ckpt / good, crafted)
    (crafted / "state.safetensors").unlink()
    (crafted / "state.pt").write_bytes(payload)
    write_manifest(crafted)
    assert check_manifest(crafted) is None

    resumed = cli("train", str(recipe), "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not marker.exists(), "a pickle from the run folder ran"
    notes = [line for line in resumed.stderr.splitlines() if "resuming from" in line]
    assert len(notes) == 1
    assert notes[0].startswith(f"bispikclm: warning: resuming from {good}; skipped step-00009999 (named by latest, "
                               f"but missing); step-00009998 (state.safetensors is missing); {torn} (model.safetensors "
                               f"has 1000 bytes, the manifest says ")
    assert f"{garbled} (trainer_state.json does not match its sha256 in the manifest)" in notes[0]
    assert {p.name for p in ckpt.glob("damaged-*")} == {f"damaged-{n}" for n in ("step-00009998", torn, garbled)}
    same_run(run, root / "whole")

    # every checkpoint damaged: one line, exit 2, the folder exactly as it was
    for name in checkpoints(run):
        with open(ckpt / name / "model.safetensors", "r+b") as f:
            f.truncate(500)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert main(["train", str(recipe), "--out", str(run), "--resume", "--no-progress"]) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"bispikclm train: error: no usable checkpoint in {ckpt}: ")
    assert line.endswith("; train again into another folder") and "model.safetensors has 500 bytes" in line
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


class _CreatesFile:
    """Unpickling it opens (creates) a file: what a malicious ``state.pt`` would do, harmlessly."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_two_processes_agree_on_a_signal_to_one_and_on_the_checkpoint_to_resume(setup):
    """torchrun, 2 gloo processes: SIGTERM to the main process only; both stop after the same step with one
    checkpoint. The newest checkpoint is then torn; both processes resume from the one the main process verified,
    and the run ends exactly as an uninterrupted 2-process run."""
    root, _, recipe = setup
    recipe_args = ("--set", "train.save_every=3")
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531")
    reference = cli("train", str(recipe), "--out", str(root / "two-whole"), *recipe_args, launcher=launcher)
    assert reference.returncode == 0, reference.stderr
    run = root / "two"
    proc = start("train", str(recipe), "--out", str(run), *recipe_args, launcher=launcher)
    wait_until(lambda: logged(run) >= 7 and (run / LOCK).is_file(), proc)
    main_pid = json.loads((run / LOCK).read_text())["pid"]
    os.kill(main_pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    step = logged(run)
    assert f"bispikclm train: stopped by SIGTERM after step {step}; " in err, err[-3000:]
    names = intact(run)
    assert names[-1] == f"step-{step:08d}" and list(losses(run)) == list(range(1, step + 1))
    with open(run / "checkpoints" / names[-1] / "model.safetensors", "r+b") as f:
        f.truncate(2000)
    resumed = cli("train", str(recipe), "--out", str(run), "--resume", *recipe_args, launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count(f"bispikclm: warning: resuming from {names[-2]}; skipped {names[-1]} ") == 1
    got, expected = losses(run), losses(root / "two-whole")
    assert list(got) == list(range(1, STEPS + 1)) and got == expected


# ---- full and read-only disks ---------------------------------------------------------------------------------------

def stop_outside(proc: subprocess.Popen, folder: Path) -> None:
    """SIGSTOP ``proc`` at a moment it has no file under ``folder`` open (a file open for writing would keep the
    file system from being remounted read-only)."""
    while True:
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.01)
        fds = Path(f"/proc/{proc.pid}/fd")
        if not any(str(os.readlink(fd)).startswith(str(folder)) for fd in fds.iterdir() if fd.is_symlink()):
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.003)


def used_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.parametrize("where, how", [("checkpoints", "full"), ("checkpoints", "read-only"), ("best", "full")])
def test_a_full_or_read_only_disk_ends_in_one_line_and_keeps_what_was_written(setup, tmp_path, where, how):
    """The folder the run writes its checkpoints (or its best weights) to is a real tmpfs. Once the first one is
    written the process is stopped, the tmpfs shrunk to what it holds plus less than a checkpoint (or made
    read-only), and the process continued: exit 2 with one line, the earlier folders intact and verified."""
    root, _, recipe = setup
    run = tmp_path / "run"
    extra = ["--set", "train.save_every=2"] if where == "checkpoints" else [
        "--set", "train.eval_every=1", "--set", "train.early_stopping=100", "--set", "train.lr=0.01"]
    with tmpfs(run / where) as disk:
        proc = start("train", str(recipe), "--out", str(run), *extra)
        try:
            wait_until(lambda: any(disk.glob("step-*")), proc)
            stop_outside(proc, disk)
            option = "remount,ro" if how == "read-only" else f"remount,size={used_bytes(disk) + 64 * 1024}"
            assert mount("-o", option, target=disk)
        finally:
            proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        reason = "Read-only file system" if how == "read-only" else "No space left on device"
        line = last_line(err)
        assert line.startswith("bispikclm train: error: cannot write ") and f": {reason}" in line, line
        assert "Traceback" not in err
        if where == "checkpoints":
            assert line.endswith(f"; the earlier checkpoints in {disk} are kept") or "latest" in line, line
            intact(run)
        else:
            assert line.startswith(f"bispikclm train: error: cannot write the best weights {disk}/step-"), line
            assert line.endswith(f"; the earlier best weights in {disk} are kept")
            kept = sorted(disk.glob("step-*"))
            assert kept and all(check_manifest(v) is None for v in kept)
            assert not list(disk.glob(".tmp-*"))
        assert not (run / LOCK).exists()


def test_a_failed_write_keeps_the_earlier_folder(tmp_path):
    """committing() on a real full device: a tmpfs where this machine can mount one, else /dev/full (every write to
    it fails with ENOSPC) under the file the serializer writes."""
    from safetensors.torch import save_file

    with contextlib.ExitStack() as stack:
        parent = tmp_path / "disk"
        try:
            stack.enter_context(tmpfs(parent, "256k"))
            big, full = torch.zeros(200_000), None
        except pytest.skip.Exception:
            parent.mkdir(exist_ok=True)
            big, full = torch.zeros(10), Path("/dev/full")
        with committing(parent / "step-1") as tmp:
            save_file({"w": torch.ones(10)}, str(tmp / "model.safetensors"))
        with pytest.raises(WriteFailed) as err:
            with committing(parent / "step-1", "checkpoint step-1", "; the earlier one is kept") as tmp:
                if full is not None:
                    (tmp / "model.safetensors").symlink_to(full)
                save_file({"w": big}, str(tmp / "model.safetensors"))
        assert str(err.value) == "cannot write checkpoint step-1: No space left on device; the earlier one is kept"
        assert check_manifest(parent / "step-1") is None
        assert torch.equal(load_file(str(parent / "step-1" / "model.safetensors"))["w"], torch.ones(10))
        assert sorted(p.name for p in parent.iterdir()) == ["step-1"]


# ---- the teacher cache ----------------------------------------------------------------------------------------------

def _cache_parts(setup):
    from bispikclm import BiSpikCLMConfig
    from bispikclm.distill import SpADLoss, load_teacher
    from bispikclm.distill.teacher_cache import CacheSpec

    teacher = load_teacher(str(setup[1]))
    student = BiSpikCLMConfig.from_teacher_config(teacher.config, time_steps=2)
    spec = CacheSpec.for_loss(SpADLoss(student, teacher.config), student, teacher.config, top_k=8)
    seqs = torch.randint(0, teacher.config.vocab_size, (24, 32), generator=torch.Generator().manual_seed(0))
    return teacher, spec, seqs


def test_teacher_cache_stops_on_sigterm_resumes_refuses_a_second_builder_and_a_full_disk(setup, tmp_path):
    from bispikclm.distill.teacher_cache import TeacherCache

    teacher, spec, seqs = _cache_parts(setup)
    whole = TeacherCache.build(teacher, seqs, tmp_path / "whole", spec, "opt", batch_size=4, progress=False)

    calls = []

    def sigterm_in_second_batch(*_) -> None:          # a real SIGTERM, to this very process
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    hook = teacher.register_forward_hook(sigterm_in_second_batch)
    try:
        with pytest.raises(Interrupted) as stop:
            TeacherCache.build(teacher, seqs, tmp_path / "c", spec, "opt", batch_size=4, progress=False)
    finally:
        hook.remove()
    assert stop.value.exit_code == 143 and str(stop.value) == (
        f"stopped by SIGTERM while building the teacher cache {tmp_path / 'c'} (8 of 24 sequences done)")
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["done"] == 8
    assert check_manifest(tmp_path / "c") is not None and not (tmp_path / "c" / LOCK).exists()
    with pytest.raises(UserError, match="incomplete"):
        TeacherCache(tmp_path / "c")

    holder = _hold_in_child(tmp_path / "c")
    try:
        with pytest.raises(RunFolderBusy, match=f"is in use by PID {holder.pid} \\(holder on host "):
            TeacherCache.build(teacher, seqs, tmp_path / "c", spec, "opt", batch_size=4, progress=False)
    finally:
        holder.kill()
        holder.wait()
    cache = TeacherCache.build(teacher, seqs, tmp_path / "c", spec, "opt", batch_size=4, progress=False)
    for name, array in whole.arrays.items():
        assert np.array_equal(cache.arrays[name], array), name
    assert check_manifest(tmp_path / "c") is None

    with open(tmp_path / "c" / "hidden.npy", "r+b") as f:     # damaged after the build: refused, then rebuilt
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(UserError, match="is damaged \\(hidden.npy does not match its sha256"):
        TeacherCache(tmp_path / "c")
    rebuilt = TeacherCache.build(teacher, seqs, tmp_path / "c", spec, "opt", batch_size=4, progress=False)
    assert np.array_equal(rebuilt.arrays["hidden"], whole.arrays["hidden"])

    with tmpfs(tmp_path / "small", "64k") as disk:
        with pytest.raises(WriteFailed) as err:
            TeacherCache.build(teacher, seqs, disk / "c", spec, "opt", batch_size=4, progress=False)
        assert str(err.value).startswith(f"cannot write the teacher cache {disk / 'c'}: No space left on device "
                                         f"(the cache needs 0.00")
        assert not list((disk / "c").glob("*.npy")) and not (disk / "c" / LOCK).exists()


# ---- the lock -------------------------------------------------------------------------------------------------------

HOLDER = ("import sys, time\n"
          "from bispikclm.runfolder import RunLock\n"
          "for folder in sys.argv[1:]:\n"
          "    RunLock(folder, 'holder').acquire()\n"
          "print('held', flush=True)\n"
          "time.sleep(600)\n")


def _hold_in_child(*folders: Path) -> subprocess.Popen:
    """Another process that holds the locks of ``folders`` until it is killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, folders)], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_lock_refuses_a_second_process_and_takes_over_from_a_dead_one(tmp_path, capsys):
    holder = _hold_in_child(tmp_path / "run")
    record = json.loads((tmp_path / "run" / LOCK).read_text())
    assert record["pid"] == holder.pid and record["command"] == "holder"
    with pytest.raises(RunFolderBusy) as err:
        RunLock(tmp_path / "run", "train").acquire()
    assert str(err.value).startswith(f"{tmp_path / 'run'} is in use by PID {holder.pid} (holder on host ")
    assert str(err.value).endswith("; wait for it to end or stop it")
    holder.send_signal(signal.SIGKILL)              # dies holding it: the kernel drops the flock, the record stays
    holder.wait()
    with RunLock(tmp_path / "run", "train"):
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
        with RunLock(tmp_path / "run", "train"):     # re-entrant within a process
            pass
        assert (tmp_path / "run" / LOCK).exists()
    assert last_line(capsys.readouterr().err) == (
        f"bispikclm: warning: taking over the lock of {tmp_path / 'run'} from PID {holder.pid} (holder on host "
        f"{record['host']}, since {record['since']}), which is no longer running")
    assert list((tmp_path / "run").iterdir()) == []  # the lock file goes with the lock


def test_quickstart_is_refused_in_a_folder_another_process_holds(data_dir, tmp_path, capsys):
    holder = _hold_in_child(tmp_path / "qs")
    try:
        assert main(["quickstart", "--data", str(data_dir), "--out", str(tmp_path / "qs"), "--cache-dir",
                     str(tmp_path / "cache"), "--no-progress"]) == 2
    finally:
        holder.kill()
        holder.wait()
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"bispikclm quickstart: error: {tmp_path / 'qs'} is in use by PID {holder.pid} (holder ")
    assert sorted(p.name for p in (tmp_path / "qs").iterdir()) == [LOCK] and not (tmp_path / "cache").exists()


# ---- state without pickle -------------------------------------------------------------------------------------------

def test_optimizer_scheduler_and_rng_state_round_trip_bit_for_bit_without_pickle(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
        opt = torch.optim.AdamW([{"params": model[0].parameters(), "weight_decay": 0.1},
                                 {"params": list(model[1].parameters()) + list(model[2].parameters())}],
                                lr=0.01, betas=(0.9, 0.95))
        return model, opt, get_cosine_schedule_with_warmup(opt, 2, 10)

    def step(model, opt, sched):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    model, opt, sched = make()
    for _ in range(3):
        step(model, opt, sched)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "nested": {"none": None, "tuple": (1, 2.5, "x"), 3: [True, float("inf")]}}
    save_state(state, tmp_path / "state.safetensors")
    back = load_state(tmp_path / "state.safetensors")
    assert back["nested"] == state["nested"] and back["scheduler"] == state["scheduler"]
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(back["rng"], state["rng"])

    copy, opt2, sched2 = make()
    copy.load_state_dict(model.state_dict())
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    for _ in range(3):                              # both continue from the same RNG state
        torch.set_rng_state(back["rng"])
        step(copy, opt2, sched2)
        torch.set_rng_state(back["rng"])
        step(model, opt, sched)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), copy.parameters()))

    marker = tmp_path / "ran"
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(_CreatesFile(str(marker))))
    with pytest.raises(ValueError, match="evil.safetensors is not a saved state"):
        load_state(tmp_path / "evil.safetensors")
    assert not marker.exists()


def test_manifest_names_what_is_wrong(tmp_path):
    with committing(tmp_path / "step-1") as tmp:
        (tmp / "a.bin").write_bytes(b"a" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b" * 10)
    folder = tmp_path / "step-1"
    assert check_manifest(folder) is None
    (folder / "sub" / "b.bin").write_bytes(b"c" * 10)
    assert check_manifest(folder) == "sub/b.bin does not match its sha256 in the manifest"
    (folder / "a.bin").write_bytes(b"a" * 99)
    assert check_manifest(folder) == "a.bin has 99 bytes, the manifest says 100"
    (folder / "a.bin").unlink()
    assert check_manifest(folder) == "a.bin is missing"
    (folder / "manifest.json").write_text("{")
    assert check_manifest(folder) == "manifest.json is unreadable"
    (folder / "manifest.json").unlink()
    assert check_manifest(folder).startswith("no manifest.json")
