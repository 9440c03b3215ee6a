"""Everything between a YAML file and a score: config, genome, plan, deltas, scoring."""
