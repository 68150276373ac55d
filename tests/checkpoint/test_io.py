"""checkpoint/io.py's atomic writes (every writer in dsalite uses them) and the writing side's import direction."""

import ast
import os
import stat

import pytest

import dsalite
from dsalite.checkpoint.io import CheckpointError, atomic_dir, atomic_file


class Boom(Exception):
    pass


def leftovers(parent) -> list[str]:
    return [f for f in os.listdir(parent) if ".tmp-" in f or ".old-" in f]


# --------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_writes_then_renames(tmp_path):
    target = tmp_path / "a" / "b" / "ckpt"
    with atomic_dir(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and ".tmp-" in os.path.basename(tmp)
        assert not target.exists()  # nothing at the target until the block ends
        with open(os.path.join(tmp, "x.bin"), "wb") as f:
            f.write(b"new")
    assert (target / "x.bin").read_bytes() == b"new" and not leftovers(target.parent)


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_dir_failure_keeps_previous_content(tmp_path, error):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(error):
        with atomic_dir(str(target)) as tmp:
            (open(os.path.join(tmp, "half.bin"), "wb")).close()
            raise error()
    assert os.listdir(tmp_path) == ["ckpt"] and os.listdir(target) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"


def test_atomic_dir_failure_on_a_new_path_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_dir(str(tmp_path / "new" / "nested" / "ckpt")) as tmp:
            (open(os.path.join(tmp, "half.bin"), "wb")).close()
            raise Boom()
    assert os.listdir(tmp_path) == []  # no temporary, and no parent folder made for it


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(str(target)) as tmp:
        with open(os.path.join(tmp, "new.txt"), "w") as f:
            f.write("new")
    assert os.listdir(target) == ["new.txt"] and not leftovers(tmp_path)


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        with atomic_dir(str(tmp_path / "f")):
            pass
    assert (tmp_path / "f").read_text() == "keep" and os.listdir(tmp_path) == ["f"]


# --------------------------------------------------------------------------- atomic_file


def test_atomic_file_failure_keeps_previous_content(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous")
    with pytest.raises(Boom):
        with atomic_file(str(target)) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and ".tmp-" in os.path.basename(tmp)
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise Boom()
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.gguf"]


def test_atomic_file_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "m.gguf"
    with pytest.raises(Boom):
        with atomic_file(str(target)):
            raise Boom()
    assert os.listdir(tmp_path) == []
    old_umask = os.umask(0o022)
    try:
        for content in (b"one", b"two"):
            with atomic_file(str(target)) as tmp:
                with open(tmp, "wb") as f:
                    f.write(content)
            assert target.read_bytes() == content and os.listdir(target.parent) == ["m.gguf"]
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644  # as a plain open() would have made it


def test_atomic_file_refuses_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        with atomic_file(str(tmp_path)):
            pass


# --------------------------------------------------------------------------- import direction


def _module_imports(path: str) -> list[str]:
    """Modules a file imports when it is loaded (imports inside functions run later, on call)."""
    out = []

    def visit(node):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.extend([node.module] + [f"{node.module}.{a.name}" for a in node.names])
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.iter_child_nodes(node):
                visit(child)

    with open(path, encoding="utf-8") as f:
        visit(ast.parse(f.read()))
    return out


def _file_of(module: str) -> str | None:
    root = os.path.dirname(os.path.dirname(dsalite.__file__))
    base = os.path.join(root, *module.split("."))
    for p in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(p):
            return p
    return None


def test_saving_does_not_import_the_model():
    """Transformer.save_pretrained calls checkpoint/save.py; loading that module must not load dsalite.model."""
    seen, todo = set(), ["dsalite.checkpoint.save"]
    while todo:
        m = todo.pop()
        if m in seen or not m.startswith("dsalite.") or _file_of(m) is None:
            continue
        seen.add(m)
        todo += _module_imports(_file_of(m))
    assert "dsalite.model" not in seen, sorted(seen)
    assert "dsalite.checkpoint.io" in seen and "dsalite.families" in seen
