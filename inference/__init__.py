"""elbolab's library: estimators that work on any Pyro model/guide pair.

Where things are (the command line lives apart, in :mod:`inference.commands`):

- :mod:`.tracing`: scoring a model against a guide with vectorised particles;
  ``log_importance_weights`` and the reconstruction/KL decomposition.
- :mod:`.inspection`: what a pair is made of, judged once (``inspect_pair``),
  and the one-line refusals (``PairError``).
- :mod:`.bounds`: pure tensor functions from log weights to ELBO, IWAE-k and
  their standard errors.
- :mod:`.evaluation`: those bounds over a whole data set.
- :mod:`.objectives`: training objectives (ELBO, IWAE, DReG).
- :mod:`.hierarchical`, :mod:`.surgery`, :mod:`.amortization`: the bounds of
  multi-layer encoders, the aggregate posterior, the Cremer split.
- :mod:`.ais`: annealed importance sampling with HMC and the BDMC sandwich.
- :mod:`.partition`, :mod:`.contrastive`: RBM log Z and CD/PCD training.
- :mod:`.reference`, :mod:`.diagnostics`: NUTS references, PSIS k-hat, ArviZ.
- :mod:`.training`, :mod:`.svi`, :mod:`.runs`, :mod:`.data`: the training
  skeleton, SVI on it, run directories, data sets; :mod:`.user_model`, a
  user's own model named on the command line.
- :mod:`.plots`: figures.

The library never parses arguments and never prints (progress bars aside).
"""

__version__ = "0.1.0"
