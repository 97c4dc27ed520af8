"""Remote code of the tiny stand-ins, one package per family, written by this project.

Each family's stand-in is a small model in the shape of the vendor's own remote code (loaded with
``trust_remote_code=True`` through ``auto_map``), because an engine talks to the model through
exactly what this code reproduces: the ``forward`` keyword arguments (BlueLM takes no
``position_ids``; Qwen v1 takes them and ignores them), where positions come from (the cache length
for Qwen v1 and BlueLM), the KV-cache type and layout (legacy tuples with the sequence on dim 1 or
dim 2, or a transformers ``DynamicCache`` for MiniCPM), module and weight names and config fields
(so other tools can treat a stand-in like the real checkpoint), and a config vocabulary larger than
the tokenizer where the real model has one. ``helpers.tiny.build_tiny`` builds a checkpoint folder
from one of these packages: ``make_config(...)`` gives the config, ``MODEL_CLASS`` the random
weights, and the files in ``FILES`` are copied next to them, so the folder loads like the real one.

Each package's contract (used by ``helpers.tiny``)::

    FILES         the .py files copied into the checkpoint folder
    AUTO_MAP      the config's auto_map, as the vendor's config.json has it
    ARCHITECTURE  the vendor's class name (config.architectures)
    MODEL_CLASS   the causal-LM class
    make_config(*, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
                max_positions, bos_token_id, eos_token_id, pad_token_id, init_range, rms_norm_eps)
    CONFIG_ON_DISK  (optional) values written into the saved config.json as the vendor's has them

The facts each one reproduces are asserted by tests/test_standins.py.
"""
