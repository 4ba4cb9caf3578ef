"""The simulated world for end-to-end tests and `hushgate demo`: namespaces, a cloud, speakers.

Rules of this package: nothing here is imported by the guard itself; it exists to exercise the
guard from outside, with real kernels, real TLS and real traffic shapes. Every process and
namespace it creates is bounded in time and removed on exit (see `topology`).

Modules: `topology` (namespaces, router, dnsmasq, lifecycle), `cloud` (TLS/UDP servers that
count what they receive), `speaker` (the speaker simulator), `profiles` (upload shapes), `certs`
(a throw-away CA), `wire` (the speaker<->cloud frame protocol), `quic` (QUIC v1 Initial packets).
"""
