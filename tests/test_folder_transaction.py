"""The export folder as a transaction (issue 28): one writer at a time, and the old folder or the new one, whole, at
every instant and after a kill at any point.

The fault injection works as storage engines test crash safety: a writer runs in a child process into a folder
holding a previous export and is SIGKILLed at each step boundary in turn (tests/kill_points.py: before every
rename and the swap, and after the last); after each kill the folder must be the old export or the new one, every
file with its sha256, and a rerun must succeed and leave nothing beside the folder. The writers: export.build's
publishing (torch-free, so each kill is cheap), one full ``python -m export.build`` killed just before its swap,
and the target side's ``python -m export.engine --backend rtx`` (it builds a TensorRT-RTX engine without a GPU and
updates the manifest).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from compress.plumbing.files import OutputError, atomic_write
from compress.plumbing.folder_transaction import FolderBusy, folder_lock, folder_transaction, lock_path
from conftest import run_in_process
from export.on_target.engine import read_manifest

REPO = Path(__file__).resolve().parents[1]
KILL_POINTS = REPO / "tests" / "kill_points.py"
USER_FILES = {"notes.txt": b"my notes\n", "other.onnx": b"not the tool's\n"}  # put into the folder by its user
OLD_FLAGS = ("--fp16",)  # the previous export: keep 0.7, float32 and float16 graphs
NEW_FLAGS = ("--keep", "0.6")  # the new one: float32 only, so the float16 files go with the old folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of ``folder``."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def verifies(folder: Path) -> bool:
    """The manifest parses and lists every file of the folder but the user's, each with its sha256."""
    try:
        listed = {a["path"]: a["sha256"] for a in json.loads((folder / "manifest.json").read_text())["artifacts"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    files = snapshot(folder)
    return set(files) == {*listed, "manifest.json", *USER_FILES} and all(files[p] == h for p, h in listed.items())


def state_of(folder: Path, old: dict[str, str], new: dict[str, str] | None) -> str:
    """'old', 'new', 'missing' (only the two-rename swap, killed between its renames) or 'torn'.

    ``new``: the new folder's snapshot where the writer is deterministic; None: any folder that verifies, keeps the
    user's files and is not the old one (an engine build's bytes and times differ from run to run)."""
    if not folder.is_dir():
        return "missing"
    files = snapshot(folder)
    if files == old:
        return "old"
    users_intact = all(files.get(name) == hashlib.sha256(data).hexdigest() for name, data in USER_FILES.items())
    complete = verifies(folder) and users_intact and (new is None or files == new)
    return "new" if complete else "torn"


def leftovers(folder: Path) -> list[str]:
    """What a writer left beside ``folder``: staging, old folder, lock file."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def with_user_files(export: Path, folder: Path) -> Path:
    shutil.copytree(export, folder)
    for name, data in USER_FILES.items():
        (folder / name).write_bytes(data)
    return folder


def reset(template: Path, folder: Path) -> None:
    """``folder`` as a copy of ``template``, and nothing else beside it."""
    for entry in folder.parent.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    shutil.copytree(template, folder)


def run_writer(kill_at: str, writer: list, no_exchange: bool = False) -> subprocess.CompletedProcess:
    """The writer in a child process, killed at ``kill_at`` (tests/kill_points.py)."""
    command = [sys.executable, str(KILL_POINTS), kill_at, *(["--no-exchange"] * no_exchange), *map(str, writer)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def changes_of(result: subprocess.CompletedProcess) -> list[str]:
    """The renames and swaps a writer made, from its last stderr line (tests/kill_points.py)."""
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1].removeprefix("changes: ").split(",")


def boundaries(changes: list[str], only: str | None = None) -> list[int]:
    """Before each change (of kind ``only``) and after the last one, as kill_points.py numbers them: every state
    the names can be in (after one change and before the next, the writers touch no name in the folder)."""
    chosen = [i for i, name in enumerate(changes) if only in (None, name)]
    return [2 * i + 1 for i in chosen] + [2 * chosen[-1] + 2]


def kill_at_each(template: Path, folder: Path, writer: list[str], points: list[int], new: dict | None,
                 no_exchange: bool = False) -> Counter:
    """Kill the writer at each boundary in turn, starting each time from ``template``; after each kill the state of
    the folder is counted, and a rerun must publish the new folder and leave nothing beside it."""
    old, states = snapshot(template), Counter()
    for point in points:
        reset(template, folder)
        killed = run_writer(str(point), writer, no_exchange)
        assert killed.returncode == -signal.SIGKILL, f"boundary {point} was not reached: {killed.stderr[-2000:]}"
        states[state_of(folder, old, new)] += 1
        rerun = run_writer("0", writer, no_exchange)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert state_of(folder, old, new) == "new" and leftovers(folder) == [], rerun.stderr[-2000:]
    return states


def report(writer: str, states: Counter) -> None:
    """The numbers the issue asks for, on stdout (pytest -s shows them)."""
    print(f"\n{writer}: {sum(states.values())} kill points, {states['torn']} torn folders "
          f"(old {states['old']}, new {states['new']}, missing until the next writer {states['missing']})")


def make_exports(root: Path) -> None:
    """The two exports, side by side (one process each)."""
    runs = [subprocess.Popen([sys.executable, "-m", "export.build", "--backend", "ort", *flags, "--out",
                              str(root / name)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, flags in (("old_export", OLD_FLAGS), ("new", NEW_FLAGS))]
    for process in runs:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    with_user_files(root / "old_export", root / "old")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The previous export (with the user's files added) and the new one's files, made once per test session:
    pytest-xdist's workers share them (the first one makes them, under a lock the others wait on)."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    root = shared / "folder_transaction_exports"
    with open(shared / "folder_transaction_exports.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits: a worker that arrives second uses the first one's exports
        if not (root / "old").is_dir():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            make_exports(root)
    assert verifies(root / "old")
    return {"old": root / "old", "new": root / "new"}


# --- one writer -------------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_at_once_naming_the_folder_and_the_holder(tmp_path):
    folder = tmp_path / "out"
    with folder_lock(folder, "python -m export.build"):
        with pytest.raises(FolderBusy) as refused:
            with folder_transaction(folder, "python -m export.engine"):
                pass
        assert lock_path(folder).read_text() == f"{os.getpid()} python -m export.build\n"
    message = str(refused.value)
    assert str(folder) in message and f"pid {os.getpid()}, python -m export.build" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file goes with the lock


def test_a_lock_whose_holder_was_killed_does_not_block(tmp_path, exports):
    folder = tmp_path / "work"
    shutil.copytree(exports["old"], folder)
    holder = subprocess.Popen([sys.executable, str(KILL_POINTS), "wait@before:exchange", "publish", exports["new"],
                               folder], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "waiting\n"  # inside its transaction, the staging folder complete
    holder.kill()
    holder.wait()
    assert lock_path(folder).read_text().split()[0] == str(holder.pid)  # the dead holder's lock file stays...
    assert state_of(folder, snapshot(exports["old"]), None) == "old"
    rerun = run_writer("0", ["publish", exports["new"], folder])  # ...and blocks no one
    assert rerun.returncode == 0 and "left by a writer that was killed" in rerun.stderr, rerun.stderr
    assert verifies(folder) and leftovers(folder) == []


def test_two_writers_one_folder_one_publishes_the_other_refuses_cleanly(tmp_path, exports):
    """Writer A holds the folder (stopped inside its transaction, before its swap); export.build and export.engine
    started meanwhile refuse in one line with exit 2 and write nothing; A then publishes a folder that verifies."""
    folder = tmp_path / "work"
    shutil.copytree(exports["old"], folder)
    before = snapshot(folder)
    holder = subprocess.Popen([sys.executable, str(KILL_POINTS), "wait@before:exchange", "publish", exports["new"],
                               folder], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "waiting\n"
    build = run_in_process("export.build", "--backend", "ort", *NEW_FLAGS, "--out", folder)
    engine = subprocess.run([sys.executable, "-m", "export.engine", str(folder), "--backend", "trt"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    for refused in (build, engine):
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert str(folder) in line and f"pid {holder.pid}, python -m export.build" in line
    assert snapshot(folder) == before
    holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0
    assert snapshot(folder) == {**snapshot(exports["new"]), **{n: snapshot(exports["old"])[n] for n in USER_FILES}}
    assert verifies(folder) and leftovers(folder) == []


# --- the transaction itself -------------------------------------------------------------------------------------


def test_an_error_or_ctrl_c_inside_leaves_the_folder_as_it_was(tmp_path, exports):
    folder = tmp_path / "work"
    shutil.copytree(exports["old"], folder)
    before = snapshot(folder)
    with pytest.raises(OutputError) as refused:
        with folder_transaction(folder, "test", from_current=True) as staging:
            (staging / "model.onnx").unlink()
            atomic_write(staging / "manifest.json", lambda temporary: Path(temporary).write_text("{}"))
            raise OutputError(f"cannot read {staging / 'golden.npz'}")
    assert str(refused.value) == f"cannot read {folder / 'golden.npz'}"  # the folder the user named, not staging
    assert snapshot(folder) == before and leftovers(folder) == []
    with pytest.raises(KeyboardInterrupt):
        with folder_transaction(folder, "test", from_current=True) as staging:
            (staging / "model.onnx").unlink()
            raise KeyboardInterrupt
    assert snapshot(folder) == before and leftovers(folder) == []
    # And the target side: export.engine fails inside its transaction here (no TensorRT): nothing changes.
    failed = subprocess.run([sys.executable, "-m", "export.engine", str(folder), "--backend", "trt"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert snapshot(folder) == before and leftovers(folder) == []


def test_an_update_starts_from_hard_links_and_a_symlinked_folder_keeps_its_link(tmp_path, exports):
    real, link = tmp_path / "real", tmp_path / "link"
    shutil.copytree(exports["old"], real)
    link.symlink_to(real)
    with folder_transaction(link, "test", from_current=True) as staging:
        assert staging.parent == tmp_path and sorted(p.name for p in staging.iterdir()) == sorted(snapshot(real))
        assert (staging / "model.onnx").stat().st_ino == (real / "model.onnx").stat().st_ino
        (staging / "added.txt").write_text("new")
    assert link.is_symlink() and (link / "added.txt").read_text() == "new" and (real / "notes.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_file_or_a_mount_point_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        with folder_transaction(blocker, "test"):
            pass
    with pytest.raises(OutputError, match="mount point"):
        with folder_transaction(Path("/proc"), "test"):
            pass


# --- fault injection ----------------------------------------------------------------------------------------------


def test_export_build_killed_at_every_step_leaves_the_old_or_the_new_export(tmp_path, exports):
    """export.build's publishing (export.publishing, as export_model runs it) killed before each staged file, the
    manifest and the swap and after the swap, with RENAME_EXCHANGE and with the two-rename fallback."""
    folder = tmp_path / "parent" / "work"
    folder.parent.mkdir()
    writer = ["publish", exports["new"], folder]
    reset(exports["old"], folder)
    changes = changes_of(run_writer("0", writer))
    new = snapshot(folder)
    assert changes[-1] == "exchange" and len(changes) == len(snapshot(exports["new"])) + 1
    states = kill_at_each(exports["old"], folder, writer, boundaries(changes), new)
    reset(exports["old"], folder)
    fallback = changes_of(run_writer("0", writer, no_exchange=True))
    assert fallback[-2:] == ["rename", "rename"]
    states += kill_at_each(exports["old"], folder, writer, boundaries(fallback, "rename"), new, no_exchange=True)
    report("export.build (publishing)", states)
    assert states["torn"] == 0 and states["missing"] == 1  # between the two renames


def test_a_full_export_build_killed_before_its_swap_leaves_the_old_export(tmp_path, exports):
    folder = tmp_path / "work"
    shutil.copytree(exports["old"], folder)
    writer = ["-m", "export.build", "--backend", "ort", *NEW_FLAGS, "--out", folder]
    killed = run_writer("before:exchange", writer)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    states = Counter([state_of(folder, snapshot(exports["old"]), None)])
    assert leftovers(folder) == [".work.lock", ".work.staging"]  # the dead writer's lock and its staging folder,
    assert verifies(folder.parent / ".work.staging")  # complete, the user's files included, when it was killed
    rerun = run_writer("0", ["publish", exports["new"], folder])  # a full export.build's rerun: test_export.py
    assert rerun.returncode == 0 and "left by a writer that was killed" in rerun.stderr, rerun.stderr[-3000:]
    assert state_of(folder, snapshot(exports["old"]), None) == "new" and leftovers(folder) == []
    assert not (folder / "model_native_fp16.onnx").exists()  # listed by the old manifest only: gone with it
    report("python -m export.build (full run)", states)
    assert states == Counter(old=1)


def test_export_engine_killed_at_every_step_leaves_the_old_or_the_new_folder(tmp_path, exports):
    """The target side: ``export.engine --backend rtx`` builds an engine (TensorRT-RTX builds without a GPU) and
    updates the manifest, killed before the engine, the manifest and the swap and after the swap (both swaps)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    template = with_user_files(exports["new"], tmp_path / "template")
    folder = tmp_path / "parent" / "work"
    folder.parent.mkdir()
    writer = ["-m", "export.engine", folder, "--backend", "rtx"]
    reset(template, folder)
    changes = changes_of(run_writer("0", writer))
    assert changes[-1] == "exchange" and any(a["role"] == "engine" for a in json.loads(
        (folder / "manifest.json").read_text())["artifacts"])
    states = kill_at_each(template, folder, writer, boundaries(changes), None)
    reset(template, folder)
    fallback = changes_of(run_writer("0", writer, no_exchange=True))
    states += kill_at_each(template, folder, writer, boundaries(fallback, "rename"), None, no_exchange=True)
    report("python -m export.engine --backend rtx", states)
    assert states["torn"] == 0 and states["missing"] == 1


def test_a_reader_puts_back_the_folder_a_killed_two_rename_swap_left_missing(tmp_path, exports):
    """The one state a reader cannot read: no folder, .<name>.old beside it (killed between the two renames)."""
    folder = tmp_path / "work"
    shutil.copytree(exports["old"], tmp_path / ".work.old")
    assert read_manifest(folder)["artifacts"] and snapshot(folder) == snapshot(exports["old"])
    assert leftovers(folder) == []
