"""One module per engine. None of them is imported by ``import parallel_hydra``."""
