import pytest

from serve_fixtures import ServerThread, make_checkpoint, tiny_model


@pytest.fixture(scope="session")
def glm():
    return tiny_model()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ckpt):
    s = ServerThread(ckpt)
    yield s
    s.stop()
