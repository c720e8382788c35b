"""Config files: ``get_config(arg) -> ml_collections.ConfigDict``, named on the
command line as ``--config configs/<file>.py[:arg]`` (``launch.py``)."""
