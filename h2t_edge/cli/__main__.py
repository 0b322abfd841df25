"""`python -m h2t_edge.cli ...`: the same as the `h2t-edge` command."""

from h2t_edge.cli import main

main()
