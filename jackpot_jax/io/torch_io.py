"""Reading and writing PyTorch state dicts: the only torch-dependent part of the conversion.

torch is imported inside the functions, so importing this module costs nothing. Never
import tensorflow in a process that uses these functions (torch after tensorflow
segfaults). Nothing here downloads anything.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

CACHE_INPUT = 'cache'
_STATE_DICT_HOWTO = (
    "save one in PyTorch with torch.save(model.state_dict(), 'FILE.pth') and pass that file"
)


def _to_numpy(value: Any) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _unwrap(loaded: Any, path: str) -> Mapping[str, Any]:
    """A bare state dict or ``{'state_dict': ...}``; anything else is an error."""
    import torch

    if isinstance(loaded, Mapping) and isinstance(loaded.get('state_dict'), Mapping):
        loaded = loaded['state_dict']
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        keys = list(loaded)[:10] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(
            f'{path} holds neither a state dict (names -> tensors) nor {{"state_dict": ...}}; '
            f'found {keys}; {_STATE_DICT_HOWTO}'
        )
    return loaded


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a local ``.pth``/``.pt`` (``torch.load``, weights only) or ``.safetensors`` file.

    Floating tensors come back as float32 numpy arrays, others keep their dtype.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no such file: {path}')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file

            tensors = load_file(path, device='cpu')
        else:
            import torch

            tensors = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  (torch raises many types)
        raise _unreadable(path, e) from e
    if not path.endswith('.safetensors'):
        tensors = _unwrap(tensors, path)
    return {k: _to_numpy(v) for k, v in tensors.items()}


def _unreadable(path: str, error: Exception) -> ValueError:
    """The error for a file that torch.load (weights only) or safetensors cannot read."""
    pickled = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(error))
    if pickled:
        return ValueError(
            f'{path} holds pickled Python objects ({pickled.group(1)}), not a state dict of '
            f'tensors, and such files are never unpickled here; {_STATE_DICT_HOWTO}'
        )
    return ValueError(
        f'{path} is not a readable {"safetensors" if path.endswith(".safetensors") else "PyTorch"}'
        f' file ({type(error).__name__}); it may be truncated or of another format: copy it '
        f'again, or {_STATE_DICT_HOWTO}'
    )


def torchvision_cache_dir() -> str:
    """``$TORCH_HOME/hub/checkpoints`` (torch.hub's own rule, so ``set_dir`` is honoured)."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def _torchvision_file_names(arch: str) -> list[str]:
    """File names of torchvision's published weights for ``arch`` (from its weight enums)."""
    import torchvision.models

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return []
    return sorted({os.path.basename(w.url) for w in enum})


def find_torchvision_cache(arch: str, cache_dir: str | None = None) -> str:
    """The cached torchvision file for ``arch`` (``<arch>-<hash>.pth``); never downloads."""
    cache_dir = cache_dir or torchvision_cache_dir()
    known = _torchvision_file_names(arch)
    found = [
        os.path.join(cache_dir, n) for n in known if os.path.isfile(os.path.join(cache_dir, n))
    ]
    if not found:
        found = sorted(glob.glob(os.path.join(glob.escape(cache_dir), f'{arch}-*.pth')))
    if not found:
        raise FileNotFoundError(
            f'no cached torchvision weights for {arch} in {cache_dir} (looked for '
            f"{', '.join(known) or arch + '-<hash>.pth'}); nothing is downloaded: copy the file "
            'there (or set $TORCH_HOME), or pass its path as --input'
        )
    if len(found) > 1:
        raise ValueError(
            f'several cached torchvision weights for {arch}: {found}; pass one as --input'
        )
    return found[0]


def resolve_input(spec: str, arch: str | None) -> str:
    """A file path as given, or ``'cache'`` -> the torchvision cache file of ``arch``."""
    if spec == CACHE_INPUT:
        if arch is None:
            raise ValueError("'cache' input works only for torchvision architectures")
        return find_torchvision_cache(arch)
    if not os.path.isfile(spec):
        hint = " (or 'cache' for torchvision's cache)" if arch is not None else ''
        raise FileNotFoundError(f'no such file: {spec}; pass a local state-dict file{hint}')
    return spec


def save_state_dict(state: Mapping[str, np.ndarray], path: str, wrap: bool = False) -> None:
    """Writes ``state`` with ``torch.save`` (``{'state_dict': state}`` if ``wrap``) or, for
    ``.safetensors`` paths, as a flat safetensors file."""
    import torch

    tensors = {k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f'{path}.partial'  # renamed once complete: a crash never leaves half a file
    if path.endswith('.safetensors'):
        from safetensors.torch import save_file

        save_file(tensors, partial)
    else:
        torch.save({'state_dict': tensors} if wrap else tensors, partial)
    os.replace(partial, path)
