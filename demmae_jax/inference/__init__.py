"""Using a trained model: restore it from its workdir, apply it (optionally averaged over the 8
square symmetries), score it on a tile split, predict over rasters of any size.

Depends on the models, the core (workdirs, weight port, sharding), the data pipelines and the
GIS output formats, never on `demmae_jax.train` (docs/architecture.md; tests/test_layering.py).
"""
