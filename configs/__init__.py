"""The configuration files (big_vision style: `get_config(arg)` returns an ml_collections
ConfigDict), importable as a package (`configs.dem_pretrain`, installed with the project by
`make venv`) and loadable by path as scripts take them: `--config configs/dem_pretrain.py:cpu`.
A config file given by path imports what it shares from this package (`from configs import
common`)."""
