"""ssamba: self-supervised audio representation learning with bidirectional Mamba encoders."""

from ssamba import features
from ssamba.audio import AudioError, load_audio, resample

__version__ = "0.1.0"

__all__ = ["AudioError", "features", "load_audio", "resample", "__version__"]
