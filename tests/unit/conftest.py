"""The unit tier: pure Python, no root, no kernel programs. Fakes stand in for collectors where the
session or the sinks are under test; the kernel tier (tests/) checks the same code on the real kernel."""
