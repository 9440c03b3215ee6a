"""What the user writes: the evolve config (evolve.py: mergekit-evolve's schema, checked
against the model folders), the genome (genome.py: a flat CMA-ES vector <-> a merge
recipe <-> mergekit's merge config) and mergekit merge configs (merge.py: read with
every parameter mergekit takes)."""
