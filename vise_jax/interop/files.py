"""State_dict files: .safetensors (numpy only, no torch) and .pth (needs torch).

Both come back as a flat {key: numpy array} (floating tensors as float32), ready for
`interop.torchvision.torchvision_to_flax`. Writes are atomic: a temporary file beside the target,
renamed into place.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vise_jax import artifacts
from vise_jax.errors import InputError

SAFETENSORS_SUFFIXES = ('.safetensors',)
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
TORCH_HINT = "install the PyTorch extra: pip install -e '.[torch]' (or a CPU build of torch)"
# Wrappers that training scripts commonly put around a state_dict.
WRAPPER_KEYS = ('state_dict', 'model', 'model_state', 'module', 'net')


def torch_available() -> bool:
    return importlib.util.find_spec('torch') is not None


def is_weights_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in WEIGHT_SUFFIXES


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A .safetensors or .pth state_dict as numpy arrays; InputError naming the path if the file
    is missing, unreadable, or .pth without torch installed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f'{path}: no such weights file')
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return read_pth(path)
    raise InputError(f'{path}: unknown weights format {suffix!r}; expected one of '
                     f'{", ".join(WEIGHT_SUFFIXES)}')


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        state_dict = load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        raise InputError(f'{path}: not a readable safetensors file ({error})') from None
    return {key: as_float32(value) for key, value in state_dict.items()}


def read_pth(path: Path) -> dict[str, np.ndarray]:
    if not torch_available():
        raise InputError(f'{path}: reading a .pth file needs PyTorch, which is not installed; '
                         f'{TORCH_HINT}. Or convert it to .safetensors where torch is installed')
    import torch

    try:
        loaded = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors all land here
        raise InputError(f'{path}: torch.load failed ({error}); expected a state_dict saved '
                         f'with torch.save(model.state_dict(), ...)') from None
    state_dict = unwrap(loaded, path)
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor')
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()   # numpy has no bfloat16
        out[key] = tensor.numpy()
    return out


def unwrap(loaded: Any, path: Path) -> Mapping[str, Any]:
    """The state_dict inside what torch.load returned ({'state_dict': {...}} and the like)."""
    for _ in range(3):
        if not isinstance(loaded, Mapping):
            break
        inner = [k for k in WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)]
        if not inner or any(isinstance(v, np.ndarray) or hasattr(v, 'shape')
                            for v in loaded.values()):
            break
        loaded = loaded[inner[0]]
    if not isinstance(loaded, Mapping) or not loaded:
        raise InputError(f'{path}: holds a {type(loaded).__name__}, not a state_dict '
                         f'(a mapping of names to tensors)')
    return loaded


def as_float32(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
        return value.astype(np.float32, copy=False)
    return value


def write_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    arrays = {key: np.asarray(value, order='C') for key, value in state_dict.items()}
    with artifacts.atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=dict(metadata or {}))
    return path


def write_pth(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """torch.save of the state_dict as tensors (an OrderedDict, as module.state_dict() gives)."""
    if not torch_available():
        raise InputError(f'{path}: writing a .pth file needs PyTorch; {TORCH_HINT}')
    import collections

    import torch

    path = Path(path)
    tensors = collections.OrderedDict(
        (key, torch.from_numpy(np.array(value, copy=True))) for key, value in state_dict.items())
    with artifacts.atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    return path
