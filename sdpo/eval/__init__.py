"""What comes out: the H4 harness, log-likelihood requests, the end-of-run report, plots.

Uses the method's metrics and reference pass, never the optimisation loop."""
