"""Sample crews, graphs and tools used by the demo config and the tests."""
