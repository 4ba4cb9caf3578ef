"""The runtime shell: the relay, the queue, the kernel rules, the store, the control socket,
metrics, the web prompt, hooks and the daemon that composes them.

Rules of this package: it turns IO into core calls and core actions into IO, and decides
nothing; it imports guard.core, never guard.tools (tests/test_layers.py)."""
