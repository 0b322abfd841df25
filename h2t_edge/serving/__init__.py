"""h2t_edge.serving."""
