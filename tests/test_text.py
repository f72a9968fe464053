"""Documents: bag-of-words data, the multinomial likelihood, word dropout, perplexity."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from inference.ais import annealed_log_marginal, annealing_pair
from inference.bounds import MONTE_CARLO
from inference.commands.cli import main
from inference.data import UNK, DataError, load_dataset, tokenize
from inference.evaluation import evaluate_bounds, perplexity, unigram_perplexity
from inference.tracing import log_importance_weights
from ppl_models import VAE, HierarchicalVAE
from ppl_models.text import (
    BagOfWords,
    WordDropout,
    alpha_for_rate,
    expected_drop_rate,
    keep_logits,
    log_multinomial_coefficient,
)


def _documents(num_docs=40, vocab=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(num_docs, vocab, generator=gen) * 1.5, generator=gen)


# --- the multinomial likelihood ------------------------------------------------------------


def test_bag_of_words_log_prob_is_the_multinomial_pmf():
    # By hand: counts (2, 1, 0) under (0.5, 0.3, 0.2): 3!/(2! 1! 0!) 0.5^2 0.3 = 0.225.
    probs = torch.tensor([0.5, 0.3, 0.2])
    value = torch.tensor([2.0, 1.0, 0.0])
    d = BagOfWords(probs.log() + 7.0, torch.tensor(3.0))  # logits: any shift
    assert d.log_prob(value).item() == pytest.approx(math.log(0.225), abs=1e-6)
    # Against pyro's Multinomial one document at a time, documents of different lengths.
    x = _documents()
    logits = torch.randn(3, 40, 12)
    ours = BagOfWords(logits, x.sum(-1)).log_prob(x)
    for k in range(3):
        for n in range(40):
            total = int(x[n].sum())
            ref = dist.Multinomial(total, logits=logits[k, n]).log_prob(x[n])
            assert ours[k, n].item() == pytest.approx(ref.item(), abs=1e-4)


def test_bag_of_words_checks_its_input_and_samples_documents_of_the_given_lengths():
    d = BagOfWords(torch.zeros(2, 5), torch.tensor([3.0, 4.0]), validate_args=True)
    with pytest.raises(ValueError, match="do not sum"):
        d.log_prob(torch.tensor([[1.0, 1, 0, 0, 0], [4.0, 0, 0, 0, 0]]))
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.manual_seed(0)
    draws = BagOfWords(probs.log(), torch.tensor([0.0, 7.0])).sample((20_000,))
    assert (draws.sum(-1) == torch.tensor([0.0, 7.0])).all()
    mean = draws[:, 1].mean(0)
    stderr = (7 * probs * (1 - probs) / 20_000).sqrt()
    assert ((mean - 7 * probs).abs() < 4 * stderr).all()


def test_multinomial_vae_is_nvdm_and_its_log_px_is_exact_when_z_is_ignored():
    # A decoder that ignores z and a guide equal to the prior: every importance weight is
    # log p(x) = log C(x) + sum_w x_w log pi_w, so ELBO = IWAE = that, and perplexity is
    # the unigram's.
    x = _documents()
    model = VAE(12, likelihood="multinomial", hidden=[8], z_dim=3)
    assert isinstance(model.decoder, torch.nn.Sequential) and len(model.decoder) == 1  # R z + b
    pi = torch.softmax(torch.randn(12), 0)
    with torch.no_grad():
        model.decoder[0].weight.zero_()
        model.decoder[0].bias.copy_(pi.log())
        model.encoder[-1].weight.zero_()
        model.encoder[-1].bias.copy_(torch.cat([torch.zeros(3), torch.full((3,), 0.5413)]))
    exact = log_multinomial_coefficient(x) + (x * pi.log()).sum(-1)
    result = evaluate_bounds(model.model, model.guide, x, ks=[1, 10], progress=False)
    assert torch.allclose(result["iwae"][10].value, exact, atol=1e-3)
    assert torch.allclose(result["elbo"].value, exact, atol=1e-3)
    ppl = perplexity(result["iwae"][10].summary(), x)
    reference = math.exp(-float((x * pi.log()).sum() / x.sum()))
    assert ppl["mean"] == pytest.approx(reference, rel=1e-4)
    assert ppl["error"] == MONTE_CARLO


def test_perplexity_of_the_uniform_model_is_the_vocabulary_size():
    x = _documents(vocab=50).double()
    log_p = log_multinomial_coefficient(x) - x.sum(-1) * math.log(50)
    entry = {"mean": float(log_p.mean()), "stderr": 0.1, "error": MONTE_CARLO}
    ppl = perplexity(entry, x)
    assert ppl["mean"] == pytest.approx(50, rel=1e-9)
    # delta method: d ppl / d mean = ppl / (words per document)
    assert ppl["stderr"] == pytest.approx(50 * 0.1 / float(x.sum(-1).mean()), rel=1e-9)
    # the unigram with add-one counts of a flat corpus is the uniform model too
    assert unigram_perplexity(x, torch.full((50,), 7.0)) == pytest.approx(50, rel=1e-9)


# --- word dropout ---------------------------------------------------------------------------


def test_word_dropout_density_is_the_product_of_binomials_and_keeps_the_length():
    x = _documents()
    logits = torch.randn(5, 40, 12)
    d = WordDropout(x, logits)
    torch.manual_seed(1)
    value = d.sample()
    assert value.shape == (5, 40, 12)
    assert (value.sum(-1) == x.sum(-1)).all() and (value[..., 1:] <= x[..., 1:]).all()
    dense = dist.Binomial(x[..., 1:].expand(5, 40, 11), logits=logits[..., 1:])
    assert torch.allclose(d.log_prob(value), dense.log_prob(value[..., 1:]).sum(-1), atol=1e-4)
    kept = x[..., 1:] * torch.sigmoid(logits[..., 1:])
    assert torch.allclose(d.mean[..., 1:], kept, atol=1e-5)
    assert torch.allclose(d.mean[..., 0], x[..., 0] + (x[..., 1:] - kept).sum(-1), atol=1e-4)


def _dropped_fraction(x, logits, draws=4000):
    torch.manual_seed(0)
    kept = WordDropout(x, logits).sample((draws,))[..., 1:].sum(0)
    return 1 - kept / (draws * x[..., 1:])


def test_uniform_word_dropout_drops_each_token_with_probability_p():
    x = torch.tensor([[0.0, 3, 1, 5, 2]])
    p = 0.3
    logits = keep_logits("word-dropout", p, torch.ones(5))
    dropped = _dropped_fraction(x, logits)
    stderr = math.sqrt(p * (1 - p) / (4000 * 11))
    assert abs(float(1 - (1 - dropped) @ x[0, 1:] / 11) - p) < 4 * stderr
    # each word on its own, too
    tokens = 4000 * x[0, 1:]
    assert ((dropped[0] - p).abs() < 4 * (p * (1 - p) / tokens).sqrt()).all()


def test_frequency_word_dropout_drops_rare_words_more_often():
    x = torch.tensor([[0.0, 4, 4, 4]])
    corpus = torch.tensor([0.0, 1, 10, 1000])  # training counts c(w)
    alpha = 5.0
    dropped = _dropped_fraction(x, keep_logits("word-dropout-freq", alpha, corpus))[0]
    expected = alpha / (corpus[1:] + alpha)  # 0.833, 0.333, 0.005
    stderr = (expected * (1 - expected) / (4000 * 4)).sqrt()
    assert ((dropped - expected).abs() < 4 * stderr + 1e-9).all()
    assert dropped[0] > dropped[1] > dropped[2]


def test_alpha_for_rate_inverts_the_expected_drop_rate():
    counts = torch.tensor([100.0, 1, 2, 3, 50, 400])
    for rate in (0.05, 0.3, 0.7):
        alpha = alpha_for_rate(rate, counts)
        assert expected_drop_rate(alpha, counts) == pytest.approx(rate, abs=1e-9)
    with pytest.raises(ValueError, match="drop rate"):
        alpha_for_rate(1.0, counts)


def test_word_dropout_encoder_bounds_hold_and_ais_anneals_z_alone():
    # The reverse r(x~ | z, x) integrates to one, so the extended IWAE and the IWAE of the
    # decoder alone (the pair AIS anneals) estimate the same log p(x).
    x = _documents(num_docs=6)
    counts = x.sum(0) + 1
    pyro.set_rng_seed(0)
    model = HierarchicalVAE(12, layers=2, likelihood="multinomial", hidden=[16], z_dim=2,
                            corruption="word-dropout-freq:2", word_counts=counts)  # fmt: skip
    assert torch.allclose(model.word_keep_logits, (counts.log() - math.log(2.0)))
    extended = log_importance_weights(model.model, model.guide, x, num_particles=20_000)
    decoder, guide = annealing_pair(model)
    plain = log_importance_weights(decoder, guide, x, num_particles=20_000)
    # log p(x) by quadrature over the 2-d z
    grid = torch.linspace(-7, 7, 281)
    z = torch.cartesian_prod(grid, grid).unsqueeze(1)  # (G, 1, 2)
    with torch.no_grad():
        log_joint = model.likelihood_dist(z, x).log_prob(x) + model.prior(x).log_prob(z)
    exact = torch.logsumexp(log_joint, 0) + 2 * math.log(float(grid[1] - grid[0]))

    def iwae(log_w):
        return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])

    # The extended weights are heavy-tailed (an estimate may overshoot by a few tenths):
    # compare averages over the documents; the decoder's own weights are tame.
    assert abs(float((iwae(extended) - exact).mean())) < 0.3
    assert ((iwae(plain) - exact).abs() < 0.3).all()
    assert (extended.mean(0) < exact).all()  # the ELBO
    # AIS anneals z alone (HMC cannot move the discrete x~) and lands on the quadrature.
    pyro.set_rng_seed(1)
    ais = annealed_log_marginal(decoder, guide, x, num_chains=8, num_temperatures=200)
    assert ((ais.value - exact).abs() < 4 * ais.stderr + 0.05).all()
    with pytest.raises(ValueError, match="needs word counts"):
        HierarchicalVAE(12, layers=2, likelihood="bernoulli", corruption="word-dropout:0.1")
    with pytest.raises(ValueError, match="not word counts"):
        HierarchicalVAE(12, layers=2, likelihood="multinomial", corruption="gaussian:0.1")
    with pytest.raises(ValueError, match="word_counts"):
        HierarchicalVAE(12, layers=2, likelihood="multinomial", corruption="word-dropout-freq:1")


# --- data -----------------------------------------------------------------------------------


def test_lee_corpus_from_gensims_wheel():
    data = load_dataset("lee")
    train, test = data.split("train"), data.split("test")
    assert (train.shape[0], test.shape[0]) == (240, 60)  # 300 news articles, 80/20
    assert data.vocabulary[0] == UNK and data.x_dim == len(data.vocabulary)
    assert data.likelihood == "multinomial"
    assert torch.equal(data.word_counts, train.sum(0))
    assert (data.word_counts[1:] >= 2).all()  # min count 2 in the training documents
    assert (train == train.round()).all() and (train.sum(1) > 0).all()
    # the split and the vocabulary are fixed, whatever the seed: loading again gives them
    again = load_dataset("lee", min_count=5, max_vocab=100)
    assert again.x_dim == 101 and torch.equal(again.split("test").sum(1), test.sum(1))
    assert again.vocabulary[1:] == data.vocabulary[1:101]


def _write_corpus(tmp_path, documents):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(documents):
        (folder / f"doc{i:02d}.txt").write_text(text)
    words = sorted({w for text in documents for w in tokenize(text)})
    index = {w: i + 1 for i, w in enumerate(words)}
    entries = []
    for d, text in enumerate(documents):
        counts = {}
        for w in tokenize(text):
            counts[index[w]] = counts.get(index[w], 0) + 1
        entries += [(d + 1, w, c) for w, c in sorted(counts.items())]
    uci = tmp_path / "uci"
    uci.mkdir()
    body = "".join(f"{d} {w} {c}\n" for d, w, c in entries)
    (uci / "docword.toy.txt").write_text(f"{len(documents)}\n{len(words)}\n{len(entries)}\n{body}")
    (uci / "vocab.toy.txt").write_text("\n".join(words) + "\n")
    return folder, uci


def test_uci_docword_and_a_folder_of_text_give_the_same_data(tmp_path):
    rng = np.random.default_rng(0)
    pool = ["river", "bank", "money", "loan", "water", "stream", "credit", "fish", "boat"]
    documents = [" ".join(rng.choice(pool, size=rng.integers(5, 30))) for _ in range(25)]
    documents.append("the and of")  # only stop words: an empty document, left out
    folder, uci = _write_corpus(tmp_path, documents)
    a = load_dataset("text-folder", path=folder)
    b = load_dataset("uci-bow", path=uci)
    c = load_dataset("uci-bow", path=uci / "docword.toy.txt")
    assert a.vocabulary == b.vocabulary == c.vocabulary
    for split in ("train", "test"):
        assert torch.equal(a.split(split), b.split(split))
        assert torch.equal(b.split(split), c.split(split))
    assert a.split("train").shape[0] + a.split("test").shape[0] == 25
    assert "1 empty documents left out" in a.binarization


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda u: (u / "vocab.toy.txt").unlink(), "no vocabulary beside"),
        (lambda u: _edit(u, 1, "7"), "the header says 7 words"),
        (lambda u: _edit(u, 0, "x"), "lacks the 3 header lines"),
        (lambda u: _edit(u, 3, "1 99 1"), "wordID 99 outside"),
        (lambda u: _edit(u, 3, "1 1 0"), "count 0"),
        (lambda u: _edit(u, 2, "999"), "the header says 999 entries"),
    ],
)
def test_damaged_uci_files_are_named(tmp_path, damage, message):
    _, uci = _write_corpus(tmp_path, ["river bank money", "loan water stream", "fish boat"])
    damage(uci)
    with pytest.raises(DataError, match=message):
        load_dataset("uci-bow", path=uci)


def _edit(uci, line, text):
    path = uci / "docword.toy.txt"
    lines = path.read_text().splitlines()
    lines[line] = text
    path.write_text("\n".join(lines) + "\n")


def test_text_data_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        load_dataset("text-folder", path=empty)
    with pytest.raises(DataError, match="needs --data-path"):
        load_dataset("uci-bow")
    with pytest.raises(DataError, match="is not text"):
        load_dataset("digits", min_count=3)


# --- the command line -----------------------------------------------------------------------


def _one_line_error(capsys, code, fragment):
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("elbolab: error:") and fragment in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "hvae", "--corruption", "word-dropout:0.3"], "needs text data"),
        (["--data", "lee", "--model", "hvae", "--corruption", "salt-pepper:0.1"], "image data"),
        (["--data", "lee", "--model", "hvae", "--corruption", "word-dropout:1.5"], "(0, 1)"),
        (["--data", "lee", "--model", "hvae", "--corruption", "word-dropout-freq:0"], "alpha"),
        (["--min-count", "3"], "needs text data"),
        (["--data", "lee", "--max-vocab", "0"], "--max-vocab must be >= 1"),
        (["--data", "lee", "--model", "linear-gaussian"], "Normal-likelihood"),
    ],
)
def test_bad_text_settings_are_one_line_errors(tmp_path, capsys, args, fragment):
    out = tmp_path / "run"
    _one_line_error(capsys, main(["train", "--out", str(out), "--no-progress", *args]), fragment)
    assert not (out / "checkpoint.pt").exists()


def test_text_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "nvdm"
    small = ["--epochs", "2", "--hidden", "16", "--z-dim", "4", "--max-vocab", "300"]
    assert main(["train", "--data", "lee", "--out", str(run), "--no-progress", *small]) == 0
    assert main(["evaluate", str(run), "--k", "1,10", "--limit", "12", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "perplexity per word" in out and "unigram" in out
    report = json.loads((run / "eval.json").read_text())
    ppl = report["perplexity"]["bounds"]
    assert ppl["IWAE-10"]["mean"] <= ppl["ELBO"]["mean"] + 4 * ppl["ELBO"]["stderr"]

    hvae = tmp_path / "dropout"
    dropout = ["--model", "hvae", "--layers", "2", "--corruption", "word-dropout-freq:3"]
    assert main(["train", "--data", "lee", "--out", str(hvae), "--no-progress", *dropout,
                 *small]) == 0  # fmt: skip
    assert main(["gaps", str(hvae), "--k", "50", "--inner-samples", "1,5", "--limit", "12",
                 "--no-progress", "--logpx", "ais", "--ais-temperatures", "20",
                 "--ais-chains", "2"]) == 0  # fmt: skip
    report = json.loads((hvae / "gaps.json").read_text())
    # L_marg's plug-in needs many inner samples to converge; the paired inequalities hold
    assert not any("VIOLATED" in c["verdict"] for c in report["chain"][1:])
    b = report["bounds"]
    for bound in ("l_aux", "l_h"):  # AIS's log p(x) above every proper lower bound
        assert b["log_px"]["mean"] > b[bound]["mean"] - 3 * b[bound]["stderr"]
    assert {"log_px", "iwae[50]", "l_aux"} <= set(report["perplexity"])

    exp = tmp_path / "exp"
    assert main(["experiment", "word-dropout", "--out", str(exp), "--epochs", "1", "--seeds",
                 "0", "--k", "10", "--inner-samples", "1,2", "--limit", "6", "--hidden", "8",
                 "--z-dim", "2", "--rates", "0.2", "--no-progress"]) == 0  # fmt: skip
    result = json.loads((exp / "experiment.json").read_text())
    assert (exp / "experiment.png").stat().st_size > 0
    assert list(result["table"]) == ["none (L=1)", "uniform 0.2", "frequency 0.2"]
    alpha = result["alphas"]["frequency 0.2"]
    assert result["drop_rates_of_alphas"]["frequency 0.2"] == pytest.approx(0.2, abs=1e-3)
    config = json.loads((exp / "frequency0.2-seed0" / "config.json").read_text())
    assert config["corruption"] == f"word-dropout-freq:{alpha:g}"
    assert "perplexity IWAE" in capsys.readouterr().out
