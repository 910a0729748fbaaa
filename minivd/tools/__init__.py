"""Tools apart from the reading path: the benchmark, random checkpoints and small vocabularies for tests."""
