"""Small Keras models trained here on scikit-learn's digits (NHWC), for the TensorFlow frontend's tests,
example and benchmark: a CNN with DepthwiseConv2D, BatchNorm, a nested sub-model and AveragePooling2D, an MLP
with BatchNorm after a Dense layer, and a CNN with Conv2DTranspose."""

from __future__ import annotations

import numpy as np


def digits_nhwc(size: int = 16):
    """(x_train, y_train, x_test, y_test): tests/zoo.py's digits split, NHWC float32."""
    import zoo

    d = zoo.load_digits(size)
    return d.x_train.transpose(0, 2, 3, 1).copy(), d.y_train, d.x_test.transpose(0, 2, 3, 1).copy(), d.y_test


def cnn(size: int = 16):
    import keras
    from keras import layers

    block = keras.Sequential([layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="conv"),
                              layers.BatchNormalization(momentum=0.9, name="bn"), layers.ReLU(name="relu")], name="block")
    inp = keras.Input((size, size, 1), name="image")
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    x = block(x)
    x = layers.AveragePooling2D(2)(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    return keras.Model(inp, layers.Dense(10)(x), name="digits_cnn")


def mlp(size: int = 16):
    import keras
    from keras import layers

    inp = keras.Input((size, size, 1), name="image")
    x = layers.Flatten()(inp)
    x = layers.Dense(64, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    x = layers.Dense(64, activation="relu")(x)
    return keras.Model(inp, layers.Dense(10)(x), name="digits_mlp")


def deconv(size: int = 16):
    import keras
    from keras import layers

    inp = keras.Input((size, size, 1), name="image")
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inp)
    x = layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    return keras.Model(inp, layers.Dense(10)(x), name="digits_deconv")


def resnet(size: int = 32, width: int = 16):
    """ResNet-style: Conv + BatchNorm + ReLU blocks with residual Adds (1x1 projection shortcuts)."""
    import keras
    from keras import layers

    def block(x, cout, stride):
        y = layers.Conv2D(cout, 3, strides=stride, padding="same", use_bias=False)(x)
        y = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(y))
        y = layers.Conv2D(cout, 3, padding="same", use_bias=False)(y)
        y = layers.BatchNormalization(momentum=0.9)(y)
        if stride != 1 or x.shape[-1] != cout:
            x = layers.BatchNormalization(momentum=0.9)(layers.Conv2D(cout, 1, strides=stride, use_bias=False)(x))
        return layers.ReLU()(layers.Add()([x, y]))

    inp = keras.Input((size, size, 1), name="image")
    x = layers.Conv2D(width, 3, padding="same", use_bias=False)(inp)
    x = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(x))
    for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
        x = block(x, cout, stride)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(10)(x), name="digits_resnet")


def mobilenet(size: int = 32, width: int = 16):
    """MobileNetV2-style: inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 project, BatchNorm, ReLU6)."""
    import keras
    from keras import layers

    def inverted(x, cout, stride, expand=4):
        cin = x.shape[-1]
        y = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.9)(layers.Conv2D(cin * expand, 1, use_bias=False)(x)))
        y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(y)
        y = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.9)(y))
        y = layers.BatchNormalization(momentum=0.9)(layers.Conv2D(cout, 1, use_bias=False)(y))
        return layers.Add()([x, y]) if stride == 1 and cin == cout else y

    inp = keras.Input((size, size, 1), name="image")
    x = layers.Conv2D(width, 3, padding="same", use_bias=False)(inp)
    x = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.9)(x))
    for cout, stride in ((width, 1), (24, 2), (24, 1), (32, 2), (32, 1)):
        x = inverted(x, cout, stride)
    x = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.9)(layers.Conv2D(64, 1, use_bias=False)(x)))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(10)(x), name="digits_mobilenet")


BUILDERS = {"cnn": cnn, "mlp": mlp, "deconv": deconv, "resnet": resnet, "mobilenet": mobilenet}


def train(name: str, data, epochs: int = 6, seed: int = 0):
    """A trained model and its test accuracy (TensorFlow, FP32)."""
    import keras

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = data
    model = BUILDERS[name](x_train.shape[1])
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model, accuracy(model, x_test, y_test)


def accuracy(model, x, y) -> float:
    return float((np.asarray(model(x)).argmax(1) == y).mean())
