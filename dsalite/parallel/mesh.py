"""The parallel layout: a recipe's [parallel] degrees checked against the world size, then turned into DeviceMeshes.

Ranks are laid out as torchtitan lays them out: world = pp × dp_replicate × dp_shard × cp (tensor parallel is not
used). Pipeline stages (pp) are the outermost dimension: every stage's ranks form the same dp × cp layout. Expert
parallelism does not add ranks: it is carved out of dp_shard × cp, which is seen a second way as efsdp × ep with ep
the inner (neighbouring) part. So `dp_shard = 2, ep = 2` runs on 2 processes and `dp_shard = 4, ep = 2` on 4, where
each expert shard is further FSDP-sharded over efsdp = 2 ranks.

Context parallel (cp, the innermost dimension: a sequence's ranks are neighbours) splits every sequence over cp
ranks that read the same batch rows; FSDP shards over dp_shard × cp (flattened, as torchtitan's dp_shard_cp), so the
cp ranks' gradients are summed with the data-parallel ones, and the losses and metrics are shared over dp × cp.

Both views of the ranks are `_unflatten`ed from one 1-D world mesh, so they share a root mesh: FSDP2 requires the
mesh an expert weight is sharded over for EP and the mesh it is FSDP-sharded over to come from the same root.

Every check here runs before any process group exists (the launcher calls `check` before spawning workers), and
each failure is a `LayoutError` that names the recipe key and the numbers involved.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A [parallel] layout that cannot run: names the recipe key(s) and the values."""


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: fill (world / (dp_replicate · pp · cp))
    ep: int = 1
    pp: int = 1
    cp: int = 1

    @classmethod
    def from_recipe(cls, section) -> "Layout":
        return cls(section.dp_replicate, section.dp_shard, section.ep, section.pp, section.cp)

    # ----- derived sizes (after `resolve`) -----
    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads a different slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """FSDP degree of the routed experts: the part of dp_shard × cp that is not ep."""
        return self.dp_shard * self.cp // self.ep

    def resolve(self, world: int) -> "Layout":
        """Fill dp_shard = -1 from the world size; refuse degrees that do not multiply to it."""
        if world < 1:
            raise LayoutError(f"world size must be >= 1, got {world}")
        rest = self.dp_replicate * self.pp * self.cp
        shard = self.dp_shard
        if shard == -1:
            if world % rest:
                raise LayoutError(f"world size {world} is not divisible by parallel.dp_replicate × pp × cp = "
                                  f"{self.dp_replicate} × {self.pp} × {self.cp} = {rest}, so parallel.dp_shard = -1 "
                                  "cannot fill it")
            shard = world // rest
        got = Layout(self.dp_replicate, shard, self.ep, self.pp, self.cp)
        if got.world != world:
            raise LayoutError(f"parallel.dp_replicate × dp_shard × pp × cp = {self.dp_replicate} × {shard} × "
                              f"{self.pp} × {self.cp} = {got.world}, but the world size is {world} (--nproc / "
                              "torchrun's processes); change the layout or the process count")
        return got

    def check(self, world: int, n_routed_experts: int, global_batch: int) -> "Layout":
        """The resolved layout, or a LayoutError naming the first rule it breaks."""
        got = self.resolve(world)
        span = got.dp_shard * got.cp
        if got.ep > 1:
            if n_routed_experts == 0:
                raise LayoutError(f"parallel.ep={got.ep} needs a model with routed experts (this one has none)")
            if span % got.ep:
                raise LayoutError(f"parallel.ep={got.ep} must divide dp_shard × cp = {got.dp_shard} × {got.cp} = "
                                  f"{span} (expert parallelism is carved out of those ranks)")
            if n_routed_experts % got.ep:
                raise LayoutError(f"parallel.ep={got.ep} does not divide n_routed_experts={n_routed_experts}: every "
                                  "expert-parallel rank must hold the same number of experts")
        if global_batch % got.dp:
            raise LayoutError(f"data.batch_size={global_batch} (the global batch) does not divide over the "
                              f"{got.dp} data-parallel ranks (dp_replicate × dp_shard = {got.dp_replicate} × "
                              f"{got.dp_shard})")
        return got

    def describe(self) -> str:
        parts = [f"dp_replicate={self.dp_replicate}", f"dp_shard={self.dp_shard}"]
        if self.pp > 1:
            parts.insert(0, f"pp={self.pp}")
        if self.cp > 1:
            parts.append(f"cp={self.cp}")
        if self.ep > 1:
            parts.append(f"ep={self.ep} (efsdp={self.efsdp})")
        return f"{self.world} processes: " + ", ".join(parts)


@dataclass
class Meshes:
    """The DeviceMeshes a layout needs (see the module docstring for the rank order)."""

    layout: Layout
    world: object  # 1-D DeviceMesh over every rank
    dense: object  # FSDP mesh of everything but the routed experts: (dp_replicate, dp_shard) or (dp_shard,)
    #                (dp_shard_cp = dp_shard × cp in their place under context parallel)
    dp: object  # 1-D mesh of the data-parallel ranks (each reads its own rows of the global batch)
    ep: object | None = None  # 1-D mesh the routed experts are split over (None when ep = 1)
    experts: object | None = None  # FSDP mesh of the routed experts: (dp_replicate, efsdp) or (efsdp,)
    cp: object | None = None  # 1-D mesh of the ranks sharing each sequence (None when cp = 1)
    tokens: object | None = None  # 1-D mesh over dp × cp: ranks holding different tokens (loss counts, router
    #                               loads and metrics are summed over it); `dp` when cp = 1
    pp: object | None = None  # 1-D mesh of the pipeline stages this rank's activations pass through (pp > 1)
    stage: object | None = None  # 1-D mesh of the ranks holding this rank's stage (pp > 1)

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.dp.size()


def build_meshes(layout: Layout, device_type: str) -> Meshes:
    """DeviceMeshes for a resolved layout; needs an initialised default process group of `layout.world` ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    L = layout
    world = init_device_mesh(device_type, (L.world,), mesh_dim_names=("world",))
    dense = world._unflatten(0, (L.pp, L.dp_replicate, L.dp_shard, L.cp), ("pp", "dp_replicate", "dp_shard", "cp"))
    dp = world._unflatten(0, (L.pp, L.dp, L.cp), ("pp", "dp", "cp"))["dp"]
    fsdp_dims = ("dp_replicate", "dp_shard") if L.dp_replicate > 1 else ("dp_shard",)
    m = Meshes(L, world, dense[fsdp_dims], dp, tokens=dp)
    if L.cp > 1:  # FSDP over dp_shard × cp; sequences split over cp
        m.cp = dense["cp"]
        flat = world._unflatten(0, (L.pp, L.dp_replicate, L.dp_shard * L.cp), ("pp", "dp_replicate", "dp_shard_cp"))
        m.dense = flat[("dp_replicate", "dp_shard_cp") if L.dp_replicate > 1 else ("dp_shard_cp",)]
        m.tokens = world._unflatten(0, (L.pp, L.dp * L.cp), ("pp", "dp_cp"))["dp_cp"]
    if L.pp > 1:
        stages = world._unflatten(0, (L.pp, L.world // L.pp), ("pp", "stage"))
        m.pp, m.stage = stages["pp"], stages["stage"]
    if L.ep > 1:
        sparse = world._unflatten(0, (L.pp, L.dp_replicate, L.efsdp, L.ep), ("pp", "dp_replicate", "efsdp", "ep"))
        m.ep = sparse["ep"]
        m.experts = sparse[("dp_replicate", "efsdp") if L.dp_replicate > 1 else ("efsdp",)]
    return m
