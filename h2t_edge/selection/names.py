"""The names of the methods h2t-edge fits, as they appear in task.json, reports and on the command
line. Defined once here; `h2t_edge.selection.methods` registers what each one does."""

LINEAR = "LINEAR"  # linear probe on the pre-logits
HEAD2TOE = "HEAD2TOE"  # group-lasso ranking of every tap's features, top fraction F (the paper)
HEAD2TOE_LINEAR = "HEAD2TOE+LINEAR"  # HEAD2TOE whose selection always keeps the pre-logits (train's guard)
ALL_L1, ALL_L2, ALL_L21 = "ALL-L1", "ALL-L2", "ALL-L21"  # one regularized head on every feature (baselines)
TABLE1_METHODS = (LINEAR, ALL_L2, ALL_L1, ALL_L21, HEAD2TOE)  # the paper's Table 1 columns, in its order
