"""The ``saga`` command line: wires storage, brokers and the core together."""
