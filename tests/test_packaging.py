"""The wheel maps the design card's folders into specdec.* and installs into a fresh venv."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["specdec", "specdec.drafters", "specdec.verifiers", "specdec.tree_attention", "specdec.training", "specdec.recipes",
               "specdec.data"]


def test_wheel_installs_into_a_fresh_venv_and_imports_every_subpackage(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
                   check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("specdec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in SUBPACKAGES:
        assert f"{pkg.replace('.', '/')}/__init__.py" in names, pkg
    assert not any(n.startswith(("drafters/", "verifiers/", "tests/")) for n in names)
    for data in ("specdec/data/spec_bench.jsonl", "specdec/data/mt_bench.jsonl", "specdec/data/longctx.jsonl", "specdec/recipes/medusa1-smollm2-cpu.yaml",
                 "specdec/tree_attention/triton_kernel.py"):
        assert data in names, data

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # dependencies (torch, transformers, ...) come from this environment; specdec itself only from the wheel
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = "import importlib; " + "; ".join(f"importlib.import_module('{p}')" for p in SUBPACKAGES) + "; import specdec; print(specdec.__file__)"
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(venv) in out
    cli = subprocess.run([str(venv / "bin" / "specdec"), "--help"], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "generate" in cli.stdout
