"""Official-checkpoint import and conformance replay."""

from ssamba.convert.conformance import ReplayResult, conformance_cli, replay
from ssamba.convert.official import convert_checkpoint, import_official, load_official_state_dict

__all__ = [
    "ReplayResult",
    "conformance_cli",
    "convert_checkpoint",
    "import_official",
    "load_official_state_dict",
    "replay",
]
