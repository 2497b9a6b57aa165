"""pdengine.locking: one writer per output directory, stale locks of dead processes taken over."""
import subprocess
import sys
import textwrap

import pytest

from pdengine.errors import InputError
from pdengine.locking import LOCK_NAME, DirectoryLock

HOLD = textwrap.dedent("""
    import sys, time
    from pdengine.locking import DirectoryLock
    lock = DirectoryLock(sys.argv[1], purpose="holder").acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        with pytest.raises(InputError, match=rf"in use by another pdengine process \(pid {proc.pid} on .*holder"):
            DirectoryLock(tmp_path / "out").acquire()
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = _holder(tmp_path / "out")
    proc.kill()  # SIGKILL: no clean-up ran
    proc.wait()
    with DirectoryLock(tmp_path / "out"):
        assert (tmp_path / "out" / LOCK_NAME).exists()


def test_released_lock_can_be_taken_again_and_a_file_is_refused(tmp_path):
    with DirectoryLock(tmp_path / "a"):
        pass
    with DirectoryLock(tmp_path / "a"):
        pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        DirectoryLock(tmp_path / "f").acquire()
