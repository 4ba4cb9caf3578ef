"""The pure core: parsing, names, rules, the detector, flows, policy and the engine.

Rules of this package: no IO, no clock, no import of guard.shell or guard.tools (checked by
tests/test_layers.py); every entry point takes `now`."""
