"""Pure numpy analysis of stored outputs: selection rules, statistics, FLOPs, MCMC diagnostics, budget curves."""
