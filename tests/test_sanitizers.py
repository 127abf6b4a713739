"""The ring under AddressSanitizer and UndefinedBehaviorSanitizer.

Builds csrc/ with -DSAGE_SANITIZE=ON and reruns the queue, framing and shm
tests in a subprocess against that build (libasan preloaded into Python).
Any sanitizer report aborts the subprocess, failing this test.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pybind11
import pytest

import sage_ray_comm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _preload() -> str:
    """libasan must come first; libstdc++ must be loaded before libasan looks
    up __cxa_throw (Python itself does not link it), or the first C++
    exception aborts."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.fail("no C++ compiler: the sanitizer build needs g++")
    libs = []
    for lib in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path):
            pytest.fail(f"g++ does not ship {lib} ({path!r})")
        libs.append(path)
    return " ".join(libs)


# The instrumented rerun gets 900 s; the test itself, the build besides.
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_queue_tests_pass_under_asan_and_ubsan(tmp_path):
    build = tmp_path / "build"
    cmake = shutil.which("cmake")
    assert cmake, "cmake not found (it is in the test extras)"
    subprocess.run(
        [
            cmake,
            "-S",
            os.path.join(REPO, "csrc"),
            "-B",
            str(build),
            "-DSAGE_SANITIZE=ON",
            "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DSKBUILD_PROJECT_NAME=sage_ray_comm",
            f"-DSKBUILD_PROJECT_VERSION={sage_ray_comm.__version__}",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run([cmake, "--build", str(build), "-j2"], check=True, capture_output=True)
    (core,) = glob.glob(str(build / "_core*.so"))

    env = dict(os.environ)
    env.update(
        SAGE_TEST_CORE=core,
        LD_PRELOAD=_preload(),
        # Python itself "leaks" by design; leaks are not what this run looks for.
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, 'tests'); import _core_override; "
            "from sage_ray_comm import _core; assert _core.SANITIZED, _core.__file__; print(_core.__file__)",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == core

    r = subprocess.run(
        # Slow tests included: MPMC stress, random SIGKILLs and the segment
        # fuzzer run with every process on the instrumented build.
        # By file, less the one test that needs Ray (by its id: a substring
        # such as "ray" would also drop test_non_contiguous_array_...).
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            "--deselect",
            "tests/test_queue.py::test_ray_actor_opens_reference",
            "tests/test_queue.py",
            "tests/test_framing.py",
            "tests/test_shm.py",
            "tests/test_claims.py",
            "tests/test_arena.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    assert "ERROR: AddressSanitizer" not in tail and "runtime error:" not in tail, tail
    assert " passed" in r.stdout
    assert "test_non_contiguous_array_still_round_trips PASSED" in r.stdout
    assert "1 deselected" in r.stdout
    assert "test_the_caller_and_a_replica_in_another_process_never_both_win PASSED" in r.stdout
    assert "test_the_location_decoder_survives_fuzzing[known-slab] PASSED" in r.stdout
    assert "test_the_layout_decoder_survives_fuzzing PASSED" in r.stdout
    assert "test_broken_layouts_are_refused_by_name PASSED" in r.stdout
    assert "test_the_frame_writer_lays_out_what_an_independent_reader_reads[2] PASSED" in r.stdout
    assert "test_hold_slot_holds_a_whole_slot_for_its_receiver_and_nothing_else PASSED" in r.stdout
