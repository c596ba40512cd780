"""``fl-sim``: virtual hospitals on public data, Flower's simulation engine, baselines."""
