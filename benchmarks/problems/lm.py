"""A small byte-level decoder-only language model (flax NNX) and its offline corpus.

Corpus. The text is the source code of a fixed list of Python standard-library modules
(``CORPUS_MODULES``), read from the running interpreter's ``stdlib`` folder and
concatenated in that order: about 1.2 MB of real English docstrings and comments mixed
with code, on every machine that has Python, with no download. The bytes differ a little
between Python versions, so :func:`stdlib_corpus` also returns the Python version and the
SHA-256 of the bytes, and the studies record both. The held-out split is the last
``val_fraction`` of the bytes (a contiguous tail: no sequence straddles the split).

Model. Pre-norm transformer decoder: byte embedding plus learned positions, ``depth``
blocks of causal multi-head attention and a GELU MLP, a final LayerNorm and an output
head. The four matmuls of every block (``qkv``, ``proj``, ``up``, ``down``) are
:class:`optstab.lowprec.QuantLinear` layers; the embedding, the head, the norms and the
attention products stay in float32, as in common FP8 recipes. The path of a block's
layer, e.g. ``blocks/0/up``, is also its GNMR unit name (see :func:`layer_units`).

Outliers (the stress of the ``lowprec_lm`` study; ones mean no outliers). ``model(tokens,
outliers, real_outliers)`` takes two optional ``{layer_path: (width,) array}`` of
per-channel multipliers of a layer's input:

* ``outliers``: as the layer's quantizer sees it (the ``outliers`` argument of
  :class:`~optstab.lowprec.QuantLinear`): the format sees them, the float32 function
  does not;
* ``real_outliers``: in the function itself, on the sequence positions
  ``outlier_positions`` only (default ``(0,)``), as the massive activations of large LMs
  sit on a few tokens such as the first: the layer, float32 or quantized, computes on
  ``x * a`` there.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optstab import lowprec, units

CORPUS_MODULES = (
    "argparse.py",
    "textwrap.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "csv.py",
    "string.py",
    "shlex.py",
    "difflib.py",
    "heapq.py",
    "fractions.py",
    "statistics.py",
    "calendar.py",
    "dataclasses.py",
    "functools.py",
    "inspect.py",
    "pathlib.py",
    "typing.py",
    "collections/__init__.py",
    "random.py",
    "pydoc.py",
)
VOCAB = 256
LAYER_NAMES = ("qkv", "proj", "up", "down")


class Corpus(NamedTuple):
    train: np.ndarray  # (n_train,) uint8
    val: np.ndarray  # (n_val,) uint8
    python: str  # interpreter version the bytes came from
    sha256: str  # of the whole concatenation


def stdlib_corpus(val_fraction: float = 0.1) -> Corpus:
    """The byte corpus (see the module docstring) split into train and held-out tails."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in CORPUS_MODULES:
        with open(os.path.join(root, name), "rb") as f:
            parts.append(f.read())
    data = b"\n".join(parts)
    array = np.frombuffer(data, dtype=np.uint8)
    cut = int(len(array) * (1 - val_fraction))
    version = ".".join(str(v) for v in sys.version_info[:3])
    return Corpus(array[:cut], array[cut:], version, hashlib.sha256(data).hexdigest())


def sample_windows(data: np.ndarray, rng: np.random.Generator, shape: tuple, length: int):
    """Random windows of ``length`` bytes: an int32 array of ``shape + (length,)``."""
    starts = rng.integers(0, len(data) - length, size=shape)
    return data[starts[..., None] + np.arange(length)].astype(np.int32)


def val_windows(data: np.ndarray, count: int, length: int) -> np.ndarray:
    """``count`` evenly spaced, fixed windows of the held-out bytes, (count, length) int32."""
    starts = np.linspace(0, len(data) - length, count).astype(np.int64)
    return data[starts[:, None] + np.arange(length)].astype(np.int32)


class Block(nnx.Module):
    """Pre-norm block: causal multi-head attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int, config, rngs: nnx.Rngs):
        def linear(n_in, n_out):
            return lowprec.QuantLinear(n_in, n_out, config=config, rngs=rngs)

        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = linear(width, 3 * width)
        self.proj = linear(width, width)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = linear(width, mlp_width)
        self.down = linear(mlp_width, width)

    def __call__(
        self,
        x: jax.Array,
        outliers: Mapping[str, jax.Array],
        real: Mapping[str, jax.Array],
        positions: tuple[int, ...],
    ) -> jax.Array:
        def layer(name: str, inputs: jax.Array) -> jax.Array:
            inputs = with_real_outliers(inputs, real.get(name), positions)
            return getattr(self, name)(inputs, outliers.get(name))

        batch, length, width = x.shape
        q, k, v = jnp.split(layer("qkv", self.norm1(x)), 3, axis=-1)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.reshape(shape) for t in (q, k, v))
        mask = jnp.tril(jnp.ones((length, length), bool))
        attended = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
        x = x + layer("proj", attended.reshape(batch, length, width))
        h = jax.nn.gelu(layer("up", self.norm2(x)))
        return x + layer("down", h)


def with_real_outliers(
    x: jax.Array, multipliers: jax.Array | None, positions: tuple[int, ...]
) -> jax.Array:
    """``x`` (batch, length, channels) with its channels multiplied by ``multipliers``
    (channels,) at the sequence ``positions`` only (``x`` itself when None)."""
    if multipliers is None:
        return x
    at = jnp.zeros((x.shape[-2], 1), bool).at[jnp.asarray(positions)].set(True)
    return x * jnp.where(at, jnp.asarray(multipliers, x.dtype), 1)


class Decoder(nnx.Module):
    """Byte-level decoder-only transformer (see the module docstring)."""

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        heads: int,
        mlp_width: int,
        context: int,
        config: lowprec.QuantConfig,
        rngs: nnx.Rngs,
    ):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.embed = nnx.Embed(VOCAB, width, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, width)))
        self.blocks = nnx.List([Block(width, heads, mlp_width, config, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, VOCAB, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        outliers: Mapping[str, jax.Array] | None = None,
        real_outliers: Mapping[str, jax.Array] | None = None,
        outlier_positions: tuple[int, ...] = (0,),
    ) -> jax.Array:
        x = self.embed(tokens) + self.position.get_value()[: tokens.shape[-1]]
        for i, block in enumerate(self.blocks):
            local = [_block_entries(given, f"blocks/{i}/") for given in (outliers, real_outliers)]
            x = block(x, *local, outlier_positions)
        return self.head(self.norm(x))


SIZE_FIELDS = ("width", "depth", "heads", "mlp_width", "context")


def decoder(sizes: Mapping[str, int], quant: lowprec.QuantConfig, key: jax.Array) -> Decoder:
    """The :class:`Decoder` of ``sizes`` (a mapping with :data:`SIZE_FIELDS`, such as a
    config) with quantizers ``quant``; parameters drawn from ``key``, the quantizers'
    randomness (stochastic rounding) from ``fold_in(key, 1)``."""
    return Decoder(
        **{field: sizes[field] for field in SIZE_FIELDS},
        config=quant,
        rngs=nnx.Rngs(params=key, quant=jax.random.fold_in(key, 1)),
    )


def _block_entries(given: Mapping[str, jax.Array] | None, prefix: str) -> dict[str, jax.Array]:
    """The entries of ``given`` under ``prefix``, keyed by the rest of their path."""
    return {k[len(prefix) :]: v for k, v in (given or {}).items() if k.startswith(prefix)}


def layer_paths(depth: int) -> list[str]:
    """Paths of the quantized layers, in block order: ``blocks/i/{qkv,proj,up,down}``."""
    return [f"blocks/{i}/{name}" for i in range(depth) for name in LAYER_NAMES]


def layer_input_widths(width: int, mlp_width: int) -> dict[str, int]:
    """Input width of each quantized layer kind (the outlier vectors' sizes)."""
    return {"qkv": width, "proj": width, "up": width, "down": mlp_width}


def layer_output_widths(width: int, mlp_width: int) -> dict[str, int]:
    """Output width of each quantized layer kind."""
    return {"qkv": 3 * width, "proj": width, "up": mlp_width, "down": width}


def layer_units(params: Any) -> Any:
    """GNMR units: one per layer (kernel and bias together), named by the layer's path."""
    return units.by_regex({r"^(.*)/[^/]+$": r"\1"})(params)


def next_byte_loss(
    model: Decoder,
    windows: jax.Array,
    outliers=None,
    real_outliers=None,
    outlier_positions: tuple[int, ...] = (0,),
) -> jax.Array:
    """Mean cross-entropy (nats per byte) of predicting ``windows[:, 1:]`` (the outliers:
    see the module docstring)."""
    logits = model(windows[:, :-1], outliers, real_outliers, outlier_positions)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    targets = windows[:, 1:]
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
