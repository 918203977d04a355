"""Layer-wise analysis of representations: mutual information (MINE, clustering), CCA, plots."""
