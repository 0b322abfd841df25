"""h2t_edge.core."""
