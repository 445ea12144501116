"""The ``ledger`` command line: a thin layer over the library."""
