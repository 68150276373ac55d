"""Training recipes: a TOML file with [model], [data], [train] and optional [lora] and [parallel] tables, read into
dataclasses.

Unknown keys and wrongly typed values are errors that name `section.key`. The stage decides what trains:
  pretrain / sft  all parameters, top-k sparse attention, indexer KL on the selected keys (sft = JSONL prompt masks);
  dsa_warmup      dense attention, only the indexers train, KL over every visible key (DSA stage 1);
  dsa_sparse      top-k sparse attention, all parameters, KL restricted to the selection (DSA stage 2);
  lora            base frozen, adapters on [lora].targets train.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STAGES = ("pretrain", "sft", "dsa_warmup", "dsa_sparse", "lora")


@dataclass
class ModelSection:
    preset: str = "glm-5.2-tiny"  # a `dsalite create` preset, or
    init_from: str = ""  # an HF checkpoint directory to start from (relative paths: to the recipe file)
    overrides: dict = field(default_factory=dict)  # HF config keys applied on top of the preset
    seed: int = 0
    init_std: float = 0.02


@dataclass
class DataSection:
    files: list = field(default_factory=list)  # .txt / .jsonl; empty = the built-in Shakespeare corpus
    tokenizer: str = ""  # a directory with tokenizer.json; empty = train one on the data
    vocab_size: int = 512  # for a trained tokenizer; also the model's vocab_size unless overridden
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0


@dataclass
class TrainSection:
    stage: str = "pretrain"
    max_steps: int = 200
    optimizer: str = "adamw"  # adamw | muon (Muon for 2-D hidden weights, AdamW for the rest)
    lr: float = 3e-3
    muon_lr: float = 0.02
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    accum_steps: int = 1
    bf16: bool = False
    recompute: bool = False
    mtp_coeff: float = 0.3
    indexer_coeff: float = 0.01
    aux_loss_coeff: float = 0.0  # sequence-level balance loss (DeepSeek-V3 eq. 17-20)
    bias_update_rate: float = 1e-3  # aux-loss-free router bias step (DeepSeek-V3 §2.1.2); 0 = off
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2
    threads: int = 0  # torch threads; 0 = leave as is
    device: str = "cpu"  # where the model trains ("cpu", "cuda", "cuda:1", ...); autocast follows its type


@dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    targets: list = field(default_factory=lambda: ["attention", "mlp"])


@dataclass
class ParallelSection:
    """The parallel layout (dsalite/parallel/mesh.py checks it against the world size before any work).

    world size = dp_replicate × dp_shard × pp × cp; ep is carved out of dp_shard × cp (torchtitan's rule), so
    dp_shard = 2, ep = 2 runs on 2 processes. data.batch_size stays the global batch whatever the layout.
    """

    dp_replicate: int = 1  # full replicas (HSDP's outer dimension)
    dp_shard: int = -1  # FSDP2 sharding degree; -1 = whatever the world size leaves
    ep: int = 1  # expert-parallel degree (routed experts split over this many ranks)
    pp: int = 1  # pipeline stages (torch.distributed.pipelining; parallel/pipeline.py)
    pp_microbatches: int = 0  # micro-batches per pipeline step (0 = pp); each dp rank's rows split into these
    pp_schedule: str = "1f1b"  # 1f1b | gpipe (one stage per rank) | interleaved-1f1b | looped-bfs (several)
    pp_stages_per_rank: int = 0  # 0 = 1 for 1f1b / gpipe, 2 for interleaved-1f1b / looped-bfs
    pp_split: list = field(default_factory=list)  # first trunk layer of stages 2, 3, ... (of pp × stages per
    #                                               rank); empty = automatic
    pp_carry_topk: bool = False  # let a stage boundary fall between IndexShare source and shared layers
    cp: int = 1  # context-parallel degree (reserved: must be 1 for now)
    param_dtype: str = "fp32"  # fp32 | bf16: the dtype FSDP gathers parameters in (gradients reduce in fp32)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    source: str = ""  # the TOML file it came from

    @property
    def dense_attention(self) -> bool:
        return self.train.stage == "dsa_warmup"


def _fill(cls, values: dict, section: str):
    obj = cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in values.items():
        if k not in known:
            raise ValueError(f"recipe key {section}.{k} is unknown; expected one of {sorted(known)}")
        want = type(getattr(obj, k))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ValueError(f"recipe key {section}.{k} must be {want.__name__}, got {v!r}")
        setattr(obj, k, v)
    return obj


def parse_recipe(d: dict, source: str = "") -> Recipe:
    sections = {"model": ModelSection, "data": DataSection, "train": TrainSection, "lora": LoraSection,
                "parallel": ParallelSection}
    bad = sorted(set(d) - set(sections))
    if bad:
        raise ValueError(f"recipe table [{bad[0]}] is unknown; expected {sorted(sections)}")
    r = Recipe(**{name: _fill(cls, d.get(name, {}), name) for name, cls in sections.items()}, source=source)
    t = r.train
    if t.stage not in STAGES:
        raise ValueError(f"recipe key train.stage={t.stage!r} is unknown; expected one of {list(STAGES)}")
    if t.optimizer not in ("adamw", "muon"):
        raise ValueError(f"recipe key train.optimizer={t.optimizer!r}; expected 'adamw' or 'muon'")
    for sec, name in (("train", "max_steps"), ("train", "accum_steps"), ("data", "seq_len"), ("data", "batch_size"),
                      ("train", "keep_last"), ("train", "save_every"), ("train", "log_every")):
        if getattr(getattr(r, sec), name) < 1:
            raise ValueError(f"recipe key {sec}.{name} must be >= 1, got {getattr(getattr(r, sec), name)}")
    for name in ("dp_replicate", "ep", "pp", "cp"):
        if getattr(r.parallel, name) < 1:
            raise ValueError(f"recipe key parallel.{name} must be >= 1, got {getattr(r.parallel, name)}")
    if r.parallel.dp_shard < 1 and r.parallel.dp_shard != -1:
        raise ValueError(f"recipe key parallel.dp_shard must be >= 1 or -1 (fill), got {r.parallel.dp_shard}")
    if r.parallel.pp_microbatches < 0:
        raise ValueError(f"recipe key parallel.pp_microbatches must be >= 0 (0 = pp), got {r.parallel.pp_microbatches}")
    if r.parallel.param_dtype not in ("fp32", "bf16"):
        raise ValueError(f"recipe key parallel.param_dtype={r.parallel.param_dtype!r}; expected 'fp32' or 'bf16'")
    if len(t.betas) != 2:
        raise ValueError(f"recipe key train.betas must have 2 entries, got {t.betas}")
    base = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    r.data.files = [f if os.path.isabs(f) else os.path.join(base, f) for f in r.data.files]
    for sec, key in (("model", "init_from"), ("data", "tokenizer")):
        v = getattr(getattr(r, sec), key)
        if v and not os.path.isabs(v):
            setattr(getattr(r, sec), key, os.path.join(base, v))
    return r


def load_recipe(path: str) -> Recipe:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe {path} does not exist")
    with open(path, "rb") as f:
        try:
            d = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"recipe {path} is not valid TOML: {e}") from None
    return parse_recipe(d, path)
