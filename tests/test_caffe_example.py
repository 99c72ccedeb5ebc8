"""examples/caffe_auto_nuq.py (seed 002 as written) runs, and the README shows its call sequence verbatim."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "caffe_auto_nuq.py"


def test_readme_shows_the_caffe_example_verbatim():
    code = EXAMPLE.read_text()
    block = code[code.index("class AutoNuqEvaluator("):code.index("    prefix = os.path")].rstrip()
    readme = (ROOT / "README.md").read_text()
    for part in (block[:block.index("\n\n\ndef main")], block[block.index("    # seed 002"):]):
        assert textwrap.dedent(part) in readme, part[:80]


@pytest.mark.slow  # the example trains its Caffe model
def test_caffe_auto_nuq_example_runs_as_written(tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    before, after, pair, ratio = map(float, re.search(
        r"top1 before quantize ([\d.]+), after auto_nuq ([\d.]+) \(fake-quant ONNX\), ([\d.]+) \(weights-only Caffe "
        r"pair\); weights \d+ bytes, ([\d.]+)x of float", res.stdout).groups())
    assert before > 0.9 and (before - after) * 100 < 1 and (before - pair) * 100 < 1.5 and ratio < 0.3, res.stdout
    out = tmp_path / "results" / "ResNet50"
    assert (out / "resnet_fake_quant_weights.caffemodel").is_file() and (out / "resnet_deploy_model.onnx").is_file()
