"""AMCT's TensorFlow call sequence with ``import omct.tensorflow as amct``, on a Keras model of your own.

    python examples/tensorflow_ptq.py     # trains a small Keras CNN on scikit-learn's digits, then quantizes it

Replace ``build_model``, ``calibration_data`` and ``user_do_inference_onnx`` with your own. Inputs stay NHWC,
as your Keras model takes them; the saved ONNX models take them NHWC too.
"""

import keras
import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_digits

import omct.tensorflow as amct


def build_model() -> keras.Model:
    """Your model. Here: a small Keras CNN (DepthwiseConv2D, BatchNorm) trained for a few seconds on the digits."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train_x, train_y, epochs=8, batch_size=32, verbose=0)
    return model


def user_do_inference_onnx(model_file, x, y) -> float:
    session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return float((session.run(None, feed)[0].argmax(1) == y).mean())


digits = load_digits()
images = (digits.images[..., None] / 16.0).astype(np.float32)  # NHWC
labels = digits.target
train_x, train_y, test_x, test_y = images[:1297], labels[:1297], images[1297:], labels[1297:]

ori_model = build_model()
calibration_data = [train_x[i * 32:(i + 1) * 32] for i in range(8)]

# 1. generate the quantization configuration file (layers by their Keras names)
config_file = './tmp/config.json'
skip_layers = []
batch_num = 8
amct.create_quant_config(config_file=config_file, model=ori_model, skip_layers=skip_layers, batch_num=batch_num)

# 2. get the calibration model
record_file = './tmp/record.txt'
calibration_model = amct.quantize_model(model=ori_model, config_file=config_file, record_file=record_file)

# 3. calibrate: batch_num batches, NHWC, as ori_model(x) takes them
for x in calibration_data[:batch_num]:
    calibration_model(x)

# 4. save the fake-quant and deploy models
quant_model_path = './results/user_model'
amct.save_model(ori_model, record_file, quant_model_path)

# 5. test both in ONNX Runtime
fp32 = float((np.asarray(ori_model(test_x)).argmax(1) == test_y).mean())
fake = user_do_inference_onnx('./results/user_model_fake_quant_model.onnx', test_x, test_y)
deploy = user_do_inference_onnx('./results/user_model_deploy_model.onnx', test_x, test_y)
print(f"accuracy  FP32 (TensorFlow) {fp32:.4f}  fake-quant (ORT) {fake:.4f}  deploy INT8 (ORT) {deploy:.4f}")
