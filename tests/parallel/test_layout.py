"""The [parallel] layout: resolved against the world size, bad layouts refused by name before any work, and the
DeviceMeshes it builds (with torch's fake process group: no processes needed)."""

import pytest
import torch.distributed as dist

from dsalite import parallel
from dsalite.cli import main
from dsalite.parallel.mesh import Layout, LayoutError, build_meshes
from dsalite.training.recipe import parse_recipe
from workers import recipe


def test_fill_and_sizes():
    assert Layout().resolve(4) == Layout(1, 4, 1, 1, 1)
    got = Layout(dp_replicate=2, ep=2).check(8, n_routed_experts=8, global_batch=8)
    assert (got.dp_shard, got.dp, got.efsdp, got.world) == (4, 8, 2, 8)
    assert Layout(dp_shard=2, ep=2).check(2, 8, 4).efsdp == 1  # ep carved out of dp_shard: still 2 processes


@pytest.mark.parametrize("layout, world, experts, batch, words", [
    (Layout(dp_shard=2), 4, 8, 4, ["dp_replicate × dp_shard × pp × cp", "= 2", "world size is 4"]),
    (Layout(dp_replicate=3), 4, 8, 12, ["not divisible by parallel.dp_replicate", "3"]),
    (Layout(dp_shard=3, ep=3), 3, 8, 3, ["parallel.ep=3 does not divide n_routed_experts=8"]),
    (Layout(dp_shard=2, ep=4), 2, 8, 4, ["parallel.ep=4 must divide dp_shard × cp", "= 2"]),
    (Layout(dp_shard=3), 3, 8, 4, ["data.batch_size=4", "3 data-parallel ranks"]),
    (Layout(dp_shard=2, cp=2), 2, 8, 4, ["dp_replicate × dp_shard × pp × cp = 1 × 2 × 1 × 2 = 4",
                                          "world size is 2"]),
    (Layout(dp_shard=2, ep=2), 2, 0, 4, ["parallel.ep=2 needs a model with routed experts"]),
])
def test_bad_layouts_are_named(layout, world, experts, batch, words):
    with pytest.raises(LayoutError) as e:
        layout.check(world, experts, batch)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("family, train, word", [
    ("glm-5.2", {"stage": "lora"}, "train.stage='lora'"),
])
def test_recipe_refusals(tmp_path, family, train, word):
    with pytest.raises(LayoutError, match=word.replace("(", r"\(")):
        parallel.check_recipe(recipe(family, [], **train), 2)
    parallel.check_recipe(recipe(family, [], **train), 1)  # one process runs all of them


def test_recipe_section_is_checked():
    with pytest.raises(ValueError, match="parallel.ep must be >= 1"):
        parse_recipe({"parallel": {"ep": 0}})
    with pytest.raises(ValueError, match=r"recipe key parallel.tp is unknown"):
        parse_recipe({"parallel": {"tp": 2}})
    with pytest.raises(ValueError, match="parallel.param_dtype"):
        parse_recipe({"parallel": {"param_dtype": "fp16"}})
    r = parse_recipe({"model": {"preset": "deepseek-v4-tiny"}, "parallel": {"dp_shard": 2, "ep": 2}})
    assert parallel.check_recipe(r, 2).ep == 2  # DeepSeek-V4 trains under FSDP2 + expert parallel


@pytest.mark.parametrize("recipe_text, args, message", [
    ('[model]\npreset = "deepseek-v3-tiny"\n[data]\nbatch_size = 4\n', ["--nproc", "2", "--ep", "3"],
     "parallel.ep=3 must divide dp_shard × cp = 2 × 1 = 2"),
    ('[model]\npreset = "deepseek-v3-tiny"\n[data]\nbatch_size = 4\n', ["--nproc", "3"],
     "data.batch_size=4 (the global batch) does not divide over the 3 data-parallel ranks"),
    ('[model]\npreset = "glm-5.2-tiny"\n[data]\nseq_len = 30\nbatch_size = 4\n', ["--nproc", "2", "--cp", "2"],
     "data.seq_len=30 does not split into 2 × parallel.cp = 4 equal chunks"),
])
def test_cli_refuses_a_bad_layout_before_starting_anything(tmp_path, capsys, recipe_text, args, message):
    rec = tmp_path / "r.toml"
    rec.write_text(recipe_text)
    out = tmp_path / "never"
    assert main(["train", str(rec), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_meshes_on_the_fake_process_group():
    """dp_shard = 4, ep = 2 on 4 ranks, seen from rank 1: FSDP over all 4, experts split over ranks {0, 1} and
    FSDP-sharded over {1, 3}, data-parallel rank 1 of 4."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        m = build_meshes(Layout(dp_shard=4, ep=2).check(4, 8, 4), "cpu")
        assert m.dense.mesh.flatten().tolist() == [0, 1, 2, 3]
        assert m.ep.mesh.tolist() == [0, 1] and m.experts.mesh.tolist() == [1, 3]
        assert (m.dp_rank, m.dp_size) == (1, 4)
    finally:
        dist.destroy_process_group()
