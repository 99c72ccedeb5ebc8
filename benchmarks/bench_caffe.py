"""Figures of docs/CAFFE.md: the Caffe ResNet the tests train on the digits (BatchNorm + Scale, Eltwise residuals,
ceil-mode pooling), through uniform INT8, NUQ-32 and NUQ-16; accuracy on the 500 held-out samples.

    python benchmarks/bench_caffe.py      (needs opencv-python-headless 4.x, torch, scikit-learn)
"""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMCT_QUIET", "1")

import caffe_models as cm  # noqa: E402
import zoo  # noqa: E402
from conftest import ort_run  # noqa: E402

import omct.caffe as amct  # noqa: E402

d = zoo.load_digits(16)
tmp = Path(tempfile.mkdtemp())
proto, w = cm.resnet_caffe(cm.train_resnet(d, epochs=6)).save(tmp, 'resnet')
fp32 = cm.opencv_accuracy(proto, w, d.x_test, d.y_test)


def acc(p):
    return float((ort_run(p, {'data': d.x_test})[0].argmax(1) == d.y_test).mean())
print(f"FP32 (OpenCV) {fp32:.3f}; caffemodel {w.stat().st_size} bytes")
for name, cfg in (("uniform INT8", None), ("NUQ-32", 32), ("NUQ-16", 16)):
    sub = tmp / name.replace(' ', '_')
    sub.mkdir()
    c = None
    if cfg:
        c = sub / 'n.cfg'
        c.write_text(f'batch_num: 4\nnuq_config {{ nuq_quantize {{ num_steps: {cfg} }} }}\n')
    amct.create_quant_config(str(sub/'c.json'), str(proto), str(w), batch_num=4, config_defination=str(c) if c else None)
    g = amct.init(str(sub/'c.json'), str(proto), str(w), str(sub/'r.txt'))
    s = amct.quantize_model(g, str(sub/'m.prototxt'), str(sub/'m.caffemodel'))
    for i in range(4):
        s.run(None, {'data': d.x_train[i*64:(i+1)*64]})
    amct.save_model(g, 'Both', str(sub/'q'))
    pair = cm.opencv_accuracy(sub/'q_fake_quant_model.prototxt', sub/'q_fake_quant_weights.caffemodel', d.x_test, d.y_test)
    print(f"{name}: fake-quant {acc(sub / 'q_fake_quant_model.onnx'):.3f}, deploy {acc(sub / 'q_deploy_model.onnx'):.3f}, "
          f"Caffe pair in OpenCV {pair:.3f}")
