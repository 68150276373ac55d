import pytest

from serve_fixtures import tiny_model


@pytest.fixture(scope="session")
def glm():
    return tiny_model()
