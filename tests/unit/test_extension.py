"""One compiled extension (async_wf._core) and one loader for every pure-Python twin."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import async_wf
from async_wf.checkpoint import _format, _keys

_NO_EXT = os.environ.get("ASYNC_WF_NO_EXTENSIONS", "") not in ("", "0")
PKG = Path(async_wf.__file__).parent

PROBE = """
import sys, warnings
# an editable install's finder maps async_wf._core to the installed tree's
# build whatever async_wf is imported: leave the import to sys.path alone
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import async_wf, async_wf.checkpoint
    from async_wf.checkpoint import _format, _keys
print(async_wf.CORE_IMPL)
print(_format._result_record is _format._py_result_record,
      _format._mapped_payload is _format._py_mapped_payload,
      _keys._quick_key is _keys._quick_key_py)
print(len([w for w in caught if issubclass(w.category, RuntimeWarning)]))
for w in caught:
    print(w.category.__name__, w.message)
"""


@pytest.mark.skipif(_NO_EXT, reason="ASYNC_WF_NO_EXTENSIONS is set")
def test_one_extension_serves_the_core_and_the_checkpoint_log() -> None:
    from async_wf import _core

    assert async_wf.core.Core is _core.Core
    assert _format._result_record is _core.result_record
    assert _format._mapped_payload is _core.mapped_payload
    assert _keys._quick_key is _core.quick_key


def test_a_missing_extension_warns_once_for_every_twin(tmp_path: Path) -> None:
    """A copy of the package without compiled files: one RuntimeWarning, every twin in Python."""
    shutil.copytree(PKG, tmp_path / "async_wf",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "ASYNC_WF_NO_EXTENSIONS"}
    env["PYTHONPATH"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True, cwd=tmp_path)
    lines = res.stdout.splitlines()
    assert lines[:3] == ["python", "True True True", "1"], res.stdout
    assert "async_wf._core" in lines[3] and "pure-Python" in lines[3], lines[3]


def test_no_extensions_env_picks_every_twin_silently() -> None:
    env = dict(os.environ, ASYNC_WF_NO_EXTENSIONS="1")
    res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True)
    assert res.stdout.splitlines() == ["python", "True True True", "0"], res.stdout


@pytest.mark.skipif(_NO_EXT, reason="ASYNC_WF_NO_EXTENSIONS is set")
def test_the_compiled_record_layout_is_checked_against_the_format() -> None:
    from async_wf import _core

    _format._check_compiled_layout(_core.RECORD_LAYOUT)  # the build agrees
    stale = dict(_core.RECORD_LAYOUT, HEADER_SIZE=24)
    with pytest.raises(ImportError, match=r"HEADER_SIZE: compiled 24, _format\.py 20.*rebuild"):
        _format._check_compiled_layout(stale)
    missing = {k: v for k, v in _core.RECORD_LAYOUT.items() if k != "RECORD_MAGIC"}
    with pytest.raises(ImportError, match=r"RECORD_MAGIC: compiled None"):
        _format._check_compiled_layout(missing)


@pytest.mark.skipif(_NO_EXT, reason="ASYNC_WF_NO_EXTENSIONS is set")
def test_the_compiled_key_hash_is_checked_against_the_key_scheme() -> None:
    from async_wf import _core

    _keys._check_compiled_key_hash(_core.KEY_LAYOUT)  # the build agrees
    stale = dict(_core.KEY_LAYOUT, PERSON_TASK=b"awf-task-0")
    with pytest.raises(ImportError, match=r"PERSON_TASK: compiled b'awf-task-0'.*rebuild"):
        _keys._check_compiled_key_hash(stale)
    with pytest.raises(ImportError, match=r"DIGEST_SIZE: compiled None"):
        _keys._check_compiled_key_hash({"PERSON_TASK": _keys._PERSON_TASK})
