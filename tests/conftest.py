import os, shutil, sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def vlmrepro_command() -> list[str]:
    "The installed `vlmrepro` command of this environment."
    exe = Path(sys.executable).parent / "vlmrepro"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vlmrepro.cli"]


@pytest.fixture
def vlmrepro_cmd():
    return vlmrepro_command()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains for more than ~20 s, executes a paper notebook, or starts several processes")
