"""hushgate: a network-level egress guard for smart speakers.

The package is split into a pure core (packet, flow, names, ruleset, detector, policy, engine),
which never does IO nor reads the clock, and a thin shell (nfqueue, firewall, control, store,
metrics, web, daemon, cli) that feeds it.
"""

__version__ = "0.1.0"
