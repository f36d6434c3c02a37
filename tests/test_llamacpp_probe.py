"""A llama.cpp build this machine cannot run (AMX tile instructions on a VM that reports AMX) is refused with the
rebuild command, instead of killing the process with SIGILL at its first matmul."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from archquant.engine import llamacpp


class _FakeBinding:
    """``llama_cpp`` as the check sees it: its system info and its package folder (whose libraries identify the
    build)."""

    def __init__(self, info: str, folder: Path | None = None) -> None:
        self.info = info
        self.__file__ = str((folder or Path("/nonexistent")) / "__init__.py")

    def llama_print_system_info(self) -> bytes:
        return self.info.encode()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("ARCHQUANT_CACHE", str(tmp_path))
    monkeypatch.delenv("ARCHQUANT_LLAMACPP_PROBE", raising=False)
    monkeypatch.setattr(llamacpp, "_AMX_OK", None)
    return tmp_path


def test_a_build_that_dies_by_sigill_is_refused_with_the_rebuild_command(fresh, monkeypatch):
    pkg = fresh / "llama_cpp"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "lib" / "libggml-cpu.so").write_bytes(b"build 1")
    amx = _FakeBinding("CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |", pkg)
    sigill = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    with pytest.raises(llamacpp.LlamaCppMissingError, match=r"SIGILL.*-mno-amx-tile.*--force-reinstall"):
        llamacpp._check_amx(amx, probe=sigill)
    # the verdict is kept per build and CPU: the next process is refused without running the probe again
    run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the probe ran twice"))
    with pytest.raises(llamacpp.LlamaCppMissingError, match="verdict kept in"):
        llamacpp._check_amx(amx, probe=sigill)
    assert len(list((fresh / "llamacpp_probe").glob("*.json"))) == 1
    # a rebuild (new library files) is probed afresh: this one runs
    monkeypatch.setattr(subprocess, "run", run)
    lib = pkg / "lib" / "libggml-cpu.so"
    lib.write_bytes(b"build 2")
    os.utime(lib, ns=(lib.stat().st_atime_ns, lib.stat().st_mtime_ns + 10**9))
    llamacpp._check_amx(amx, probe="pass")
    assert llamacpp._AMX_OK is True


def test_a_build_that_runs_passes_and_other_failures_are_not_called_amx(fresh):
    amx = _FakeBinding("CPU : AMX_INT8 = 1 |")
    llamacpp._check_amx(amx, probe="pass")
    assert llamacpp._AMX_OK is True
    llamacpp._AMX_OK = None
    with pytest.raises(RuntimeError, match="probe failed .exit 3"):
        llamacpp._check_amx(amx, probe="raise SystemExit(3)")


def test_the_probe_is_skipped_in_its_own_process_survives_a_readonly_cache_and_times_out_by_name(fresh, monkeypatch):
    amx = _FakeBinding("CPU : AMX_INT8 = 1 |")
    monkeypatch.setenv("ARCHQUANT_LLAMACPP_PROBE", "1")  # the child: no probe of the probe
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("probed inside the probe"))
    llamacpp._check_amx(amx, probe="pass")
    monkeypatch.undo()
    monkeypatch.setenv("ARCHQUANT_CACHE", str(fresh))
    monkeypatch.setattr(llamacpp, "_AMX_OK", None)
    (fresh / "llamacpp_probe").write_text("not a folder")  # the verdict cannot be kept: the build still passes
    llamacpp._check_amx(amx, probe="pass")
    assert llamacpp._AMX_OK is True
    llamacpp._AMX_OK = None

    def slow(*a, **k):
        raise subprocess.TimeoutExpired(a[0], 600)

    monkeypatch.setattr(subprocess, "run", slow)
    with pytest.raises(RuntimeError, match="did not finish"):
        llamacpp._check_amx(amx, probe="import time; time.sleep(1)")


def test_builds_without_amx_are_not_probed(fresh, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("probed a build without AMX"))
    llamacpp._check_amx(_FakeBinding("CPU : AVX2 = 1 | AVX512 = 1 | REPACK = 1 |"))
    assert not (fresh / "llamacpp_probe").exists()


@pytest.mark.llamacpp
def test_the_probe_decodes_a_tiny_model_in_a_child_process(fresh):
    """The real probe on this machine's build: it runs here (a build that could not would fail every llama.cpp
    test), so the child exits 0."""
    pytest.importorskip("llama_cpp")
    proc = subprocess.run([sys.executable, "-c", llamacpp._PROBE], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ARCHQUANT_LLAMACPP_PROBE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
