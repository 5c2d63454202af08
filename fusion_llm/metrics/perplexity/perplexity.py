"""Token-level loss and perplexity from per-token negative log-likelihoods (nats), shipped for offline use.

Unlike the hub's `perplexity` metric (which runs a model itself), this one aggregates losses the
training loop already computed: `add_batch(nll=[...])` per token, then `compute()`.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Mean token negative log-likelihood (nats) and its exponential, perplexity."
_KWARGS_DESCRIPTION = """
Args:
    nll (list of float): one negative log-likelihood per predicted token, in nats.
Returns:
    loss (float): mean nll; perplexity (float): exp(loss).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64")}),
        )

    def _compute(self, nll):
        loss = sum(nll) / max(len(nll), 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
