"""IndexShare (GLM-5.2 cross-layer top-k sharing): which layers run an indexer and which reuse one.

HF semantics (`GlmMoeDsaConfig.__post_init__`): an explicit `indexer_types` list wins, then `index_topk_pattern`
("FSSF…" or a list), else layer i (0-indexed) is full iff max(i - offset + 1, 0) % max(freq, 1) == 0 with defaults
freq 1, offset 2. GLM-5.2 (78 layers, freq 4, offset 3) gives 21 full layers at 0, 1, 2, 6, 10, …, 74.
MTP layer k sits at global index L + k and follows the same rule (the GLM-5.2 MTP layer 78 is full).
The top-k itself never lives here: a full layer returns it and the model hands it to the next layer explicitly.
`None` as a top-k means "every visible key" (index_topk >= T, dense warm-up); `NOT_GIVEN` means no source layer ran,
and a shared layer that receives it raises `IndexShareError` instead of silently attending densely.
"""

from __future__ import annotations


class IndexShareError(ValueError):
    """A shared IndexShare layer ran without the top-k of its source layer."""


class _NotGiven:
    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = _NotGiven()  # the top-k a block receives when no full layer ran before it in this forward


def indexer_schedule(
    num_layers: int,
    num_mtp_layers: int = 0,
    *,
    indexer_types: list[str] | None = None,
    pattern: str | list[str] | None = None,
    freq: int | None = None,
    offset: int | None = None,
    error: type[Exception] = ValueError,
) -> list[str]:
    """Per-layer "full"/"shared" for the trunk followed by the MTP layers."""
    total = num_layers + num_mtp_layers
    f = max(freq if freq is not None else 1, 1)
    o = offset if offset is not None else 2

    def by_rule(i: int) -> str:
        return "full" if max(i - o + 1, 0) % f == 0 else "shared"

    if indexer_types is not None:
        field, types = "indexer_types", list(indexer_types)
    elif pattern is not None:
        field = "index_topk_pattern"
        if isinstance(pattern, str):
            bad = sorted(set(pattern) - {"F", "S"})
            if bad:
                raise error(f"index_topk_pattern may only contain 'F' and 'S', got {bad[0]!r}")
            types = [{"F": "full", "S": "shared"}[ch] for ch in pattern]
        else:
            types = list(pattern)
    else:
        return [by_rule(i) for i in range(total)]

    if len(types) not in (num_layers, total):
        raise error(f"{field} has {len(types)} entries, expected num_hidden_layers={num_layers}")
    bad = [t for t in types if t not in ("full", "shared")]
    if bad:
        raise error(f"{field} entries must be 'full' or 'shared', got {bad[0]!r}")
    if types and types[0] == "shared":
        raise error(f"{field}[0] is 'shared': the first layer has no earlier full layer to take its top-k from")
    rule_known = freq is not None or offset is not None
    types += [by_rule(i) if rule_known else "full" for i in range(len(types), total)]
    return types


def source_layer(types: list[str], i: int) -> int:
    """The full layer whose top-k layer i uses (i itself when it is full)."""
    for j in range(i, -1, -1):
        if types[j] == "full":
            return j
    raise ValueError(f"layer {i} is shared but no earlier layer is full")
