"""Data sets: images, a synthetic linear-Gaussian, and bags of words.

Images: sklearn digits (the offline default), binarized MNIST. Text: the Lee
news corpus shipped in gensim's wheel (the offline default), UCI docword
files, a folder of text files.

Every loader returns a :class:`Dataset` of float tensors whose values have
been checked: finite, the expected width, binary where the likelihood is
Bernoulli, counts where it is multinomial, and no empty split. Problems
raise :class:`DataError` with a message that names the data set, the split
and the problem.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ppl_models import LinearGaussian
from ppl_models.text import UNK_INDEX

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["load_dataset", "Dataset", "DataError"]

TEXT_DATASETS = ("lee", "uci-bow", "text-folder")
DATASETS = ("digits", "binarized-mnist", "synthetic", *TEXT_DATASETS)
DATA_ENV = "ELBOLAB_DATA"
MNIST_WIDTH = 784
MNIST_AMAT = {
    "train": "binarized_mnist_train.amat",
    "valid": "binarized_mnist_valid.amat",
    "test": "binarized_mnist_test.amat",
}
SPLIT_SEED = 0  # the digits and synthetic splits are fixed, whatever the training seed


class DataError(ValueError):
    """Bad or missing input data; the message names the problem.

    Examples
    --------
    >>> from inference import DataError, load_dataset
    >>> try:
    ...     load_dataset("binarized-mnist", path="no/such/file.npz")
    ... except DataError as err:
    ...     print(str(err)[:40])
    binarized-mnist: no such file or folder:
    """


@dataclass
class Dataset:
    """Named splits of one data set, as float tensors of shape (N, x_dim).

    Splits are loaded and checked when first used (a command that evaluates
    the test split never holds the training split in memory).

    Examples
    --------
    >>> from inference import Dataset, load_dataset
    >>> digits = load_dataset("digits")
    >>> isinstance(digits, Dataset), digits.splits
    (True, ...)
    """

    name: str
    loaders: dict[str, Callable[[], torch.Tensor]]
    likelihood: str
    binarization: str
    x_dim: int
    truth: object = field(default=None, repr=False)  # generating model, when known
    vocabulary: list[str] | None = field(default=None, repr=False)  # text: column -> word
    word_counts: torch.Tensor | None = field(default=None, repr=False)  # text: training counts
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.loaders)

    def split(self, name: str) -> torch.Tensor:
        if name not in self.loaders:
            raise DataError(
                f"{self.name} has no split {name!r}; available: {', '.join(self.loaders)}"
            )
        if name not in self._cache:
            self._cache[name] = self.loaders[name]()
        return self._cache[name]

    @property
    def heldout_split(self) -> str:
        """The split used for per-epoch held-out bounds: valid if present, else test."""
        return "valid" if "valid" in self.loaders else "test"


def _float32_rows(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 with its rows contiguous in memory (minibatches are gathered by row).

    Arrays saved column-major (the binarized-MNIST ``.npz``) make every row
    gather a strided one, several times slower. torch converts and lays out
    in one multi-threaded pass, many times faster than numpy's ``astype``
    here; dtypes that torch does not hold take numpy's way.
    """
    if x.flags.writeable and x.dtype.isnative:
        try:
            rows = torch.from_numpy(x).to(torch.float32, memory_format=torch.contiguous_format)
            return rows.numpy()
        except (TypeError, RuntimeError):  # a dtype torch does not hold (object, ...)
            pass
    return np.ascontiguousarray(x, dtype=np.float32)


def check_array(
    x: np.ndarray,
    *,
    name: str,
    split: str,
    binary: bool,
    width: int | None = None,
    counts: bool = False,
) -> np.ndarray:
    """Check one split and return it as float32; raise :class:`DataError` naming the problem.

    ``binary``: every value 0 or 1; ``counts``: every value a non-negative integer.
    """
    where = f"{name} {split} split"
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{where}: expected a 2-D array (N, D), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{where} is empty")
    if width is not None and x.shape[1] != width:
        raise DataError(f"{where}: expected width {width}, got {x.shape[1]}")
    if not np.issubdtype(x.dtype, np.number) and x.dtype != np.bool_:
        raise DataError(f"{where}: expected numbers, got dtype {x.dtype}")
    if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
        # Integers are finite and whole: two reductions decide, with no array-sized temporaries.
        low, high = x.min(), x.max()
        if low >= 0 and (high <= 1 or not binary):
            return _float32_rows(x)
    x = _float32_rows(x)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise DataError(f"{where}: {bad} rows contain NaN or infinite values")
    if binary:
        nonbinary = (x != 0) & (x != 1)
        if nonbinary.any():
            value = x[nonbinary][0]
            raise DataError(
                f"{where}: a Bernoulli likelihood needs 0/1 data, found {value:g} "
                f"({int(nonbinary.any(1).sum())} rows); binarise it first"
            )
    if counts:
        bad = (x < 0) | (x != np.round(x))
        if bad.any():
            raise DataError(
                f"{where}: a multinomial likelihood needs word counts (non-negative integers), "
                f"found {x[bad][0]:g} ({int(bad.any(1).sum())} rows)"
            )
    return x


def _to_dataset(
    name, arrays, *, likelihood, binarization, width=None, truth=None, **text
) -> Dataset:
    """A data set from in-memory arrays, or from callables that read one split each."""
    kinds = {"binary": likelihood == "bernoulli", "counts": likelihood == "multinomial"}
    if width is None:  # small data: check every split now and take the width from them
        checked = {s: check_array(x, name=name, split=s, **kinds) for s, x in arrays.items()}
        widths = {x.shape[1] for x in checked.values()}
        if len(widths) > 1:
            raise DataError(f"{name}: splits have different widths {sorted(widths)}")
        arrays, width = checked, widths.pop()

    def loader(split):
        def load():
            x = arrays[split]() if callable(arrays[split]) else arrays[split]
            checked = check_array(x, name=name, split=split, width=width, **kinds)
            return torch.from_numpy(checked)

        return load

    loaders = {split: loader(split) for split in arrays}
    return Dataset(name, loaders, likelihood, binarization, width, truth, **text)


def load_digits(*, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 digits (1797 x 64), pixels > 7 of 16 set to 1; fixed seeded split."""
    from sklearn.datasets import load_digits as sk_digits  # on first use: 1.5 s of imports

    pixels = sk_digits().data
    x = (pixels > 7).astype(np.float32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    arrays = {"train": x[order[n_test:]], "test": x[order[:n_test]]}
    return _to_dataset(
        "digits", arrays, likelihood="bernoulli", binarization="static threshold: pixel > 7/16"
    )


def resolve_data_path(path: str | os.PathLike | None) -> Path:
    """``path``, else the ``ELBOLAB_DATA`` environment variable; error if neither is set."""
    chosen = path if path is not None else os.environ.get(DATA_ENV)
    if not chosen:
        raise DataError(
            f"binarized-mnist needs a file: pass --data-path FILE (.npz or a folder of the "
            f"three .amat files) or set {DATA_ENV}"
        )
    return Path(chosen).expanduser()


def check_npz(path: Path, what: str = "data") -> list[str]:
    """The array names of a ``.npz`` whose headers agree with the bytes it holds.

    Each member's header (dtype and shape) is read without reading the
    array, and the size it claims is checked against the member's stored
    size, so that a damaged or hostile header (a 10^9 x 784 array in a small
    file) is refused in one line instead of allocating memory it describes.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = []
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)  # fmt: skip
                    shape, _, dtype = read_header(member, max_header_size=10_000)
                    claimed = math.prod(shape) * dtype.itemsize
                    if dtype.hasobject:
                        raise DataError(f"{what}: {path}: {info.filename} holds Python objects")
                    if claimed != info.file_size - member.tell():
                        raise DataError(
                            f"{what}: {path}: {info.filename[:-4]} claims shape {shape} "
                            f"({claimed:,} bytes) but holds {info.file_size - member.tell():,}; "
                            "the file is damaged"
                        )
                names.append(info.filename[:-4])
            return names
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{what}: cannot read {path}: {err}") from None


def load_binarized_mnist(path: str | os.PathLike | None = None) -> Dataset:
    """Statically binarised MNIST (Larochelle & Murray 2011), 50k/10k/10k.

    Parameters
    ----------
    path : path-like, optional
        A ``.npz`` with arrays ``train``, ``valid``, ``test``; or a folder (or
        one of the files) holding ``binarized_mnist_{train,valid,test}.amat``.
        Default: the ``ELBOLAB_DATA`` environment variable.
    """
    where = resolve_data_path(path)
    if not where.exists():
        raise DataError(f"binarized-mnist: no such file or folder: {where}")

    def reading(read: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
        def guarded():
            try:
                return read()
            except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as err:
                raise DataError(f"binarized-mnist: cannot read {where}: {err}") from err

        return guarded

    arrays: dict[str, Callable[[], np.ndarray]] = {}
    if where.is_file() and where.suffix == ".npz":
        files = check_npz(where, "binarized-mnist")
        missing = [s for s in MNIST_AMAT if s not in files]
        if missing:
            raise DataError(
                f"binarized-mnist: {where} lacks array(s) {', '.join(missing)} "
                f"(has {', '.join(files) or 'none'})"
            )

        def from_npz(split):
            def read():
                with np.load(where, allow_pickle=False) as npz:
                    return npz[split]

            return reading(read)

        arrays = {split: from_npz(split) for split in MNIST_AMAT}
    else:
        folder = where if where.is_dir() else where.parent
        for split, filename in MNIST_AMAT.items():
            file = folder / filename
            if not file.exists():
                raise DataError(f"binarized-mnist: missing {file}")
            arrays[split] = reading(lambda file=file: np.loadtxt(file, dtype=np.float32, ndmin=2))
    return _to_dataset(
        "binarized-mnist",
        arrays,
        likelihood="bernoulli",
        binarization="static (Larochelle & Murray 2011)",
        width=MNIST_WIDTH,
    )


def load_synthetic(
    *, x_dim: int = 16, z_dim: int = 4, num_train: int = 2000, num_test: int = 500
) -> Dataset:
    """Draws from a fixed LinearGaussian (seeded), whose exact log p(x) is ``truth``'s."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    truth = LinearGaussian(x_dim, z_dim)
    truth.set_params(
        weight=torch.randn(x_dim, z_dim, generator=gen),
        loc=torch.randn(x_dim, generator=gen),
        scale=0.5,
    )
    truth.requires_grad_(False)
    with torch.no_grad():
        chol = torch.linalg.cholesky(truth.marginal().covariance_matrix)
        eps = torch.randn(num_train + num_test, x_dim, generator=gen)
        x = (truth.loc + eps @ chol.T).numpy()
    arrays = {"train": x[:num_train], "test": x[num_train:]}
    return _to_dataset("synthetic", arrays, likelihood="normal", binarization="none", truth=truth)


def load_dataset(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    min_count: int | None = None,
    max_vocab: int | None = None,
) -> Dataset:
    """Load a data set by its command-line name (see ``DATASETS``).

    ``min_count`` and ``max_vocab`` shape the vocabulary of a text data set
    (see :func:`bag_of_words`); ``None`` takes the defaults.

    Examples
    --------
    >>> from inference import load_dataset
    >>> digits = load_dataset("digits")              # bundled with scikit-learn: offline
    >>> digits.split("train").shape[1], digits.likelihood
    (64, 'bernoulli')
    """
    if path is not None:
        where = Path(path).expanduser()
        if where.exists() and not (where.is_file() or where.is_dir()):
            raise DataError(f"--data-path {where} is not a regular file or a folder")
    if name in TEXT_DATASETS:
        vocab = {"min_count": min_count or MIN_COUNT, "max_vocab": max_vocab or MAX_VOCAB}
        if name == "lee":
            return bag_of_words("lee", *read_lee(), **vocab)
        if name == "uci-bow":
            return bag_of_words("uci-bow", *read_uci(_text_path(name, path)), **vocab)
        return bag_of_words("text-folder", *read_text_folder(_text_path(name, path)), **vocab)
    if min_count is not None or max_vocab is not None:
        raise DataError(f"--min-count and --max-vocab shape a vocabulary; {name} is not text")
    if name == "digits":
        return load_digits()
    if name == "binarized-mnist":
        return load_binarized_mnist(path)
    if name == "synthetic":
        return load_synthetic()
    raise DataError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------
# Bags of words

UNK = "<unk>"
MIN_COUNT = 2  # a word seen fewer times in the training documents is <unk>
MAX_VOCAB = 10_000  # words besides <unk>, the most frequent ones
TEXT_TEST_FRACTION = 0.2
DENSE_LIMIT = 2**31  # bytes of the dense (documents x vocabulary) float32 matrix
LEE_FILE = ("test", "test_data", "lee_background.cor")
_TOKEN = re.compile(r"[a-z]{2,}")


def tokenize(text: str) -> list[str]:
    """Lower-case words of two or more letters, English stop words removed.

    Digits and punctuation separate words; the stop words are
    scikit-learn's ``ENGLISH_STOP_WORDS`` (318 words).
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [w for w in _TOKEN.findall(text.lower()) if w not in ENGLISH_STOP_WORDS]


def lee_corpus_path() -> Path:
    """gensim's copy of the Lee background corpus (300 news articles, one per line).

    gensim is located, not imported (its import takes seconds).
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("lee: the corpus ships in gensim's wheel; pip install gensim")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*LEE_FILE)
    if not path.exists():
        raise DataError(f"lee: gensim is installed but has no {path}")
    return path


def _tokens_to_triplets(documents: list[list[str]]):
    """Token lists -> (words, doc, word, count) as :func:`bag_of_words` takes them."""
    index: dict[str, int] = {}
    doc, word = [], []
    for d, tokens in enumerate(documents):
        for token in tokens:
            doc.append(d)
            word.append(index.setdefault(token, len(index)))
    return list(index), np.asarray(doc, np.int64), np.asarray(word, np.int64), None, len(documents)


def read_lee():
    """The Lee background corpus, tokenised: (words, doc, word, count, documents)."""
    path = lee_corpus_path()
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return _tokens_to_triplets([tokenize(line) for line in lines if line.strip()])


def _text_path(name: str, path) -> Path:
    if path is None:
        what = "a docword file or its folder" if name == "uci-bow" else "a folder of .txt files"
        raise DataError(f"{name} needs --data-path: {what}")
    where = Path(path).expanduser()
    if not where.exists():
        raise DataError(f"{name}: no such file or folder: {where}")
    return where


def read_text_folder(folder: Path):
    """Every ``*.txt`` file under ``folder`` (recursively, in sorted order) is one document."""
    if not folder.is_dir():
        raise DataError(f"text-folder: {folder} is not a folder")
    # Regular files only: a FIFO or a device named *.txt would be read for ever.
    files = sorted(f for f in folder.rglob("*.txt") if f.is_file())
    if not files:
        raise DataError(f"text-folder: no .txt files under {folder}")
    try:
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    except OSError as err:
        raise DataError(f"text-folder: cannot read {err.filename}: {err.strerror}") from None
    return _tokens_to_triplets([tokenize(text) for text in texts])


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path)


def _uci_files(where: Path) -> tuple[Path, Path]:
    """(docword, vocab) from a docword file or a folder holding one of each."""
    if where.is_dir():
        docwords = sorted(where.glob("docword*.txt*"))
        if len(docwords) != 1:
            found = ", ".join(p.name for p in docwords) or "none"
            raise DataError(f"uci-bow: {where} needs exactly one docword*.txt file (found {found})")
        docword = docwords[0]
    else:
        docword = where
    vocab = docword.with_name(docword.name.replace("docword", "vocab").removesuffix(".gz"))
    if "docword" not in docword.name or not vocab.exists():
        raise DataError(f"uci-bow: no vocabulary beside {docword} (expected {vocab.name})")
    return docword, vocab


def read_uci(where: Path):
    """The UCI bag-of-words format: ``docword.NAME.txt[.gz]`` and ``vocab.NAME.txt``.

    docword: three header lines D (documents), W (words), NNZ (entries), then
    one ``docID wordID count`` line per entry, ids from 1. vocab: word W on
    line W.
    """
    docword, vocab_file = _uci_files(where)
    try:
        with _open_text(docword) as f:
            header = [f.readline() for _ in range(3)]
            body = np.loadtxt(f, dtype=np.int64, ndmin=2)
        words = vocab_file.read_text(encoding="utf-8", errors="replace").split()
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"uci-bow: cannot read {docword}: {err}") from None
    try:
        num_docs, num_words, nnz = (int(line) for line in header)
    except ValueError:
        raise DataError(f"uci-bow: {docword} lacks the 3 header lines D, W, NNZ") from None
    if body.size == 0:
        body = body.reshape(0, 3)
    problems = [
        (body.shape[1] != 3, f"expected 3 numbers per line, got {body.shape[1]}"),
        (len(body) != nnz, f"the header says {nnz} entries, the file has {len(body)}"),
        (len(words) != num_words, f"the header says {num_words} words, {vocab_file.name} "
         f"has {len(words)}"),
    ]  # fmt: skip
    for bad, why in problems:
        if bad:
            raise DataError(f"uci-bow: {docword}: {why}")
    doc, word, count = body[:, 0] - 1, body[:, 1] - 1, body[:, 2]
    for values, high, what in ((doc, num_docs, "docID"), (word, num_words, "wordID")):
        out = (values < 0) | (values >= high)
        if out.any():
            raise DataError(f"uci-bow: {docword}: {what} {values[out][0] + 1} outside 1..{high}")
    if (count < 1).any():
        raise DataError(f"uci-bow: {docword}: count {count[count < 1][0]} (counts must be >= 1)")
    return words, doc, word, count, num_docs


def bag_of_words(
    name: str,
    words: list[str],
    doc: np.ndarray,
    word: np.ndarray,
    count: np.ndarray | None,
    num_docs: int,
    *,
    min_count: int = MIN_COUNT,
    max_vocab: int = MAX_VOCAB,
) -> Dataset:
    """A text data set from (document, word, count) entries.

    Empty documents are left out; the rest are split 80/20 into train and
    test with a fixed seed. The vocabulary is built from the training
    documents alone: the ``max_vocab`` most frequent words seen at least
    ``min_count`` times, in order of frequency (ties alphabetically), after
    ``<unk>`` (column 0), which takes every other word's tokens. Rows are
    count vectors over that vocabulary.
    """
    count = np.ones(len(doc), np.int64) if count is None else np.asarray(count, np.int64)
    lengths = np.bincount(doc, weights=count, minlength=num_docs)
    kept = np.flatnonzero(lengths > 0)
    if len(kept) < 2:
        raise DataError(f"{name}: {len(kept)} non-empty documents; at least 2 are needed")
    order = kept[np.random.default_rng(SPLIT_SEED).permutation(len(kept))]
    n_test = max(1, int(round(TEXT_TEST_FRACTION * len(order))))
    rows = {"train": order[n_test:], "test": order[:n_test]}
    split_of = np.full(num_docs, -1)
    split_of[rows["train"]] = 0
    in_train = split_of[doc] == 0
    totals = np.bincount(word[in_train], weights=count[in_train], minlength=len(words))
    frequent = [w for w in np.flatnonzero(totals >= min_count)]
    frequent.sort(key=lambda w: (-totals[w], words[w]))
    chosen = frequent[:max_vocab]
    column = np.full(len(words), UNK_INDEX, np.int64)
    column[chosen] = np.arange(1, len(chosen) + 1)
    width = len(chosen) + 1
    if len(kept) * width * 4 > DENSE_LIMIT:
        raise DataError(
            f"{name}: {len(kept):,} documents x {width:,} words would take "
            f"{len(kept) * width * 4 / 2**30:.1f} GiB as a dense matrix; lower --max-vocab"
        )
    arrays = {}
    for split, docs in rows.items():
        position = np.full(num_docs, -1)
        position[docs] = np.arange(len(docs))
        mine = position[doc] >= 0
        matrix = np.zeros((len(docs), width), np.float32)
        np.add.at(matrix, (position[doc[mine]], column[word[mine]]), count[mine])
        arrays[split] = matrix
    description = (
        f"bag of words: {len(kept)} documents, {width:,} words incl. {UNK} "
        f"(min count {min_count}, at most {max_vocab:,})"
    )
    if len(kept) < num_docs:
        description += f", {num_docs - len(kept)} empty documents left out"
    return _to_dataset(
        name, arrays, likelihood="multinomial", binarization=description,
        vocabulary=[UNK, *(words[w] for w in chosen)],
        word_counts=torch.from_numpy(arrays["train"].sum(0)),
    )  # fmt: skip
