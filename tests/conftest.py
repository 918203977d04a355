from pathlib import Path

import pytest

# ../shared/conformance beside the checkout (CI always has it; a user's clone may not).
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"


def conformance_dir(name: str) -> Path:
    path = CONFORMANCE / name
    if not (path / "config.json").exists():
        pytest.skip(f"official-code fixture {path} is absent (it ships beside the repository as shared/conformance)")
    return path
