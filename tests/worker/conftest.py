import pytest

from shared.models import ModelNotFound, resolve_model


@pytest.fixture(scope="module")
def spec_files():
    """The default model's files, or a skip when it is not installed (speculative decoding tests)."""
    try:
        return resolve_model("default")
    except ModelNotFound as e:
        pytest.skip(str(e))
