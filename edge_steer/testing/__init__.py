"""Test instrumentation that plugs into the runtime from outside (never imported by production code)."""
