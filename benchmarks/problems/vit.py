"""A small Vision Transformer (flax NNX) on 8x8 digits, and its sample-reweighting data.

Model (:class:`ViT`). The layout of ViT (Dosovitskiy et al. 2021) at digits' scale: a
convolutional patch embedding (``patch x patch`` pixels, stride ``patch``: 16 tokens
for 2x2 patches), a learned position embedding, ``depth`` pre-norm blocks of multi-head
self-attention and a GELU MLP, a final LayerNorm, mean pooling over tokens and a linear
head. Every projection of a block is written as an einsum of a 2-D kernel
(:class:`flax.nnx.Einsum`, ``"btd,dk->btk"``; the attention output stores its kernel
output-first and contracts it on its columns, ``"btk,dk->btd"``), the heads split after
the projection as in timm's ViT; the head is a :class:`flax.nnx.Linear` (a plain
``dot_general``). The patch embedding (a 4-D conv kernel), the position embedding
(``(1, tokens, width)``), the LayerNorms and the biases are not 2-D.

Parameters as a pytree: :func:`init` returns ``(graphdef, params)`` with ``params`` a
nested dict of arrays (``params["blocks"][0]["query"]["kernel"]``), and :func:`logits`
applies them (``nnx.merge`` at trace time, no cost at run time), so the bilevel solvers
see plain leaves.

Data (:func:`reweighting_data`). scikit-learn's digits in the fixed stratified split of
:func:`benchmarks.problems.data.digits_splits` (1077 / 360 / 360 images), features
standardised on the full training split. The training split is made long-tailed, then
noisy: the class of frequency rank ``j`` (a random order of the classes, drawn from
the seed) keeps ``round(n_min * imbalance ** (-j / 9))`` images (``n_min = 104``, the
smallest class: 104 down to 21 at imbalance 5, 531 in all), then ``noise`` of the kept
labels are replaced by a label drawn uniformly from the *other* nine classes.
Validation and test stay clean and balanced.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.problems import data

IMAGE = 8  # digits are 8x8
CLASSES = 10


class Block(nnx.Module):
    """Pre-norm block: multi-head self-attention, then a GELU MLP (einsum projections)."""

    def __init__(self, width: int, heads: int, mlp_width: int, rngs: nnx.Rngs):
        def project(n_in: int, n_out: int) -> nnx.Einsum:
            return nnx.Einsum("btd,dk->btk", (n_in, n_out), (n_out,), rngs=rngs)

        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.query = project(width, width)
        self.key = project(width, width)
        self.value = project(width, width)
        # Stored output-first (width_out, width_in) and contracted on its columns.
        self.out = nnx.Einsum("btk,dk->btd", (width, width), (width,), rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = project(width, mlp_width)
        self.down = project(mlp_width, width)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        h = self.norm1(x)
        split = (batch, tokens, self.heads, width // self.heads)
        q, k, v = (layer(h).reshape(split) for layer in (self.query, self.key, self.value))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width // self.heads)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + self.out(attended.reshape(batch, tokens, width))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class ViT(nnx.Module):
    """A ViT classifier of ``(batch, 64)`` flattened 8x8 images (see the module docstring)."""

    def __init__(
        self, *, patch: int, width: int, depth: int, heads: int, mlp_width: int, rngs: nnx.Rngs
    ):
        if IMAGE % patch:
            raise ValueError(f"patch must divide the image size {IMAGE}, got {patch}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.patch = patch
        tokens = (IMAGE // patch) ** 2
        self.embed = nnx.Conv(
            1, width, (patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs
        )
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, width)))
        self.blocks = nnx.List([Block(width, heads, mlp_width, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, CLASSES, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        pixels = images.reshape(images.shape[0], IMAGE, IMAGE, 1)
        x = self.embed(pixels)  # (batch, IMAGE / patch, IMAGE / patch, width)
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.position[...]
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(self.norm(x), axis=1))


Params = dict[str, Any]


def init(key: jax.Array, **sizes: int) -> tuple[nnx.GraphDef, Params]:
    """``(graphdef, params)`` of a :class:`ViT` of ``sizes`` (``patch``, ``width``,
    ``depth``, ``heads``, ``mlp_width``); ``params`` is a nested dict of arrays."""
    graphdef, state = nnx.split(ViT(**sizes, rngs=nnx.Rngs(key)))
    return graphdef, nnx.to_pure_dict(state)


def logits(graphdef: nnx.GraphDef, params: Params, images: jax.Array) -> jax.Array:
    """Class logits ``(batch, 10)`` of the ViT ``(graphdef, params)`` on flat images."""
    return nnx.merge(graphdef, params)(images)


def per_sample_loss(graphdef: nnx.GraphDef, params: Params, images, labels) -> jax.Array:
    """Softmax cross-entropy of every image of the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits(graphdef, params, images), labels)


def projected_leaves(params: Params, rank: int) -> list[str]:
    """'/'-joined paths of the leaves BROS projects at ``rank`` (2-D, more than ``rank``
    rows: :func:`optstab.bilevel.subspace.is_projected`)."""
    from optstab.bilevel import subspace

    return [
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if subspace.is_projected(leaf, rank)
    ]


class ReweightingData(NamedTuple):
    """Long-tailed, noisy digits; float32 features, int32 labels."""

    x_train: np.ndarray  # (n_train, 64) kept training images
    y_train: np.ndarray  # (n_train,) labels after the noise
    true_train: np.ndarray  # (n_train,) labels before the noise
    corrupted: np.ndarray  # (n_train,) bool, True where the label was replaced
    x_val: np.ndarray  # (360, 64) clean, balanced
    y_val: np.ndarray
    x_test: np.ndarray  # (360, 64) clean, balanced
    y_test: np.ndarray


def long_tail(labels: np.ndarray, imbalance: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the images kept: the class of frequency rank ``j`` (0 = most
    frequent; ranks are a random permutation of the classes) keeps ``round(n_min *
    imbalance ** (-j / 9))`` of its images, chosen at random, ``n_min`` being the size
    of the smallest class (so the total does not depend on the permutation)."""
    order = rng.permutation(CLASSES)
    smallest = np.bincount(labels, minlength=CLASSES).min()
    kept = []
    for j, c in enumerate(order):
        count = max(1, int(round(smallest * imbalance ** (-j / (CLASSES - 1)))))
        kept.append(rng.choice(np.flatnonzero(labels == c), size=count, replace=False))
    return np.sort(np.concatenate(kept))


def reweighting_data(seed: int, noise: float, imbalance: float) -> ReweightingData:
    """The sample-reweighting data set: the split is fixed, the tail and noise use
    ``seed``."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    if imbalance < 1.0:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    x_train, y_train, x_val, y_val, x_test, y_test = data.digits_splits()
    rng = np.random.default_rng([seed, 7])
    kept = long_tail(y_train, imbalance, rng)
    x_train, y_true = x_train[kept], y_train[kept]
    noisy, corrupted = data.corrupt_labels(y_true, noise, CLASSES, seed)
    return ReweightingData(x_train, noisy, y_true, corrupted, x_val, y_val, x_test, y_test)


def reweighting_problem(graphdef: nnx.GraphDef, init_params: Params, l2: float):
    """Sample reweighting: ``x`` holds one weight logit per training image.

    * inner ``g(x, y, (idx, images, labels)) = mean_i sigmoid(x_idx_i) * CE_i(y)
      + l2/2 ||y||^2`` on a training batch;
    * outer ``f(x, y, (images, labels))`` = mean cross-entropy on a validation batch.
    """
    from optstab import bilevel

    def inner_loss(x, y, batch):
        idx, images, labels = batch
        weighted = jax.nn.sigmoid(x[idx]) * per_sample_loss(graphdef, y, images, labels)
        decay = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(y))
        return jnp.mean(weighted) + 0.5 * l2 * decay

    def outer_loss(x, y, batch):
        images, labels = batch
        return jnp.mean(per_sample_loss(graphdef, y, images, labels))

    return bilevel.BilevelProblem(inner_loss, outer_loss, init_params)
