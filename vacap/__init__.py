"""vacap: caption images with local LLaVA-family models and VASparse decoding."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vacap")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["Captioner", "__version__"]


def __getattr__(name: str):
    # Keeps `import vacap` (and so `vacap --help`) free of torch and transformers.
    if name == "Captioner":
        from vacap.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'vacap' has no attribute {name!r}")
