"""edge-qwen: a quantized edge runtime for Qwen2.5.

Importing the package is cheap: heavy modules (llama_cpp, numpy, gguf, torch) are
imported only when the object that needs them is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["EdgeQwen", "EdgeQwenError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .errors import EdgeQwenError
    from .runtime import EdgeQwen


def __getattr__(name: str) -> Any:
    # Lazy exports keep `import edge_qwen` fast for desktop apps and the CLI.
    if name == "EdgeQwen":
        from .runtime import EdgeQwen

        return EdgeQwen
    if name == "EdgeQwenError":
        from .errors import EdgeQwenError

        return EdgeQwenError
    raise AttributeError(f"module 'edge_qwen' has no attribute {name!r}")
