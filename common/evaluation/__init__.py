"""Numbers about a model: metrics, CIs, reliability, cross-site, fairness, saliency, plots."""
