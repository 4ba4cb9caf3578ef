"""What a person runs: the CLI, analyze, watch, doctor, discover, demo and the UCI mapping.

Rules of this package: it may import guard.core and guard.shell; the simulator (hushsim) only
inside the commands that need it, with a one-line message when it is missing."""
