"""torch, the optional `train` extra, imported where a function needs it rather than at
module level, so that `import modelgate` (registering, listing, backfilling models) works
without it."""

from __future__ import annotations

from typing import Any

__all__ = ["TORCH_MISSING", "import_torch"]

TORCH_MISSING = "this needs torch, the train extra: pip install 'modelgate[train]'"


def import_torch() -> Any:
    """The torch module, or an ImportError that names the extra to install."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(TORCH_MISSING) from exc
    return torch
