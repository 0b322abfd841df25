"""h2t_edge.suite."""
