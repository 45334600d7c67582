"""Models: the Flax networks jopt's training loop trains (an MLP and a small CNN).

Both are Flax **Linen** modules. Linen keeps a model's description apart from its
parameters, so ``model.apply(params, images)`` is a pure function of a plain
parameter pytree - exactly what the training loop needs: the parameters are the
carry of a ``lax.scan``, they are packed into :class:`jopt.flat.FlatParams` and
unpacked inside the step, and they are what checkpoints store. Flax NNX would hold
the parameters inside mutable module objects and need ``nnx.split``/``nnx.merge``
around every step to get the same pure function.

Inputs are images ``[batch, height, width]`` (or ``[batch, height, width,
channels]``) already scaled to floats; the training loop keeps them ``uint8`` on the
device and scales them inside its step. ``dtype`` is the computation dtype (``None``:
the parameters' dtype): with ``dtype=jnp.bfloat16`` the float32 parameters and the
inputs are cast to bfloat16 inside each layer (mixed precision), and the gradients
still arrive in float32.

``quantize_weights`` / ``quantize_activations`` turn on quantization-aware training:
the dense layers become :class:`jopt.quantization.QuantDense` (same parameter names
and shapes, fake-quantized kernels with straight-through gradients), so the trained
tree exports with :func:`jopt.quantization.quantize_params`. Convolutions stay float.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jopt.models import MLP
  >>> model = MLP(hidden_sizes=(64, 64), num_classes=10)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))
  >>> model.apply(params, jnp.zeros((5, 28, 28))).shape
  (5, 10)
  >>> sum(x.size for x in jax.tree.leaves(params))  # 784*64+64 + 64*64+64 + 64*10+10
  55050
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jopt.quantization import QuantDense

__all__ = ["CNN", "MLP", "num_params"]


class MLP(nn.Module):
    """A multi-layer perceptron: flatten, ``Dense -> relu`` per hidden size, ``Dense``.

    With the defaults this is the Keras-tutorial model 784-64(relu)-64(relu)-10.

    Attributes:
      hidden_sizes: width of each hidden layer.
      num_classes: number of output logits.
      dtype: computation dtype (``None``: the parameters' dtype).
      param_dtype: dtype the parameters are created in.
      quantize_weights: QAT weight mode (``"int8"``, ``"int4"``, ``"ternary"``,
        ``"binary"``) or ``None`` for float weights.
      quantize_activations: ``"int8"`` to fake-quantize each layer's input, or ``None``.
      input_mean, input_std: the input is standardised as ``(x - mean) / std`` first;
        ``train.create_model`` sets the training set's pixel statistics
        (``jopt.data.DatasetSpec.pixel_mean``/``pixel_std``), as torchvision's MNIST
        example does. Standardised inputs train measurably better than ``[0, 1]``
        inputs (Fashion-MNIST reference recipe: 87.2% vs 86.4%, mean of 8 seeds).
    """

    hidden_sizes: Sequence[int] = (64, 64)
    num_classes: int = 10
    dtype: Any = None
    param_dtype: Any = jnp.float32
    quantize_weights: str | None = None
    quantize_activations: str | None = None
    input_mean: float = 0.0
    input_std: float = 1.0

    @nn.compact
    def __call__(self, images):
        x = _standardise(images, self.input_mean, self.input_std)
        x = x.reshape((x.shape[0], -1))
        for i, size in enumerate(self.hidden_sizes):
            x = nn.relu(self._dense(size, f"hidden_{i}")(x))
        return self._dense(self.num_classes, "logits")(x)

    def _dense(self, features: int, name: str) -> nn.Module:
        if self.quantize_weights is None and self.quantize_activations is None:
            return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return QuantDense(features, weights=self.quantize_weights,
                          activations=self.quantize_activations, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)


class CNN(nn.Module):
    """A small convolutional network: ``(Conv 3x3 -> relu -> avg-pool 2x2)`` per
    entry of ``conv_features``, then an :class:`MLP` head on the flattened maps.

    With the defaults it is the Flax MNIST example's CNN (32 and 64 channels, a
    256-unit hidden layer).

    Attributes:
      conv_features: channels of each convolution.
      hidden_sizes: hidden layers of the dense head.
      num_classes: number of output logits.
      dtype: computation dtype (``None``: the parameters' dtype).
      param_dtype: dtype the parameters are created in.
      quantize_weights: QAT weight mode of the dense head (see :class:`MLP`).
      quantize_activations: QAT activation mode of the dense head.
      input_mean, input_std: input standardisation (see :class:`MLP`).
    """

    conv_features: Sequence[int] = (32, 64)
    hidden_sizes: Sequence[int] = (256,)
    num_classes: int = 10
    dtype: Any = None
    param_dtype: Any = jnp.float32
    quantize_weights: str | None = None
    quantize_activations: str | None = None
    input_mean: float = 0.0
    input_std: float = 1.0

    @nn.compact
    def __call__(self, images):
        if images.ndim not in (3, 4):
            raise ValueError(
                f"CNN takes a batch of images [batch, height, width] or [batch, height, "
                f"width, channels], got shape {images.shape}; reshape flat inputs (e.g. "
                f"[batch, 784] -> [batch, 28, 28]), and add a batch axis to a single image.")
        smallest = 2 ** len(self.conv_features)
        if min(images.shape[1:3]) < smallest:
            raise ValueError(
                f"CNN halves the image {len(self.conv_features)} times: height and width "
                f"must be at least {smallest}, got {images.shape[1:3]}.")
        x = _standardise(images, self.input_mean, self.input_std)
        x = x if x.ndim == 4 else x[..., None]
        for i, features in enumerate(self.conv_features):
            x = nn.Conv(features, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype,
                        name=f"conv_{i}")(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        head = MLP(tuple(self.hidden_sizes), self.num_classes, self.dtype,
                   self.param_dtype, self.quantize_weights, self.quantize_activations,
                   name="head")
        return head(x)


def _standardise(x: jax.Array, mean: float, std: float) -> jax.Array:
    if std <= 0:
        raise ValueError(f"input_std must be > 0, got {std}.")
    if mean == 0.0 and std == 1.0:
        return x
    return (x - mean) * (1.0 / std)


def num_params(params: Any) -> int:
    """Number of parameters (array elements) in a parameter pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
