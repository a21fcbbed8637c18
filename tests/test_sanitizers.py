"""The C++ search module built once more under AddressSanitizer + UndefinedBehaviorSanitizer, and the search
tests run against that build: a read past a buffer, a use after free or undefined behaviour fails the test.

The sanitized module is built with cmake into build/asan (reused, and rebuilt incrementally, when present) and
imported as engine._search by a child interpreter before pytest starts there (the library itself reads no
switch for this). libasan must come first in the process, hence LD_PRELOAD. Also built: the scalar-only
module (AML_SCALAR_ONLY, the build of a machine that is not x86-64), sanitized too.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SANITIZE = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
# Tests run against the sanitized module: the kernel on every tier, and the hostile inputs (but the faiss and
# torch baselines, which bring their own runtimes and are not this module's code).
SANITIZED_TESTS = ["tests/test_search_core.py", "tests/faults/test_faults_search.py", "-k", "not faiss and not torch"]


def runtime_library(name: str) -> str | None:
    """The compiler's shared sanitizer runtime (e.g. libasan.so), or None when it has none."""
    cxx = shutil.which("g++")
    if cxx is None:
        return None
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def build(folder: Path, *options: str) -> Path:
    """Configure and build the module with the sanitizers into folder (incremental when it exists); the .so."""
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 (the test extras) is needed to build the module")
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing or runtime_library("libasan.so") is None:
        pytest.skip(f"no sanitizer toolchain here: missing {', '.join(missing) or 'libasan'}")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(folder), *generator, "-DCMAKE_BUILD_TYPE=Debug",
        f"-DCMAKE_CXX_FLAGS=-O1 -g {SANITIZE}", f"-DCMAKE_MODULE_LINKER_FLAGS={SANITIZE}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}", *options,
    ]
    for command in (configure, ["cmake", "--build", str(folder), "-j", str(os.cpu_count() or 1)]):
        out = subprocess.run(command, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (so,) = folder.glob("_search*.so")
    assert b"libasan.so" in so.read_bytes() and b"libubsan.so" in so.read_bytes()  # the sanitizers are linked in
    return so


# Loads the given .so as engine._search, then runs pytest with the remaining arguments.
RUNNER = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("engine._search", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine._search"] = module
    spec.loader.exec_module(module)
    import engine
    engine._search = module
    assert engine._search.__file__ == sys.argv[1]
    if sys.argv[2:] == ["--isa-levels"]:
        sys.exit(print(" ".join(module.isa_levels())))
    import pytest
    sys.exit(pytest.main(sys.argv[2:]))
    """
)


def run_sanitized(so: Path, *args: str) -> subprocess.CompletedProcess:
    preload = [runtime_library("libasan.so"), runtime_library("libubsan.so")]
    env = dict(
        os.environ,
        LD_PRELOAD=" ".join(p for p in preload if p),
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0",  # the interpreter itself leaks
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        PYTHONPATH=str(ROOT),
    )
    if args != ("--isa-levels",):
        # --capture=sys: a sanitizer's report goes to file descriptor 2 and ends the process, so pytest must
        # not hold that descriptor
        args = ("-q", "-x", "--capture=sys", "-p", "no:randomly", "-p", "no:cacheprovider", *args)
    command = [sys.executable, "-c", RUNNER, str(so), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_clean(out: subprocess.CompletedProcess) -> None:
    log = out.stdout + out.stderr
    for report in ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer"):
        assert report not in log, log[-6000:]
    assert out.returncode == 0, log[-6000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-3000:]


def test_search_tests_pass_under_asan_and_ubsan():
    so = build(ROOT / "build" / "asan")
    assert_clean(run_sanitized(so, *SANITIZED_TESTS))


def test_scalar_only_build_searches_exactly():
    """The module as built where there is no x86 tier: scalar alone, and still exact (also sanitized)."""
    so = build(ROOT / "build" / "asan-scalar", "-DAML_SCALAR_ONLY=ON")
    out = run_sanitized(so, "tests/test_search_core.py", "-k", "exact_with_rescoring or ties or bad_arguments or nan")
    assert_clean(out)
    levels = run_sanitized(so, "--isa-levels")
    assert levels.returncode == 0 and levels.stdout.split() == ["scalar"], levels.stdout + levels.stderr[-2000:]
