r"""Documents as bags of words: the multinomial likelihood and word dropout.

A document is a vector of word counts x over a vocabulary whose column 0 is
the unknown token ``<unk>`` (:data:`UNK_INDEX`). elbolab's VAEs become
document models with ``likelihood="multinomial"``: the VAE is then NVDM
(Miao, Yu & Blunsom 2016),

    z ~ N(0, I),   x | z ~ Multinomial(N_d, softmax(R z + b)),

with the document length N_d = sum_w x_w given (observed), and q(z | x) a
diagonal Normal from an MLP of log(1 + x).

log p(x) here is the probability of the *bag* (the count vector). The
probability of the document's words in their given order, which perplexity
is defined from (NVDM, ProdLDA), differs from it by the multinomial
coefficient N_d! / prod_w x_w!, which does not depend on the model:
:func:`log_multinomial_coefficient`.

Word dropout (Iyyer et al. 2015; Goldberg 2017, ch. 8) replaces each token
of a word w by ``<unk>`` with probability ``1 - keep_w``: uniformly
(keep_w = 1 - p) or by frequency (drop_w = alpha / (c(w) + alpha), c(w) the
word's count in the training corpus, so rare words are dropped more often).
As the first layer of the hierarchical encoder it is the denoising
criterion for text: :class:`WordDropout` is its density p(x~ | x).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints

UNK_INDEX = 0  # the unknown token's column in every vocabulary


def log_multinomial_coefficient(counts: torch.Tensor) -> torch.Tensor:
    """log(N! / prod_w x_w!) per document (the last dimension is the vocabulary)."""
    return torch.lgamma(counts.sum(-1) + 1) - torch.lgamma(counts + 1).sum(-1)


class BagOfWords(dist.TorchDistribution):
    r"""Multinomial over the vocabulary with one total count per document.

    ``pyro.distributions.Multinomial`` takes a single integer ``total_count``
    for the whole batch; documents differ in length. The density is the
    same normalised multinomial pmf, ``log N! - sum_w log x_w! + sum_w x_w
    log pi_w`` (tested against ``pyro.distributions.Multinomial`` one
    document at a time).

    Parameters
    ----------
    logits : torch.Tensor
        Unnormalised log word probabilities, shape (..., V).
    total_count : torch.Tensor
        Words per document, shape broadcastable to the batch (...).
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.independent(constraints.nonnegative_integer, 1)

    def __init__(self, logits: torch.Tensor, total_count: torch.Tensor, validate_args=None):
        batch_shape = torch.broadcast_shapes(logits.shape[:-1], total_count.shape)
        event_shape = logits.shape[-1:]
        self.logits = torch.log_softmax(logits, -1).expand(batch_shape + event_shape)
        self.total_count = total_count.expand(batch_shape)
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BagOfWords, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        new.total_count = self.total_count.expand(batch_shape)
        super(BagOfWords, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.total_count.unsqueeze(-1) * self.logits.exp()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
            if not torch.equal(*torch.broadcast_tensors(value.sum(-1), self.total_count)):
                raise ValueError("BagOfWords: a document's counts do not sum to its total_count")
        # The coefficient on the value's own shape: it is shared by every particle.
        return log_multinomial_coefficient(value) + (value * self.logits).sum(-1)

    @torch.no_grad()
    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        probs = self.logits.exp().expand(shape).reshape(-1, shape[-1])
        totals = self.total_count.expand(shape[:-1]).reshape(-1).long()
        counts = torch.zeros_like(probs)
        longest = int(totals.max()) if totals.numel() else 0
        if longest > 0:
            words = torch.multinomial(probs, longest, replacement=True)
            used = torch.arange(longest, device=probs.device) < totals.unsqueeze(-1)
            counts.scatter_add_(-1, words, used.to(probs.dtype))
        return counts.reshape(shape)


class WordDropout(dist.TorchDistribution):
    r"""p(x~ | x): each token of word w kept with probability sigmoid(keep_logits_w), else <unk>.

    The kept counts of the words other than ``<unk>`` are independent
    binomials, x~_w ~ Binomial(x_w, keep_w); the ``<unk>`` count is what
    remains, so the document length is unchanged and the density is the
    product of those binomials (``pyro.distributions.Binomial``). Only the
    words a document holds enter (a word with x_w = 0 has x~_w = 0 and a
    factor of one): a few percent of the vocabulary, so sampling and scoring
    take a few percent of the dense cost.

    Parameters
    ----------
    counts : torch.Tensor
        The clean documents x, shape (..., V); pass them unexpanded (their
        batch shape broadcasts against ``keep_logits``'s).
    keep_logits : torch.Tensor
        logit of each word's keeping probability, shape broadcastable to
        ``counts``; the ``<unk>`` column is ignored (it is never dropped).
    """

    arg_constraints = {"keep_logits": constraints.real_vector}
    support = constraints.independent(constraints.nonnegative_integer, 1)

    def __init__(self, counts: torch.Tensor, keep_logits: torch.Tensor, validate_args=None):
        shape = torch.broadcast_shapes(counts.shape, keep_logits.shape)
        self.counts = counts.expand(shape)
        self.keep_logits = keep_logits.expand(shape)
        words = counts[..., UNK_INDEX + 1 :]
        held = int((words != 0).sum(-1).max()) if words.numel() else 0
        absent = (words == 0).to(torch.uint8)  # each document's words first, in column order
        columns = torch.argsort(absent, dim=-1, stable=True)[..., : max(held, 1)]
        self.columns = (columns + UNK_INDEX + 1).expand(shape[:-1] + columns.shape[-1:])
        super().__init__(shape[:-1], shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(WordDropout, _instance)
        shape = torch.Size(batch_shape) + self.event_shape
        new.counts = self.counts.expand(shape)
        new.keep_logits = self.keep_logits.expand(shape)
        new.columns = self.columns.expand(shape[:-1] + self.columns.shape[-1:])
        super(WordDropout, new).__init__(shape[:-1], self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _kept(self) -> dist.Binomial:
        """The binomials of the words the documents hold (padding columns have zero counts)."""
        return dist.Binomial(
            total_count=self.counts.gather(-1, self.columns),
            logits=self.keep_logits.gather(-1, self.columns),
            validate_args=self._validate_args,
        )

    def _document(self, kept: torch.Tensor) -> torch.Tensor:
        """Kept counts of the held words -> x~ over the vocabulary, dropped tokens as ``<unk>``."""
        columns = self.columns.expand(kept.shape)
        full = torch.zeros(kept.shape[:-1] + self.event_shape, dtype=kept.dtype, device=kept.device)
        full.scatter_(-1, columns, kept)
        dropped = self.counts[..., UNK_INDEX + 1 :].sum(-1) - kept.sum(-1)
        full[..., UNK_INDEX] = self.counts[..., UNK_INDEX] + dropped
        return full

    @property
    def mean(self) -> torch.Tensor:
        return self._document(self._kept().mean)

    @torch.no_grad()
    def sample(self, sample_shape=()) -> torch.Tensor:
        return self._document(self._kept().sample(sample_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        kept = value.gather(-1, self.columns.expand(value.shape[:-1] + self.columns.shape[-1:]))
        return self._kept().log_prob(kept).sum(-1)


def keep_logits(kind: str, level: float, word_counts: torch.Tensor) -> torch.Tensor:
    """logit of each word's keeping probability for ``word-dropout:P`` or ``word-dropout-freq:A``.

    Uniform: keep = 1 - P for every word. Frequency-based: drop = A / (c + A),
    so keep = c / (c + A) and its logit is log c - log A (c = the word's count
    in the training corpus, at least 1 for every word of the vocabulary).
    """
    if kind == "word-dropout":
        return torch.full_like(word_counts, math.log1p(-level) - math.log(level))
    if kind == "word-dropout-freq":
        return word_counts.clamp_min(1).log() - math.log(level)
    raise ValueError(f"{kind!r} is not a word dropout")


def expected_drop_rate(alpha: float, word_counts: torch.Tensor) -> float:
    """Fraction of the corpus's tokens (except ``<unk>``) that ``word-dropout-freq:alpha`` drops."""
    counts = word_counts[UNK_INDEX + 1 :].double()
    return float((counts * alpha / (counts + alpha)).sum() / counts.sum())


def alpha_for_rate(rate: float, word_counts: torch.Tensor) -> float:
    """The alpha at which frequency-based dropout drops ``rate`` of the tokens (bisection)."""
    if not 0 < rate < 1:
        raise ValueError(f"a drop rate must lie in (0, 1), got {rate}")
    low, high = 0.0, 1.0
    while expected_drop_rate(high, word_counts) < rate:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_drop_rate(mid, word_counts) < rate else (low, mid)
    return (low + high) / 2
