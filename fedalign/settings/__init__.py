"""Each strategy's settings: one frozen dataclass per method, Flower-free.

A settings class owns its defaults, validates itself from the composed config
(``from_config``), and writes what the silos need into a message's ``config`` record
(``to_wire``); the silos read it back through the same class (``from_wire``). Strategy names
map to their settings in ``catalog``; ``strategies/registry.py`` maps them to strategies.
"""
