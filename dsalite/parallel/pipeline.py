"""Where a pipeline cuts a DSA model: stage boundaries that keep IndexShare whole, balanced by the model's own FLOPs.

A stage is the model with the other layers deleted (pipeline_stage.py does that and runs the schedule). Stage s
holds trunk layers [starts[s], starts[s+1]); the first stage also the embeddings, the last one the final norm, the
head and every MTP layer (MTP layer k sits at global index L + k and follows the same IndexShare schedule).

The guard (Megatron-Lite's rule for GLM-5.2): a shared layer reuses the top-k of the most recent full layer, so a
stage must not begin with a shared layer — that layer's source would sit on an earlier stage. Every stage starting
on a full layer is exactly the condition that no shared layer, trunk or MTP, is separated from its source (a shared
layer i with source j < start <= i makes every layer of [start, i] shared, the first of them included). The
automatic split is the most even one, by `Transformer.flops_by_part`, among the boundaries the guard allows;
a user's `pp_split` that breaks it is refused before any work, naming the shared layer, its source and both stages.

With `pp_carry_topk = true` any boundary is allowed: the top-k of the last full layer before a boundary travels
with the activations to the next stage (int32 [b, S, K] per micro-batch, only across boundaries that begin with a
shared layer), and the split is balanced over every boundary.

Legend: L trunk layers, P stages (pp), M micro-batches, b rows per micro-batch, S sequence length, K index_topk.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsalite.indexshare import source_layer
from dsalite.parallel.mesh import LayoutError

# recipe name -> torch.distributed.pipelining schedule; the last two run several stages per rank (looped: stage s on
# rank s mod pp), each its own model (pipeline_stage.stage_model)
SCHEDULES = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe", "interleaved-1f1b": "ScheduleInterleaved1F1B",
             "looped-bfs": "ScheduleLoopedBFS"}
MULTI_STAGE = ("interleaved-1f1b", "looped-bfs")


class SplitError(LayoutError):
    """A pipeline split that cannot run: names pp_split, the layers and the stages involved."""


@dataclass(frozen=True)
class PipelineSpec:
    pp: int
    microbatches: int  # per pipeline step (an accumulation step of a data-parallel rank's rows)
    schedule: str
    split: tuple[int, ...]  # first trunk layer of stages 1 .. P-1 (0-based stage index); () = automatic
    carry_topk: bool
    per_rank: int = 1  # stages per rank

    @classmethod
    def from_recipe(cls, section) -> "PipelineSpec":
        v = section.pp_stages_per_rank or (2 if section.pp_schedule in MULTI_STAGE else 1)
        return cls(section.pp, section.pp_microbatches or section.pp, section.pp_schedule,
                   tuple(section.pp_split), section.pp_carry_topk, v)

    @property
    def stages(self) -> int:
        return self.pp * self.per_rank


@dataclass(frozen=True)
class Split:
    starts: tuple[int, ...]  # first trunk layer of every stage; starts[0] = 0
    n_layers: int  # L (trunk)
    n_mtp: int = 0

    @property
    def stages(self) -> int:
        return len(self.starts)

    def layers(self, s: int) -> range:
        """Trunk layers of stage s (the last stage also holds MTP layers L .. L + n_mtp - 1)."""
        end = self.starts[s + 1] if s + 1 < self.stages else self.n_layers
        return range(self.starts[s], end)

    def stage_of(self, i: int) -> int:
        """The stage of global layer i (MTP layers: the last stage)."""
        return max(s for s in range(self.stages) if self.starts[s] <= min(i, self.n_layers - 1))

    def user_form(self) -> list[int]:
        """As `parallel.pp_split` writes it."""
        return list(self.starts[1:])


def describe_layer(i: int, L: int) -> str:
    return f"MTP layer {i - L} (global index {i})" if i >= L else f"layer {i}"


def violations(types: list[str], split: Split) -> list[tuple[int, int, int, int]]:
    """(shared layer, its source, the shared layer's stage, the source's stage) for every shared layer, trunk or MTP,
    that the split puts on another stage than its source. `types` is the trunk + MTP schedule."""
    out = []
    for i, t in enumerate(types[: split.n_layers + split.n_mtp]):
        if t != "shared":
            continue
        src = source_layer(types, i)
        a, b = split.stage_of(i), split.stage_of(src)
        if a != b:
            out.append((i, src, a, b))
    return out


def carried(types: list[str] | None, split: Split) -> list[bool]:
    """Per boundary (before stage 1 .. P-1): whether a top-k must travel across it (the stage begins with a shared
    layer, so its source is on an earlier stage)."""
    return [bool(types) and types[b] == "shared" for b in split.starts[1:]]


def topk_width(cfg, seq_len: int) -> int:
    """K of the carried top-k: index_topk, or 0 when the indexer selects every visible key (index_topk >= S)."""
    k = cfg.index_topk or 0
    return k if 0 < k < seq_len else 0


def carry_bytes(cfg, split: Split, rows: int, seq_len: int) -> list[int]:
    """Extra bytes per micro-batch per boundary that carrying the top-k costs (int32 [rows, S, K]; 0 where the
    boundary begins with a full layer)."""
    K = topk_width(cfg, seq_len)
    return [rows * seq_len * K * 4 if c else 0 for c in carried(cfg.indexer_types if cfg.has_indexer else None,
                                                                  split)]


# ----- balance -----


def layer_costs(cfg, seq_len: int) -> tuple[list[float], float]:
    """(training FLOPs per token of each trunk layer, of everything the last stage adds: final norm, head, MTP
    layers), from the model's own `flops_by_part` on a meta-device build."""
    import torch

    from dsalite.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    parts = model.flops_by_part(seq_len)
    trunk = [parts[f"layers.{i}"] for i in range(cfg.num_hidden_layers)]
    return trunk, sum(v for k, v in parts.items() if not k.startswith("layers."))


def stage_costs(costs: list[float], tail: float, split: Split) -> list[float]:
    out = [sum(costs[i] for i in split.layers(s)) for s in range(split.stages)]
    out[-1] += tail
    return out


def imbalance(costs: list[float], tail: float, split: Split) -> float:
    """The most loaded stage's FLOPs over the mean."""
    c = stage_costs(costs, tail, split)
    return max(c) / (sum(c) / len(c))


def balanced_split(costs: list[float], tail: float, pp: int, allowed: list[bool], n_mtp: int = 0) -> Split:
    """The split of layers 0 .. L-1 into pp non-empty contiguous stages whose most loaded stage (the last one
    carrying `tail`) costs least, with every stage after the first starting on a layer where allowed[i]; ties go to
    the smaller sum of squared stage costs. Dynamic programming over (stage, first layer of the next stage)."""
    L = len(costs)
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    INF = (float("inf"), float("inf"))
    # best[s][j]: (max stage cost, Σ cost²) of layers [0, j) in s stages; j is a legal start (or L)
    best = [[INF] * (L + 1) for _ in range(pp + 1)]
    back = [[-1] * (L + 1) for _ in range(pp + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, pp + 1):
        for j in range(1, L + 1):
            if j < L and not allowed[j]:
                continue
            if (s == pp) != (j == L):
                continue
            for k in range(0, j):
                if best[s - 1][k] == INF:
                    continue
                c = pre[j] - pre[k] + (tail if j == L else 0.0)
                m, q = best[s - 1][k]
                cand = (max(m, c), q + c * c)
                if cand < best[s][j]:
                    best[s][j], back[s][j] = cand, k
    if best[pp][L] == INF:
        raise SplitError(f"parallel.pp: the model's {L} trunk layers cannot be split into {pp} stages that each "
                         "begin with an IndexShare full layer (only "
                         f"{sum(allowed[1:])} full layers after layer 0); lower pp or set parallel.pp_carry_topk = "
                         "true")
    starts, j = [], L
    for s in range(pp, 0, -1):
        j = back[s][j]
        starts.append(j)
    return Split(tuple(reversed(starts)), L, n_mtp)


def allowed_starts(cfg, carry: bool) -> list[bool]:
    """Where a stage may begin: anywhere with carry_topk or without an indexer schedule, else on a full layer."""
    L = cfg.num_hidden_layers
    if carry or not cfg.has_indexer:
        return [True] * L
    return [t == "full" for t in cfg.indexer_types[:L]]


def plan_split(cfg, spec: PipelineSpec, seq_len: int) -> Split:
    """The split the run uses: the user's `pp_split` (checked) or the automatic balanced one."""
    L, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    if not spec.split:
        costs, tail = layer_costs(cfg, seq_len)
        return balanced_split(costs, tail, spec.stages, allowed_starts(cfg, spec.carry_topk), n_mtp)
    given, P = list(spec.split), spec.stages
    if len(given) != P - 1:
        raise SplitError(f"parallel.pp_split={given} has {len(given)} entries; {P} stages (pp={spec.pp} × "
                         f"{spec.per_rank} per rank) need {P - 1} (the first trunk layer of stages 2 .. {P})")
    if any(not isinstance(b, int) or isinstance(b, bool) for b in given) or \
            any(b <= a for a, b in zip([0] + given, given)) or given[-1] >= L:
        raise SplitError(f"parallel.pp_split={given} must be increasing trunk layer indices in 1 .. {L - 1} (each "
                         "stage needs at least one trunk layer)")
    split = Split(tuple([0] + given), L, n_mtp)
    if not spec.carry_topk and cfg.has_indexer:
        bad = violations(cfg.indexer_types, split)
        if bad:
            i, src, a, b = bad[0]
            more = f" ({len(bad) - 1} more shared layers likewise)" if len(bad) > 1 else ""
            legal = [j for j, ok in enumerate(allowed_starts(cfg, False)) if ok and j > 0]
            raise SplitError(
                f"parallel.pp_split={given} separates an IndexShare shared layer from its source: "
                f"{describe_layer(i, L)} reuses the top-k of full {describe_layer(src, L)}, but the split puts "
                f"{describe_layer(i, L)} on stage {a} and {describe_layer(src, L)} on stage {b}{more}. Start every "
                f"stage on a full layer ({legal[:12]}{' ...' if len(legal) > 12 else ''}), leave pp_split empty for "
                "the automatic split, or set parallel.pp_carry_topk = true to send the top-k with the activations")
    return split


def check(r, cfg, layout) -> Split:
    """Every pipeline rule that can be checked before a process starts; the split the run will use."""
    spec = PipelineSpec.from_recipe(r.parallel)
    if spec.schedule not in SCHEDULES:
        raise LayoutError(f"parallel.pp_schedule={spec.schedule!r} is unknown; expected one of {list(SCHEDULES)}")
    if layout.cp > 1:
        raise LayoutError(f"parallel.pp={layout.pp} with cp={layout.cp}: pipeline and context parallel together are "
                          "not supported yet")
    if (spec.per_rank > 1) != (spec.schedule in MULTI_STAGE):
        raise LayoutError(f"parallel.pp_stages_per_rank={spec.per_rank} does not fit pp_schedule={spec.schedule!r}: "
                          f"{list(MULTI_STAGE)} run 2 or more stages per rank, the others exactly 1")
    if spec.stages > cfg.num_hidden_layers:
        raise SplitError(f"parallel.pp={spec.pp} × {spec.per_rank} stages per rank is more than the model's "
                         f"num_hidden_layers={cfg.num_hidden_layers}: every stage needs at least one trunk layer")
    if r.train.stage == "dsa_warmup":
        raise LayoutError(f"parallel.pp={layout.pp} with train.stage='dsa_warmup' is not supported yet (only the "
                          "indexers train: no hidden state between stages needs a gradient); run the warm-up without pp")
    if cfg.hyper:
        raise LayoutError(f"parallel.pp={layout.pp}: pipeline stages of DeepSeek-V4 (mHC streams between stages) are "
                          "not supported yet")
    if cfg.tie_word_embeddings:
        raise LayoutError("parallel.pp > 1 needs untied embeddings (tie_word_embeddings = true would put one weight on "
                          "the first and the last stage)")
    rows = r.data.batch_size // layout.dp
    if rows % spec.microbatches:
        raise LayoutError(f"parallel.pp_microbatches={spec.microbatches} does not divide the {rows} rows each "
                          f"data-parallel rank reads per step (data.batch_size={r.data.batch_size} over {layout.dp} "
                          "ranks)")
    if spec.schedule == "1f1b" and spec.microbatches < spec.pp:
        raise LayoutError(f"parallel.pp_microbatches={spec.microbatches} is fewer than pp={spec.pp}: 1F1B needs at "
                          "least one micro-batch per stage")
    rounds = max(1, spec.microbatches // spec.pp)
    if spec.schedule == "interleaved-1f1b" and spec.microbatches % rounds:
        raise LayoutError(f"parallel.pp_microbatches={spec.microbatches}: interleaved 1F1B runs rounds of pp={spec.pp} "
                          f"micro-batches, so it needs a multiple of {rounds} (or at most pp)")
    return plan_split(cfg, spec, r.data.seq_len)


def describe_split(split: Split) -> str:
    """"0-21, 22-41, 42-77 + MTP": each stage's trunk layers."""
    parts = []
    for s in range(split.stages):
        r = split.layers(s)
        parts.append(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}")
    return ", ".join(parts) + (" + MTP" if split.n_mtp else "")


def plan_for(r, cfg, layout) -> tuple[Split, PipelineSpec, list[str]]:
    """The split a `--dry-run` plans with (the automatic one when the recipe's pp_split is refused) and the lines it
    prints about it: stages, FLOPs balance, carried top-k bytes."""
    from dataclasses import replace

    spec = PipelineSpec.from_recipe(r.parallel)
    S, lines = r.data.seq_len, []
    try:
        split = plan_split(cfg, spec, S)
    except SplitError:
        spec = replace(spec, split=())
        split = plan_split(cfg, spec, S)
        lines.append("pipeline: the recipe's pp_split is refused (see below); planned with the automatic split")
    costs, tail = layer_costs(cfg, S)
    rows = r.data.batch_size // layout.dp // spec.microbatches
    mine = list(range(0, spec.stages, spec.pp))
    lines.append(f"pipeline: {spec.stages} stages on {spec.pp} ranks ({spec.schedule}, {spec.microbatches} "
                 f"micro-batches of {rows} rows), layers {describe_split(split)}; most loaded stage / mean FLOPs = "
                 f"{imbalance(costs, tail, split):.3f}; rank 0 holds stage{'s' if len(mine) > 1 else ''} "
                 f"{', '.join(map(str, mine))} (figures above are its)")
    extra = carry_bytes(cfg, split, rows, S)
    if any(extra):
        lines.append(f"pipeline: carried top-k per micro-batch per boundary: {[_mib(b) for b in extra]}")
    return split, spec, lines


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
