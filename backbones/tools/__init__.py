"""Tools that work on every registered backbone: summary, benchmark, export."""
