"""numpy references for the lowprec tests, written from the definitions (scale = group
amax / format max; value = round(x / scale) * scale on the format's grid, saturating),
with ml_dtypes casts for the float formats. They share no code with optstab.lowprec."""

import ml_dtypes
import numpy as np

U = 2.0**-24  # float32 unit roundoff: one correctly rounded operation errs by <= U relative
FORMAT_MAX = {"float8_e4m3": 448.0, "float8_e5m2": 57344.0, "float4_e2m1": 6.0, "int8": 127.0}
ML_DTYPES = {
    "float8_e4m3": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float4_e2m1": ml_dtypes.float4_e2m1fn,
}


def gamma(n: int) -> float:
    """Higham's gamma_n = n U / (1 - n U): a float32 sum or dot product of n terms errs
    by at most gamma_n times the sum of the terms' absolute values."""
    return n * U / (1 - n * U)


def spacing(v: np.ndarray, fmt: str) -> np.ndarray:
    """The format's grid spacing at |v| (in format units), from ml_dtypes' finfo.

    Taken at the binade of ``|v| * (1 + 2U)`` so that a float32 rounding of ``v`` that
    crosses a power of two upwards is covered (the spacing there doubles).
    """
    if fmt == "int8":
        return np.ones_like(v, np.float64)
    info = ml_dtypes.finfo(ML_DTYPES[fmt])
    magnitude = np.maximum(np.abs(np.asarray(v, np.float64)) * (1 + 2 * U), 1e-300)
    exponent = np.maximum(np.floor(np.log2(magnitude)), np.log2(float(info.smallest_normal)))
    return 2.0 ** (exponent - info.nmant)


def tile_amax(x: np.ndarray, block: int) -> np.ndarray:
    """Per 1 x block tile of the last axis, by slicing (the last tile possibly shorter)."""
    c = x.shape[-1]
    tiles = [np.abs(x[..., i : i + block]).max(-1) for i in range(0, c, block)]
    return np.stack(tiles, axis=-1).astype(np.float32)


def block_amax_expanded(w: np.ndarray, block: int) -> np.ndarray:
    """Each element of a 2-D ``w`` gets the amax of its block x block block."""
    out = np.empty_like(w, np.float32)
    for i in range(0, w.shape[0], block):
        for j in range(0, w.shape[1], block):
            out[i : i + block, j : j + block] = np.abs(w[i : i + block, j : j + block]).max()
    return out


def scales(x: np.ndarray, scaling: str, fmt: str, block: int = 8) -> np.ndarray:
    """float32 scale of every element: its group's amax / the format's max (one correctly
    rounded division; XLA may multiply by the reciprocal instead: 2 U apart at most)."""
    x = np.asarray(x, np.float32)
    if scaling == "per_tensor":
        amax = np.full_like(x, np.abs(x).max())
    elif scaling == "per_token":
        amax = np.broadcast_to(np.abs(x).max(-1, keepdims=True), x.shape)
    else:
        amax = np.repeat(tile_amax(x, block), block, axis=-1)[..., : x.shape[-1]]
    return (amax / np.float32(FORMAT_MAX[fmt])).astype(np.float32)


def quantize(x: np.ndarray, scale: np.ndarray, fmt: str) -> np.ndarray:
    """Nearest rounding of ``x / scale`` onto the format's grid (saturating), times
    ``scale``, in float32 numpy."""
    v = np.clip(np.asarray(x, np.float32) / scale, -FORMAT_MAX[fmt], FORMAT_MAX[fmt])
    if fmt == "int8":
        rounded = np.round(v)  # ties to even, like the cast below
    else:
        rounded = v.astype(ML_DTYPES[fmt]).astype(np.float32)
    return (rounded * scale).astype(np.float32)
