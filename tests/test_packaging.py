"""An installed s3proxy exposes its twistd plugins."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import REPO_ROOT


@pytest.mark.integration
@pytest.mark.slow
def test_fresh_venv_lists_plugins(tmp_path: Path) -> None:
    """`pip install .` into a new venv makes `twistd --help` list both plugins.

    twistd finds plugins only under an installed ``twisted/plugins`` folder, which an editable
    install does not create, so this test builds a real install from a copy of the tree.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    source = tmp_path / "src"
    # The working tree as it is, without the outer venv, caches or build output.
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache",
        ".pytest_cache"))
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(source)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    plugin_dir = next((venv / "lib").glob("python3*/site-packages/twisted/plugins"))
    installed = sorted(path.name for path in plugin_dir.iterdir())
    assert "s3proxy_exporter.py" in installed
    assert "s3proxy.py" in installed

    result = subprocess.run([str(venv / "bin" / "twistd"), "--help"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "s3proxy-exporter" in result.stdout
    assert "s3proxy " in result.stdout or "s3proxy\n" in result.stdout
