"""The README's PyTorch example runs as written, and the README shows exactly what runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pytorch_ptq.py"


def test_readme_shows_the_example_verbatim():
    code = EXAMPLE.read_text()
    block = code[code.index("# 1. generate"):code.index("# 5. test both")].rstrip()
    assert block in (ROOT / "README.md").read_text()


@pytest.mark.slow  # the example trains its CNN
def test_pytorch_example_runs_as_written(tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    fp32, fake, deploy = map(float, re.search(r"FP32 \(PyTorch\) ([\d.]+).*fake-quant \(ORT\) ([\d.]+).*deploy INT8 \(ORT\) "
                                              r"([\d.]+)", res.stdout).groups())
    assert fp32 > 0.85 and deploy >= fp32 - 0.01 and fake >= fp32 - 0.01, res.stdout
    assert (tmp_path / "results" / "user_model_deploy_model.onnx").is_file()


@pytest.mark.slow  # the example trains its CNN
def test_decompose_example_runs_as_written(tmp_path):
    example = ROOT / "examples" / "pytorch_decompose.py"
    res = subprocess.run([sys.executable, str(example)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    original, decomposed, tuned, int8 = map(float, re.search(
        r"original ([\d.]+)\s+decomposed ([\d.]+)\s+fine-tuned ([\d.]+)\s+INT8 \(ORT\) ([\d.]+)", res.stdout).groups())
    assert "decomposed: {'" in res.stdout  # at least one layer was decomposed
    assert original > 0.9 and tuned >= original - 0.03 and int8 >= tuned - 0.02, res.stdout


QAT_EXAMPLE = ROOT / "examples" / "pytorch_qat.py"


def test_readme_shows_the_qat_example_verbatim():
    code = QAT_EXAMPLE.read_text()
    block = code[code.index("# 1. generate the retrain"):code.index("# 6. test both")].rstrip()
    assert block in (ROOT / "README.md").read_text()


@pytest.mark.slow  # the example trains its CNN, then retrains it
def test_pytorch_qat_example_runs_as_written(tmp_path):
    res = subprocess.run([sys.executable, str(QAT_EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    fp32, fake, deploy = map(float, re.search(r"FP32 \(PyTorch\) ([\d.]+).*QAT fake-quant \(ORT\) ([\d.]+).*QAT deploy "
                                              r"INT4/INT8 \(ORT\) ([\d.]+)", res.stdout).groups())
    assert fp32 > 0.85 and deploy >= fp32 - 0.02 and fake >= fp32 - 0.02, res.stdout
    assert (tmp_path / "results" / "user_model_deploy_model.onnx").is_file() and (tmp_path / "tmp" / "record.txt").is_file()
