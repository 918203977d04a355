"""ssamba: self-supervised audio representation learning with bidirectional Mamba encoders."""

from ssamba import features
from ssamba.audio import AudioError, load_audio, resample
from ssamba.models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["AudioError", "create_model", "features", "list_models", "load_audio", "resample", "__version__"]
