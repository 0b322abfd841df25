"""h2t_edge.research."""
