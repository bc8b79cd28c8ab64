"""Output locations: what may be replaced, what is refused, and what a killed run leaves for the next one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, snapshot
from visprune.outputs import (
    ENGINE_SET,
    ONNX_SET,
    RECIPE,
    OutputLocationError,
    check_output,
    recover_interrupted,
    replacing,
    writing_in_place,
)


def onnx_set_folder(path, extra=()):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"schema": "visprune.onnx_set", "schema_version": 2}))
    (path / "vision.onnx").write_bytes(b"old graph")
    for name in extra:
        (path / name).write_text("user data")
    return path


def user_file(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a user's picture")
    return path


def test_missing_empty_and_same_kind_locations_are_accepted(tmp_path):
    check_output(tmp_path / "new" / "deeper" / "onnx", ONNX_SET)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", ONNX_SET)
    check_output(onnx_set_folder(tmp_path / "onnx"), ONNX_SET)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: onnx_set_folder(p, extra=["notes.txt"]), "holds files visprune did not write: notes.txt"),
    (lambda p: onnx_set_folder(p).parent, "a folder with other files"),
    (lambda p: user_file(p.parent / "photo.png"), "is a file"),
])
def test_anything_else_is_refused_without_force_and_replaced_with_it(tmp_path, make, fragment):
    target = make(tmp_path / "work" / "onnx")
    before = snapshot(tmp_path)
    with pytest.raises(OutputLocationError, match=fragment) as info:
        check_output(target, ONNX_SET)
    assert info.value.exit_code == 2 and "--force" in info.value.hint
    assert snapshot(tmp_path) == before
    check_output(target, ONNX_SET, force=True)


def test_another_kind_of_artifact_is_named(tmp_path):
    engine = onnx_set_folder(tmp_path / "onnx")
    with pytest.raises(OutputLocationError, match="is a visprune ONNX set, not a visprune engine"):
        check_output(engine, ENGINE_SET)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"schema": "visprune.recipe", "method": "none"}))
    check_output(recipe, RECIPE)
    with pytest.raises(OutputLocationError, match="is a visprune recipe, not a visprune ONNX set"):
        check_output(recipe, ONNX_SET)


@pytest.mark.parametrize("out, inputs, relation", [
    ("onnx", ["onnx"], "is the input"),
    ("onnx/engine", ["onnx"], "lies inside the input"),
    ("runs", ["runs/onnx"], "contains the input"),
])
def test_inputs_are_never_outputs_not_even_with_force(tmp_path, out, inputs, relation):
    onnx_set_folder(tmp_path / "runs" / "onnx")
    onnx_set_folder(tmp_path / "onnx")
    with pytest.raises(OutputLocationError, match=relation):
        check_output(tmp_path / out, ENGINE_SET, inputs=[tmp_path / i for i in inputs], force=True)


def test_a_file_in_the_parent_path_is_refused_before_work(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(OutputLocationError, match="is a file, not a folder"):
        check_output(tmp_path / "runs" / "demo" / "onnx", ONNX_SET, force=True)


def test_side_files_follow_the_same_rule(tmp_path):
    (tmp_path / "recipe.png").write_bytes(b"a user's picture")
    with pytest.raises(OutputLocationError, match="recipe.png exists and is not part of a visprune recipe"):
        check_output(tmp_path / "recipe.json", RECIPE, siblings=[tmp_path / "recipe.png"])


def test_replacing_keeps_the_old_artifact_until_the_new_one_is_complete(tmp_path):
    target = onnx_set_folder(tmp_path / "onnx")
    with pytest.raises(KeyboardInterrupt):
        with replacing(target) as staging:
            (staging / "vision.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    assert (target / "vision.onnx").read_bytes() == b"old graph" and len(list(tmp_path.iterdir())) == 1
    with replacing(target) as staging:
        (staging / "vision.onnx").write_bytes(b"new graph")
    assert (target / "vision.onnx").read_bytes() == b"new graph" and len(list(tmp_path.iterdir())) == 1


def test_writing_in_place_restores_the_old_folder_on_failure(tmp_path):
    target = onnx_set_folder(tmp_path / "run")
    with pytest.raises(RuntimeError):
        with writing_in_place(target):
            (target / "partial").write_text("x")
            raise RuntimeError("stage failed")
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "vision.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


KILLED_WRITER = """
import sys, time
from pathlib import Path
from visprune.outputs import replacing, writing_in_place
target, mode = Path(sys.argv[1]), sys.argv[2]
with (replacing(target) if mode == "staging" else writing_in_place(target)) as folder:
    (folder / "vision.onnx").write_bytes(b"partial")
    print("ready", flush=True)
    time.sleep(60)
"""


def start_writer(target, mode):
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), mode], stdout=subprocess.PIPE, cwd=REPO)
    assert child.stdout.readline().strip() == b"ready"
    return child


@pytest.mark.parametrize("mode", ["staging", "in-place"])
def test_what_a_killed_run_leaves_is_cleaned_by_the_next_run(tmp_path, mode):
    target = onnx_set_folder(tmp_path / "onnx")
    child = start_writer(target, mode)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(list(tmp_path.iterdir())) > 1  # the killed run's staging folder, or the old one moved aside
    check_output(target, ONNX_SET)
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]
    assert (target / "vision.onnx").read_bytes() == b"old graph"


def test_an_old_artifact_moved_aside_by_a_killed_run_comes_back(tmp_path):
    """The window between renaming the old artifact aside and renaming the new one in."""
    target = onnx_set_folder(tmp_path / "onnx")
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout)
    os.replace(target, tmp_path / f".onnx.visprune-old.{dead_pid}.abc")
    recover_interrupted(target)
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"] and (target / "vision.onnx").exists()


def test_a_live_writer_is_not_disturbed(tmp_path):
    target = onnx_set_folder(tmp_path / "onnx")
    child = start_writer(target, "staging")
    try:
        with pytest.raises(OutputLocationError, match=f"Another visprune process \\(PID {child.pid}\\)"):
            check_output(target, ONNX_SET)
    finally:
        child.kill()
        child.wait()
    time.sleep(0.1)
    check_output(target, ONNX_SET)
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]


def test_a_sigterm_that_lands_in_a_finalizer_still_interrupts():
    """Python drops an exception raised in a `__del__`; a SIGTERM handled there used to be lost, and an export
    ran on to the end and exited 0 (seen once in the test below: regex's Group.__del__ took it)."""
    from cli.main import sigterm_as_interrupt

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at a loop's back edge: here, inside the finalizer
                pass

    hook = sys.unraisablehook
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        SignalledWhileCollected()  # no reference kept: finalized at once
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and sys.unraisablehook is hook  # both restored


@pytest.mark.slow
def test_sigterm_during_an_export_keeps_the_old_set_and_leaves_nothing(exported, tmp_path):
    """SIGTERM unwinds like Ctrl-C: exit 130, the staging folder is removed, the set being replaced is intact."""
    import shutil

    target = tmp_path / "onnx"
    shutil.copytree(exported["pruned-onnx"], target)
    before = snapshot(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "from cli.main import entry_point; entry_point()", "export",
                              "--out", str(target), "--quiet"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while not any(".visprune-staging." in p.name for p in tmp_path.iterdir()):  # the export is under way
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before
