"""The programs' shared command line: configs found outside the repository, one-line errors."""

import os
import pathlib
import subprocess
import sys

import pytest

from mixreorg_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_shipped_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, _, variant = cli.resolve_config("configs/mixreorg.py:demo").partition(":")
    assert variant == "demo"
    assert pathlib.Path(path).read_text() == (REPO / "configs" / "mixreorg.py").read_text()
    eval_path = cli.resolve_config("configs/eval/voc.py")
    assert pathlib.Path(eval_path).read_text() == (REPO / "configs" / "eval" / "voc.py").read_text()
    # A file of the working directory wins; an unknown one stays as typed for the error message.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mixreorg.py").write_text("# mine\n")
    assert cli.resolve_config("configs/mixreorg.py:tiny") == "configs/mixreorg.py:tiny"
    assert cli.resolve_config("configs/nope.py") == "configs/nope.py"


def test_config_flags_are_resolved_in_both_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [
        "prog",
        "--config=configs/groupvit.py:tiny",
        "--workdir",
        "w",
        "--config",
        "configs/eval/voc.py",
        "--config.seed=1",
    ]
    resolved = cli.resolve_config_flags(argv)
    assert resolved[0] == "prog" and resolved[2:4] == ["--workdir", "w"]
    assert resolved[1].startswith("--config=/") and resolved[1].endswith("groupvit.py:tiny")
    assert resolved[4] == "--config" and resolved[5].endswith("configs/eval/voc.py")
    assert os.path.isabs(resolved[5]) and resolved[6] == "--config.seed=1"


def test_train_finds_its_config_outside_the_repository(tmp_path):
    """Run from another directory, the config loads (the override error proves it was read)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixreorg_jax.train",
            "--config=configs/mixreorg.py:tiny",
            f"--workdir={tmp_path / 'w'}",
            "--config.optim.lrr=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --config.optim.lrr=1: no such config field"), result.stderr
    assert not (tmp_path / "w").exists()


def test_huge_pages_tunable_joins_the_environments_own():
    assert cli.with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": cli.HUGE_PAGES_TUNABLE}
    env = cli.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{cli.HUGE_PAGES_TUNABLE}"
    mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # the user's own choice stands
    assert cli.with_huge_pages(mine) == mine


# Allocates, fills and frees a block as large as XLA:CPU's per-step buffers, twice, in a thread
# (as XLA's workers do); prints the page faults of the second round.
_REFILL = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 256 << 20
def fill():
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
def rounds():
    fill()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
"""


@pytest.mark.skipif(not cli.huge_pages_available(), reason="needs glibc 2.35+ and huge pages")
def test_a_freed_buffer_faults_back_in_2_mib_at_a_time_with_huge_pages():
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def faults(env):
        command = [sys.executable, "-c", _REFILL]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    plain, huge = faults(base), faults(cli.with_huge_pages(base))
    assert plain >= (256 << 20) // 4096 // 2  # glibc unmapped the block: 4 KiB faults again
    assert huge < plain / 20
