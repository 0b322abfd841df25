"""h2t_edge.steps."""
